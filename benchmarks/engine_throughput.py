"""Engine benchmark: restore a large uint16 zarr stack through the CLI, measure what the engine adds.

Reports, as JSON and a short table:
- throughput: image megapixels restored per second of wall time, reading and writing zarr included;
- peak RSS of the restoring process (it runs as a child, so the stack's creation is not counted);
- efficiency: that throughput divided by the bare network's forward throughput on the same tiles
  (same tile shapes and count per plane, same batch, same threads), i.e. what the engine keeps of
  the model's speed after I/O, normalisation and blending.

A small network (width 8 by default) keeps the run to minutes on a CPU; a small network is the hard
case for efficiency, since the engine's fixed per-pixel work weighs more against a cheap model.

Three more figures say where the time goes:
- a timeline of the engine run (``benchmarks/engine_child.py``): for input reads, planes, network
  calls and output writes, the seconds summed over threads and the seconds during which any thread
  was in them, next to the span from the first read to the last write. A network covering the
  whole span means the device is the bottleneck; gaps mean it waited for the host;
- startup: the same command on a one-plane 64 x 64 stack (imports, loading the model, a device
  context, the first passes), subtracted for a steady-state throughput. With a compiled path that
  run compiles its own 64 x 64 shape, not the stack's tile shapes, so the throughput after startup
  still holds the stack's compilations: read the timeline's forward passes instead. Any fallback
  of an optimised path to eager (its warning, in the engine or the bare timing) is reported, since
  the figures then measure the eager network;
- the forward passes' median and slowest durations: a compilation or graph capture shows as a
  shape's slow first pass, the median is the steady pass;
- ``--network copy``: the engine with the network's forward pass replaced by a copy of the tiles,
  the most the host side (reading, normalising, cutting, blending, compressing, writing) can give
  with this machine's threads, whatever the device.

    python benchmarks/engine_throughput.py --planes 256 --size 2048 --workdir /tmp/engine-bench
    python benchmarks/engine_throughput.py --planes 24 --size 2048 --network copy
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import zarr

from napari_gama_ir.engine import ModelRunner
from napari_gama_ir.engine.tiling import group_by_run_shape, plan_tiles
from napari_gama_ir.model import GamaIR, GamaIRConfig, create_model, save_checkpoint

# How an optimised path's warning ends when it falls back to eager (engine.compiled.CheckedNetwork).
FALLBACK_WARNING = "running the network eagerly"

# The CLI options of each way to run the network (CUDA graphs are the CLI's default on CUDA).
PATH_OPTIONS = {
    "eager": ["--no-cuda-graphs"],
    "compile": ["--compile"],
    "cuda-graphs": ["--cuda-graphs"],
    "compiled-graphs": ["--compile", "--cuda-graphs"],
}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def make_stack(path: Path, planes: int, size: int, seed: int) -> None:
    """A noisy uint16 stack, written plane by plane (never whole in memory)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = 20000 + 15000 * np.sin(6 * xx) * np.cos(4 * yy)
    array = zarr.open_array(str(path), mode="w", shape=(planes, size, size), chunks=(1, size, size),
                            dtype=np.uint16, zarr_format=2)
    array.attrs["axes"] = "ZYX"
    for index in range(planes):
        plane = base + rng.normal(0, 8000, base.shape)
        array[index] = np.clip(plane, 0, 65535).astype(np.uint16)


def bare_model_mpx_per_s(model: GamaIR, size: int, tile: int, overlap: int, planes: int, path: str,
                         device: str, precision: str, batch: int | None) -> float:
    """Forward passes only, on the tiles the engine cuts from ``planes`` planes."""
    runner = ModelRunner(model, device, precision=precision, batch=batch,
                         compile=path in ("compile", "compiled-graphs"),
                         cuda_graphs=path in ("cuda-graphs", "compiled-graphs"))
    multiple = model.config.size_multiple
    groups = group_by_run_shape(plan_tiles(size, size, tile, overlap, multiple), multiple)
    rng = np.random.default_rng(0)
    plane_tiles = [rng.random((len(group), 1) + shape, dtype=np.float32) for shape, group in groups.items()]
    for tiles in plane_tiles:  # warm-up (and compilation or graph capture)
        runner.run(tiles)
    started = time.perf_counter()
    for _ in range(planes):
        for tiles in plane_tiles:
            runner.run(tiles)
    elapsed = time.perf_counter() - started
    return planes * size * size / 1e6 / elapsed


