"""Helpers shared by the plugin's widgets: image layers, their axes, and one-sentence errors."""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator

from napari.utils.notifications import show_error

from ..engine.axes import guess_axes
from ..engine.calibration import PixelSizes, unit_name


def image_layer_names(viewer) -> list[str]:
    from napari.layers import Image

    return [layer.name for layer in viewer.layers if isinstance(layer, Image)]


def watch_layer_names(viewer, on_renamed) -> None:
    """Connect ``on_renamed``, a widget's method, to the name events of every layer of ``viewer``:
    call again as layers are added (napari ignores a second connection, and keeps only a weak
    reference to the widget)."""
    for layer in viewer.layers:
        layer.events.name.connect(on_renamed)


def refresh_after_rename(boxes: list, refresh: Callable[[], None], layer) -> None:
    """Refresh layer choices (``refresh``) after ``layer`` was renamed; those of ``boxes`` that showed
    it show it under its new name. They kept the old name, which named no layer any more: restoring
    then failed with "choose an image layer", and a refresh alone would pick another layer."""
    shown = [box.value for box in boxes]
    refresh()
    for box, value in zip(boxes, shown):
        if value not in box.choices:
            box.value = layer.name


def find_layer(viewer, name):
    return viewer.layers[name] if name in viewer.layers else None


def layer_data(layer):
    """The layer's full-resolution array (the first level of a multiscale layer), never copied."""
    return layer.data[0] if layer.multiscale else layer.data


def axes_guess(layer) -> str:
    """Axes as napari shows the layer, or "" when they cannot be guessed (the user types them)."""
    try:
        return guess_axes(layer_data(layer).shape, rgb=layer.rgb)
    except ValueError:
        return ""


def has_alpha(layer, axes: str) -> bool:
    """Whether the layer is RGBA: napari shows its last channel as opacity, so it is not restored."""
    return bool(layer.rgb) and axes.endswith("C") and layer_data(layer).shape[-1] == 4


def layer_pixel_size(layer, axes: str) -> PixelSizes:
    """The layer's scale and units along ``axes`` where they say more than 1 pixel (napari's
    dimensions leave out an RGB layer's channels)."""
    dims = axes[:-1] if layer.rgb else axes
    sizes = {}
    for axis, size, unit in zip(dims, layer.scale, layer.units):
        if axis != "C" and (size != 1 or unit_name(str(unit))):
            sizes[axis] = (float(size), unit_name(str(unit)))
    return sizes


def report_error(status, error: BaseException) -> None:
    """Show ``error`` as one sentence in the widget's status line and as a napari notification."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    status.value = f"error: {message}"
    show_error(f"GAMA-IR: {message}")


class WorkerRuntimeError(Exception):
    """A RuntimeError raised in a widget's background steps, passed on under another type."""


def runtime_errors_reported(steps: Callable[..., Generator]) -> Callable[..., Generator]:
    """``steps``, a generator function for a napari worker, with its RuntimeErrors raised as
    :class:`WorkerRuntimeError` (the message kept, the original as the cause).

    superqt's generator workers take a RuntimeError for a sign that the worker itself was deleted:
    they drop it with a warning and report neither "errored" nor "finished". A tile too large for
    memory (``TileTooLargeError``) left "Restore all" running so for good, its buttons disabled and
    its progress bar open, with no word of why.
    """

    @functools.wraps(steps)
    def reported(*args, **kwargs):
        try:
            return (yield from steps(*args, **kwargs))
        except RuntimeError as error:
            raise WorkerRuntimeError(str(error)) from error

    return reported
