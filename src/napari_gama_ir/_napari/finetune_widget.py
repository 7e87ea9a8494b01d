"""The Fine-tune dock widget: train on the user's layers with a live loss plot, a thin shell over ``train``."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import ComboBox, Container, FloatSpinBox, Label, LineEdit, PushButton, SpinBox
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.qt.threading import create_worker
from napari.utils.notifications import show_info
from napari.utils.theme import get_theme
from qtpy.QtWidgets import QVBoxLayout, QWidget

from ..engine.axes import parse_axes
from ..engine.runner import forget_kept_runner
from ..model import (
    check_user_model_name,
    create_model,
    list_models,
    save_user_model,
    shipped_model_names,
    user_model_names,
    user_models_dir,
)
from ..train import (
    Trainer,
    TrainSettings,
    data_from_arrays,
    default_normalization,
    remove_run,
    resume_trainer,
    starting_model,
)
from ..train.trainer import CHECKPOINT_DIR, STATE_FILE
from .layers import (
    axes_guess,
    find_layer,
    has_alpha,
    image_layer_names,
    layer_data,
    refresh_after_rename,
    report_error,
    runtime_errors_reported,
    watch_layer_names,
)
from .model_events import model_events

if TYPE_CHECKING:
    import napari

SELF_SUPERVISED = "none (self-supervised)"
NEW = "new network: "
REDRAW_SECONDS = 0.2  # the plot redraws at most this often; every step is still recorded


def starting_choices() -> list[str]:
    """New networks of each registered architecture, then shipped and user models to fine-tune."""
    new = [NEW + spec.name for spec in list_models()]
    default = NEW + "gama_ir_xs"
    return [default] + [c for c in new if c != default] + shipped_model_names() + user_model_names()


def runs_dir() -> Path:
    """Where fine-tuning runs keep their checkpoints, beside the user's models."""
    return user_models_dir().parent / "runs"


def free_name(stem: str = "my-model") -> str:
    """``stem``, else ``stem-2``, ``stem-3``...: the first name of no saved model and no run, so that
    the default name never replaces yesterday's model."""
    taken = set(user_model_names()) | ({p.name for p in runs_dir().iterdir()} if runs_dir().is_dir() else set())
    names = itertools.chain([stem], (f"{stem}-{number}" for number in itertools.count(2)))
    return next(name for name in names if name not in taken)


class LossPlot(FigureCanvasQTAgg):
    """Training loss per step and the validation score per validation, drawn without blocking."""

    def __init__(self, background: str = "white", text: str = "black") -> None:
        self.figure = Figure(figsize=(4, 3.2), tight_layout=True, facecolor=background)
        super().__init__(self.figure)
        self.loss_axes = self.figure.add_subplot(211)
        self.score_axes = self.figure.add_subplot(212)
        for axes in (self.loss_axes, self.score_axes):
            axes.set_facecolor(background)
            axes.tick_params(colors=text)
            axes.xaxis.label.set_color(text)
            axes.yaxis.label.set_color(text)
            for spine in axes.spines.values():
                spine.set_color(text)
        (self.loss_line,) = self.loss_axes.plot([], [], lw=0.8, color="tab:blue")
        (self.score_line,) = self.score_axes.plot([], [], "o-", ms=3, color="tab:orange")
        self.loss_axes.set_ylabel("training loss")
        self.score_axes.set_xlabel("step")
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.score_steps: list[int] = []
        self.scores: list[float] = []
        self._drawn_at = 0.0
        self.draws = 0

    def clear(self, score_name: str = "validation PSNR (dB)") -> None:
        for values in (self.steps, self.losses, self.score_steps, self.scores):
            values.clear()
        self.score_axes.set_ylabel(score_name)
        self.refresh(force=True)

    def add(self, step: int, loss: float, validation: dict | None) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        if validation:
            score = validation.get("psnr", validation.get("loss"))
            if score is not None:
                self.score_steps.append(step)
                self.scores.append(score)
        self.refresh(force=bool(validation))

    def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._drawn_at < REDRAW_SECONDS:
            return
        self.loss_line.set_data(self.steps, self.losses)
        self.score_line.set_data(self.score_steps, self.scores)
        for axes in (self.loss_axes, self.score_axes):
            axes.relim()
            axes.autoscale_view()
        self.draw_idle()
        self._drawn_at = time.monotonic()
        self.draws += 1


