"""The Restore dock widget: lazy preview and background "restore all", a thin shell over the engine."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, LineEdit, PushButton, SpinBox
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_info
from qtpy.QtWidgets import QVBoxLayout, QWidget
from superqt.utils import ensure_main_thread

from .. import __version__
from ..engine import restore
from ..engine.arrays import as_dask
from ..engine.axes import parse_axes, plane_layout
from ..engine.calibration import ATTRIBUTE as PIXEL_SIZE_ATTRIBUTE
from ..engine.calibration import to_attribute
from ..engine.device import available_memory, resolve_device
from ..engine.io import (
    Cancelled,
    OutputExistsError,
    check_output_format,
    check_output_path,
    colours_subsampled,
    open_image,
    store_chunks,
    write_image_steps,
)
from ..engine.restore import DEFAULT_MEAN_MODE, MEAN_MODES, chunks_at_once, plan_restore
from ..model import create_model, default_model_name, shipped_model_names, user_model_names
from .layers import (
    axes_guess,
    find_layer,
    has_alpha,
    image_layer_names,
    layer_data,
    layer_pixel_size,
    refresh_after_rename,
    report_error,
    runtime_errors_reported,
    watch_layer_names,
)
from .model_events import model_events
from .preview import BackgroundPlanes, preview_levels

if TYPE_CHECKING:
    import napari

CHECKPOINT_FILE = "checkpoint file..."
IN_MEMORY, TO_ZARR = "new layer (in memory)", "zarr store"
# Planes above this, or of a multiscale layer (a slide scan), are previewed a region at a time: on a
# 2-core CPU, GAMA-IR-XS showed a full-HD view of an 8192 x 8192 plane in 15 s, the plane whole in 103 s.
REGION_PREVIEW_PIXELS = 4096 * 4096


def model_choices() -> list[str]:
    """Shipped models, then the user's own, then a checkpoint picked from disk."""
    return shipped_model_names() + user_model_names() + [CHECKPOINT_FILE]


def chunk_unit(restored: da.Array, axes: str) -> str:
    """What a chunk of the engine's ``restored`` stack is, to count them by: planes, batches of
    small planes, or blocks of planes too large for memory."""
    if any(len(restored.chunks[axes.index(a)]) > 1 for a in "YX"):
        return "blocks"
    if all(max(chunks) == 1 for a, chunks in zip(axes, restored.chunks) if a not in "CYX"):
        return "planes"
    return "batches of planes"


def plane_label(axes: str, planes: BackgroundPlanes, index: tuple[int, ...]) -> str:
    """The plane (or block) at ``index`` of a preview, as the user knows it: "T=2, Z=5", "the
    image", or "Z=5, y 1024-2047, x 0-1023"."""
    plane = [f"{axes[d]}={i}" for d, i in zip(planes.iterated, index)]
    block = [f"{axes[d].lower()} {span.start}-{span.stop - 1}" for d, span in planes.block_region(index).items()]
    return ", ".join(plane + block) or "the image"


def _check_fits_in_memory(nbytes: int, what: str = "the restored image") -> None:
    """Refuse an in-memory result (``what``) larger than half the memory free now: filling it would
    end, perhaps hours later, with napari killed for want of memory and the work lost."""
    available = available_memory()
    if available is not None and nbytes > available // 2:
        raise ValueError(
            f"{what} would take {nbytes / 1e9:.1f} GB of memory, and {available / 1e9:.1f} GB is free; "
            "restore it to a zarr store"
        )