def covered_seconds(intervals: list[tuple[float, float]]) -> float:
    """Seconds during which at least one of ``intervals`` was running."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def summarise_timeline(timeline: dict) -> dict:
    """Per stage (read, plane, network, forward, write): calls, seconds summed over threads, and
    seconds during which any thread was in it, next to the span from the first read to the last
    write; when the imports and the runner were done; on a GPU, the share of that span during which
    the device ran forward passes."""
    events = timeline["events"]
    first = min(e[2] for e in events if e[0] == "read")
    last = max(e[3] for e in events if e[0] == "write")
    summary = {"seconds_before_first_read": round(first, 2), "span_seconds": round(last - first, 2)}
    # Where the time before the first read went: the imports, then the runner (model to its device).
    for stage in ("imports", "runner"):
        ends = [e[3] for e in events if e[0] == stage]
        summary[f"{stage}_done_at_seconds"] = round(min(ends), 2) if ends else None
    for stage in ("read", "plane", "network", "forward", "write"):
        intervals = [(e[2], e[3]) for e in events if e[0] == stage]
        summary[stage] = {
            "calls": len(intervals),
            "busy_seconds": round(sum(end - start for start, end in intervals), 2),
            "covered_seconds": round(covered_seconds(intervals), 2),
        }
    # A compilation or graph capture makes its shape's first pass slow: the median is the steady pass.
    passes = sorted(end - start for stage, _, start, end in events if stage == "forward")
    if passes:
        summary["forward"]["median_seconds"] = round(passes[len(passes) // 2], 6)
        summary["forward"]["slowest_seconds"] = [round(seconds, 6) for seconds in passes[:-4:-1]]
    summary["network_covers_span"] = round(summary["network"]["covered_seconds"] / (last - first), 3)
    if timeline["device_busy_seconds"] is not None:
        summary["device_busy_seconds"] = round(timeline["device_busy_seconds"], 2)
        summary["device_busy_share_of_span"] = round(timeline["device_busy_seconds"] / (last - first), 3)
    return summary


def restore_in_child(stack: Path, output: Path, checkpoint: Path, tile: int, overlap: int,
                     path: str, device: str, precision: str, batch: int | None, network: str,
                     timeline: Path | None = None) -> tuple[float, float, list[str]]:
    """Run the CLI's restore in a child; return wall seconds, its peak RSS in MB, and the warnings
    of an optimised path that fell back to eager (its stderr is echoed here as well)."""
    instruments = [*(["--copy-network"] if network == "copy" else []),
                   *(["--timeline", str(timeline)] if timeline else [])]
    command = [sys.executable, str(Path(__file__).with_name("engine_child.py")), *instruments,
               "restore", str(stack), "-o", str(output),
               "--model", str(checkpoint), "--tile", str(tile), "--overlap", str(overlap), "--device", device,
               "--precision", precision, *(["--batch", str(batch)] if batch else []), "-q", *PATH_OPTIONS[path]]
    with tempfile.TemporaryFile("w+") as errors:  # a file, not a pipe: a long stderr cannot block the child
        started = time.perf_counter()
        child = subprocess.Popen(command, stderr=errors)
        _, status, usage = os.wait4(child.pid, 0)
        elapsed = time.perf_counter() - started
        errors.seek(0)
        stderr = errors.read()
    sys.stderr.write(stderr)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"restore failed with status {os.waitstatus_to_exitcode(status)}")
    fallbacks = [line.strip() for line in stderr.splitlines() if FALLBACK_WARNING in line]
    return elapsed, usage.ru_maxrss / 1024, fallbacks  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--planes", type=int, default=256)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--arch", help="a registered architecture (grey, random weights) instead of --width")
    parser.add_argument("--path", choices=tuple(PATH_OPTIONS), default="eager",
                        help="how the network runs, in the engine and the bare timing alike (compile or capture time "
                             "included in the engine's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--batch", type=int, help="most tiles per forward pass (the engine's default: 512 x 512 pixels' "
                                                  "worth on CPU, 4 x 512 x 512 on GPU, there stretched up to twice "
                                                  "that to split a plane's tiles evenly)")
    parser.add_argument("--network", choices=("model", "copy"), default="model",
                        help="copy: replace the network's forward pass by a copy, to measure the host side alone")
    parser.add_argument("--bare-planes", type=int, default=12, help="planes' worth of tiles per bare timing")
    parser.add_argument("--workdir", default="benchmarks/output/engine")
    parser.add_argument("--keep", action="store_true", help="keep the stack for another run")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stack, output = workdir / "stack.zarr", workdir / "restored.zarr"
    small_stack = workdir / "startup.zarr"
    torch.manual_seed(0)
    if args.arch:
        model = create_model(args.arch, in_channels=1, out_channels=1, channel_meaning="grey")
    else:
        config = GamaIRConfig(in_channels=1, out_channels=1, width=args.width, encoder_blocks=(1, 1, 1),
                              middle_blocks=2, decoder_blocks=(1, 1, 1), channel_meaning="grey")
        model = GamaIR(config).eval()
    checkpoint = save_checkpoint(model, workdir / "bench_model")

    expected_shape = (args.planes, args.size, args.size)
    if not (stack.exists() and zarr.open_array(str(stack), mode="r").shape == expected_shape):
        shutil.rmtree(stack, ignore_errors=True)
        print(f"creating a {expected_shape} uint16 stack in {stack} ...", flush=True)
        make_stack(stack, args.planes, args.size, seed=0)
    shutil.rmtree(output, ignore_errors=True)
    shutil.rmtree(small_stack, ignore_errors=True)
    make_stack(small_stack, 1, 64, seed=1)

    def run_engine(source: Path, timeline: Path | None = None) -> tuple[float, float, list[str]]:
        shutil.rmtree(output, ignore_errors=True)
        return restore_in_child(source, output, checkpoint, args.tile, args.overlap, args.path, args.device,
                                args.precision, args.batch, args.network, timeline)

    fallbacks = []  # warnings of an optimised path that fell back to eager, which it then measures

    # The bare timing varies by several percent between runs on a shared machine: take it before
    # and after the engine run and compare with the mean.
    def time_bare() -> float:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rate = bare_model_mpx_per_s(model, args.size, args.tile, args.overlap, args.bare_planes, args.path,
                                        args.device, args.precision, args.batch)
        fallbacks.extend(f"bare timing: {w.message}" for w in caught if FALLBACK_WARNING in str(w.message))
        return rate

    startup, _, startup_fallbacks = run_engine(small_stack)
    fallbacks += startup_fallbacks
    bare_runs = [time_bare()]
    timeline = workdir / "timeline.json"
    timeline.unlink(missing_ok=True)
    seconds, peak_mb, engine_fallbacks = run_engine(stack, timeline)
    fallbacks += engine_fallbacks
    bare_runs.append(time_bare())
    bare = sum(bare_runs) / len(bare_runs)
    megapixels = args.planes * args.size * args.size / 1e6
    engine = megapixels / seconds
    # None where the startup run took as long as the whole stack (it compiles a shape of its own,
    # and inductor's first import): there is then no steady state to speak of.
    steady = megapixels / (seconds - startup) if seconds > startup else None
    results = {
        "stack_shape": list(expected_shape),
        "stack_bytes_on_disk": folder_bytes(stack),
        "output_bytes_on_disk": folder_bytes(output),
        "model": {"arch": args.arch, "width": model.config.width, "parameters": sum(p.numel() for p in model.parameters())},
        "network": args.network,
        "network_path": args.path,
        "tile": args.tile,
        "overlap": args.overlap,
        "device": args.device,
        "precision": args.precision,
        "batch": args.batch,
        "cpu_threads": torch.get_num_threads(),
        "engine_seconds": round(seconds, 1),
        "startup_seconds": round(startup, 1),
        "engine_mpx_per_s": round(engine, 3),
        "engine_mpx_per_s_after_startup": None if steady is None else round(steady, 3),
        "bare_model_mpx_per_s": round(bare, 3),
        "bare_model_runs_mpx_per_s": [round(b, 3) for b in bare_runs],
        "efficiency": round(engine / bare, 3),
        "efficiency_after_startup": None if steady is None else round(steady / bare, 3),
        "peak_rss_mb": round(peak_mb, 1),
        "fallbacks_to_eager": fallbacks,
        # The child writes its timeline as it exits; without it the other figures still stand.
        "timeline": summarise_timeline(json.loads(timeline.read_text())) if timeline.exists() else None,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(stack, ignore_errors=True)
    shutil.rmtree(output, ignore_errors=True)
    shutil.rmtree(small_stack, ignore_errors=True)
    print(json.dumps(results, indent=2))
    engine_name = "host side (network copied)" if args.network == "copy" else "engine"
    after_startup = ("no steady state after" if steady is None
                     else f"{steady:.2f} Mpx/s, efficiency {steady / bare:.2f}, after")
    print(f"\nstack {results['stack_bytes_on_disk'] / 1e9:.2f} GB on disk | {engine_name} {engine:.2f} Mpx/s, "
          f"efficiency {engine / bare:.2f} ({after_startup} {startup:.1f} s startup) | bare model {bare:.2f} Mpx/s "
          f"({min(bare_runs):.2f}-{max(bare_runs):.2f}) | peak RSS {peak_mb:.0f} MB")
    for warning in results["fallbacks_to_eager"]:
        print(f"FELL BACK TO EAGER: {warning}")
    if results["timeline"]:
        spent = results["timeline"]
        device = (f", the device ran passes {spent['device_busy_share_of_span']:.0%} of it"
                  if "device_busy_seconds" in spent else "")
        done_at = {stage: spent[f"{stage}_done_at_seconds"] for stage in ("imports", "runner")}
        steps = ", ".join(f"{stage} done at {at:.1f} s" for stage, at in done_at.items() if at is not None)
        print(f"first read {spent['seconds_before_first_read']:.1f} s after the child started ({steps}); from it "
              f"to the last write {spent['span_seconds']:.1f} s, a network call running "
              f"{spent['network_covers_span']:.0%} of it{device}")
        if "median_seconds" in spent["forward"]:
            slowest = ", ".join(f"{seconds:.2f}" for seconds in spent["forward"]["slowest_seconds"])
            print(f"forward passes: median {spent['forward']['median_seconds'] * 1e3:.1f} ms, slowest {slowest} s "
                  "(a compilation or capture is a shape's first pass)")


if __name__ == "__main__":
    main()