class FineTuneWidget(QWidget):
    """Fine-tune or train a network on a noisy layer and a clean layer (or the noisy one alone)."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.noisy = ComboBox(label="noisy", choices=self._image_layer_names)
        self.clean = ComboBox(label="clean", choices=lambda _: [SELF_SUPERVISED, *self._image_layer_names()])
        self.method = ComboBox(label="method", choices=["noise2void", "neighbor2neighbor"], value="noise2void")
        self.axes = LineEdit(label="axes")
        self.start_model = ComboBox(label="start from", choices=lambda _: starting_choices())
        self.steps = SpinBox(label="steps", min=1, max=10_000_000, value=2000)
        self.patch = SpinBox(label="patch", min=16, max=1024, step=8, value=64)
        self.batch = SpinBox(label="batch", min=1, max=1024, value=8)
        self.learning_rate = FloatSpinBox(label="learning rate", min=1e-6, max=1.0, step=1e-4, value=1e-3)
        self.device = ComboBox(label="device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self.name = LineEdit(label="save as", value=free_name())
        self.start_button = PushButton(text="Start")
        self.pause_button = PushButton(text="Pause", enabled=False)
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.resume_button = PushButton(text="Resume", enabled=False)
        self.status = Label(value="")
        self.form = Container(widgets=[
            self.noisy, self.clean, self.method, self.axes, self.start_model, self.steps, self.patch, self.batch,
            self.learning_rate, self.device, self.name, self.start_button, self.pause_button, self.cancel_button,
            self.resume_button, self.status,
        ])
        self.learning_rate.native.setDecimals(6)
        theme = get_theme(self.viewer.theme)
        self.plot = LossPlot(theme.background.as_hex(), theme.text.as_hex())
        layout = QVBoxLayout(self)
        layout.addWidget(self.form.native)
        layout.addWidget(self.plot)
        self.worker = None
        self.trainer: Trainer | None = None
        self._cancel_requested = False
        self.destroyed.connect(lambda: self._release())

        self.noisy.changed.connect(self._guess_axes)
        self.clean.changed.connect(self._show_method)
        self.name.changed.connect(self._update_resume)
        self.start_button.changed.connect(self.start)
        self.pause_button.changed.connect(self.toggle_pause)
        self.cancel_button.changed.connect(self.cancel)
        self.resume_button.changed.connect(self.resume)
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()

    # -- choices -------------------------------------------------------------------------------
    def _image_layer_names(self, _=None) -> list[str]:
        return image_layer_names(self.viewer)

    def _refresh_layers(self, _=None) -> None:
        watch_layer_names(self.viewer, self._layer_renamed)
        self.noisy.reset_choices()
        self.clean.reset_choices()
        self._guess_axes()
        self._show_method()
        self._update_resume()

    def _layer_renamed(self, event) -> None:
        refresh_after_rename([self.noisy, self.clean], self._refresh_layers, event.source)

    def _show_method(self, _=None) -> None:
        self.method.visible = self.clean.value == SELF_SUPERVISED

    def _guess_axes(self, _=None) -> None:
        layer = find_layer(self.viewer, self.noisy.value)
        if layer is not None:
            self.axes.value = axes_guess(layer)

    def run_folder(self) -> Path:
        return runs_dir() / self.name.value.strip()

    def _update_resume(self, _=None) -> None:
        running = self.worker is not None
        can_resume = bool(self.name.value.strip()) and (self.run_folder() / CHECKPOINT_DIR / STATE_FILE).is_file()
        self.resume_button.enabled = can_resume and not running

    # -- starting and resuming -----------------------------------------------------------------
    def _data(self):
        noisy_layer = find_layer(self.viewer, self.noisy.value)
        if noisy_layer is None:
            raise ValueError("choose the noisy image layer")
        clean_layer = None if self.clean.value == SELF_SUPERVISED else find_layer(self.viewer, self.clean.value)
        if clean_layer is not None and clean_layer.name == noisy_layer.name:  # napari hands out proxies: compare names
            raise ValueError("the clean layer must be another layer than the noisy one")
        axes = parse_axes(self.axes.value, layer_data(noisy_layer).ndim)
        noisy = _colours(noisy_layer, axes)
        clean = None if clean_layer is None else _colours(clean_layer, axes)
        return data_from_arrays(noisy, clean, axes=axes, name=noisy_layer.name, rgb=bool(noisy_layer.rgb))

    def _settings(self) -> TrainSettings:
        return TrainSettings(
            steps=self.steps.value, batch=self.batch.value, patch=self.patch.value,
            learning_rate=self.learning_rate.value, device=self.device.value,
            objective="supervised" if self.clean.value != SELF_SUPERVISED else self.method.value,
        )

    def start(self, _=None):
        """Check the settings, then build the data and the network and train in a worker thread."""
        try:
            name = check_user_model_name(self.name.value)  # Start never replaces a saved model
            data, settings = self._data(), self._settings()
        except (ValueError, KeyError, OSError) as error:
            return self._fail(error)
        choice, folder = self.start_model.value, self.run_folder()

        def make_trainer() -> Trainer:
            if choice.startswith(NEW):
                model, start = starting_model(
                    data.channels, architecture=choice.removeprefix(NEW), patch=settings.patch,
                    normalization=default_normalization(data.dtype), seed=settings.seed, colour=data.colour,
                )
            else:
                # The normalisation counts only where a colour model is made grey for grey data.
                model, start = starting_model(
                    data.channels, source=choice, normalization=default_normalization(data.dtype),
                )
            remove_run(folder)  # Start begins again; Resume continues
            return Trainer(model, data, settings, folder, start=start)

        return self._launch(make_trainer, name)

    def resume(self, _=None):
        """Continue the run saved under the chosen name from its last checkpoint."""
        try:
            name = check_user_model_name(self.name.value, overwrite=True)
            data = self._data()
        except (ValueError, KeyError, OSError) as error:
            return self._fail(error)
        folder = self.run_folder()
        return self._launch(lambda: resume_trainer(folder, data, device=self.device.value), name)

    def _launch(self, make_trainer, name: str):
        self.trainer, self._cancel_requested = None, False
        forget_kept_runner()  # the last restore's network and CUDA graphs leave the device to training
        self.plot.clear("validation PSNR (dB)" if self.clean.value != SELF_SUPERVISED else "validation loss")
        self.status.value = "preparing the data..."
        self.worker = create_worker(
            self._train_steps, make_trainer,
            _connect={
                "yielded": self._on_event,
                "returned": lambda result: self._finished(result, name),
                "errored": self._fail,
                "paused": self._on_paused,
                "finished": self._worker_done,
            },
            _start_thread=False,
        )
        self._set_running(True)
        self.worker.start()
        return self.worker

    @runtime_errors_reported
    def _train_steps(self, make_trainer):
        self.trainer = make_trainer()  # in the worker: reading percentiles may take a while
        if self._cancel_requested:  # Cancel was pressed while the data was being prepared
            self.trainer.stop()
        steps = self.trainer.run()
        for event in steps:
            worker = self.worker
            if worker is not None and worker.abort_requested:
                # napari quits its workers as its window closes, and a quit worker never resumes this
                # generator: stop here instead, so that the trainer writes the step's checkpoint.
                self.trainer.stop()
                for _ in steps:
                    pass
                break
            yield event
        return self.trainer.result()

    # -- while running -------------------------------------------------------------------------
    def _on_event(self, event) -> None:
        self.plot.add(event.step, event.loss, event.validation)
        text = f"step {event.step}/{event.steps}, loss {event.loss:.4g}"
        if self.trainer is not None and self.trainer.history:
            last = self.trainer.history[-1]
            text += f", validation PSNR {last['psnr']:.2f} dB" if "psnr" in last else f", validation loss {last.get('loss', 0):.4g}"
        self.status.value = text

    def toggle_pause(self, _=None) -> None:
        if self.worker is None:
            return
        self.worker.toggle_pause()  # takes effect after the current step
        self.pause_button.text = "Continue" if self.pause_button.text == "Pause" else "Pause"

    def _on_paused(self) -> None:
        step = self.trainer.step if self.trainer is not None else 0
        self.status.value = f"paused at step {step}"

    def cancel(self, _=None) -> None:
        """Stop after the current step; the checkpoint written then lets Resume continue."""
        self._stop_training()
        self.status.value = "stopping after this step..."

    def _stop_training(self) -> None:
        self._cancel_requested = True
        if self.trainer is not None:
            self.trainer.stop()
        if self.worker is not None and self.worker.is_paused:
            self.worker.resume()

    def _release(self) -> None:
        """Deleted with its viewer (napari sends no closeEvent then): stop the training after this
        step, with its checkpoint, and stop reporting to widgets that no longer exist."""
        if self.worker is not None:
            for signal in ("yielded", "returned", "errored", "paused", "finished"):
                getattr(self.worker, signal).disconnect()
        self._stop_training()

    def _finished(self, result, name: str) -> None:
        self.plot.refresh(force=True)
        if result.stopped_early:
            self.status.value = f"stopped at step {result.steps_done}; Resume continues from there"
            return
        path = save_user_model(create_model(str(result.model_path)), name, overwrite=True)
        model_events.registered.emit(name)
        best = f", best validation {result.best['psnr']:.2f} dB" if result.best and "psnr" in result.best else ""
        self.name.value = free_name(name)  # the next Start saves beside this model, not over it
        self.status.value = f"done: saved as {name!r}{best}"
        show_info(f"GAMA-IR: model {name!r} saved to {path}; it is now in the Restore widget's model list")

    def _worker_done(self) -> None:
        self.worker = None
        self._set_running(False)

    def _set_running(self, running: bool) -> None:
        self.start_button.enabled = not running
        self.pause_button.enabled = running
        self.pause_button.text = "Pause"
        self.cancel_button.enabled = running
        self._update_resume()

    def _fail(self, error: BaseException) -> None:
        report_error(self.status, error)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        self.cancel()
        super().closeEvent(event)


def _colours(layer, axes: str):
    """The layer's data without the opacity channel of an RGBA layer, which is not trained on (a view)."""
    data = layer_data(layer)
    return data[..., :-1] if has_alpha(layer, axes) else data
