"""Train on a Poisson-Gaussian noisy grey stack for a few minutes each: supervised vs self-supervised.

The stack is the plugin's fluorescence sample generator (blurred 3-D blobs, Poisson photon noise
plus Gaussian read noise, uint16) at a larger size. The last ``--test-planes`` planes are never
trained on; every method restores them and is scored against their clean (expected-count) planes,
PSNR with the clean plane's max - min as data range (as ``napari-gama-ir evaluate``). Each method
trains GAMA-IR-XS from scratch (no weights ship yet) for about ``--minutes``: the step count is set
from a short timing so that the cosine schedule ends on time. Example:

    python benchmarks/finetune_fluorescence.py --minutes 4 -o benchmarks/output/finetune
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_gama_ir import create_model, restore
from napari_gama_ir.samples import noisy_fluorescence_stack
from napari_gama_ir.train import TrainSettings, Trainer, data_from_arrays, default_normalization, psnr, ssim, starting_model

METHODS = {
    "supervised (noisy/clean pairs, L1)": {"objective": "supervised"},
    "Noise2Void (noisy only)": {"objective": "noise2void"},
    "Neighbor2Neighbor (noisy only)": {"objective": "neighbor2neighbor"},
}


def scores(clean: np.ndarray, images: np.ndarray) -> tuple[float, float]:
    pairs = [(c, i) for c, i in zip(clean, images)]
    ranges = [float(c.max() - c.min()) for c, _ in pairs]
    return (
        float(np.mean([psnr(c, i, r) for (c, i), r in zip(pairs, ranges)])),
        float(np.mean([ssim(c, i, r) for (c, i), r in zip(pairs, ranges)])),
    )


def make_trainer(noisy, clean, objective, steps, args, folder) -> Trainer:
    data = data_from_arrays(noisy, clean if objective == "supervised" else None, axes="ZYX", name="fluorescence")
    model, start = starting_model(1, architecture=args.arch, patch=args.patch,
                                  normalization=default_normalization(noisy.dtype), seed=args.seed)
    settings = TrainSettings(steps=steps, batch=args.batch, patch=args.patch, objective=objective, seed=args.seed,
                             validate_every=max(steps // 8, 1), device="cpu")
    return Trainer(model, data, settings, folder, start=start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="training time per method")
    parser.add_argument("--planes", type=int, default=40)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--test-planes", type=int, default=4)
    parser.add_argument("--photons", type=float, default=30.0)
    parser.add_argument("--read-noise", type=float, default=3.0)
    parser.add_argument("--arch", default="gama_ir_xs")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", default="benchmarks/output/finetune")
    args = parser.parse_args()

    noisy, clean = noisy_fluorescence_stack(args.planes, args.size, args.photons, args.read_noise, seed=args.seed)
    train_noisy, train_clean = noisy[: -args.test_planes], clean[: -args.test_planes]
    test_noisy, test_clean = noisy[-args.test_planes :], clean[-args.test_planes :]
    results = {"noisy input": scores(test_clean, test_noisy.astype(np.float32))}
    print(f"noisy input: PSNR {results['noisy input'][0]:.2f} dB, SSIM {results['noisy input'][1]:.4f}", flush=True)
    details = {}
    for label, method in METHODS.items():
        with tempfile.TemporaryDirectory() as folder:
            # Time a few steps of this method to size a schedule that ends after --minutes.
            probe = make_trainer(train_noisy, train_clean, method["objective"], 10_000, args, folder)
            started = time.monotonic()
            for event in probe.run():
                if event.step == 5:
                    break
            per_step = (time.monotonic() - started) / 5
        steps = max(int(args.minutes * 60 / per_step), 10)
        folder = Path(args.output) / method["objective"]
        trainer = make_trainer(train_noisy, train_clean, method["objective"], steps, args, folder)
        started = time.monotonic()
        for _ in trainer.run():
            pass
        seconds = time.monotonic() - started
        result = trainer.result()

        model = create_model(str(result.model_path))
        restored = restore(test_noisy, model, "ZYX", tile=None, device="cpu")
        results[label] = scores(test_clean, restored)
        details[label] = {"steps": steps, "seconds": round(seconds, 1), "best": result.best}
        print(f"{label}: {steps} steps in {seconds:.0f} s, PSNR {results[label][0]:.2f} dB, "
              f"SSIM {results[label][1]:.4f}", flush=True)

    print("\n| method | steps | train time | PSNR (dB) | SSIM |\n|---|---|---|---|---|")
    for label, (value_psnr, value_ssim) in results.items():
        extra = details.get(label, {"steps": "-", "seconds": "-"})
        print(f"| {label} | {extra['steps']} | {extra['seconds']} s | {value_psnr:.2f} | {value_ssim:.4f} |")
    record = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "arguments": vars(args),
        "results": {k: {"psnr": v[0], "ssim": v[1], **details.get(k, {})} for k, v in results.items()},
    }
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "results.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
