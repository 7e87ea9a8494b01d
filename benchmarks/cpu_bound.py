"""How close to the CPU's matmul rate can a network get with its present kernels? A bound.

Times a network's whole pass, then each of its convolutions on the very input it gets in that
pass, three ways: inside the pass (hooks), alone with its input and output warm in the caches,
and alone after a 64 MB sweep has pushed them out. Each sum is the time the pass would take if
everything else (LayerNorm, gates, residual adds, GAMA's means, shuffles) cost nothing, so each
gives the highest share of the float32 matmul rate that these convolution kernels, run one after
another, allow. CPU, float32, channels_last, inference mode, as the engine runs networks.

    python benchmarks/cpu_bound.py --models gama_ir_s gama_ir_l nafnet_32 --size 256 --out docs/benchmarks/cpu_bound
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from baselines import BASELINES

from napari_gama_ir import create_model
from napari_gama_ir.engine.benchmark import conv_gemm_gflops, count_flops, machine_description, matmul_gflops
from napari_gama_ir.engine.heap import heap_kept_for_reuse

CACHE_SWEEP_BYTES = 64 * 2**20  # twice this CPU's L3, so a sweep leaves nothing of the conv's data


def median_seconds(call, runs: int, before=None) -> float:
    """Median wall time of ``call()`` over ``runs`` runs after 3 warm-ups; ``before()`` runs untimed first."""
    times = []
    for index in range(runs + 3):
        if before is not None:
            before()
        started = time.perf_counter()
        call()
        if index >= 3:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def conv_kind(conv: nn.Conv2d, inputs: torch.Tensor) -> str:
    height, width = inputs.shape[-2:]
    if conv.groups > 1:
        kind = "depthwise" if conv.groups == conv.in_channels else "grouped"
        return f"{kind} {conv.kernel_size[0]}x{conv.kernel_size[1]}"
    if conv.in_channels == conv.out_channels == 1:
        return f"1->1 {conv.kernel_size[0]}x{conv.kernel_size[1]}"
    return f"{conv.kernel_size[0]}x{conv.kernel_size[1]} at {height}x{width}"


def bound(model: nn.Module, size: int, runs: int, peak: float) -> dict:
    """The pass and its convolutions, timed as the module docstring says, for one 1x3xsize x size input."""
    model = model.to(memory_format=torch.channels_last).eval()
    image = torch.randn(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    flops = count_flops(model, tuple(image.shape))
    convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    in_pass: dict[nn.Conv2d, list[float]] = {conv: [] for conv in convs}
    first_input: dict[nn.Conv2d, torch.Tensor] = {}
    started: dict[nn.Conv2d, float] = {}

    def before_conv(conv, args):
        started[conv] = time.perf_counter()

    def after_conv(conv, args, output):
        in_pass[conv].append(time.perf_counter() - started[conv])
        first_input.setdefault(conv, args[0].clone(memory_format=torch.preserve_format))

    hooks = [hook for conv in convs for hook in
             (conv.register_forward_pre_hook(before_conv), conv.register_forward_hook(after_conv))]
    sweep = torch.zeros(CACHE_SWEEP_BYTES // 4)
    with torch.inference_mode(), heap_kept_for_reuse("cpu"):
        for _ in range(3):
            model(image)
        for times in in_pass.values():
            times.clear()
        pass_s = median_seconds(lambda: model(image), runs)
        for hook in hooks:
            hook.remove()
        kinds: dict[str, dict[str, float]] = {}
        for conv in convs:
            inputs = first_input[conv]
            entry = kinds.setdefault(conv_kind(conv, inputs), {"count": 0, "gflop": 0.0, "in_pass_ms": 0.0,
                                                               "alone_warm_ms": 0.0, "alone_cold_ms": 0.0})
            entry["count"] += 1
            entry["gflop"] += count_flops(conv, tuple(inputs.shape)) / 1e9
            entry["in_pass_ms"] += statistics.median(in_pass[conv]) * 1e3
            run_alone = functools.partial(conv, inputs)
            entry["alone_warm_ms"] += median_seconds(run_alone, runs) * 1e3
            entry["alone_cold_ms"] += median_seconds(run_alone, runs, before=lambda: sweep.add_(1)) * 1e3

    def share(ms: float) -> float:
        return flops / (ms / 1e3) / 1e9 / peak

    totals = {key: sum(entry[key] for entry in kinds.values()) for key in ("in_pass_ms", "alone_warm_ms", "alone_cold_ms")}
    return {
        "size": size,
        "gflop": flops / 1e9,
        "pass_ms": pass_s * 1e3,
        "pass_share_of_matmul_rate": share(pass_s * 1e3),
        "convolutions_ms": totals,
        "bound_share_of_matmul_rate": {key: share(ms) for key, ms in totals.items()},
        "budget_ms_at_75_percent": flops / (0.75 * peak * 1e9) * 1e3,
        "by_kind": kinds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gama_ir_s"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=10, help="timed runs per measurement")
    parser.add_argument("--out", help="write the JSON report to this path stem (.json)")
    args = parser.parse_args()
    peak = matmul_gflops("cpu")
    # The convolution library's own matrix-product rate, for reference (engine.benchmark.conv_gemm_gflops).
    conv_gemm = conv_gemm_gflops("cpu")
    print(f"float32 matmul {peak:.0f} GFLOP/s, as a 1x1 convolution {conv_gemm:.0f} GFLOP/s")
    report = {"machine": machine_description("cpu"), "matmul_gflops_fp32": peak, "conv_gemm_gflops_fp32": conv_gemm,
              "threads": torch.get_num_threads(), "models": {}}
    for name in args.models:
        torch.manual_seed(0)
        model = BASELINES[name]() if name in BASELINES else create_model(name)
        result = report["models"][name] = bound(model, args.size, args.runs, peak)
        print(f"{name} at {args.size}: {result['gflop']:.2f} GFLOP, pass {result['pass_ms']:.1f} ms "
              f"= {result['pass_share_of_matmul_rate']:.0%} of {peak:.0f} GFLOP/s; 75% allows "
              f"{result['budget_ms_at_75_percent']:.1f} ms")
        print(f"  {'convolutions':24s} {'n':>3s} {'GFLOP':>6s} {'in pass':>8s} {'alone':>8s} {'cold':>8s}  ms")
        for kind, entry in sorted(result["by_kind"].items(), key=lambda item: -item[1]["in_pass_ms"]):
            print(f"  {kind:24s} {entry['count']:3d} {entry['gflop']:6.2f} {entry['in_pass_ms']:8.1f} "
                  f"{entry['alone_warm_ms']:8.1f} {entry['alone_cold_ms']:8.1f}")
        totals, shares = result["convolutions_ms"], result["bound_share_of_matmul_rate"]
        print("  all convolutions: " + ", ".join(
            f"{key.removesuffix('_ms').replace('_', ' ')} {totals[key]:.1f} ms (bound {shares[key]:.0%})" for key in totals))
    if args.out:
        path = Path(args.out).with_suffix(".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
