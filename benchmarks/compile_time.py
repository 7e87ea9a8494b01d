"""How long torch.compile takes in a first process and in a later one, with and without frozen weights.

Inductor keeps compiled code in an on-disk cache; frozen weights (what ``compile=True`` in the
engine uses) keep part of the work out of it. For each precision and freezing setting this runs two
fresh processes on one new, empty cache directory and reports, per process, the first call (the
compilation) and the median of the passes after it.

    python benchmarks/compile_time.py --arch gama_ir_xs --size 512 --precisions fp32 bf16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def one_process(arch: str, size: int, precision: str, freezing: bool, passes: int) -> dict:
    """Compile and time the network in this process (the child's side)."""
    import torch
    import torch._inductor.config as inductor_config

    from napari_gama_ir import create_model

    torch.manual_seed(0)
    model = create_model(arch, in_channels=1, out_channels=1, channel_meaning="grey").eval()
    model = model.to(memory_format=torch.channels_last)  # as the engine runs it on the CPU
    inputs = torch.rand(1, 1, size, size).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(model, dynamic=False)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.inference_mode(), inductor_config.patch(freezing=freezing), autocast:
        started = time.perf_counter()
        compiled(inputs)
        first = time.perf_counter() - started
        seconds = []
        for _ in range(passes):
            started = time.perf_counter()
            compiled(inputs)
            seconds.append(time.perf_counter() - started)
    return {"first_call_seconds": round(first, 2), "median_pass_ms": round(sorted(seconds)[passes // 2] * 1e3, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="gama_ir_xs")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    parser.add_argument("--passes", type=int, default=8)
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # precision,freezing: run one process's part
    args = parser.parse_args()

    if args.child:
        precision, freezing = args.child.split(",")
        print(json.dumps(one_process(args.arch, args.size, precision, freezing == "1", args.passes)))
        return

    results = []
    for precision in args.precisions:
        for freezing in (True, False):
            with tempfile.TemporaryDirectory() as cache:
                for process in ("first", "second"):
                    command = [sys.executable, __file__, "--arch", args.arch, "--size", str(args.size),
                               "--passes", str(args.passes), "--child", f"{precision},{int(freezing)}"]
                    child = subprocess.run(command, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache},
                                           capture_output=True, text=True, check=True)
                    row = {"precision": precision, "frozen_weights": freezing, "process": process,
                           **json.loads(child.stdout.strip().splitlines()[-1])}
                    results.append(row)
                    print(f"{precision} {'frozen' if freezing else 'not frozen':10} {process:6} process: first call "
                          f"{row['first_call_seconds']:6.1f} s, median pass {row['median_pass_ms']:6.1f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"arch": args.arch, "size": args.size, "results": results}, file, indent=2)
            file.write("\n")


if __name__ == "__main__":
    main()
