"""Peak memory of restoring one large plane, per pixel: what bounds the plane size a machine can take.

Each side runs in its own process, which restores one random uint16 plane with the shipped grey
GAMA-IR-XS (uint16 output, the engine's default tiles) and reports the rise of its peak resident
set over the moment before ``restore`` was called. The rise between two sides, over the pixels
between them, is the memory each further pixel costs; the rest is fixed (torch, the network's
activations on one tile).

With ``--zarr`` the plane is a zarr store (written band by band beforehand, chunks of 1024) and the
result is written to another zarr store, lazily, as the CLI does; ``--block`` restores it in
blocks of that side, whose memory should not grow with the plane.

    python benchmarks/plane_memory.py --sides 4096 8192 12288 --json plane_memory.json
    python benchmarks/plane_memory.py --zarr --block 2048 --sides 4096 8192 12288
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_plane(side: int, in_zarr: bool, block: int | None) -> dict:
    import numpy as np
    import zarr

    from napari_gama_ir import create_model, restore
    from napari_gama_ir.engine.io import write_image

    model = create_model("gama_ir_xs-denoise-grey", pretrained=True)
    random = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        if in_zarr:
            plane = zarr.open_array(str(Path(folder) / "in.zarr"), mode="w", shape=(side, side), chunks=(1024, 1024),
                                    dtype="uint16")
            for row in range(0, side, 1024):  # band by band: the peak before restoring stays small
                plane[row:row + 1024] = random.integers(0, 4000, plane[row:row + 1024].shape, dtype=np.uint16)
        else:
            plane = random.integers(0, 4000, (side, side), dtype=np.uint16)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        started = time.perf_counter()
        restored = restore(plane, model, "YX", output_dtype="input", block=block)
        if in_zarr:
            write_image(restored, Path(folder) / "out.zarr", "YX")
        seconds = time.perf_counter() - started
        rise = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    return {"side": side, "megapixels": side * side / 1e6, "zarr": in_zarr, "block": block,
            "peak_rise_gb": rise / 1e9, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--zarr", action="store_true", help="zarr in, zarr out, lazily (as the CLI restores)")
    parser.add_argument("--block", type=int, help="restore in blocks of this side (default: as the engine chooses)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child's side
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_plane(args.one, args.zarr, args.block)))
        return
    rows = []
    for side in args.sides:
        options = (["--zarr"] if args.zarr else []) + (["--block", str(args.block)] if args.block else [])
        child = subprocess.run([sys.executable, __file__, "--one", str(side), *options], capture_output=True,
                               text=True, check=True)
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
