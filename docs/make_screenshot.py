"""Screenshots of napari with the plugin's widgets, for the docs (written to docs/images/).

    python docs/make_screenshot.py restore --model path/to/rgb_checkpoint.json
    python docs/make_screenshot.py finetune
    python docs/make_screenshot.py region

``restore``: the Restore widget and a restored sample photo (restore_widget.png). ``finetune``: the
Fine-tune widget training a new network on the fluorescence sample, with its live plot
(finetune_widget.png). ``region``: the preview of an 8192 x 8192 fluorescence-like plane, restored
where it was viewed at full resolution, then seen zoomed out (region_preview.png). Needs a display (or Xvfb: ``xvfb-run -a python docs/make_screenshot.py ...``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

from napari_gama_ir._napari.restore_widget import CHECKPOINT_FILE

IMAGES = Path(__file__).parent / "images"


def save_screenshot(viewer: napari.Viewer, output: Path) -> None:
    """Write the whole window to ``output``, refusing a blank frame (black is also an image)."""
    import imageio.v3 as iio

    for _ in range(20):
        QApplication.processEvents()
    image = np.asarray(viewer.screenshot(canvas_only=False, flash=False))
    spread = float(image[..., :3].std())
    if spread < 5:
        raise SystemExit(f"screenshot looks blank (pixel spread {spread:.1f})")
    output.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(output, image)
    print(f"wrote {output} ({image.shape[1]}x{image.shape[0]}, pixel spread {spread:.1f})")


def side_by_side(viewer: napari.Viewer) -> None:
    grid = viewer.canvas.grid if hasattr(viewer, "canvas") else viewer.grid  # napari 0.9 moved it
    grid.enabled = True
    grid.shape = (1, 2)
    viewer.reset_view()


def restore_screenshot(viewer: napari.Viewer, args: argparse.Namespace) -> None:
    viewer.open_sample("napari-gama-ir", "noisy_photos")
    _, widget = viewer.window.add_plugin_dock_widget("napari-gama-ir", "Restore")
    widget.image.value = "noisy photos (sigma 25)"
    widget.model.value = CHECKPOINT_FILE
    widget.checkpoint.value = args.model
    layer = widget.preview()
    viewer.dims.set_point(0, 0)
    layer.data.wait(timeout=600)
    layer.refresh()
    side_by_side(viewer)
    viewer.layers.selection.active = layer
    save_screenshot(viewer, Path(args.output or IMAGES / "restore_widget.png"))


def finetune_screenshot(viewer: napari.Viewer, args: argparse.Namespace) -> None:
    os.environ["NAPARI_GAMA_IR_HOME"] = tempfile.mkdtemp()  # the demo run stays out of your models
    viewer.open_sample("napari-gama-ir", "noisy_fluorescence")
    viewer.layers["clean fluorescence"].visible = True
    side_by_side(viewer)
    _, widget = viewer.window.add_plugin_dock_widget("napari-gama-ir", "Fine-tune")
    widget.noisy.value, widget.clean.value = "noisy fluorescence", "clean fluorescence"
    widget.steps.value, widget.patch.value, widget.batch.value = args.steps, 48, 4
    widget.name.value = "fluorescence-demo"
    widget.start()
    deadline = time.monotonic() + 900
    while len(widget.plot.steps) < args.steps * 2 // 3 and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.05)
    widget.plot.refresh(force=True)
    save_screenshot(viewer, Path(args.output or IMAGES / "finetune_widget.png"))
    widget.cancel()
    while widget.worker is not None and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.05)


def region_screenshot(viewer: napari.Viewer, args: argparse.Namespace) -> None:
    from scipy.ndimage import gaussian_filter, zoom
    from skimage.data import binary_blobs

    blobs = binary_blobs(length=2048, n_dim=2, volume_fraction=0.2, blob_size_fraction=0.01, rng=0)
    structure = gaussian_filter(zoom(blobs.astype(np.float32), 4, order=1), 3.0)
    rng = np.random.default_rng(0)
    counts = rng.poisson(30 * structure + 2) + rng.normal(0, 3, structure.shape) + 100
    viewer.add_image(np.clip(np.rint(counts), 0, 65535).astype(np.uint16), name="slide scan", contrast_limits=(95, 140))
    _, widget = viewer.window.add_plugin_dock_widget("napari-gama-ir", "Restore")
    widget.image.value = "slide scan"  # the shipped grey model for the CPU is chosen
    layer = widget.preview()
    planes = widget.previews[layer]
    viewer.layers["slide scan"].visible = False
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari 0.9 moved it
    camera.center, camera.zoom = (4096, 4096), 1.0  # full resolution: the blocks in view are restored
    deadline = time.monotonic() + 600
    while not (planes.computed and planes.wait(timeout=0.1)) and time.monotonic() < deadline:
        QApplication.processEvents()
    camera.zoom = 0.15  # zoomed out: the input around the restored view
    save_screenshot(viewer, Path(args.output or IMAGES / "region_preview.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_subparsers(dest="widget", required=True)
    restore = which.add_parser("restore")
    restore.add_argument("--model", required=True, help="RGB checkpoint (.json)")
    finetune = which.add_parser("finetune")
    finetune.add_argument("--steps", type=int, default=300)
    region = which.add_parser("region")
    for sub in (restore, finetune, region):
        sub.add_argument("-o", "--output", help="PNG to write (default: docs/images/<widget>_widget.png)")
    args = parser.parse_args()

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 860)
    {"restore": restore_screenshot, "finetune": finetune_screenshot, "region": region_screenshot}[args.widget](
        viewer, args)
    viewer.close()


if __name__ == "__main__":
    main()
