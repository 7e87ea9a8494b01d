"""A/B latency of a network under two environments, in alternating child processes.

Each side is a list of environment assignments; the children alternate A, B, A, B, ... so both see
the same machine load, and each times forward passes and counts its page faults. Examples:

    # transparent huge pages for torch's CPU allocator (napari_gama_ir turns them on at import)
    python benchmarks/ab_latency.py --a THP_MEM_ALLOC_ENABLE=0 --b THP_MEM_ALLOC_ENABLE=1
    # an older commit's code against this one's (git worktree add /tmp/base OLD_COMMIT first)
    python benchmarks/ab_latency.py --a PYTHONPATH=/tmp/base/src --b PYTHONPATH=src
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import json, resource, sys, time, torch
import napari_gama_ir
from napari_gama_ir import create_model
torch.manual_seed(0)
model = create_model(sys.argv[1]).eval().to(memory_format=torch.channels_last)
with torch.no_grad():  # switch the residual branches on (they start at zero)
    for name, parameter in model.named_parameters():
        if name.endswith("_scale"):
            parameter.normal_(0, 0.5)
out = {"package": napari_gama_ir.__file__}
for size in map(int, sys.argv[3:]):
    x = torch.rand(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times = []
        for _ in range(int(sys.argv[2])):
            started = time.perf_counter(); model(x); times.append(time.perf_counter() - started)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    out[size] = {"median_ms": 1000 * sorted(times)[len(times) // 2], "page_faults_per_run": faults / len(times)}
print(json.dumps(out))
"""


def _environment(assignments: list[str]) -> dict[str, str]:
    env = dict(os.environ)
    for assignment in assignments:
        name, _, value = assignment.partition("=")
        env[name] = os.path.abspath(value) if name == "PYTHONPATH" else value
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", nargs="+", required=True, metavar="NAME=VALUE")
    parser.add_argument("--b", nargs="+", required=True, metavar="NAME=VALUE")
    parser.add_argument("--arch", default="gama_ir_s")
    parser.add_argument("--sizes", nargs="+", default=["256", "512"])
    parser.add_argument("--runs", type=int, default=5, help="timed forward passes per child")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of A and B")
    args = parser.parse_args()
    results = {"a": [], "b": []}
    for _ in range(args.rounds):
        for side in ("a", "b"):
            child = subprocess.run([sys.executable, "-c", CHILD, args.arch, str(args.runs), *args.sizes],
                                   env=_environment(getattr(args, side)), capture_output=True, text=True, check=True)
            results[side].append(json.loads(child.stdout))
    summary = {"arch": args.arch, "rounds": args.rounds, "runs": args.runs,
               "a": {"env": args.a, "package": results["a"][0]["package"]},
               "b": {"env": args.b, "package": results["b"][0]["package"]}, "sizes": {}}
    for size in args.sizes:
        a = statistics.median(r[size]["median_ms"] for r in results["a"])
        b = statistics.median(r[size]["median_ms"] for r in results["b"])
        summary["sizes"][size] = {
            "a_ms": round(a, 1), "b_ms": round(b, 1), "speedup_b_over_a": round(a / b, 3),
            "page_faults_a": round(statistics.median(r[size]["page_faults_per_run"] for r in results["a"])),
            "page_faults_b": round(statistics.median(r[size]["page_faults_per_run"] for r in results["b"])),
        }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
