"""Does the GAMA block give a shallow network a global receptive field? Two measurements.

1. The paper's Figure 5 (section 5): a network with one hidden layer (3x3 conv, ReLU, [global
   module], 3x3 conv, plus the input) learns to map one noisy image to its clean version. Plain CNN,
   Squeeze&Excite and GAMA variants get (nearly) equal parameter counts by adapting the hidden
   width. Images: scikit-image's chessboard (repetitive) and its grass texture (natural, no
   repetition), both bundled with scikit-image. Reports PSNR per variant, image and seed.
2. The effective receptive field (Luo et al., 2016): the gradient of one output pixel of GAMA-IR-S
   with respect to the input, against the same architecture with ``global_block="identity"``;
   reports the radius holding 90% of the gradient mass and saves the maps.

    python benchmarks/receptive_field.py --out docs/experiments
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from skimage import data
from skimage.metrics import peak_signal_noise_ratio
from torch import nn

from napari_gama_ir import create_model
from napari_gama_ir.model.global_blocks import make_global_block

VARIANTS = {"plain": "identity", "squeeze_excite": "squeeze_excite", "gama": "gama"}


class OneHiddenLayer(nn.Module):
    """3x3 conv -> ReLU -> global module -> 3x3 conv, added to the input (Figure 5's networks)."""

    def __init__(self, hidden: int, global_block: str) -> None:
        super().__init__()
        self.first = nn.Conv2d(1, hidden, 3, padding=1)
        self.context = make_global_block(global_block, hidden)
        self.last = nn.Conv2d(hidden, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.last(self.context(torch.relu(self.first(x))))


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def matched_widths(gama_hidden: int) -> dict[str, int]:
    """Hidden widths giving each variant the parameter count closest to GAMA's at ``gama_hidden``."""
    target = parameters(OneHiddenLayer(gama_hidden, "gama"))
    widths = {}
    for name, block in VARIANTS.items():
        widths[name] = min(range(4, 4 * gama_hidden), key=lambda h: abs(parameters(OneHiddenLayer(h, block)) - target))
    return widths


def images() -> dict[str, np.ndarray]:
    grass = data.grass()  # 512 x 512 uint8, a natural texture without repetition
    return {
        "chessboard": data.checkerboard().astype(np.float32) / 255,  # 200 x 200, 25-pixel squares
        "grass": grass[128:384, 128:384].astype(np.float32) / 255,
    }


def fit_one_image(clean: np.ndarray, hidden: int, block: str, sigma: float, steps: int, seed: int):
    """Train on the single noisy/clean pair; return the PSNR of the final output and the output."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.from_numpy(clean)[None, None]
    noisy = target + sigma / 255 * torch.randn(target.shape, generator=generator)
    torch.manual_seed(seed)
    net = OneHiddenLayer(hidden, block)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = (net(noisy) - target).abs().mean()
        loss.backward()
        optimiser.step()
        schedule.step()
    with torch.no_grad():
        output = net(noisy)[0, 0].clamp(0, 1).numpy()
    return peak_signal_noise_ratio(clean, output, data_range=1.0), noisy[0, 0].numpy(), output


def figure5(args, out: Path) -> dict:
    widths = matched_widths(args.gama_hidden)
    counts = {name: parameters(OneHiddenLayer(widths[name], block)) for name, block in VARIANTS.items()}
    print(f"hidden widths {widths}, parameters {counts}", flush=True)
    results = {"sigma": args.sigma, "steps": args.steps, "seeds": args.seeds, "hidden": widths,
               "parameters": counts, "psnr": {}}
    shown = {}
    for image_name, clean in images().items():
        if image_name not in args.images:
            continue
        results["psnr"][image_name] = {}
        for name, block in VARIANTS.items():
            scores = []
            for seed in range(args.seeds):
                started = time.perf_counter()
                score, noisy, output = fit_one_image(clean, widths[name], block, args.sigma, args.steps, seed)
                scores.append(score)
                print(f"{image_name:<10} {name:<15} seed {seed}: {score:.2f} dB ({time.perf_counter() - started:.0f} s)",
                      flush=True)
                if seed == 0:
                    shown[image_name, name] = output
                    shown[image_name, "noisy"] = noisy
                    shown[image_name, "clean"] = clean
            results["psnr"][image_name][name] = scores
        noisy_psnr = peak_signal_noise_ratio(clean, np.clip(shown[image_name, "noisy"], 0, 1), data_range=1.0)
        results["psnr"][image_name]["noisy input (clipped)"] = [noisy_psnr]
    _plot_figure5(results, shown, out / "figure5.png")
    return results


def _plot_figure5(results: dict, shown: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["clean", "noisy", *VARIANTS]
    rows = len(results["psnr"])
    figure, axes = plt.subplots(rows, len(columns), figsize=(3 * len(columns), 3.2 * rows), squeeze=False)
    for row, image_name in enumerate(results["psnr"]):
        for col, name in enumerate(columns):
            axes[row][col].imshow(shown[image_name, name][:96, :96], cmap="gray", vmin=0, vmax=1)
            title = name
            if name in VARIANTS:
                title += f"\n{np.mean(results['psnr'][image_name][name]):.2f} dB"
            axes[row][col].set_title(title, fontsize=9)
            axes[row][col].axis("off")
    figure.suptitle(f"One hidden layer, one image, sigma {results['sigma']} (top-left 96 x 96 shown; "
                    f"PSNR mean of {results['seeds']} seeds)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def gradient_map(global_block: str, size: int, seeds: int) -> np.ndarray:
    """Mean |d output[centre] / d input| over ``seeds`` random networks and inputs, summed over channels."""
    total = np.zeros((size, size))
    for seed in range(seeds):
        torch.manual_seed(seed)
        net = create_model("gama_ir_s", global_block=global_block)
        with torch.no_grad():  # residual scales start at zero, which would switch every block off
            for name, parameter in net.named_parameters():
                if name.endswith("_scale"):
                    parameter.normal_(0, 0.5)
        image = torch.rand(1, 3, size, size, requires_grad=True)
        net(image)[0, :, size // 2, size // 2].sum().backward()
        total += image.grad[0].abs().sum(0).numpy()
    return total / seeds


def mass_radius(gradient: np.ndarray, fraction: float = 0.9) -> float:
    """Smallest distance from the centre pixel within which ``fraction`` of the gradient mass lies."""
    size = gradient.shape[0]
    rows, cols = np.indices(gradient.shape)
    distance = np.hypot(rows - size // 2, cols - size // 2).ravel()
    order = np.argsort(distance)
    cumulative = np.cumsum(gradient.ravel()[order])
    return float(distance[order][np.searchsorted(cumulative, fraction * cumulative[-1])])


def effective_receptive_field(args, out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {"size": args.erf_size, "seeds": args.erf_seeds}
    figure, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, block in zip(axes, ("gama", "identity")):
        gradient = gradient_map(block, args.erf_size, args.erf_seeds)
        radius = mass_radius(gradient)
        half = args.erf_size // 2
        far = gradient[np.hypot(*np.indices(gradient.shape) - half) > half / 2].sum() / gradient.sum()
        results[block] = {"radius_90_percent": radius, "mass_beyond_quarter_size": float(far)}
        print(f"ERF gama_ir_s/{block}: 90% of the gradient within {radius:.1f} px; "
              f"{100 * far:.2f}% beyond {half // 2} px", flush=True)
        ax.imshow(np.log10(gradient + gradient.max() * 1e-6), cmap="magma")
        ax.add_patch(plt.Circle((half, half), radius, fill=False, color="cyan", lw=1))
        ax.set_title(f"GAMA-IR-S, global_block={block}\n90% of |gradient| within {radius:.0f} px (circle)", fontsize=9)
        ax.axis("off")
    figure.suptitle(f"log10 |d out(centre) / d input|, {args.erf_size} x {args.erf_size}, mean of "
                    f"{args.erf_seeds} random networks", fontsize=10)
    figure.tight_layout()
    figure.savefig(out / "effective_receptive_field.png", dpi=100)
    plt.close(figure)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigma", type=float, default=25.0, help="Gaussian noise on the 0-255 scale")
    parser.add_argument("--steps", type=int, default=2000, help="Adam steps per fit")
    parser.add_argument("--seeds", type=int, default=3, help="fits per variant and image")
    parser.add_argument("--gama-hidden", type=int, default=64, help="hidden width of the GAMA network")
    parser.add_argument("--erf-size", type=int, default=256)
    parser.add_argument("--erf-seeds", type=int, default=4)
    parser.add_argument("--images", nargs="+", default=["chessboard", "grass"], choices=["chessboard", "grass"])
    parser.add_argument("--skip-erf", action="store_true", help="only the Figure 5 experiment")
    parser.add_argument("--out", default="benchmarks/output/receptive_field")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"figure5": figure5(args, out)}
    if not args.skip_erf:
        results["effective_receptive_field"] = effective_receptive_field(args, out)
    (out / "receptive_field.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2), file=sys.stderr)


if __name__ == "__main__":
    main()
