"""Training steps per second on a folder of images, reading included, as `napari-gama-ir train` runs.

Supervised training on the clean images with synthetic Gaussian noise, no validation, no
checkpoints: what is timed is reading the images, cutting patches, adding noise and the optimiser
steps. Run it with ``PYTHONPATH=<other checkout>/src`` to compare two versions of the package.

    python benchmarks/train_throughput.py ../shared/data/train/CBSD432 --steps 80 --batch 8 --patch 96
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import napari_gama_ir
from napari_gama_ir.train import TrainSettings, data_from_paths, starting_model, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="clean training images")
    parser.add_argument("--arch", default="gama_ir_xs")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    data = data_from_paths(None, args.folder)
    settings = TrainSettings(steps=args.steps, batch=args.batch, patch=args.patch, noise="gaussian:0-55",
                             validation_fraction=0, checkpoint_every=10**9, device=args.device)
    model, _ = starting_model(data.channels, architecture=args.arch, patch=args.patch, seed=0)
    folder = tempfile.mkdtemp(prefix="gama-train-throughput-")
    try:
        started = time.perf_counter()
        train(model, data, settings, folder)
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{napari_gama_ir.__file__}: {args.arch}, {args.steps} steps of {args.batch} x {args.patch} px on "
          f"{args.device}: {seconds:.1f} s, {args.steps / seconds:.2f} steps/s")


if __name__ == "__main__":
    main()
