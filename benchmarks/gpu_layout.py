"""Why GAMA-IR is slow on a GPU: LayerNorm kernels, memory layout and the GAMA block, one call.

The first GPU run (docs/performance.md, "GPU") found GAMA-IR-S at 9% of the matmul rate and
slower than NAFNet-32 from 512 pixels up, while a plain UNet reached 87%. Its profile put 11 of
24 ms in torch's layer_norm slow path, taken when the channel count (42) is not a multiple of 4;
LayerNorm2d now computes those by separate passes on a GPU. This times forward passes and
training steps of GAMA-IR-S, GAMA-IR-S without GAMA blocks and NAFNet-32 with the fused kernel
everywhere ("fused", the old code) and with the current rule ("current"), in both memory layouts,
fp32 and bf16, and lists the top GPU kernels of GAMA-IR-S.

    python benchmarks/gpu_layout.py --size 512 --json layout.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from baselines import BASELINES

from napari_gama_ir import create_model
from napari_gama_ir.model import gama
from napari_gama_ir.model.layers import LayerNorm2d, layer_norm_fused

LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
# "fused" is LayerNorm2d before the GPU rule: the fused kernel for every channel count.
LAYER_NORMS = {
    "current": LayerNorm2d.forward,
    "fused": lambda self, x: layer_norm_fused(x, self.weight, self.bias, self.eps),
}


def networks() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "gama_ir_s": create_model("gama_ir_s"),
        "gama_ir_s_no_gama": create_model("gama_ir_s", global_block="identity"),
        "nafnet_32": BASELINES["nafnet_32"](),
    }


def forward_ms(model, x, dtype, runs: int, warmup: int = 5) -> float:
    """Median forward latency in ms, timed with CUDA events."""
    times = []
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        for index in range(warmup + runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            torch.cuda.synchronize()
            if index >= warmup:
                times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def train_step_ms(model, layout, batch: int, patch: int, steps: int = 20, warmup: int = 8) -> float:
    """Mean ms of an AdamW step on random data (L1 loss, bf16 autocast), as the trainer takes it."""
    model = model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, patch, patch, device="cuda").contiguous(memory_format=layout)
    target = x.clone()
    for index in range(warmup + steps):
        if index == warmup:
            torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (model(x) - target).abs().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    torch.cuda.synchronize()
    model.eval()
    return (time.perf_counter() - started) / steps * 1e3


def top_kernels(model, x, dtype, count: int = 10) -> list[tuple[str, float]]:
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                model(x)
            torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    return [(e.key[:90], round(e.device_time_total / 5 / 1e3, 3)) for e in events[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--compile-seconds", type=float, default=0,
                        help="also time torch.compile if this much time is left")
    parser.add_argument("--deadline", type=float, default=1e18, help="seconds since the epoch to stop starting work")
    parser.add_argument("--json")
    args = parser.parse_args()
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "size": args.size,
                     "forward_ms": [], "train_step_ms": [], "top_kernels": {}}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")

    models = {name: model.cuda().eval() for name, model in networks().items()}
    for norm_name, forward in LAYER_NORMS.items():
        LayerNorm2d.forward = forward
        for layout_name, layout in LAYOUTS.items():
            for name, model in models.items():
                model.to(memory_format=layout)
                x = torch.rand(1, 3, args.size, args.size, device="cuda").contiguous(memory_format=layout)
                for dtype_name, dtype in DTYPES.items():
                    row = {"model": name, "layer_norm": norm_name, "layout": layout_name, "dtype": dtype_name,
                           "ms": round(forward_ms(model, x, dtype, args.runs), 3)}
                    results["forward_ms"].append(row)
                    print(json.dumps(row), flush=True)
        save()
    LayerNorm2d.forward = LAYER_NORMS["current"]
    # GAMA's means reduce a channels_last tensor through its NHWC view, a CPU-kernel workaround:
    # time plain torch means on the GPU too.
    nhwc_view_mean = gama.global_mean
    gama.global_mean = lambda x, dims: x.mean(dims, keepdim=True)
    for layout_name, layout in LAYOUTS.items():
        model = models["gama_ir_s"].to(memory_format=layout)
        x = torch.rand(1, 3, args.size, args.size, device="cuda").contiguous(memory_format=layout)
        for dtype_name, dtype in DTYPES.items():
            row = {"model": "gama_ir_s, plain GAMA means", "layer_norm": "current", "layout": layout_name,
                   "dtype": dtype_name, "ms": round(forward_ms(model, x, dtype, args.runs), 3)}
            results["forward_ms"].append(row)
            print(json.dumps(row), flush=True)
    gama.global_mean = nhwc_view_mean
    for layout_name, layout in LAYOUTS.items():
        model = models["gama_ir_s"].to(memory_format=layout)
        x = torch.rand(1, 3, args.size, args.size, device="cuda").contiguous(memory_format=layout)
        results["top_kernels"][layout_name] = top_kernels(model, x, torch.bfloat16)
        print(layout_name, json.dumps(results["top_kernels"][layout_name]), flush=True)
    save()
    for norm_name, forward in LAYER_NORMS.items():
        LayerNorm2d.forward = forward
        for layout_name, layout in LAYOUTS.items():
            for name in ("gama_ir_s", "nafnet_32"):
                if time.time() > args.deadline:
                    break
                ms = train_step_ms(models[name].to(memory_format=layout), layout, batch=32, patch=128)
                row = {"model": name, "layer_norm": norm_name, "layout": layout_name, "batch": 32, "patch": 128,
                       "dtype": "bf16", "ms": round(ms, 2)}
                results["train_step_ms"].append(row)
                print(json.dumps(row), flush=True)
    LayerNorm2d.forward = LAYER_NORMS["current"]
    save()
    if args.compile_seconds and time.time() + args.compile_seconds < args.deadline:
        for name in ("gama_ir_s", "nafnet_32"):
            model = models[name].to(memory_format=torch.channels_last)
            x = torch.rand(1, 3, args.size, args.size, device="cuda").contiguous(memory_format=torch.channels_last)
            compiled = torch.compile(model)
            started = time.perf_counter()
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                compiled(x)
            compile_s = time.perf_counter() - started
            ms = forward_ms(compiled, x, torch.bfloat16, args.runs)
            row = {"model": name, "layer_norm": "current", "layout": "channels_last", "dtype": "bf16",
                   "compiled": True, "compile_s": round(compile_s, 1), "ms": round(ms, 3)}
            results["forward_ms"].append(row)
            print(json.dumps(row), flush=True)
            save()


if __name__ == "__main__":
    main()
