"""Headless napari tests of the Fine-tune widget: live plot, cancel, resume, registration."""

import json

import numpy as np
import pytest

napari = pytest.importorskip("napari", reason="the napari extra is not installed")

from napari_gama_ir import create_model, save_checkpoint  # noqa: E402
from napari_gama_ir._napari.finetune_widget import NEW, SELF_SUPERVISED, FineTuneWidget, runs_dir  # noqa: E402
from napari_gama_ir._napari.model_events import model_events  # noqa: E402
from napari_gama_ir._napari.restore_widget import CHECKPOINT_FILE, RestoreWidget  # noqa: E402

from .conftest import make_tiny_model  # noqa: E402
from .test_train import smooth_stack  # noqa: E402


@pytest.fixture(autouse=True)
def private_models(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_GAMA_IR_HOME", str(tmp_path / "home"))


def open_widget(viewer, name) -> FineTuneWidget:
    _, widget = viewer.window.add_plugin_dock_widget("napari-gama-ir", name)
    return widget


def test_train_plot_cancel_resume_and_register(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    noisy, clean = smooth_stack(planes=6, size=48)
    viewer.add_image(noisy, name="noisy")
    viewer.add_image(clean, name="clean")
    restore_widget = open_widget(viewer, "Restore")
    assert isinstance(restore_widget, RestoreWidget)
    widget = open_widget(viewer, "Fine-tune")
    assert isinstance(widget, FineTuneWidget)
    assert widget.axes.value == "ZYX" and widget.start_model.value == NEW + "gama_ir_xs"
    widget.noisy.value, widget.clean.value = "noisy", "clean"
    widget.steps.value, widget.batch.value, widget.patch.value = 40, 2, 32
    widget.name.value = "tuned"

    worker = widget.start()
    qtbot.waitUntil(lambda: len(widget.plot.steps) >= 5, timeout=30000)
    assert widget.plot.draws >= 1 and widget.plot.losses[0] > 0
    assert not widget.start_button.enabled and widget.cancel_button.enabled
    with qtbot.waitSignal(worker.paused, timeout=30000):
        widget.toggle_pause()
    assert widget.pause_button.text == "Continue" and widget.status.value.startswith("paused at step")
    steps_when_paused = len(widget.plot.steps)
    qtbot.wait(500)
    assert len(widget.plot.steps) == steps_when_paused  # no step runs while paused
    with qtbot.waitSignal(worker.finished, timeout=30000):
        widget.cancel()  # also wakes a paused run so that it can write its checkpoint
    stopped_at = json.loads((runs_dir() / "tuned" / "checkpoint" / "training.json").read_text())["step"]
    assert 5 <= stopped_at < 40
    assert f"stopped at step {stopped_at}" in widget.status.value
    assert widget.resume_button.enabled and widget.start_button.enabled
    assert "tuned" not in restore_widget.model.choices  # nothing registered before the run ends

    # Resume from the checkpoint and let it finish: the plot restarts at the checkpoint's step.
    worker = widget.resume()
    qtbot.waitUntil(lambda: len(widget.plot.steps) >= 1, timeout=30000)
    assert widget.plot.steps[0] == stopped_at + 1
    with qtbot.waitSignal(worker.finished, timeout=120000):
        pass
    assert widget.status.value.startswith("done: saved as 'tuned'"), widget.status.value
    assert widget.plot.steps[-1] == 40 and widget.plot.score_steps
    model = create_model("tuned")
    assert model.config.metadata["training"]["step"] == 40
    assert "tuned" in restore_widget.model.choices  # offered at once by the Restore widget
    # Start never replaces a saved model: the name moves on, and the old name is refused.
    assert widget.name.value == "tuned-2"
    widget.name.value = "tuned"
    assert widget.start() is None and "a model named 'tuned' exists already" in widget.status.value
    assert create_model("tuned").config.metadata["training"]["step"] == 40


def test_the_default_name_is_one_no_model_or_run_has(make_napari_viewer):
    """The default name was always "my-model", so each new fine-tuning replaced the last one's model."""
    from napari_gama_ir.model import save_user_model

    viewer = make_napari_viewer()
    assert open_widget(viewer, "Fine-tune").name.value == "my-model"
    save_user_model(make_tiny_model(1), "my-model")
    (runs_dir() / "my-model-2").mkdir(parents=True)  # a run stopped before it saved a model
    assert FineTuneWidget(viewer).name.value == "my-model-3"


def run_to_its_end(make_napari_viewer, qtbot, monkeypatch) -> tuple[FineTuneWidget, list[str]]:
    """A short fine-tuning run on two small planes, started and waited for; with the error
    notifications it showed."""
    shown = []
    monkeypatch.setattr("napari_gama_ir._napari.layers.show_error", shown.append)
    viewer = make_napari_viewer()
    noisy, clean = smooth_stack(planes=2, size=48)
    viewer.add_image(noisy, name="noisy")
    viewer.add_image(clean, name="clean")
    widget = open_widget(viewer, "Fine-tune")
    widget.noisy.value, widget.clean.value = "noisy", "clean"
    widget.steps.value, widget.batch.value, widget.patch.value = 4, 2, 32
    with qtbot.waitSignal(widget.start().finished, timeout=30000):
        pass
    return widget, shown


def test_a_runtime_error_in_training_is_reported_and_ends_the_run(make_napari_viewer, qtbot, monkeypatch):
    from napari_gama_ir.train import Trainer

    def failing(self):
        raise RuntimeError("simulated failure in a training step")
        yield  # a generator, as Trainer.run

    monkeypatch.setattr(Trainer, "run", failing)
    widget, shown = run_to_its_end(make_napari_viewer, qtbot, monkeypatch)
    assert widget.status.value == "error: simulated failure in a training step"
    assert shown == ["GAMA-IR: simulated failure in a training step"]
    assert widget.worker is None and widget.start_button.enabled and not widget.cancel_button.enabled


def test_a_step_beyond_the_cpu_memory_is_refused_and_napari_lives_on(make_napari_viewer, qtbot, monkeypatch):
    # The widget takes patches up to 1024 and batches up to 1024: run, such a step had the system
    # kill the process, napari with it. Here the memory available is made too small for 2 x 32 x 32.
    monkeypatch.setattr("napari_gama_ir.engine.memory.available_memory", lambda: 10**6)
    widget, shown = run_to_its_end(make_napari_viewer, qtbot, monkeypatch)
    assert widget.status.value.startswith("error: a training step on 2 patches of 32x32 pixels takes about ")
    assert widget.status.value.endswith("use a smaller batch or patch") and len(shown) == 1
    assert widget.plot.steps == [] and widget.start_button.enabled and not widget.cancel_button.enabled


def test_closing_the_viewer_stops_training_previews_and_model_updates(make_napari_viewer, qtbot, tmp_path):
    # napari deletes dock widgets with their viewer without a closeEvent. The Restore widget stayed
    # subscribed to new models, and the next registration failed on its deleted model list.
    viewer = make_napari_viewer()
    noisy, clean = smooth_stack(planes=6, size=48)
    viewer.add_image(noisy, name="noisy")
    viewer.add_image(clean, name="clean")
    restore_widget = open_widget(viewer, "Restore")
    restore_widget.model.value = CHECKPOINT_FILE
    restore_widget.checkpoint.value = save_checkpoint(make_tiny_model(1), tmp_path / "tiny")
    planes = restore_widget.preview().data
    widget = open_widget(viewer, "Fine-tune")
    widget.noisy.value, widget.clean.value = "noisy", "clean"
    widget.steps.value, widget.batch.value, widget.patch.value = 100000, 2, 32
    widget.name.value = "closed"
    worker = widget.start()
    qtbot.waitUntil(lambda: len(widget.plot.steps) >= 2, timeout=30000)
    deleted = []
    for dock_widget in (restore_widget, widget):
        dock_widget.destroyed.connect(lambda: deleted.append(True))
    viewer.close()
    qtbot.waitUntil(lambda: len(deleted) == 2, timeout=10000)
    # napari quits its workers as the window closes: the steps made were lost without a checkpoint.
    state = runs_dir() / "closed" / "checkpoint" / "training.json"
    qtbot.waitUntil(lambda: not worker.is_running and state.is_file(), timeout=30000)
    assert 2 <= json.loads(state.read_text())["step"] < 100000
    assert planes.closed
    model_events.registered.emit("another")  # raised EmitLoopError from the deleted model list


def test_self_supervised_choice_and_bad_settings(make_napari_viewer, monkeypatch):
    shown = []
    monkeypatch.setattr("napari_gama_ir._napari.layers.show_error", shown.append)
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((2, 32, 32), np.float32), name="noisy")
    widget = open_widget(viewer, "Fine-tune")
    assert widget.clean.value == SELF_SUPERVISED and not widget.method.native.isHidden()
    assert widget._settings().objective == "noise2void"
    widget.clean.value = "noisy"
    assert widget.method.native.isHidden()  # supervised: no self-supervised method to choose
    assert widget.start() is None
    assert len(shown) == 1 and "another layer than the noisy one" in shown[0]
    widget.clean.value = SELF_SUPERVISED
    widget.axes.value = "YX"
    assert widget.start() is None
    assert "name 2 dimensions" in shown[-1]
    widget.axes.value = "ZYX"
    widget.name.value = "bad/name"
    assert widget.start() is None
    assert "model name 'bad/name' must be" in shown[-1] and len(shown) == 3


def test_rgba_layers_train_on_their_colours(make_napari_viewer):
    viewer = make_napari_viewer()
    rgba = np.random.default_rng(0).integers(0, 256, (48, 48, 4), dtype=np.uint8)
    viewer.add_image(rgba, name="noisy", rgb=True)
    viewer.add_image(rgba.copy(), name="clean", rgb=True)
    widget = open_widget(viewer, "Fine-tune")
    widget.noisy.value, widget.clean.value = "noisy", "clean"
    data = widget._data()
    assert data.channels == 3 and data.pairs[0].axes == "YXC"  # the opacity channel is left out
    assert np.array_equal(data.pairs[0].noisy.compute(), rgba[..., :3])


def test_a_layer_of_a_microscopes_channels_trains_no_colour_network(make_napari_viewer):
    viewer = make_napari_viewer()
    stains = np.random.default_rng(0).random((3, 48, 48), dtype=np.float32)  # DAPI, GFP, RFP
    viewer.add_image(stains, name="noisy")
    widget = open_widget(viewer, "Fine-tune")
    widget.noisy.value, widget.clean.value, widget.axes.value = "noisy", SELF_SUPERVISED, "CYX"
    assert widget._data().colour is False  # a new network of it is "3 channels", not "rgb" (test_train)
