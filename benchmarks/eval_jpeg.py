"""Denoising photos as cameras save them: Gaussian noise, then an 8-bit JPEG with 4:2:0 colours.

Protocol: the clean image on [0, 255]; white Gaussian noise of each sigma with a seed fixed per
(sigma, image), as ``eval_denoise.py``; then rounded and clipped to 8 bits and saved as a JPEG of
each quality with Pillow, colours at half resolution (4:2:0, a camera's and Pillow's default),
and decoded: that is the noisy image. Each restoration is clipped to [0, 255] (not rounded); PSNR
and SSIM as ``eval_denoise.py``, mean over the set. Sigma 0 is a clean photo's JPEG, which a model
should not spoil. ``--plain`` adds the Gaussian protocol of ``eval_denoise.py`` itself (no JPEG).
Example:

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
from napari_gama_ir.train.objectives import as_camera_jpeg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True, help="registry names, user models or checkpoints")
    parser.add_argument("--sets", nargs="+", required=True, help="folders of clean colour test images")
    parser.add_argument("--conditions", nargs="+", default=["15:90", "25:90", "50:90", "25:75", "0:90"],
                        help="SIGMA:QUALITY pairs (default 15:90 25:90 50:90 25:75 0:90)")
    parser.add_argument("--plain", nargs="*", type=float, default=[25.0],
                        help="sigmas of the plain Gaussian protocol, no JPEG (default 25; none: leave it out)")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    models = {name: create_model(name, pretrained=True) for name in args.models}
    conditions = [tuple(int(v) for v in text.split(":")) for text in args.conditions]
    conditions += [(int(sigma), None) for sigma in args.plain]
    record: dict = {"models": args.models, "protocol": __doc__.split("Example:")[0].strip(), "sets": {}}
    started = time.time()
    for folder in map(Path, args.sets):
        clean_images = load_set(folder, colour=True)
        results = record["sets"][folder.name] = {"images": len(clean_images)}
        for sigma, quality in conditions:
            label = f"sigma {sigma}, JPEG {quality}" if quality else f"sigma {sigma}, no JPEG"
            figures: dict[str, list[tuple[float, float]]] = {"noisy": [], **{name: [] for name in models}}
            for index, clean in enumerate(clean_images):
                noisy = noisy_version(clean, sigma, index)
                if quality:
                    noisy = as_camera_jpeg(noisy, quality).astype(np.float64)
                figures["noisy"].append(scores(clean, noisy))
                for name, model in models.items():
                    restored = restore((noisy / 255).astype(np.float32), model, "YXC", tile=None) * 255
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
