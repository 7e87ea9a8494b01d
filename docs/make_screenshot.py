"""Screenshot of napari with the Restore widget and a restored sample (docs/images/restore_widget.png).

    python docs/make_screenshot.py --model path/to/rgb_checkpoint.json

Needs a display (or Xvfb: ``xvfb-run -a python docs/make_screenshot.py ...``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

from napari_gama_ir._napari.restore_widget import CHECKPOINT_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="RGB checkpoint (.json)")
    parser.add_argument("-o", "--output", default=str(Path(__file__).parent / "images" / "restore_widget.png"))
    args = parser.parse_args()

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 800)
    viewer.open_sample("napari-gama-ir", "noisy_photos")
    _, widget = viewer.window.add_plugin_dock_widget("napari-gama-ir", "Restore")
    widget.image.value = "noisy photos (sigma 25)"
    widget.model.value = CHECKPOINT_FILE
    widget.checkpoint.value = args.model
    layer = widget.preview()
    viewer.dims.set_point(0, 0)
    layer.data.wait(timeout=600)
    layer.refresh()
    viewer.layers["noisy photos (sigma 25)"].visible = True
    grid = viewer.canvas.grid if hasattr(viewer, "canvas") else viewer.grid  # napari 0.9 moved it
    grid.enabled = True
    grid.shape = (1, 2)
    viewer.reset_view()
    viewer.layers.selection.active = layer
    for _ in range(20):
        QApplication.processEvents()
    image = viewer.screenshot(canvas_only=False, flash=False)
    spread = float(np.asarray(image)[..., :3].std())
    if spread < 5:
        raise SystemExit(f"screenshot looks blank (pixel spread {spread:.1f})")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    import imageio.v3 as iio

    iio.imwrite(args.output, np.asarray(image))
    print(f"wrote {args.output} ({image.shape[1]}x{image.shape[0]}, pixel spread {spread:.1f})")
    viewer.close()


if __name__ == "__main__":
    main()
