"""Latency, memory and FLOPs of networks, by the GAMA-IR paper's protocol (section 5, Table 1).

The paper times a 1 x 3 x 256 x 256 input: 10 warm-up runs, then the mean of 100 timed runs, the
device synchronised around each, and reports the device's peak allocated memory. Here the same
protocol runs for any ``nn.Module`` at any size, on a GPU or the CPU (where peak memory is the rise
of the process's resident set), with FLOPs from ``torch.utils.flop_counter`` and the achieved
GFLOP/s set against the machine's own float32 matmul rate measured in the same run.
"""

from __future__ import annotations

import copy
import datetime
import gc
import json
import os
import platform
import statistics
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .compiled import network_for
from .device import HostMemoryError, check_precision, is_out_of_memory, preferred_memory_format, resolve_device
from .heap import heap_kept_for_reuse, release_freed_heap
from .memory import forward_peak_bytes, memory_for_pass, run_on_meta


def count_flops(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Floating-point operations of one forward pass on an input of ``shape`` (N, C, H, W).

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device, so nothing is
    computed: convolutions and matrix products count 2 per multiply-add; elementwise work, norms and
    means are not counted (as in the papers' GMAC figures).
    """
    counter = FlopCounterMode(display=False)
    run_on_meta(model, shape, counter)
    return int(counter.get_total_flops())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_gflops(device: str | torch.device = "cpu", size: int = 2048, seconds: float = 2.0) -> float:
    """The device's float32 matrix-multiply rate in GFLOP/s (``torch.matmul``, square matrices):
    the issue's practical peak for convolutions."""
    device = resolve_device(device)
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    return _rate(lambda: a @ b, 2 * size**3, device, seconds)


def conv_gemm_gflops(device: str | torch.device = "cpu", size: int = 2048, seconds: float = 2.0) -> float:
    """The rate in GFLOP/s of :func:`matmul_gflops`'s product run as a 1x1 convolution (``size``
    channels in and out over ``size`` pixels, in the memory layout the engine uses on ``device``).

    That is the convolution library's own matrix product (oneDNN on a CPU, cuDNN on CUDA), the one
    the networks' convolutions use. On AMD processors ``torch.matmul`` goes through MKL, which ran
    at half oneDNN's rate on the project's Zen 5 CPU (208 against 438 GFLOP/s), so the matmul rate
    is a reference there, not a ceiling. On CUDA, cuDNN uses TF32 for float32 convolutions unless
    ``torch.backends.cudnn.allow_tf32`` is off (torch's default is on), as it does for the
    networks' convolutions, while ``torch.matmul`` stays in float32 by default.
    """
    device = resolve_device(device)
    memory_format = preferred_memory_format(device)
    rows = 2 ** (size.bit_length() // 2)  # a near-square image of about ``size`` pixels
    image = torch.randn(1, size, rows, size // rows, device=device).contiguous(memory_format=memory_format)
    weight = torch.randn(size, size, 1, 1, device=device).contiguous(memory_format=memory_format)
    flops = 2 * size * size * rows * (size // rows)
    with torch.inference_mode():
        return _rate(lambda: torch.nn.functional.conv2d(image, weight), flops, device, seconds)


def _rate(function, flops: int, device: torch.device, seconds: float) -> float:
    """GFLOP/s of ``function`` (``flops`` per call): 3 warm-up calls, then calls for ``seconds``."""
    for _ in range(3):
        function()
    _synchronize(device)
    runs, started = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - started < seconds:
        function()
        runs += 1
        _synchronize(device)
    return flops * runs / (time.perf_counter() - started) / 1e9


class _ResidentPeak:
    """Samples this process's resident set size in a thread; ``peak - start`` is the rise in bytes."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        gc.collect()
        release_freed_heap()
        self.start = self.peak = self._read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _read() -> int | None:
        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError, AttributeError):  # not Linux
            return None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            self._stop.wait(self.interval)

    def __enter__(self) -> _ResidentPeak:
        if self.start is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.start is not None:
            self._thread.join()
            self.peak = max(self.peak, self._read())

    @property
    def rise(self) -> int | None:
        return None if self.start is None else self.peak - self.start


@dataclass
class Measurement:
    """One network at one input shape."""

    model: str
    shape: tuple[int, ...]
    parameters: int
    flops: int
    warmup_runs: int
    runs: int
    latency_ms_mean: float
    latency_ms_median: float
    latency_ms_min: float
    issue_ms_median: float
    peak_memory_mb: float | None
    memory_kind: str  # "device max allocated" or "process RSS rise"
    achieved_gflops: float
    kernels_per_pass: int | None = None
    # On the CPU, whether freed heap memory was kept for reuse between the runs, as the engine
    # keeps it unless the pass is too large for that (engine.memory.memory_for_pass); None elsewhere.
    heap_kept: bool | None = None
    latencies_ms: list[float] = field(repr=False, default_factory=list)

    @property
    def gmacs(self) -> float:
        return self.flops / 2e9


def measure(
    model: nn.Module,
    shape: tuple[int, ...] = (1, 3, 256, 256),
    *,
    name: str = "model",
    device: str | torch.device = "auto",
    precision: str = "fp32",
    warmup: int = 10,
    runs: int = 100,
    budget_s: float | None = None,
    compile: bool = False,
    cuda_graphs: bool = False,
    count_kernels: bool = False,
) -> Measurement:
    """Time ``model`` on a random input of ``shape`` by the paper's protocol.

    Parameters
    ----------
    model : nn.Module
        Any image-to-image network; it is copied, so the caller's stays where it is.
    shape : tuple of int
        Input shape (N, C, H, W); the paper uses (1, 3, 256, 256).
    device, precision : str
        As for :func:`napari_gama_ir.restore`. The input and network use the engine's memory layout
        (channels_last on the CPU).
    warmup, runs : int
        Untimed and timed forward passes (paper: 10 and 100).
    budget_s : float, optional
        Stop the timed runs once they have taken this long (at least 3 runs), and the warm-up
        once it has taken a quarter of it (at least 1 run): for large inputs on slow devices.
        The measurement records how many runs were made.
    compile : bool
        Run through :class:`~.compiled.CompiledNetwork` (compilation happens in the warm-up).
    cuda_graphs : bool
        Replay the network as CUDA graphs (CUDA only; the capture happens in the warm-up):
        :class:`~.compiled.GraphedNetwork`, or with ``compile`` graphs of the compiled network.
        The paper's protocol is eager, so neither is the default here.
    count_kernels : bool
        Also count the GPU kernels (and copies) of one pass with the profiler, after the timed
        runs (CUDA only).

    Returns
    -------
    Measurement
        Latencies, peak memory (device max allocated on CUDA, RSS rise on the CPU, ``None``
        elsewhere), parameters, FLOPs and achieved GFLOP/s (FLOPs / median latency). Beside the
        latency, ``issue_ms_median`` is how long the call took to return before the device was
        synchronised: on a GPU the host's cost of launching the pass, which sets the latency when
        it comes close to it (launch-bound); on the CPU the pass itself.
    """
    device = resolve_device(device)
    _check_kernel_counting(count_kernels, device)
    autocast_dtype = check_precision(precision, device)
    memory_format = preferred_memory_format(device)
    flops = count_flops(model, shape)
    network = copy.deepcopy(model).to(device, memory_format=memory_format).eval()
    forward = network_for(network, device, autocast_dtype, compile, cuda_graphs)
    inputs = torch.rand(shape, device=device).contiguous(memory_format=memory_format)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()

    issue_times: list[float] = []

    def run_once() -> float:
        _synchronize(device)
        started = time.perf_counter()
        forward(inputs)
        issue_times.append(time.perf_counter() - started)
        _synchronize(device)
        return time.perf_counter() - started

    cpu_memory = _ResidentPeak() if device.type == "cpu" else nullcontext()
    # Checked before any run: a pass beyond the memory available would have the process killed.
    pass_memory = (
        memory_for_pass(forward_peak_bytes(model, shape), "a pass")
        if device.type == "cpu" else nullcontext()
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    # As the engine runs the network (runner.py): on a CPU, feature maps reuse freed heap memory.
    with torch.inference_mode(), autocast, cpu_memory, heap_kept_for_reuse(device.type), pass_memory as heap_kept:
        warmup_runs, warmup_time = 0, 0.0
        while warmup_runs < warmup and not (budget_s and warmup_runs >= 1 and warmup_time > budget_s / 4):
            warmup_time += run_once()
            warmup_runs += 1
        times: list[float] = []
        issue_times.clear()
        while len(times) < runs and not (budget_s and len(times) >= 3 and sum(times) > budget_s):
            times.append(run_once())
        kernels = _kernels_per_pass(forward, inputs) if count_kernels else None
    if device.type == "cuda":
        peak, memory_kind = torch.cuda.max_memory_allocated(device), "device max allocated"
    elif device.type == "cpu":
        peak, memory_kind = cpu_memory.rise, "process RSS rise"
    else:
        peak, memory_kind = None, "not measured"
    median = statistics.median(times)
    return Measurement(
        model=name, shape=tuple(shape), parameters=sum(p.numel() for p in model.parameters()), flops=flops,
        warmup_runs=warmup_runs, runs=len(times),
        latency_ms_mean=1000 * statistics.fmean(times), latency_ms_median=1000 * median,
        latency_ms_min=1000 * min(times), issue_ms_median=1000 * statistics.median(issue_times),
        peak_memory_mb=None if peak is None else peak / 2**20,
        memory_kind=memory_kind, achieved_gflops=flops / median / 1e9, kernels_per_pass=kernels, heap_kept=heap_kept,
        latencies_ms=[1000 * t for t in times],
    )


def _check_kernel_counting(count_kernels: bool, device: torch.device) -> None:
    if count_kernels and device.type != "cuda":
        raise ValueError(f"kernel counts need a CUDA device, not {device.type}")


def _kernels_per_pass(forward, inputs: torch.Tensor) -> int:
    """GPU kernels and copies of one pass, from the profiler's device activity."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        forward(inputs)
        torch.cuda.synchronize()
    return sum(event.device_type == torch.autograd.DeviceType.CUDA for event in profiler.events())


def machine_description(device: str | torch.device = "auto") -> dict[str, Any]:
    """What the figures were measured on: processor or GPU, threads, library versions, date."""
    device = resolve_device(device)
    processor = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            processor = describe_processor(cpuinfo.read()) or processor
    except OSError:
        pass
    description = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "processor": processor,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
    return description


# The instruction sets that decide how fast oneDNN's float32 and bfloat16 convolutions can be.
VECTOR_EXTENSIONS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def describe_processor(cpuinfo: str) -> str | None:
    """The first processor of a ``/proc/cpuinfo`` text: its name, family and model numbers, and
    which of :data:`VECTOR_EXTENSIONS` it has, e.g. ``"AMD EPYC (family 26, model 2; avx2,
    avx512f, avx512_bf16)"``.

    Virtual machines may report a bare name ("AMD EPYC") for quite different processors; the family
    and model numbers tell them apart (25 is AMD's Zen 3 and Zen 4, 26 Zen 5).
    """
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the end of the first processor's block
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name")
    if not name:
        return None
    identity = [f"{label} {fields[key]}" for key, label in (("cpu family", "family"), ("model", "model")) if key in fields]
    flags = set(fields.get("flags", "").split())
    extensions = [extension for extension in VECTOR_EXTENSIONS if extension in flags]
    details = "; ".join(part for part in (", ".join(identity), ", ".join(extensions)) if part)
    return f"{name} ({details})" if details else name


def benchmark(
    models: dict[str, nn.Module],
    sizes: list[int] = (256,),
    *,
    channels: int = 3,
    batch: int = 1,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    warmup: int = 10,
    runs: int = 100,
    budget_s: float | None = None,
    compile: bool = False,
    cuda_graphs: bool = False,
    count_kernels: bool = False,
    max_gflop: float | None = None,
    on_measurement=None,
) -> dict[str, Any]:
    """Measure every model at every size in one run, with the machine's matmul rate and its
    convolutions' matrix-product rate (:func:`conv_gemm_gflops`) beside them.

    ``max_gflop`` skips (and lists under ``skipped``, with the reason) the measurements whose
    forward pass needs more GFLOP than that, so the largest inputs can be timed for the fast
    networks alone on a slow device. Those that do not fit in the device's memory are skipped too,
    the others still measured: on the CPU before they run (:func:`~.memory.memory_for_pass`), where
    the process would otherwise be killed. ``on_measurement`` is called with each
    :class:`Measurement` as it is made (for progress); ``count_kernels`` is passed on to
    :func:`measure`. Returns a JSON-ready dict: ``machine``, ``settings``, ``matmul_gflops_fp32``, ``conv_gemm_gflops_fp32``, ``measurements``
    (each with its fraction of both rates) and ``skipped``.
    """
    device = resolve_device(device)
    _check_kernel_counting(count_kernels, device)
    peak = matmul_gflops(device)
    conv_gemm = conv_gemm_gflops(device)
    measurements, skipped = [], []
    for size in sizes:
        for name, model in models.items():
            shape = (batch, channels, size, size)
            if max_gflop is not None and count_flops(model, shape) > max_gflop * 1e9:
                skipped.append({"model": name, "shape": list(shape), "reason": f"more than {max_gflop:g} GFLOP"})
                continue
            try:
                result = measure(
                    model, shape, name=name, device=device, precision=precision,
                    warmup=warmup, runs=runs, budget_s=budget_s, compile=compile, cuda_graphs=cuda_graphs,
                    count_kernels=count_kernels,
                )
            except RuntimeError as error:  # the larger sizes may not fit where the smaller ones did
                if not is_out_of_memory(error):
                    raise
                # The next measure() empties the CUDA cache before it starts.
                reason = str(error) if isinstance(error, HostMemoryError) else f"out of {device} memory"
                skipped.append({"model": name, "shape": list(shape), "reason": reason})
                continue
            if on_measurement is not None:
                on_measurement(result)
            record = asdict(result)
            record["shape"] = list(result.shape)  # as it reads back from JSON
            record["gmacs"] = result.gmacs
            record["fraction_of_matmul_peak"] = result.achieved_gflops / peak
            record["fraction_of_conv_gemm"] = result.achieved_gflops / conv_gemm
            measurements.append(record)
    return {
        "machine": machine_description(device),
        "settings": {
            "precision": precision, "warmup": warmup, "runs": runs, "budget_s": budget_s, "compile": compile,
            "cuda_graphs": cuda_graphs, "count_kernels": count_kernels, "batch": batch, "channels": channels,
            "max_gflop": max_gflop,
            "memory_format": "channels_last" if preferred_memory_format(device) == torch.channels_last else "NCHW",
        },
        "matmul_gflops_fp32": peak,
        "conv_gemm_gflops_fp32": conv_gemm,
        "measurements": measurements,
        "skipped": skipped,
    }


def format_table(report: dict[str, Any]) -> str:
    """The measurements as a Markdown table, then a line for each measurement not made.

    The share of the 1x1-convolution matrix-product rate follows the matmul share in reports that
    measured it. Off the CPU two columns follow: the median time to issue a pass
    (``issue_ms_median``) and, where counted, the device kernels per pass.
    """
    measurements = report["measurements"]
    on_a_device = report["machine"]["device"] != "cpu"
    with_conv_gemm = "conv_gemm_gflops_fp32" in report
    with_kernels = any(m.get("kernels_per_pass") is not None for m in measurements)
    header = ("| model | input | params (M) | GMACs | latency mean / median (ms) | runs | peak memory (MB) | GFLOP/s "
              "| of matmul peak |")
    ruler = "|---|---|---|---|---|---|---|---|---|"
    if with_conv_gemm:
        header, ruler = header + " of 1x1-conv GEMM |", ruler + "---|"
    if on_a_device:
        header, ruler = header + " issued in (ms) |", ruler + "---|"
    if with_kernels:
        header, ruler = header + " kernels per pass |", ruler + "---|"
    lines = [header, ruler]
    for m in measurements:
        memory = "n/a" if m["peak_memory_mb"] is None else f"{m['peak_memory_mb']:.0f}"
        line = (
            f"| {m['model']} | {'x'.join(map(str, m['shape']))} | {m['parameters'] / 1e6:.2f} | {m['gmacs']:.1f} | "
            f"{m['latency_ms_mean']:.1f} / {m['latency_ms_median']:.1f} | {m['runs']} | {memory} | "
            f"{m['achieved_gflops']:.0f} | {100 * m['fraction_of_matmul_peak']:.0f}% |"
        )
        if with_conv_gemm:
            line += f" {100 * m['fraction_of_conv_gemm']:.0f}% |"
        if on_a_device:  # reports written before the issue time was measured have none
            issued = m.get("issue_ms_median")
            line += " - |" if issued is None else f" {issued:.1f} |"
        if with_kernels:
            line += f" {m.get('kernels_per_pass') or '-'} |"
        lines.append(line)
    notes = [f"{m['model']} {'x'.join(map(str, m['shape']))}" for m in measurements if m.get("heap_kept") is False]
    notes = [f"Run with freed memory handed back between passes, too much to keep: {', '.join(notes)}."] if notes else []
    notes += [f"Not measured: {entry['model']} {'x'.join(map(str, entry['shape']))}"
              f"{': ' + entry['reason'] if 'reason' in entry else ''}." for entry in report.get("skipped", [])]
    return "\n".join(lines + ([""] + notes if notes else []))


def write_report(
    report: dict[str, Any], json_path: str | os.PathLike | None = None, plot_path: str | os.PathLike | None = None,
    psnr: dict[str, tuple[float, str]] | None = None, psnr_task: str = "",
) -> None:
    """Write the report as JSON and/or a PNG plot.

    The plot shows median latency against input side for every model (bars, one a model, where
    one size was timed); with ``psnr`` (model name -> (PSNR in dB, where the figure comes from)) a
    second panel shows latency at the smallest size against PSNR on ``psnr_task`` (e.g.
    ``"CBSD68, sigma 25"``).
    """
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    if plot_path is None:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise ValueError("the plot needs matplotlib: pip install matplotlib") from None
    measurements = report["measurements"]
    names = list(dict.fromkeys(m["model"] for m in measurements))
    psnr = {name: value for name, value in (psnr or {}).items() if name in names}
    figure, axes = plt.subplots(1, 2 if psnr else 1, figsize=(12 if psnr else 6.5, 4.8), squeeze=False)
    by_size = axes[0][0]
    colours = {name: f"C{index % 10}" for index, name in enumerate(names)}  # one per model in both panels
    sides = sorted({m["shape"][-1] for m in measurements})
    if len(sides) == 1:  # one point a model says more as a bar
        latencies = [next(m["latency_ms_median"] for m in measurements if m["model"] == name) for name in names]
        bars = by_size.barh(names, latencies, color=[colours[name] for name in names])
        by_size.bar_label(bars, labels=[f"{latency:.3g} ms" for latency in latencies], padding=3, fontsize=9)
        by_size.invert_yaxis()  # the first model on top, as in the table
        by_size.margins(x=0.2)
        by_size.set(xlabel="median latency (ms)", title=f"Latency at {sides[0]}x{sides[0]}")
        by_size.grid(True, axis="x", alpha=0.3)
    else:
        for name in names:
            points = sorted((m["shape"][-1], m["latency_ms_median"]) for m in measurements if m["model"] == name)
            by_size.plot(*zip(*points), marker="o", label=name, color=colours[name])
        by_size.set(xscale="log", yscale="log", xlabel="input side (pixels)", ylabel="median latency (ms)",
                    title="Latency against input size")
        by_size.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        by_size.set_xticks(sides, [str(s) for s in sides])
        _plain_log_ticks(by_size.yaxis)
        by_size.grid(True, which="both", alpha=0.3)
        by_size.legend()
    if psnr:
        smallest = sides[0]
        quality = axes[0][1]
        for name, (value, source) in psnr.items():
            latency = next(m["latency_ms_median"] for m in measurements
                           if m["model"] == name and m["shape"][-1] == smallest)
            quality.scatter(latency, value, color=colours[name])
            quality.annotate(f"{name}\n({source})", (latency, value), fontsize=8,
                             xytext=(4, 4), textcoords="offset points")
        quality.set(xscale="log", xlabel=f"median latency at {smallest}x{smallest} (ms)", ylabel="PSNR (dB)",
                    title=f"Quality against latency ({psnr_task})" if psnr_task else "Quality against latency")
        quality.margins(x=0.35, y=0.15)  # room for the labels
        _plain_log_ticks(quality.xaxis)
        quality.grid(True, alpha=0.3)
    machine = report["machine"]
    where = machine.get("gpu") or f"{machine['processor']}, {machine['torch_threads']} threads"
    figure.suptitle(f"{where}; {report['settings']['precision']}; torch {machine['torch']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(plot_path, dpi=110)
    plt.close(figure)


def _plain_log_ticks(axis) -> None:
    """Plain numbers at 1, 2 and 5 per decade on a log ``axis``: matplotlib's own labels read
    "4 x 10^2", and its minor labels overlap on short ranges."""
    import matplotlib.ticker

    axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
