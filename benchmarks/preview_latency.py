"""Preview latency: time from napari asking for a plane to the restored plane being ready.

Builds the same lazy path as the Restore widget's Preview (engine `restore` on a lazy zarr-like
stack, then the background plane cache) and times how long single 2048 x 2048 planes take to
become ready, plus how long the request itself blocks the caller (napari's UI thread). Then the
user moves on from a plane ``--moved-after`` seconds into its restore: how long until the next plane
is ready, with the plane being restored given up (as the widget does) or, with ``--finish-busy``,
finished first (as before 2026-11-28).

    python benchmarks/preview_latency.py --model gama_ir_s --size 2048 --planes 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import dask.array as da
import numpy as np
import torch

from napari_gama_ir import create_model, restore
from napari_gama_ir._napari.preview import BackgroundPlanes
from napari_gama_ir.engine.device import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gama_ir_s", help="registry name (random weights) or checkpoint")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--planes", type=int, default=3)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--moved-after", type=float, default=2.0, help="seconds into a plane's restore")
    parser.add_argument("--finish-busy", action="store_true", help="finish the plane being restored first")
    args = parser.parse_args()

    if args.model.endswith(".json"):
        model = create_model(args.model)
    else:
        torch.manual_seed(0)
        model = create_model(args.model, in_channels=1, out_channels=1)  # speed only: weights do not matter
    channels = model.config.in_channels
    shape = (args.planes + 3, args.size, args.size) + ((channels,) if channels > 1 else ())
    stack = da.random.random(shape, chunks=(1,) + shape[1:]).astype(np.float32)
    axes = "ZYXC" if channels > 1 else "ZYX"
    given_up = None if args.finish_busy else threading.Event()
    lazy = restore(stack, model, axes, tile=args.tile, overlap=args.overlap, device=args.device, precision=args.precision,
                   cancel=given_up)
    plane_axes = tuple(range(1, len(shape)))
    planes = BackgroundPlanes(lazy, plane_axes, cancel=given_up)

    planes[args.planes]  # warm-up plane (first call loads kernels)
    planes.wait(timeout=3600)
    blocking, ready = [], []
    for z in range(args.planes):
        started = time.perf_counter()
        planes[z]
        blocking.append(time.perf_counter() - started)
        planes.wait(timeout=3600)
        ready.append(time.perf_counter() - started)
    busy, wanted = args.planes + 1, args.planes + 2
    planes[busy]
    time.sleep(args.moved_after)
    started = time.perf_counter()
    planes[wanted]
    planes.wait(timeout=3600)
    moved_on = time.perf_counter() - started
    result = {
        "device": str(resolve_device(args.device)),
        "model": args.model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "plane": [args.size, args.size],
        "tile": args.tile,
        "overlap": args.overlap,
        "precision": args.precision,
        "ready_seconds_median": round(statistics.median(ready), 3),
        "ready_seconds_each": [round(t, 3) for t in ready],
        "request_blocks_ms_max": round(1000 * max(blocking), 3),
        "moved_after_seconds": args.moved_after,
        "busy_plane": "finished first" if args.finish_busy else "given up",
        "next_plane_ready_seconds": round(moved_on, 3),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
