"""GAMA-IR against NAFNet-32/64, a plain UNet and DnCNN by the paper's latency protocol, in one run.

Writes a JSON report, a Markdown table and a PNG plot (latency against input size, and latency
against CBSD68 sigma-25 PSNR where a PSNR is known). The networks carry random weights: speed does
not depend on them.

    python benchmarks/latency.py --sizes 256 512 1024 2048 --budget 30 --max-gflop 2200 --out docs/benchmarks/cpu
    python benchmarks/latency.py --device cuda --precision fp16 --compile --out docs/benchmarks/h100_fp16
    python benchmarks/latency.py --device cuda --upsample transposed --models gama_ir_s nafnet_32 --sizes 256 512
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from baselines import BASELINES

from napari_gama_ir import create_model
from napari_gama_ir.engine.benchmark import benchmark, format_table, write_report
from napari_gama_ir.model.network import Upsample

GAMA_MODELS = ("gama_ir_xs", "gama_ir_s", "gama_ir_l")
# Colour Gaussian denoising, CBSD68 at sigma 25. Paper figures are for the authors' trained
# networks, the latency beside them is of our implementation of the architecture.
PSNR_CBSD68_SIGMA25 = {
    "gama_ir_xs": (30.87, "our shipped gama_ir_xs-denoise-rgb, measured"),
    "gama_ir_s": (31.33, "our shipped gama_ir_s-denoise-rgb, measured"),
    "gama_ir_l": (31.79, "paper, Table 4"),
    "dncnn": (31.24, "paper, Table 4"),
}
# The decoders' up-sampling (GAMA-IR's and NAFNet's), forced one way on every device; the package
# runs it transposed on the CPU and as conv + pixel shuffle elsewhere.
UPSAMPLING = {"shuffle": nn.Sequential.forward, "transposed": Upsample.transposed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[*GAMA_MODELS, *BASELINES])
    parser.add_argument("--sizes", nargs="+", type=int, default=[256])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--budget", type=float, help="seconds of timed runs per measurement at most")
    parser.add_argument("--max-gflop", type=float, help="skip measurements above this many GFLOP")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay each network as a CUDA graph (with --compile, the compiled one)")
    parser.add_argument("--upsample", choices=UPSAMPLING,
                        help="run every decoder's up-sampling this way (default: as the package does on the device)")
    parser.add_argument("--count-kernels", action="store_true", help="on CUDA, count the kernels of one pass")
    parser.add_argument("--out", default="benchmarks/output/latency", help="path stem for .json, .md and .png")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot and table from the stem's JSON")
    args = parser.parse_args()
    stem = Path(args.out)
    if args.replot:
        report = json.loads(stem.with_suffix(".json").read_text())
        stem.with_suffix(".md").write_text(format_table(report) + "\n")
        write_report(report, None, stem.with_suffix(".png"), psnr=PSNR_CBSD68_SIGMA25, psnr_task="CBSD68, sigma 25")
        return

    if args.upsample:
        Upsample.forward = UPSAMPLING[args.upsample]
    models = {}
    for name in args.models:
        torch.manual_seed(0)
        models[name] = create_model(name) if name in GAMA_MODELS else BASELINES[name]()
    report = benchmark(
        models, args.sizes, device=args.device, precision=args.precision, warmup=args.warmup, runs=args.runs,
        budget_s=args.budget, compile=args.compile, cuda_graphs=args.cuda_graphs, count_kernels=args.count_kernels,
        max_gflop=args.max_gflop,
        on_measurement=lambda m: print(f"{m.model} {m.shape[-1]}: {m.latency_ms_median:.1f} ms ({m.runs} runs)",
                                       file=sys.stderr, flush=True),
    )
    report["upsample"] = args.upsample or "as the package does"
    stem.parent.mkdir(parents=True, exist_ok=True)
    table = format_table(report)
    stem.with_suffix(".md").write_text(table + "\n")
    write_report(report, stem.with_suffix(".json"), stem.with_suffix(".png"), psnr=PSNR_CBSD68_SIGMA25,
                 psnr_task="CBSD68, sigma 25")
    print(f"float32 matmul: {report['matmul_gflops_fp32']:.0f} GFLOP/s, as a 1x1 convolution: "
          f"{report['conv_gemm_gflops_fp32']:.0f} GFLOP/s; {report['machine']}")
    print(table)


if __name__ == "__main__":
    main()
