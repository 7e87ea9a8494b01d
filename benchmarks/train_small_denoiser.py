"""Train a small blind Gaussian colour denoiser on CBSD432 within a time budget (CPU friendly).

Used to have a trained network for engine measurements (e.g. benchmarks/mean_modes.py) before
the shipped models exist. Example:

    python benchmarks/train_small_denoiser.py --data ../shared/data/train/CBSD432 \
        --minutes 40 -o /tmp/small_rgb
"""

from __future__ import annotations

import argparse
import json
import time

from napari_gama_ir.model import GamaIR, GamaIRConfig, save_checkpoint
from napari_gama_ir.train import GaussianNoise, PatchSampler, TrainSettings, load_image_folder, train_denoiser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder of clean training images")
    parser.add_argument("-o", "--output", required=True, help="checkpoint stem to write")
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--steps", type=int, default=6000, help="length of the cosine schedule")
    parser.add_argument("--width", type=int, default=24)
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = GamaIRConfig(
        width=args.width, encoder_blocks=(1, 1, 1), middle_blocks=4, decoder_blocks=(1, 1, 1),
        train_patch_size=args.patch, channel_meaning="rgb",
    )
    model = GamaIR(config)
    images = load_image_folder(args.data)
    sampler = PatchSampler(images, args.patch, seed=args.seed)
    settings = TrainSettings(steps=args.steps, batch=args.batch, seed=args.seed, time_limit=args.minutes * 60)

    def report(step: int, loss: float) -> None:
        if step % 200 == 0:
            print(f"step {step} loss {loss:.4f} {time.strftime('%H:%M:%S')}", flush=True)

    history = train_denoiser(model, sampler, GaussianNoise(0, 55, seed=args.seed), settings, on_step=report)
    metadata = {
        "task": "blind Gaussian denoising, sigma 0-55 (0-255 scale)",
        "data": str(args.data),
        "steps_done": history["steps_done"],
        "schedule_steps": args.steps,
        "batch": args.batch,
        "patch": args.patch,
        "seconds": round(history["seconds"], 1),
        "seed": args.seed,
        "final_loss_mean_100": sum(history["losses"][-100:]) / min(100, len(history["losses"])),
    }
    path = save_checkpoint(model, args.output, metadata=metadata)
    print(json.dumps({"checkpoint": str(path), **metadata}, indent=2))


if __name__ == "__main__":
    main()
