"""What a compiled restore costs when its passes do not all share one shape.

``compile=True`` compiles the network once for each input shape (tens of seconds on a CPU). Two
common inputs give a shorter last pass: a stack of small planes whose count does not divide into
equal chunks, and a plane whose tile count does not divide by the batch (once, or in every plane
of a stack, where the shorter batch is compiled the second time it comes). Each case runs in a
fresh process with an empty inductor cache, so every shape is really compiled, and reports the
restore's wall-clock time and the shapes the network was compiled for. Run it under another
commit's code (``PYTHONPATH=<its checkout>/src``) to compare.

    python benchmarks/compiled_shapes.py --json compiled_shapes.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name: (input shape, axes, restore settings)
CASES = {
    "151 planes of 64 x 64": ((151, 64, 64), "ZYX", {}),
    "one 1024 x 1024 plane, tiles of 256, batches of 4": ((1024, 1024), "YX", {"tile": 256, "batch": 4}),
    "3 planes of 1024 x 1024, tiles of 256, batches of 4": ((3, 1024, 1024), "ZYX", {"tile": 256, "batch": 4}),
}


def one_case(name: str, arch: str, device: str) -> dict:
    """Restore the case, compiled, in this process (the child's side)."""
    import numpy as np
    import torch

    from napari_gama_ir import create_model, restore
    from napari_gama_ir.engine import runner as runner_module

    shape, axes, settings = CASES[name]
    model = create_model(arch, pretrained=True)
    image = np.random.default_rng(0).integers(0, 4000, shape, dtype=np.uint16)
    started = time.perf_counter()
    restore(image, model, axes, device=device, compile=True, **settings)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    network = runner_module._kept_runner[2].network
    return {"case": name, "arch": arch, "device": device, "seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(),
            "compiled_shapes": sorted(network._checked_shapes), "compiled_path_used": network.active}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="gama_ir_xs-denoise-grey")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the case to run in this process
    args = parser.parse_args()

    if args.child:
        print(json.dumps(one_case(args.child, args.arch, args.device)))
        return

    rows = []
    for name in args.cases:
        with tempfile.TemporaryDirectory() as cache:
            child = subprocess.run([sys.executable, __file__, "--arch", args.arch, "--device", args.device,
                                    "--child", name],
                                   env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache},
                                   capture_output=True, text=True, check=True)
        row = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{name}: {row['seconds']} s, compiled for {row['compiled_shapes']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
