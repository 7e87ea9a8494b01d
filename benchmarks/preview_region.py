"""Preview of one large plane: the region in view, restored in blocks, against the whole plane.

Builds what the Restore widget's Preview builds for a plane above 4096 x 4096 pixels (engine
`restore` on a lazy stack in blocks of two tiles, the background cache and the multiscale levels),
asks for a full-resolution view of ``--view`` pixels at the plane's centre as napari does, and
times how long until its first block, and all of its blocks, are ready, and how long the request
blocks the caller (napari's UI thread). Then, unless ``--skip-whole``, the same plane previewed
whole, as planes up to 4096 x 4096 are.

    python benchmarks/preview_region.py --model gama_ir_xs-denoise-grey --size 8192 --out docs/benchmarks/preview_region.json
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import dask.array as da
import numpy as np
import torch

from napari_gama_ir import create_model, restore
from napari_gama_ir._napari.preview import BackgroundPlanes, preview_levels
from napari_gama_ir.engine.device import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gama_ir_xs-denoise-grey", help="shipped model or checkpoint (.json)")
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--view", type=int, nargs=2, default=(1080, 1920), metavar=("ROWS", "COLUMNS"))
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-whole", action="store_true", help="do not time the whole plane")
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args()

    model = create_model(args.model) if args.model.endswith(".json") else create_model(args.model, pretrained=True)
    # A microscope's 16-bit plane, read from a store in chunks of 1024.
    plane = da.random.RandomState(0).randint(0, 4096, (args.size, args.size), chunks=1024, dtype=np.uint16)
    block = -(-2 * args.tile // 16) * 16  # as the Restore widget chooses
    result = {
        "device": str(resolve_device(args.device)), "model": args.model, "plane": [args.size, args.size],
        "view": list(args.view), "tile": args.tile, "overlap": args.overlap, "block": block,
        "torch_threads": torch.get_num_threads(),
    }
    restore(np.zeros((args.tile, args.tile), np.uint16), model, "YX", tile=args.tile, device=args.device)  # warm-up

    ready_at: list[float] = []
    lazy = restore(plane, model, "YX", tile=args.tile, overlap=args.overlap, device=args.device, block=block,
                   cancel=threading.Event())
    planes = BackgroundPlanes(lazy, (0, 1), on_ready=lambda _: ready_at.append(time.perf_counter()))
    levels = preview_levels(planes, [plane], (0, 1))
    top, left = (args.size - args.view[0]) // 2, (args.size - args.view[1]) // 2
    started = time.perf_counter()
    np.asarray(levels[0][top:top + args.view[0], left:left + args.view[1]])
    result["request_blocks_ms"] = round(1000 * (time.perf_counter() - started), 3)
    planes.wait(timeout=3600)
    result["blocks_in_view"] = len(planes.computed)
    result["first_block_ready_seconds"] = round(ready_at[0] - started, 3)
    result["view_ready_seconds"] = round(ready_at[-1] - started, 3)
    result["levels"] = [list(level.shape) for level in levels]
    planes.close()

    if not args.skip_whole:
        whole = BackgroundPlanes(restore(plane, model, "YX", tile=args.tile, overlap=args.overlap, device=args.device,
                                         block=0), (0, 1))
        started = time.perf_counter()
        whole[:, :]
        whole.wait(timeout=3600)
        result["whole_plane_ready_seconds"] = round(time.perf_counter() - started, 3)
        whole.close()
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
