"""Gaussian denoising on the standard test sets: a GAMA-IR model and BM3D on the same noisy images.

Protocol (DnCNN / Restormer): the clean image on [0, 255]; white Gaussian noise of sigma 15, 25 and
50 with a seed fixed per (sigma, image); the noisy image is not clipped; each restoration is clipped
to [0, 255] (not rounded); PSNR and SSIM (scikit-image, 7x7 uniform window) on [0, 255], mean
over the set. BM3D is PyPI's ``bm3d`` (CBM3D for colour: ``bm3d_rgb``), given the true sigma.
Example:

    python benchmarks/eval_denoise.py --model gama_ir_xs-denoise-rgb --colour \\
        --sets ../shared/data/test/CBSD68 ../shared/data/test/Kodak24 --json benchmarks/output/eval_rgb.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from napari_gama_ir import create_model, restore
from napari_gama_ir.train import psnr, ssim
from napari_gama_ir.train.data import LUMINANCE

PICTURES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def load_set(folder: Path, colour: bool) -> list[np.ndarray]:
    """Clean images on [0, 255] as float64: (H, W, 3) for colour, (H, W) for grey."""
    import imageio.v3 as iio

    images = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in PICTURES):
        image = np.asarray(iio.imread(path), np.float64)
        if colour and image.ndim == 2:
            raise SystemExit(f"{path}: a grey image in a colour evaluation")
        if not colour and image.ndim == 3:
            image = image[..., :3] @ np.array(LUMINANCE)
        images.append(image[..., :3] if colour else image)
    return images


def noisy_version(clean: np.ndarray, sigma: float, index: int) -> np.ndarray:
    return clean + np.random.default_rng([int(sigma), index]).normal(0, sigma, clean.shape)


def scores(clean: np.ndarray, restored: np.ndarray) -> tuple[float, float]:
    """PSNR and SSIM on [0, 255]; channels-last images are moved to (C, H, W) for ``ssim``."""
    restored = np.clip(restored, 0, 255)
    channels_first = (lambda a: a.transpose(2, 0, 1)) if clean.ndim == 3 else (lambda a: a)
    return psnr(clean, restored, 255.0), ssim(channels_first(clean), channels_first(restored), 255.0)


def bm3d_scores(clean: np.ndarray, sigma: float, index: int) -> tuple[float, float, float]:
    """BM3D's PSNR and SSIM on one image, and its seconds (run in a worker process)."""
    import bm3d

    noisy = noisy_version(clean, sigma, index)
    started = time.perf_counter()
    if noisy.ndim == 3:
        restored = bm3d.bm3d_rgb(noisy / 255.0, sigma / 255.0) * 255.0
    else:
        restored = bm3d.bm3d(noisy / 255.0, sigma / 255.0) * 255.0
    return (*scores(clean, restored), time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="registry name with shipped weights, user model or checkpoint")
    parser.add_argument("--sets", nargs="+", required=True, help="folders of clean test images")
    parser.add_argument("--colour", action="store_true", help="colour evaluation (default: grey)")
    parser.add_argument("--sigmas", nargs="+", type=float, default=[15.0, 25.0, 50.0])
    parser.add_argument("--no-bm3d", action="store_true", help="skip BM3D (it takes most of the time)")
    parser.add_argument("--limit", type=int, help="first N images of each set (quick checks only)")
    parser.add_argument("--workers", type=int, default=2, help="processes for BM3D (default 2)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="the network's CPU precision")
    parser.add_argument("--compile", action="store_true",
                        help="run the network through torch.compile (compiled once per image shape; time included)")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()

    model = create_model(args.model, pretrained=True)
    axes = "YXC" if args.colour else "YX"
    results: dict = {"model": args.model, "precision": args.precision, "compiled": args.compile,
                     "protocol": __doc__.split("\n\n")[1], "sets": {}}
    sets = [(folder, load_set(folder, args.colour)[: args.limit]) for folder in map(Path, args.sets)]
    # BM3D is single-threaded and slow: all its jobs go to worker processes first, one per core,
    # and run while the network restores the same noisy images here.
    pool = ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn"))
    bm3d_jobs = {} if args.no_bm3d else {
        (folder.name, sigma, index): pool.submit(bm3d_scores, clean, sigma, index)
        for folder, images in sets for sigma in args.sigmas for index, clean in enumerate(images)
    }
    rows = []
    for folder, images in sets:
        for sigma in args.sigmas:
            figures: dict[str, list[tuple[float, float]]] = {"noisy": [], "model": [], "bm3d": []}
            seconds = {"model": 0.0, "bm3d": 0.0}
            for index, clean in enumerate(images):
                noisy = noisy_version(clean, sigma, index)
                figures["noisy"].append(scores(clean, noisy))
                started = time.perf_counter()
                restored = restore((noisy / 255.0).astype(np.float32), model, axes, tile=None, device="cpu",
                                   precision=args.precision, compile=args.compile)
                seconds["model"] += time.perf_counter() - started
                figures["model"].append(scores(clean, restored.astype(np.float64) * 255.0))
            for index in range(len(images)) if bm3d_jobs else ():
                *bm3d_figures, bm3d_seconds = bm3d_jobs[(folder.name, sigma, index)].result()
                figures["bm3d"].append(tuple(bm3d_figures))
                seconds["bm3d"] += bm3d_seconds
            summary = {
                name: {"psnr": float(np.mean([p for p, _ in values])), "ssim": float(np.mean([s for _, s in values]))}
                for name, values in figures.items() if values
            }
            summary["seconds_per_image"] = {k: v / len(images) for k, v in seconds.items() if figures[k]}
            results["sets"].setdefault(folder.name, {"images": len(images)})[f"sigma {sigma:g}"] = summary
            rows.append((folder.name, len(images), sigma, summary))
            bm3d_text = f"BM3D {summary['bm3d']['psnr']:.2f} / {summary['bm3d']['ssim']:.4f}, " if "bm3d" in summary else ""
            print(f"{folder.name} ({len(images)} images) sigma {sigma:g}: noisy {summary['noisy']['psnr']:.2f}, "
                  f"{bm3d_text}model {summary['model']['psnr']:.2f} / {summary['model']['ssim']:.4f}", flush=True)
    pool.shutdown()

    print("\n| set | sigma | noisy | BM3D PSNR / SSIM | model PSNR / SSIM |\n|---|---|---|---|---|")
    for name, count, sigma, summary in rows:
        bm3d = f"{summary['bm3d']['psnr']:.2f} / {summary['bm3d']['ssim']:.4f}" if "bm3d" in summary else "-"
        print(f"| {name} ({count}) | {sigma:g} | {summary['noisy']['psnr']:.2f} | {bm3d} | "
              f"{summary['model']['psnr']:.2f} / {summary['model']['ssim']:.4f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
