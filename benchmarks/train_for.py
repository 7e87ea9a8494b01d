"""Run ``napari-gama-ir train`` with as many steps as fit before a deadline, so the schedule ends.

The cosine learning-rate schedule spans a run's steps: a run cut short by ``--minutes`` stops
before it anneals. For a fixed slice of (GPU) time this script first times a short probe with the
same data, network and settings on the same device, leaving out its first steps (device start-up,
planes read into memory), then runs the train command with ``steps = rate x time left x margin``
and ``--minutes`` as a safety net: a run that falls behind stops with a checkpoint to resume.
Two of these may share a GPU; each then measures the rate it gets while the other runs.

    python benchmarks/train_for.py --until $(($(date +%s) + 330)) --clean ../shared/data/train/CBSD432 \\
        --noise gaussian:0-55 --arch gama_ir_s --patch 128 --batch 32 --precision bf16 --device cuda -o run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time

from napari_gama_ir.cli import main as cli_main
from napari_gama_ir.engine.normalize import NORMALIZATION_CHOICES
from napari_gama_ir.train import Trainer, TrainSettings, data_from_paths, default_normalization, starting_model

PROBE_STEPS, PROBE_SKIPPED = 60, 20


def probe_rate(args: argparse.Namespace) -> float:
    """Training steps per second of these settings on this device (validation and checkpoints aside)."""
    data = data_from_paths(None, args.clean, grey=args.grey)
    normalization = default_normalization(data.dtype, args.normalization)
    settings = TrainSettings(
        steps=PROBE_STEPS, batch=args.batch, patch=args.patch, noise=args.noise, precision=args.precision,
        device=args.device, validation_fraction=0.0, checkpoint_every=PROBE_STEPS + 1, seed=args.seed,
    )
    model, _ = starting_model(
        data.channels, source=args.from_, architecture=args.arch, patch=args.patch, normalization=normalization,
    )
    folder = tempfile.mkdtemp(prefix="train-probe-")
    try:
        times = {event.step: event.seconds for event in Trainer(model, data, settings, folder).run()}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return (PROBE_STEPS - PROBE_SKIPPED) / (times[PROBE_STEPS] - times[PROBE_SKIPPED])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--until", type=float, required=True, help="deadline, seconds since the epoch")
    parser.add_argument("--margin", type=float, default=0.9, help="share of the probed rate to plan with")
    parser.add_argument("--clean", required=True)
    parser.add_argument("--grey", action="store_true")
    parser.add_argument("--noise", required=True)
    parser.add_argument("--normalization", default="auto", choices=NORMALIZATION_CHOICES)
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--arch", default="gama_ir_s")
    start.add_argument("--from", dest="from_", metavar="MODEL", help="fine-tune this model instead")
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the train command's)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()

    rate = probe_rate(args)
    seconds_left = args.until - time.time() - 15  # start-up of the real run and its last validation
    steps = int(rate * seconds_left * args.margin)
    if steps < 100:
        raise SystemExit(f"only {seconds_left:.0f} s left at {rate:.1f} steps/s: too little to train")
    command = [
        "train", "--clean", args.clean, *(["--grey"] if args.grey else []), "--noise", args.noise,
        "--normalization", args.normalization, *(["--from", args.from_] if args.from_ else ["--arch", args.arch]),
        *(["--lr", str(args.lr)] if args.lr else []), "--patch", str(args.patch),
        "--batch", str(args.batch), "--precision", args.precision, "--device", args.device,
        "--seed", str(args.seed), "--checkpoint-every", str(args.checkpoint_every), "--steps", str(steps),
        "--minutes", f"{(seconds_left + 10) / 60:.2f}", "-q", "-o", args.output,
    ]
    plan = {"probe_steps_per_s": round(rate, 3), "seconds_left": round(seconds_left, 1), "steps": steps,
            "command": "napari-gama-ir " + " ".join(command)}
    print(json.dumps(plan), flush=True)
    started = time.time()
    status = cli_main(command)
    print(json.dumps({"train_exit": status, "wall_s": round(time.time() - started, 1)}), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
