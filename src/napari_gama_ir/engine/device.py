"""Device and precision choices for inference."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import dask.config
import torch

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then the CPU; other names are checked."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' requested but Apple MPS is not available")
    return device


def check_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (``None`` for full float32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("fp16 needs a GPU; on the CPU use fp32 or bf16")
    return PRECISIONS[precision]


def usable_cores() -> int:
    """CPU cores this process may run on (respects affinity masks and container limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def host_threads(device: torch.device) -> int:
    """Threads that read, normalise, blend and write planes around the network on ``device``.

    Two on a CPU, where one keeps the network (which uses every core) busy while the other
    prepares the next plane. Beside a GPU the host work is the slower side: one preparing thread
    held an H100 to 69% of the bare network on 2048 x 2048 planes (docs/performance.md), so up to
    four, within the cores there are.
    """
    return 2 if device.type == "cpu" else max(2, min(4, usable_cores()))


class HostMemoryError(RuntimeError):
    """A CPU forward pass would take more memory than is available (``engine.memory``): raised
    before it runs, where running it would end with the process killed."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a device running out of memory: CUDA, MPS, a CPU allocation that
    failed, or a CPU pass that would not fit (:class:`HostMemoryError`)."""
    # torch.cuda.OutOfMemoryError is torch.OutOfMemoryError from torch 2.4 on; 2.3 has only this name.
    if isinstance(error, (torch.cuda.OutOfMemoryError, HostMemoryError)):
        return True
    message = str(error).lower()
    # The CPU allocator's words where the system refuses memory (a ulimit, overcommit switched off).
    return "out of memory" in message or "can't allocate memory" in message


def preferred_memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on the CPU, where oneDNN runs 1x1 convs without reordering every tensor; NCHW
    elsewhere (on GPUs the gain depends on precision and card)."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def available_memory() -> int | None:
    """Bytes of memory this process can have now without swapping or being killed, or ``None``
    where the system does not say: Linux's ``MemAvailable`` (else psutil's figure where it is
    installed), lowered to the room left under a cgroup memory limit (a container, a SLURM job)
    and, in a dask worker, under the limit its nanny restarts it at (:func:`dask_worker_memory_room`)."""
    system = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    system = int(line.split()[1]) * 1024
    except OSError:
        try:
            import psutil
        except ImportError:
            return None
        system = int(psutil.virtual_memory().available)
    known = [figure for figure in (system, cgroup_memory_room(), dask_worker_memory_room()) if figure is not None]
    return min(known) if known else None


def dask_worker_memory_room() -> int | None:
    """Bytes this process can still grow by before its dask nanny restarts it, in a dask worker
    with a memory limit (its share of the machine on a LocalCluster); ``None`` elsewhere.

    The nanny terminates a worker whose resident set passes the limit times
    ``distributed.worker.memory.terminate`` (0.95 by default), which the machine's free memory does
    not show: two training replicas on one machine each found room for a step and one was lost.
    """
    # Never imported, so this is no dask worker; or imported now by another thread (dask's first
    # compute imports it where installed, for several seconds): then its get_worker is missing, and
    # napari's "Restore all" clicked during a preview's first plane failed with an AttributeError.
    get_worker = getattr(sys.modules.get("distributed"), "get_worker", None)
    if get_worker is None:
        return None
    try:
        worker = get_worker()
    except ValueError:
        return None
    limit = worker.memory_manager.memory_limit
    terminate_at = dask.config.get("distributed.worker.memory.terminate")
    if worker.nanny is None or not limit or not terminate_at:
        return None
    import psutil  # a requirement of distributed

    return max(0, int(limit * terminate_at) - psutil.Process().memory_info().rss)


def cgroup_memory_room(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 or v1), ``None`` without a limit.

    The cgroup's usage counts the page cache; its inactive file pages, which the kernel reclaims
    first, are left out of it, as container runtimes do.
    """
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            files, inactive_key = ("memory.max", "memory.current"), "inactive_file"
            folders = [root / path.lstrip("/"), root]
        elif "memory" in controllers.split(","):  # v1
            files, inactive_key = ("memory.limit_in_bytes", "memory.usage_in_bytes"), "total_inactive_file"
            folders = [root / "memory" / path.lstrip("/"), root / "memory"]
        else:
            continue
        for folder in folders:  # inside a cgroup namespace the process's own cgroup is the root
            try:
                limit_text, usage_text = ((folder / name).read_text().strip() for name in files)
                stat = dict(entry.split() for entry in (folder / "memory.stat").read_text().splitlines())
            except (OSError, ValueError):
                continue
            if limit_text == "max" or int(limit_text) >= 2**60:  # v1 writes "no limit" as a huge number
                return None
            return max(0, int(limit_text) - (int(usage_text) - int(stat.get(inactive_key, 0))))
    return None
