"""Preview latency: time from napari asking for a plane to the restored plane being ready.

Builds the same lazy path as the Restore widget's Preview (engine `restore` on a lazy zarr-like
stack, then the background plane cache) and times how long single 2048 x 2048 planes take to
become ready, plus how long the request itself blocks the caller (napari's UI thread).

    python benchmarks/preview_latency.py --model gama_ir_s --size 2048 --planes 3
"""

from __future__ import annotations

import argparse
import json
import statistics
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
    args = parser.parse_args()

    if args.model.endswith(".json"):
        model = create_model(args.model)
    else:
        torch.manual_seed(0)
        model = create_model(args.model, in_channels=1, out_channels=1)  # speed only: weights do not matter
    channels = model.config.in_channels
    shape = (args.planes + 1, args.size, args.size) + ((channels,) if channels > 1 else ())
    stack = da.random.random(shape, chunks=(1,) + shape[1:]).astype(np.float32)
    axes = "ZYXC" if channels > 1 else "ZYX"
    lazy = restore(stack, model, axes, tile=args.tile, overlap=args.overlap, device=args.device, precision=args.precision)
    plane_axes = tuple(range(1, len(shape)))
    planes = BackgroundPlanes(lazy, plane_axes)

    planes[args.planes]  # warm-up plane (first call loads kernels)
    planes.wait(timeout=3600)
    blocking, ready = [], []
    for z in range(args.planes):
        started = time.perf_counter()
        planes[z]
        blocking.append(time.perf_counter() - started)
        planes.wait(timeout=3600)
        ready.append(time.perf_counter() - started)
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
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
