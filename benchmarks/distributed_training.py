"""Scaling of data-parallel training on one machine: one process vs replicas on a LocalCluster.

Trains the same network (random start, seed 0) on the same synthetic-noise data for the same steps
and global batch with the single-process trainer and with `train_distributed` on LocalClusters of
different shapes, and reports steps/s and patches/s (cluster start-up not timed; the replicas'
process-group set-up and first steps are) and the largest weight difference from the
single-process run.

    python benchmarks/distributed_training.py --steps 60 --batch 8 --patch 96
    python benchmarks/distributed_training.py --layouts 1x1 2x1 4x1 --device cuda   # a GPU machine
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

from napari_gama_ir import create_model
from napari_gama_ir.engine.distributed import start_local_cluster
from napari_gama_ir.train import TrainSettings, data_from_arrays, starting_model, train, train_distributed


def largest_difference(first: Path, second: Path) -> float:
    a, b = create_model(str(first)).state_dict(), create_model(str(second)).state_dict()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="gama_ir_xs")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layouts", nargs="+", default=["1x2", "2x1"], help="WORKERSxTHREADS local clusters")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    clean = rng.random((16, 256, 256), dtype=np.float32)  # synthetic noise is added to patches of this
    data = data_from_arrays(clean=clean, axes="ZYX")
    settings = TrainSettings(steps=args.steps, batch=args.batch, patch=args.patch, noise="gaussian:0-55",
                             validation_fraction=0, checkpoint_every=10**9, device=args.device)
    folder = Path(tempfile.mkdtemp(prefix="gama-train-scaling-"))
    rows = []
    try:
        model, _ = starting_model(1, architecture=args.arch, patch=args.patch, seed=0)
        started = time.perf_counter()
        reference = train(model, data, settings, folder / "single")
        seconds = time.perf_counter() - started
        rows.append({"layout": f"single process ({torch.get_num_threads()} threads)", "seconds": seconds,
                     "difference": 0.0})
        for layout in args.layouts:
            workers, threads = (int(n) for n in layout.split("x"))
            client = start_local_cluster(workers, threads)
            try:
                model, _ = starting_model(1, architecture=args.arch, patch=args.patch, seed=0)
                started = time.perf_counter()
                result = train_distributed(model, data, settings, folder / layout, client=client)
                seconds = time.perf_counter() - started
            finally:
                cluster = client.cluster
                client.close()
                cluster.close()
            rows.append({"layout": f"{workers} replica(s) x {threads} thread(s)", "seconds": seconds,
                         "difference": largest_difference(reference.model_path, result.model_path)})
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print(f"{args.arch}, {args.steps} steps of {args.batch} x {args.patch}px, device {args.device}\n")
    print("| layout | wall time | steps/s | patches/s | largest weight difference from one process |")
    print("|---|---|---|---|---|")
    for row in rows:
        row["steps_per_second"] = args.steps / row["seconds"]
        print(f"| {row['layout']} | {row['seconds']:.1f} s | {row['steps_per_second']:.2f} | "
              f"{row['steps_per_second'] * args.batch:.1f} | {row['difference']:.2e} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
