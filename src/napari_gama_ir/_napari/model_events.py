"""Events shared by the plugin's widgets: a model trained in one is offered at once by the others."""

from psygnal import Signal


class ModelEvents:
    """``registered`` is emitted with the name of a newly saved user model."""

    registered = Signal(str)


model_events = ModelEvents()
