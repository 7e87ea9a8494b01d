"""Throughput of stacks of small planes (time-lapses of crops, tiles of a screen): the engine
against the bare network run a plane a pass.

For each plane side, a uint16 stack of about ``--pixels`` pixels in all (so each side does the
same work) is restored with the shipped grey GAMA-IR-XS (default tiles, uint16 output): from a
numpy array in memory, and from a zarr store (a plane a chunk) into another, as the CLI does.
The bare network runs the same planes one to a forward pass, as the engine did before it
restored small planes a chunk at a time. Run it under another commit's code (``PYTHONPATH=<its
checkout>/src``) to compare.

    python benchmarks/small_planes.py --sides 32 64 128 256 512 --json small_planes.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

import napari_gama_ir
from napari_gama_ir import create_model, restore
from napari_gama_ir.engine.io import write_image
from napari_gama_ir.engine.runner import ModelRunner


def bare_one_a_pass(model, planes: np.ndarray, device: str) -> float:
    """Seconds for the network alone on ``planes`` (N, Y, X), normalised, one plane a pass."""
    runner = ModelRunner(model, device, batch=1)
    tiles = (planes[:, None] / 65535).astype(np.float32)
    runner.run(tiles[:2])  # warm-up
    started = time.perf_counter()
    runner.run(tiles)
    return time.perf_counter() - started


def one_side(model, side: int, pixels: int, folder: Path, device: str) -> dict:
    count = max(1, pixels // (side * side))
    stack = np.random.default_rng(0).integers(0, 4000, (count, side, side), dtype=np.uint16)
    restore(stack[:2], model, "ZYX", output_dtype="input", device=device)  # warm-up
    started = time.perf_counter()
    restored = restore(stack, model, "ZYX", output_dtype="input", device=device)
    in_memory = time.perf_counter() - started
    source = zarr.open_array(str(folder / f"in{side}.zarr"), mode="w", shape=stack.shape, chunks=(1, side, side),
                             dtype=stack.dtype)
    source[:] = stack
    started = time.perf_counter()
    write_image(restore(zarr.open_array(str(folder / f"in{side}.zarr"), mode="r"), model, "ZYX",
                        output_dtype="input", device=device), folder / f"out{side}.zarr", "ZYX")
    zarr_to_zarr = time.perf_counter() - started
    written = zarr.open_array(str(folder / f"out{side}.zarr"), mode="r")
    assert np.array_equal(written[:], restored)
    bare = bare_one_a_pass(model, stack, device)
    megapixels = count * side * side / 1e6
    row = {
        "side": side, "planes": count, "output_chunk_planes": written.chunks[0],
        "in_memory_mpx_s": megapixels / in_memory, "zarr_to_zarr_mpx_s": megapixels / zarr_to_zarr,
        "bare_one_a_pass_mpx_s": megapixels / bare,
        "in_memory_s": in_memory, "zarr_to_zarr_s": zarr_to_zarr, "bare_one_a_pass_s": bare,
    }
    print(f"{side:5d} px, {count:5d} planes: in memory {row['in_memory_mpx_s']:.2f} Mpx/s ({in_memory:.1f} s), "
          f"zarr to zarr {row['zarr_to_zarr_mpx_s']:.2f} Mpx/s ({zarr_to_zarr:.1f} s, output chunks of "
          f"{written.chunks[0]} planes), bare network a plane a pass {row['bare_one_a_pass_mpx_s']:.2f} Mpx/s",
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--pixels", type=int, default=2**23, help="pixels of each stack (default 8 M)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    model = create_model("gama_ir_xs-denoise-grey", pretrained=True)
    print(f"napari_gama_ir from {Path(napari_gama_ir.__file__).parent}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        rows = [one_side(model, side, args.pixels, Path(folder), args.device) for side in args.sides]
    if args.json:
        Path(args.json).write_text(json.dumps({"model": "gama_ir_xs-denoise-grey", "device": args.device,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