class RestoreWidget(QWidget):
    """Restore an image layer: lazily as you browse (Preview) or all planes in the background."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=self._image_layer_names)
        self.model = ComboBox(label="model", choices=lambda _: model_choices())
        self.checkpoint = FileEdit(label="checkpoint", filter="*.json *.safetensors")
        self.axes = LineEdit(label="axes")
        self.tile = SpinBox(label="tile", min=0, max=8192, step=8, value=512, tooltip="0: whole planes")
        self.overlap = SpinBox(label="overlap", min=0, max=2048, step=8, value=64)
        self.mean_mode = ComboBox(label="means", choices=MEAN_MODES, value=DEFAULT_MEAN_MODE)
        self.device = ComboBox(label="device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self.precision = ComboBox(label="precision", choices=["fp32", "fp16", "bf16"], value="fp32")
        self.destination = ComboBox(label="restore all to", choices=[IN_MEMORY, TO_ZARR], value=IN_MEMORY)
        self.output = FileEdit(label="zarr path", mode="w", filter="*.zarr")
        self.preview_button = PushButton(text="Preview (lazy)")
        self.restore_button = PushButton(text="Restore all")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        self.form = Container(widgets=[
            self.image, self.model, self.checkpoint, self.axes, self.tile, self.overlap, self.mean_mode,
            self.device, self.precision, self.destination, self.output, self.preview_button, self.restore_button,
            self.cancel_button, self.status,
        ])
        layout = QVBoxLayout(self)
        layout.addWidget(self.form.native)
        layout.addStretch()
        self.previews: dict[Any, BackgroundPlanes] = {}  # by the layer that shows them
        self._released = False  # the viewer closed: a preview's reports still queued find no widgets
        self.worker = None
        self._worker_handlers: dict[str, Any] = {}  # what the worker reports to, while it runs
        self._cancel = threading.Event()
        # "Restore all"'s progress: pixels restored (counted on the engine's threads) of the total.
        self._bar: progress | None = None
        self._pixels_lock = threading.Lock()
        self._pixels_done = self._pixels_total = 0

        self.image.changed.connect(self._guess_axes)
        self.model.changed.connect(self._show_checkpoint)
        self.destination.changed.connect(self._show_checkpoint)
        self.preview_button.changed.connect(self.preview)
        self.restore_button.changed.connect(self.restore_all)
        self.cancel_button.changed.connect(self.cancel)
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._close_removed_preview)
        watch_layer_names(self.viewer, self._layer_renamed)
        model_events.registered.connect(self._refresh_models)
        # Closing the viewer deletes this widget without a closeEvent: let go then too.
        self.destroyed.connect(lambda: self._release())
        self._show_checkpoint()
        self._guess_axes()

    # -- choices -------------------------------------------------------------------------------
    def _image_layer_names(self, _=None) -> list[str]:
        return image_layer_names(self.viewer)

    def _refresh_layers(self, _=None) -> None:
        watch_layer_names(self.viewer, self._layer_renamed)
        self.image.reset_choices()
        self.model.reset_choices()

    def _layer_renamed(self, event) -> None:
        refresh_after_rename([self.image], self._refresh_layers, event.source)

    def _refresh_models(self, _=None) -> None:
        self.model.reset_choices()

    def _show_checkpoint(self, _=None) -> None:
        """Show the path fields only when they are used."""
        self.checkpoint.visible = self.model.value == CHECKPOINT_FILE
        self.output.visible = self.destination.value == TO_ZARR

    def _guess_axes(self, _=None) -> None:
        """Guess the layer's axes; switch a shipped model to the one for the layer's channels."""
        layer = self._layer()
        if layer is None:
            return
        self.axes.value = axes_guess(layer)
        if self.model.value in shipped_model_names():
            axes, shape = self.axes.value, layer_data(layer).shape
            fits = "C" in axes and len(axes) == len(shape)
            channels = shape[axes.index("C")] - has_alpha(layer, axes) if fits else 1
            subsampled = colours_subsampled(layer.source.path)  # a layer opened from a camera's JPEG, say
            with contextlib.suppress(ValueError):
                self.model.value = default_model_name(
                    channels, resolve_device(self.device.value).type, colours_subsampled=subsampled)

    def _layer(self):
        return find_layer(self.viewer, self.image.value)

    # -- the shared part of preview and restore-all --------------------------------------------
    def _prepare(
        self, on_plane=None, cancel: threading.Event | None = None, block: int | None = None,
    ) -> tuple[Any, da.Array, str, Any, dict, Any]:
        """Check the settings and build the lazy restored stack; raises ValueError with a sentence.
        Also returns the engine's plan, which says how many chunks may be restored at once.
        ``on_plane``, ``cancel`` and ``block`` go to :func:`~napari_gama_ir.engine.restore`
        (``block`` by default: whole planes where they fit in memory)."""
        layer = self._layer()
        if layer is None:
            raise ValueError("choose an image layer to restore")
        if self.model.value == CHECKPOINT_FILE:
            path = Path(str(self.checkpoint.value))
            if not path.is_file():
                raise ValueError("choose a checkpoint file (.json or .safetensors)")
            model_name, model = str(path), create_model(str(path))
        else:
            model_name, model = self.model.value, create_model(self.model.value, pretrained=True)
        data = layer_data(layer)
        axes = parse_axes(self.axes.value, data.ndim)
        alpha = has_alpha(layer, axes)
        source, _ = as_dask(data)  # lazy, so that the result is too: Preview computes planes on demand
        output_dtype = "input" if layer.rgb else "float32"
        # Blocks, where planes are too large for memory, are chosen once, for the restore and its readers.
        plan = plan_restore(source, model, axes, self.tile.value or None, self.overlap.value, self.mean_mode.value,
                            None, output_dtype, alpha, block)
        restored = restore(
            source, model, axes, tile=self.tile.value or None, overlap=self.overlap.value,
            mean_mode=self.mean_mode.value, device=self.device.value, precision=self.precision.value,
            output_dtype=output_dtype, alpha=alpha, block=plan.block or 0, on_plane=on_plane, cancel=cancel,
        )
        provenance = {
            "model": model_name, "checkpoint_sha256": getattr(model, "checkpoint_sha256", None),
            "tile": self.tile.value, "overlap": self.overlap.value, "mean_mode": self.mean_mode.value,
            "axes": axes, "alpha_passed_through": alpha, "napari_gama_ir_version": __version__,
        }
        pixel_size = layer_pixel_size(layer, axes)
        if pixel_size:  # a zarr output keeps the layer's calibration
            provenance[PIXEL_SIZE_ATTRIBUTE] = to_attribute(pixel_size)
        return layer, restored, axes, model, provenance, plan

    def _add_result(self, data, layer, provenance: dict, suffix: str):
        """Show ``data`` where ``layer`` is, as it is shown: a layer placed by a reader's rotation,
        shear or affine (a tilted light sheet, a registered tile) came out beside it, unturned."""
        return self.viewer.add_image(
            data, name=f"{layer.name} {suffix}", multiscale=isinstance(data, list), rgb=layer.rgb,
            contrast_limits=layer.contrast_limits,
            colormap=layer.colormap if not layer.rgb else None, scale=layer.scale, translate=layer.translate,
            rotate=layer.rotate, shear=layer.shear, affine=layer.affine, units=layer.units,
            axis_labels=layer.axis_labels, metadata={**layer.metadata, "gama_ir": provenance},
        )

    # -- preview -------------------------------------------------------------------------------
    def preview(self, _=None):
        """Add a layer that restores each plane the first time it is shown, off the UI thread; for
        planes too large to restore whole for a look, a multiscale layer that restores the blocks
        in view at full resolution (:func:`~.preview.preview_levels`)."""
        given_up = threading.Event()  # set by the preview to give up a plane no longer on screen
        planes = None  # made below, before the engine restores (and counts) anything

        def count_pixels(pixels: int) -> None:
            planes.count_pixels(pixels)

        try:
            block = self._preview_block(self._layer())
            layer, restored, axes, model, provenance, _ = self._prepare(count_pixels, given_up, block)
            shape = list(restored.shape)  # as the network sees it: without a passed-through alpha channel
            if provenance["alpha_passed_through"]:
                shape[axes.index("C")] -= 1
            iterated = plane_layout(axes, tuple(shape), model.config.in_channels).iterated
            plane_axes = tuple(i for i, a in enumerate(axes) if a not in iterated)
            if block is None:
                # The plane shown is held whole (a slide scan's can be tens of GB), and napari's copy of it.
                plane_bytes = int(np.prod([restored.shape[i] for i in plane_axes])) * restored.dtype.itemsize
                _check_fits_in_memory(2 * plane_bytes, "a restored plane and napari's copy of it")
        except (ValueError, KeyError, OSError) as error:
            return self._fail(error)
        planes = BackgroundPlanes(
            restored, plane_axes, cancel=given_up, pixels_per_plane=shape[axes.index("Y")] * shape[axes.index("X")],
            on_progress=lambda index, share: self._show_preview_progress(plane_label(axes, planes, index), share),
        )
        data = planes
        if block is not None:
            inputs = list(layer.data) if layer.multiscale else [layer.data]
            data = preview_levels(planes, inputs, (axes.index("Y"), axes.index("X")))
        result = self._add_result(data, layer, {**provenance, "mode": "preview"}, "restored (preview)")
        planes.on_ready = lambda index: self._plane_ready(result, planes, plane_label(axes, planes, index))
        self.previews[result] = planes
        self.status.value = ("preview: blocks are restored as you view them at full resolution" if block is not None
                             else "preview: planes are restored as you view them")
        return result

    def _preview_block(self, layer) -> int | None:
        """The side of the blocks a preview of ``layer`` restores, two tiles, where its planes are
        above :data:`REGION_PREVIEW_PIXELS` or it is multiscale; None (whole planes) otherwise, or
        where the settings do not allow blocks (no tiles), or are wrong (:meth:`_prepare` says so)."""
        if layer is None or not self.tile.value:
            return None
        shape = layer_data(layer).shape
        try:
            axes = parse_axes(self.axes.value, len(shape))
        except ValueError:
            return None
        if not layer.multiscale and shape[axes.index("Y")] * shape[axes.index("X")] <= REGION_PREVIEW_PIXELS:
            return None
        return -(-2 * self.tile.value // 16) * 16  # blocks are multiples of 16

    def _close_removed_preview(self, event) -> None:
        """A preview layer deleted stops restoring and lets go of its cached planes (up to 1 GB
        each, which previews tried one after another with other settings would otherwise pile up)."""
        planes = self.previews.pop(event.value, None)
        if planes is not None:
            planes.close()
            self.status.value = f"preview closed: {event.value.name}"

    @ensure_main_thread
    def _show_preview_progress(self, label: str, share: float) -> None:
        if self._released:
            return
        self.status.value = f"preview: restoring {label}: {share:.0%}"

    @ensure_main_thread
    def _plane_ready(self, layer, planes: BackgroundPlanes, label: str) -> None:
        if self._released:
            return
        if planes.errors:
            self._fail(planes.errors.pop())
        else:
            self.status.value = f"preview: {label} restored"
        if layer in self.viewer.layers:
            layer.refresh()

    # -- restore all ---------------------------------------------------------------------------
    def restore_all(self, _=None):
        """Restore every plane in a background worker, with progress and Cancel.

        The progress bar counts pixels, pass by pass, so that it moves, and Cancel stops within a
        forward pass, even where one plane takes minutes."""
        try:
            layer, restored, axes, model, provenance, plan = self._prepare(self._count_pixels, self._cancel)
            target = str(self.output.value) if self.destination.value == TO_ZARR else None
            if target is not None:
                try:
                    check_output_path(target, [layer.source.path or ""], overwrite=False)
                except OutputExistsError:  # its advice is the command line's --overwrite
                    raise ValueError(f"{target}: already exists; choose another zarr path") from None
                check_output_format(target, restored.shape, axes, restored.dtype)
            else:
                _check_fits_in_memory(restored.nbytes)
            # As the CLI: a chunk per host thread, so that the device never waits on reading and
            # blending, but no more than fit in memory (beside the result, where that is in memory too).
            result_bytes = 0 if target is not None else restored.nbytes
            workers = chunks_at_once(plan, model.config.out_channels, self.device.value, result_bytes)
        except (ValueError, KeyError, OSError) as error:
            return self._fail(error)
        provenance = {**provenance, "mode": "restore all", "output": target}
        total = int(np.prod(restored.numblocks))
        unit = chunk_unit(restored, axes)
        self._cancel.clear()
        shape = dict(zip(axes, restored.shape))
        self._pixels_done = 0
        self._pixels_total = plan.planes * shape["Y"] * shape["X"]
        self._bar = progress(total=100, desc="GAMA-IR", unit="%")
        # Handlers are given at creation: a worker created without an "errored" handler re-raises.
        self._worker_handlers = {
            "yielded": lambda done: setattr(self.status, "value", f"restored {done}/{total} {unit}"),
            "returned": lambda data: self._finished(data, layer, provenance),
            "errored": self._worker_failed,
            "finished": self._worker_done,
        }
        self.worker = create_worker(
            self._restore_steps, restored, axes, target, provenance, workers,
            _connect=self._worker_handlers, _start_thread=False,
        )
        self._set_running(True)
        self.worker.start()
        return self.worker

    @runtime_errors_reported
    def _restore_steps(self, restored: da.Array, axes: str, target: str | None, provenance: dict, workers: int):
        if target is not None:
            steps = write_image_steps(restored, target, axes, attrs=provenance, workers=workers, cancel=self._cancel)
        else:
            result = np.empty(restored.shape, restored.dtype)
            steps = store_chunks(restored, result, workers, self._cancel)
        for done, _ in steps:
            yield done
        if target is None:
            return result
        written = open_image(target)  # an OME-Zarr's axes are in its own order: back to the layer's
        order = [written.axes.index(a) for a in axes]
        levels = [level.transpose(order) for level in (written.array, *written.levels)]
        return levels if written.levels else levels[0]  # a restored slide shown at the level that fits

    def _count_pixels(self, pixels: int) -> None:
        """The engine's ``on_plane``, on its threads: ``pixels`` more are restored."""
        with self._pixels_lock:
            self._pixels_done += pixels
            percent = 100 * self._pixels_done // max(1, self._pixels_total)
        self._show_percent(percent)

    @ensure_main_thread
    def _show_percent(self, percent: int) -> None:
        if self._bar is not None and percent > self._bar.n:
            self._bar.update(percent - self._bar.n)

    def cancel(self, _=None) -> None:
        self._cancel.set()
        self.status.value = "cancelling..."

    def _finished(self, data, layer, provenance: dict) -> None:
        self._add_result(data, layer, provenance, "restored")
        self.status.value = "done"

    def _worker_failed(self, error: BaseException) -> None:
        if isinstance(error, Cancelled):
            self.status.value = "cancelled: nothing was written"
            show_info("GAMA-IR: restore cancelled; no output was written")
        else:
            self._fail(error)

    def _worker_done(self) -> None:
        self.worker = None
        self._set_running(False)

    def _set_running(self, running: bool) -> None:
        self.restore_button.enabled = not running
        self.preview_button.enabled = not running
        self.cancel_button.enabled = running
        if not running:
            self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _fail(self, error: BaseException) -> None:
        report_error(self.status, error)

    def _release(self) -> None:
        """Stop the previews' thread, cancel a "Restore all" (which ran on to its end after the
        viewer closed, its result lost), and stop listening for new models and for that restore
        (a deleted model list made the Fine-tune widget's registration fail)."""
        self._released = True
        model_events.registered.disconnect(self._refresh_models)
        for planes in self.previews.values():
            planes.close()
        if self.worker is not None:
            for signal, handler in self._worker_handlers.items():
                getattr(self.worker, signal).disconnect(handler)
            self.worker = None  # released once: a closed widget is released again as it is deleted
            self._cancel.set()
            self._close_bar()

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        self._release()
        super().closeEvent(event)
