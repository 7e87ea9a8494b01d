"""Peak memory of restoring one large plane, per pixel: what bounds the plane size a machine can take.

Each side runs in its own process, which restores one random uint16 plane with the shipped grey
GAMA-IR-XS (uint16 output, the engine's default tiles) and reports the rise of its peak resident
set over the moment before ``restore`` was called. The rise between two sides, over the pixels
between them, is the memory each further pixel costs; the rest is fixed (torch, the network's
activations on one tile).

    python benchmarks/plane_memory.py --sides 4096 8192 12288 --json plane_memory.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time


def one_plane(side: int) -> dict:
    import numpy as np

    from napari_gama_ir import create_model, restore

    model = create_model("gama_ir_xs-denoise-grey", pretrained=True)
    plane = np.random.default_rng(0).integers(0, 4000, (side, side), dtype=np.uint16)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    started = time.perf_counter()
    restore(plane, model, "YX", output_dtype="input")
    seconds = time.perf_counter() - started
    rise = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    return {"side": side, "megapixels": side * side / 1e6, "peak_rise_gb": rise / 1e9, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child's side
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_plane(args.one)))
        return
    rows = []
    for side in args.sides:
        child = subprocess.run([sys.executable, __file__, "--one", str(side)], capture_output=True, text=True,
                               check=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(f"{side} x {side} ({row['megapixels']:.0f} Mpx): peak rise {row['peak_rise_gb']:.2f} GB, "
              f"{row['seconds']:.0f} s", flush=True)
    for small, large in itertools.pairwise(rows):
        per_pixel = (large["peak_rise_gb"] - small["peak_rise_gb"]) * 1e3 / (large["megapixels"] - small["megapixels"])
        print(f"from {small['side']} to {large['side']}: {per_pixel:.1f} bytes per further pixel")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=1)


if __name__ == "__main__":
    main()
