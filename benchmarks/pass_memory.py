"""The memory of large CPU forward passes: the engine's estimate against the process's resident set.

Runs ``--passes`` forward passes of one network on one random input, on the engine's network thread
(freed heap memory kept for reuse, as the engine runs them), or with ``--handed-back`` as the
engine runs a pass too large for that (``engine.heap.heap_returned_while_kept``). After each pass
it prints how far the process's high-water resident set has risen above the resident set before the
first pass, beside ``engine.memory.forward_peak_bytes``. Linux only (``/proc/self``).

    python benchmarks/pass_memory.py --model gama_ir_s --channels 3 --size 2048 --passes 4
    python benchmarks/pass_memory.py --model gama_ir_s --channels 3 --size 2048 --passes 2 --handed-back
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch

from napari_gama_ir import create_model
from napari_gama_ir.engine.heap import heap_returned_while_kept, on_the_network_thread
from napari_gama_ir.engine.memory import forward_peak_bytes


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
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--handed-back", action="store_true", help="run the passes with the heap handed back")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    model = create_model(args.model, in_channels=args.channels, out_channels=args.channels).eval()
    model = model.to(memory_format=torch.channels_last)
    inputs = torch.rand(1, args.channels, args.size, args.size).contiguous(memory_format=torch.channels_last)
    estimate = forward_peak_bytes(model, tuple(inputs.shape))

    def one_pass() -> None:
        with torch.inference_mode(), heap_returned_while_kept() if args.handed_back else nullcontext():
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
    mode = "heap handed back" if args.handed_back else "heap kept"
    print(f"{args.model}, 1 x {args.channels} x {args.size} x {args.size}, {mode}: estimate {estimate / 1e9:.2f} GB; "
          f"high-water rise after each pass (GB): {', '.join(f'{rise / 1e9:.2f}' for rise in rises)}; "
          f"passes (s): {', '.join(f'{s:.1f}' for s in seconds)}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({**vars(args), "estimate_bytes": estimate, "rise_bytes": rises, "pass_seconds": seconds}, out, indent=2)


if __name__ == "__main__":
    main()
