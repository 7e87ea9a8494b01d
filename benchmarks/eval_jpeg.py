"""Denoising photos as cameras and phones save them: Gaussian noise, then a lossy 8-bit codec.

Protocol: the clean image on [0, 255]; white Gaussian noise of each sigma with a seed fixed per
(sigma, image), as ``eval_denoise.py``; then rounded and clipped to 8 bits, saved with each codec
at each quality, and decoded: that is the noisy image. The default codec is a JPEG with its colours
at half resolution (4:2:0, a camera's and Pillow's default); ``--codecs`` adds JPEG at 4:2:2 and
4:4:4, lossy WebP (always 4:2:0), and HEIF (an iPhone's HEIC, through pillow-heif) and AVIF at
4:2:0 and 4:4:4. Each restoration is clipped to [0, 255] (not rounded); PSNR and SSIM as
``eval_denoise.py``, mean over the set. Sigma 0 is a clean photo's JPEG, which a model should not
spoil. ``--plain`` adds the Gaussian protocol of ``eval_denoise.py`` itself (no codec).
``--grey`` turns colour sets to grey (BT.709 luminance, as ``eval_denoise.py``) and saves grey
pictures, which have no colours to subsample. Example:

    python benchmarks/eval_jpeg.py --models gama_ir_xs-denoise-rgb gama_ir_xs-denoise-rgb-jpeg \\
        --sets ../shared/data/test/CBSD68 ../shared/data/test/Kodak24 --json benchmarks/output/eval_jpeg.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from eval_denoise import load_set, noisy_version, scores

from napari_gama_ir import create_model, restore
from napari_gama_ir.train.objectives import PHOTO_CODECS, saved_photo


def compressed(pixels: np.ndarray, codec: str, quality: int) -> np.ndarray:
    """``pixels`` (on [0, 255]) rounded to 8 bits, saved with ``codec`` at ``quality``, decoded."""
    return saved_photo(pixels, codec, quality).astype(np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True, help="registry names, user models or checkpoints")
    parser.add_argument("--sets", nargs="+", required=True, help="folders of clean test images")
    parser.add_argument("--conditions", nargs="+", default=["15:90", "25:90", "50:90", "25:75", "0:90"],
                        help="SIGMA:QUALITY pairs (default 15:90 25:90 50:90 25:75 0:90)")
    parser.add_argument("--plain", nargs="*", type=float, default=[25.0],
                        help="sigmas of the plain Gaussian protocol, no JPEG (default 25; none: leave it out)")
    parser.add_argument("--codecs", nargs="+", default=["jpeg"], choices=list(PHOTO_CODECS),
                        help="lossy codecs to save the noisy images with (default jpeg, at 4:2:0)")
    parser.add_argument("--grey", action="store_true", help="grey images and grey pictures (colour sets made grey)")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    models = {name: create_model(name, pretrained=True) for name in args.models}
    axes = "YX" if args.grey else "YXC"
    conditions = [(codec, *(int(v) for v in text.split(":"))) for codec in args.codecs for text in args.conditions]
    conditions += [(None, int(sigma), None) for sigma in args.plain]
    record: dict = {"models": args.models, "codecs": args.codecs, "grey": args.grey,
                    "protocol": __doc__.split("Example:")[0].strip(), "sets": {}}
    started = time.time()
    for folder in map(Path, args.sets):
        clean_images = load_set(folder, colour=not args.grey)
        results = record["sets"][folder.name] = {"images": len(clean_images)}
        for codec, sigma, quality in conditions:
            shown = "JPEG" if codec == "jpeg" else codec
            label = f"sigma {sigma}, {shown} {quality}" if codec else f"sigma {sigma}, no JPEG"
            figures: dict[str, list[tuple[float, float]]] = {"noisy": [], **{name: [] for name in models}}
            for index, clean in enumerate(clean_images):
                noisy = noisy_version(clean, sigma, index)
                if codec:
                    noisy = compressed(noisy, codec, quality)
                figures["noisy"].append(scores(clean, noisy))
                for name, model in models.items():
                    restored = restore((noisy / 255).astype(np.float32), model, axes, tile=None) * 255
                    figures[name].append(scores(clean, restored))
            results[label] = {name: {"psnr": float(np.mean([p for p, _ in values])),
                                     "ssim": float(np.mean([s for _, s in values]))}
                              for name, values in figures.items()}
            print(f"{folder.name} {label}: " + ", ".join(
                f"{name} {value['psnr']:.2f}/{value['ssim']:.4f}" for name, value in results[label].items()), flush=True)
    record["seconds"] = time.time() - started
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
