"""Scaling of distributed restoration on one machine: 1 vs 2 worker processes, and the plain engine.

Restores the same uint16 zarr stack (random noise, a grey GAMA-IR-XS with random weights) with the
single-process engine (`restore` + `write_image`) and with `restore_distributed` on LocalClusters
of different shapes, checks whether every output is identical (or how far apart), and reports wall
seconds and Mpx/s. The
cluster start-up is not timed; the model's transfer and per-worker load are.

    python benchmarks/distributed_scaling.py --planes 32 --size 1024
    python benchmarks/distributed_scaling.py --layouts 1x1 2x1 4x1 --device cuda   # a GPU machine
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from napari_gama_ir import create_model, restore
from napari_gama_ir.engine.distributed import restore_distributed, start_local_cluster
from napari_gama_ir.engine.io import write_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--planes", type=int, default=32)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--arch", default="gama_ir_xs")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layouts", nargs="+", default=["1x2", "2x1"], help="WORKERSxTHREADS local clusters")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = create_model(args.arch, in_channels=1, out_channels=1, channel_meaning="grey")
    folder = Path(tempfile.mkdtemp(prefix="gama-scaling-"))
    try:
        source = zarr.open_array(str(folder / "stack.zarr"), mode="w", shape=(args.planes, args.size, args.size),
                                 chunks=(1, args.size, args.size), dtype=np.uint16)
        rng = np.random.default_rng(0)
        for z in range(args.planes):
            source[z] = rng.integers(0, 60000, (args.size, args.size), dtype=np.uint16)
        megapixels = args.planes * args.size * args.size / 1e6
        results = {"planes": args.planes, "size": args.size, "arch": args.arch, "tile": args.tile,
                   "device": args.device, "runs": []}

        started = time.perf_counter()
        lazy = restore(source, model, "ZYX", tile=args.tile, overlap=64, device=args.device)
        write_image(lazy, folder / "engine.zarr", "ZYX")
        seconds = time.perf_counter() - started
        results["runs"].append({"layout": "single process (engine)", "seconds": round(seconds, 1),
                                "mpx_per_s": round(megapixels / seconds, 3)})
        print(results["runs"][-1], flush=True)
        reference = zarr.open_array(str(folder / "engine.zarr"), mode="r")[:]

        for layout in args.layouts:
            workers, threads = map(int, layout.split("x"))
            client = start_local_cluster(workers, threads)
            try:
                output = folder / f"cluster_{layout}.zarr"
                started = time.perf_counter()
                restore_distributed(source, model, output, "ZYX", client=client, tile=args.tile, overlap=64,
                                    device=args.device)
                seconds = time.perf_counter() - started
            finally:
                cluster = client.cluster
                client.close()
                cluster.close()
            restored = zarr.open_array(str(output), mode="r")[:]
            # Passes of several tiles round otherwise under another thread count (docs/engine.md).
            difference = float(np.abs(restored.astype(np.float64) - reference).max())
            results["runs"].append({"layout": f"{workers} worker(s) x {threads} thread(s)", "seconds": round(seconds, 1),
                                    "mpx_per_s": round(megapixels / seconds, 3),
                                    "identical_to_engine": bool(np.array_equal(restored, reference)),
                                    "largest_difference": difference})
            print(results["runs"][-1], flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
