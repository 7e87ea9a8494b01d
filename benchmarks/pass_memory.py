"""The memory of large CPU forward passes and training steps: the estimate against the resident set.

Runs ``--passes`` forward passes of one network on one random input, on the engine's network thread
(freed heap memory kept for reuse, as the engine runs them), or with ``--handed-back`` as the
engine runs a pass too large for that (``engine.heap.heap_returned_while_kept``). After each pass
it prints how far the process's high-water resident set has risen above the resident set before the
first pass, beside ``engine.memory.forward_peak_bytes``. With ``--train`` each pass is a training
step instead (L1 loss, backward, AdamW, as the trainer makes them, on ``--batch`` inputs), beside
``engine.memory.training_step_peak_bytes``. With ``--precision bf16`` the passes run under bfloat16
autocast, as ``restore(..., precision="bf16")`` runs them, beside the same float32 estimate, which
the engine judges them by. Linux only (``/proc/self``).

    python benchmarks/pass_memory.py --model gama_ir_s --channels 3 --size 2048 --passes 4
    python benchmarks/pass_memory.py --model gama_ir_s --channels 3 --size 2048 --passes 2 --handed-back
    python benchmarks/pass_memory.py --model gama_ir_s --size 256 --batch 8 --passes 6 --train
    python benchmarks/pass_memory.py --model gama_ir_xs --size 2048 --passes 3 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch

from napari_gama_ir import create_model
from napari_gama_ir.engine.heap import heap_returned_while_kept, on_the_network_thread
from napari_gama_ir.engine.memory import forward_peak_bytes, training_step_peak_bytes


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gama_ir_s")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--train", action="store_true", help="training steps instead of forward passes")
    parser.add_argument("--handed-back", action="store_true", help="run the passes with the heap handed back")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="of forward passes")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    model = create_model(args.model, in_channels=args.channels, out_channels=args.channels).train(args.train)
    shape = (args.batch, args.channels, args.size, args.size)
    if args.train:  # as train.Trainer: NCHW, AdamW
        inputs, target = torch.rand(shape), torch.rand(shape)
        optimiser = torch.optim.AdamW(model.parameters())
        estimate = training_step_peak_bytes(model, shape)
    else:
        model = model.to(memory_format=torch.channels_last)
        inputs = torch.rand(shape).contiguous(memory_format=torch.channels_last)
        estimate = forward_peak_bytes(model, shape)

    def one_pass() -> None:
        with heap_returned_while_kept() if args.handed_back else nullcontext():
            if args.train:
                optimiser.zero_grad(set_to_none=True)
                torch.nn.functional.l1_loss(model(inputs), target).backward()
                optimiser.step()
            else:
                with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=args.precision == "bf16"):
                    model(inputs)

    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the high-water mark starts again from the resident set now
    start = _status("VmRSS")
    rises, seconds = [], []
    for _ in range(args.passes):
        started = time.perf_counter()
        on_the_network_thread(one_pass)
        seconds.append(time.perf_counter() - started)
        rises.append(_status("VmHWM") - start)
    mode = ("training steps" if args.train else f"{args.precision} passes") + (
        ", heap handed back" if args.handed_back else ", heap kept")
    print(f"{args.model}, {' x '.join(map(str, shape))}, {mode}: estimate {estimate / 1e9:.2f} GB; "
          f"high-water rise after each pass (GB): {', '.join(f'{rise / 1e9:.2f}' for rise in rises)}; "
          f"passes (s): {', '.join(f'{s:.1f}' for s in seconds)}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({**vars(args), "estimate_bytes": estimate, "rise_bytes": rises, "pass_seconds": seconds}, out, indent=2)


if __name__ == "__main__":
    main()
