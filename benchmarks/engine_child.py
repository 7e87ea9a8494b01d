"""The CLI, run by ``engine_throughput.py`` with optional instruments, then its arguments.

    python benchmarks/engine_child.py [--copy-network] [--timeline PATH] restore stack.zarr -o out.zarr ...

``--copy-network`` replaces the network's forward pass by a copy of its input tiles (grey in, grey
out), which leaves the host side alone. ``--timeline PATH`` records, per thread, when each input
read, plane, network call (``run``, lock wait and device wait included), forward pass (``_forward``,
under the lock; on a GPU only its queuing) and output write began and ended, in seconds since this
script started, and two steps of the startup: ``imports`` (from 0 until the CLI is imported) and
``runner`` (building the :class:`ModelRunner`: the model copied to its device, which on a GPU creates
the CUDA context). On a GPU it also times each forward pass on the device with CUDA events. It writes
``{"events": [[stage, thread, start, end], ...], "device_busy_seconds": float or null}`` to PATH as
JSON when the process exits.
"""

from __future__ import annotations

import atexit
import functools
import json
import sys
import threading
import time

STARTED = time.perf_counter()


def record_into(events: list, stage: str, function):
    """``function``, appending ``[stage, thread, start, end]`` to ``events`` at each call."""

    @functools.wraps(function)
    def timed(*args, **kwargs):
        start = time.perf_counter() - STARTED
        try:
            return function(*args, **kwargs)
        finally:
            events.append([stage, threading.current_thread().name, start, time.perf_counter() - STARTED])

    return timed


def timed_on_the_device(pairs: list, function):
    """``function``, bracketed on the current CUDA stream by a pair of timing events kept in ``pairs``."""
    import torch

    @functools.wraps(function)
    def timed(*args, **kwargs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            return function(*args, **kwargs)
        finally:
            end.record()
            pairs.append((start, end))

    return timed


def write_timeline(path: str, events: list, device_pairs: list) -> None:
    device_seconds = None
    if device_pairs:
        import torch

        torch.cuda.synchronize()
        device_seconds = sum(start.elapsed_time(end) for start, end in device_pairs) / 1000
    with open(path, "w") as handle:
        json.dump({"events": events, "device_busy_seconds": device_seconds}, handle)


def main(argv: list[str]) -> int:
    import zarr

    from napari_gama_ir.engine.restore import PlaneRestorer
    from napari_gama_ir.engine.runner import ModelRunner

    events = None
    if argv[:1] == ["--copy-network"]:
        ModelRunner._forward = lambda self, tiles, outputs: outputs.copy_(tiles, non_blocking=True)
        argv = argv[1:]
    if argv[:1] == ["--timeline"]:
        import torch

        path, argv, events, device_pairs = argv[1], argv[2:], [], []
        zarr.Array.__getitem__ = record_into(events, "read", zarr.Array.__getitem__)
        zarr.Array.__setitem__ = record_into(events, "write", zarr.Array.__setitem__)
        PlaneRestorer.__call__ = record_into(events, "plane", PlaneRestorer.__call__)
        ModelRunner.__init__ = record_into(events, "runner", ModelRunner.__init__)
        ModelRunner.run = record_into(events, "network", ModelRunner.run)
        forward = record_into(events, "forward", ModelRunner._forward)
        ModelRunner._forward = timed_on_the_device(device_pairs, forward) if torch.cuda.is_available() else forward
        atexit.register(write_timeline, path, events, device_pairs)

    from napari_gama_ir.cli import main as cli_main

    if events is not None:
        events.append(["imports", threading.current_thread().name, 0.0, time.perf_counter() - STARTED])

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
