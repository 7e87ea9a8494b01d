"""Which GAMA averaging should the engine use by default? PSNR of global vs local means.

For a trained colour denoiser, restores test images at a Gaussian noise level through the engine
(`restore`) in four ways -- whole image or tiled, global or local means -- and reports the mean
PSNR of each. Protocol: clean image scaled to [0, 255], white Gaussian noise with a fixed seed per
image, noisy input not clipped, PSNR on [0, 255].

    python benchmarks/mean_modes.py --model /tmp/small_rgb/small_rgb.json \
        --images ../shared/data/test/CBSD68 ../shared/data/test/Kodak24 --sigma 25
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from skimage.metrics import peak_signal_noise_ratio

from napari_gama_ir import create_model, restore

VARIANTS = {
    "whole, global means": dict(tile=None, mean_mode="global"),
    "whole, local means": dict(tile=None, mean_mode="local"),
    "tiles 128/32, global means": dict(tile=128, overlap=32, mean_mode="global"),
    "tiles 128/32, local means": dict(tile=128, overlap=32, mean_mode="local"),
}


def clean_images(folder: str) -> list[np.ndarray]:
    """The folder's 8-bit RGB pictures on [0, 255] as float64 (H, W, 3) arrays, sorted by name."""
    import imageio.v3 as iio

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    return [np.asarray(iio.imread(p), np.float64)[..., :3] for p in paths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", nargs="+", required=True, help="folders of clean test images")
    parser.add_argument("--sigma", type=float, default=25.0)
    parser.add_argument("--limit", type=int, default=None, help="first N images of each folder")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    model = create_model(args.model)
    results = {"model": args.model, "sigma": args.sigma, "train_patch_size": model.config.train_patch_size, "sets": {}}
    for folder in args.images:
        images = clean_images(folder)[: args.limit]
        scores = {name: [] for name in VARIANTS}
        noisy_scores = []
        for index, image in enumerate(images):
            clean = image
            noise = np.random.default_rng(index).normal(0, args.sigma, clean.shape)
            noisy = ((clean + noise) / 255.0).astype(np.float32)
            noisy_scores.append(peak_signal_noise_ratio(clean, noisy * 255.0, data_range=255))
            for name, settings in VARIANTS.items():
                out = restore(noisy, model, "YXC", **settings) * 255.0
                scores[name].append(peak_signal_noise_ratio(clean, out.astype(np.float64), data_range=255))
        summary = {"images": len(images), "noisy": round(float(np.mean(noisy_scores)), 3)}
        summary.update({name: round(float(np.mean(values)), 3) for name, values in scores.items()})
        results["sets"][Path(folder).name] = summary
        print(f"{Path(folder).name} ({len(images)} images, sigma {args.sigma:g}):")
        for name, value in summary.items():
            print(f"  {name:<28} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
