"""Runs the network on batches of tiles: device, precision, thread use and memory retries."""

from __future__ import annotations

import copy
import threading
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

from ..model import GamaIR
from .compiled import CheckedNetwork, network_for
from .device import check_precision, is_out_of_memory, preferred_memory_format, resolve_device, usable_cores
from .heap import on_the_network_thread
from .memory import forward_peak_bytes, memory_for_pass

#: Tile pixels a forward pass takes by default. On the CPU one 512 x 512 tile keeps both cores
#: busy; a pass of fewer pixels spends most of its time on per-layer overheads (GAMA-IR-XS restored
#: 64 x 64 planes at 0.26 Mpx/s one to a pass, 1.1-1.4 Mpx/s 64 to a pass: docs/performance.md,
#: "Small planes in batches"), so smaller tiles and planes run several to a pass. A GPU takes four.
CPU_PASS_PIXELS = 512 * 512
GPU_PASS_PIXELS = 4 * CPU_PASS_PIXELS
#: How far a default batch may stretch, up or down, to split a plane's tiles evenly (:func:`batch_size`).
STRETCH = 2


class TileTooLargeError(RuntimeError):
    """A single tile does not fit in device memory."""


class ModelRunner:
    """Holds a network on its device and runs batches of tiles through it.

    One forward pass runs at a time (a lock), so several engine threads can read, normalise and
    blend tiles while the network keeps the device (or all CPU cores) busy, without
    oversubscribing it. When the device runs out of memory the batch is halved and retried; a
    tile that fails on its own raises :class:`TileTooLargeError` so the caller can shrink tiles.
    ``compile=True`` runs the network through :class:`~.compiled.CompiledNetwork` (torch.compile),
    ``cuda_graphs=True`` replays it as CUDA graphs (:class:`~.compiled.GraphedNetwork`, or graphs of
    the compiled network with ``compile``; CUDA only), and the default ``None`` uses graphs on CUDA
    without ``compile``; every path is checked against eager and falls back to eager on any failure.
    """

    def __init__(
        self,
        model: GamaIR,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        batch: int | None = None,
        threads: int | None = None,
        mean_mode: str = "global",
        compile: bool = False,
        cuda_graphs: bool | None = None,
    ) -> None:
        if batch is not None and batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self.device = resolve_device(device)
        self.autocast_dtype = check_precision(precision, self.device)
        self.precision = precision
        self.memory_format = preferred_memory_format(self.device)
        # A private copy: the caller's network keeps its device, memory layout and mean mode.
        self.model = copy.deepcopy(model).to(self.device, memory_format=self.memory_format).eval()
        self.model.set_mean_mode(mean_mode)
        self.network = network_for(self.model, self.device, self.autocast_dtype, compile, cuda_graphs)
        self.given_batch = batch
        self.pass_pixels = CPU_PASS_PIXELS if self.device.type == "cpu" else GPU_PASS_PIXELS
        # A GPU queues all the passes of one call of :meth:`run` before awaiting any, so its callers
        # give it many tiles at once; on the CPU each pass runs to its end, and more tiles a call
        # would only be held in memory meanwhile.
        self.queues_passes = self.device.type != "cpu"
        self.forget_memory_failures()
        self.bytes_per_pixel: float | None = None  # of a CPU pass's tensors at their peak (_memory_checked)
        self.lock = threading.Lock()
        if self.device.type == "cpu":
            wanted = threads or usable_cores()
            if torch.get_num_threads() != wanted:
                torch.set_num_threads(wanted)

    def forget_memory_failures(self) -> None:
        """Start again from the batch given (or the default) and any tile size, as a new runner:
        what ran out of memory in one :func:`~.restore.restore` call holds for that call only, so
        that a call's result does not depend on the calls before it."""
        # Tiles per pass: the given limit, or by default as many as make ``pass_pixels``.
        self.batch = self.given_batch
        # A default batch on a GPU may stretch, up to twice, to split a plane's tiles evenly (fewer
        # CUDA graphs and compiled shapes); a given one is a limit, and so is the CPU's default:
        # the memory planned beside the planes (RESERVED_BYTES) holds one pass of ``pass_pixels``.
        self.batch_stretches = self.given_batch is None and self.device.type != "cpu"
        # The fewest pixels of a tile that did not fit on its own: callers cut smaller tiles from
        # then on (:meth:`fits_alone`) rather than run out of memory again on every plane.
        self.failed_tile_pixels: int | None = None

    @property
    def config(self):
        return self.model.config

    def pass_size(self, count: int, tile_shape: tuple[int, int]) -> int:
        """Tiles per forward pass for ``count`` tiles of ``tile_shape`` (:func:`batch_size`): at most
        the given ``batch``, or by default about ``pass_pixels`` worth of them."""
        return batch_size(count, self._most_per_pass(tile_shape), self.batch_stretches)

    def fits_alone(self, tile_shape: tuple[int, ...]) -> bool:
        """Whether a tile of ``tile_shape`` (..., h, w) is smaller than every tile that ran out of
        device memory on its own in this runner."""
        return self.failed_tile_pixels is None or tile_shape[-2] * tile_shape[-1] < self.failed_tile_pixels

    def _most_per_pass(self, tile_shape: tuple[int, ...]) -> int:
        return self.batch or max(1, self.pass_pixels // (tile_shape[-2] * tile_shape[-1]))

    def _padded(self, tiles: torch.Tensor, planned: int | None) -> torch.Tensor:
        """``tiles``, or for a compiled or graphed network, padded with copies of the last one to a
        batch size it already runs or to ``planned`` (:meth:`~.compiled.CheckedNetwork.batch_to_run`)."""
        if not self.specialises_shapes:
            return tiles
        count = len(tiles)
        most = self._most_per_pass(tiles.shape) * (STRETCH if self.batch_stretches else 1)
        padded = self.network.batch_to_run(tuple(tiles.shape), most, planned)
        if padded == count:
            return tiles
        # On the host, to be uploaded like any batch: a compiled network is specialised to its
        # input's strides too, which padding a one-channel batch on the device changed.
        return torch.cat([tiles, tiles[-1:].expand(padded - count, *tiles.shape[1:])])

    def _forward(self, tiles: torch.Tensor, outputs: torch.Tensor) -> None:
        """Queue one batch: upload ``tiles``, run the network, download into ``outputs`` (host),
        which takes the first ``len(outputs)`` tiles' results (the others are padding)."""
        inputs = tiles.to(self.device, non_blocking=True, memory_format=self.memory_format)
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else nullcontext()
        )
        with torch.inference_mode(), autocast:
            restored = self.network(inputs)[: len(outputs)]
        outputs.copy_(restored.float(), non_blocking=True)

    def _memory_checked(self, shape: torch.Size) -> AbstractContextManager:
        """Where a CPU pass of ``shape`` holds more pixels than the default pass (whose memory the
        engine plans beside the planes), :func:`~.memory.memory_for_pass` for it: it fails as out of
        memory before the process would be killed, or runs with the heap handed back."""
        pixels = shape[0] * shape[-2] * shape[-1]
        if self.device.type != "cpu" or pixels <= self.pass_pixels:
            return nullcontext()
        if self.bytes_per_pixel is None:  # feature maps scale with the pixels: traced once
            self.bytes_per_pixel = forward_peak_bytes(self.model, tuple(shape)) / pixels
        return memory_for_pass(int(self.bytes_per_pixel * pixels), f"a forward pass of shape {'x'.join(map(str, shape))}")

    @property
    def specialises_shapes(self) -> bool:
        """Whether the network is compiled or captured anew for each input shape."""
        return isinstance(self.network, CheckedNetwork) and self.network.active

    def run(self, tiles: np.ndarray, planned: int | None = None) -> np.ndarray:
        """Restore a stack of equally sized tiles, shape (N, C, h, w) float32.

        ``planned`` is how many such tiles the caller gives at once otherwise (a full chunk of
        small planes): a network compiled or captured per shape may run fewer padded to that
        many, so that a stack's last, shorter chunk takes no second shape even when it comes first.

        On a GPU the tiles go up from page-locked (pinned) host memory and come back into it
        without blocking, so every batch is queued before any result is awaited: the device runs
        batch after batch while the host launches them, instead of idling through each round trip.
        The lock is released before the wait, so another thread queues its tiles behind these.
        On the CPU the passes run on the process's network thread, whichever thread calls, and
        reuse the heap memory freed by the passes before them (:func:`~.heap.on_the_network_thread`).

        The tiles run in batches of one size where that can be done (:func:`batch_size`): each batch
        size is a shape to capture as a CUDA graph or to compile (tens of seconds).
        """
        if self.device.type == "cpu":
            return on_the_network_thread(self._run, tiles, planned)
        return self._run(tiles, planned)

    def _run(self, tiles: np.ndarray, planned: int | None) -> np.ndarray:
        count = len(tiles)
        size = self.pass_size(count, tiles.shape[-2:])
        inputs = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32))
        pinned = self.device.type == "cuda"
        if pinned:
            inputs = inputs.pin_memory()
        # Allocated page-locked where it will be: pinning an empty tensor would copy it for nothing.
        outputs = torch.empty((count, self.config.out_channels, *tiles.shape[2:]), dtype=torch.float32,
                              pin_memory=pinned)
        done = None
        start = 0
        with self.lock:
            while start < count:
                stop = min(start + size, count)
                batch = self._padded(inputs[start:stop], planned)
                try:
                    with self._memory_checked(batch.shape):
                        self._forward(batch, outputs[start:stop])
                except RuntimeError as error:  # torch's out-of-memory errors are RuntimeErrors
                    if not is_out_of_memory(error):
                        raise
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    # A tile that failed padded to a batch is retried alone: a limit of one pads nothing.
                    if len(batch) == 1:
                        pixels = tiles.shape[-2] * tiles.shape[-1]
                        self.failed_tile_pixels = min(pixels, self.failed_tile_pixels or pixels)
                        raise TileTooLargeError(
                            f"one {tiles.shape[-2]}x{tiles.shape[-1]} tile does not fit in {self.device} memory"
                        ) from None
                    self.batch = size = max(1, size // 2)
                    self.batch_stretches = False  # the device's memory sets the limit now
                    continue
                start = stop
            if self.device.type == "cuda":
                done = torch.cuda.Event()
                done.record()
        if done is not None:
            done.synchronize()
        return outputs.numpy()


def batch_size(count: int, most: int, stretch: bool = False) -> int:
    """Tiles per forward pass for ``count`` tiles in batches of up to ``most``.

    As few batches as ``most`` allows, of equal size where ``count`` divides: 9 tiles in batches of
    up to 4 run as 3 x 3, not 4 + 4 + 1. Where that leaves a smaller last batch and ``stretch`` is
    set (``most`` is a default, not the user's limit), the largest divisor of ``count`` between half
    and twice ``most`` is taken instead: the 25 tiles of a 2048 x 2048 plane run as 5 x 5 rather
    than 6 x 4 + 1, one batch shape instead of two.
    """
    even = -(-count // -(-count // most))  # the tiles over the fewest batches, rounded up
    if stretch and count % even:
        divisors = [size for size in range(-(-most // STRETCH), STRETCH * most + 1) if count % size == 0]
        if divisors:
            return divisors[-1]
    return even


# The last runner, kept for the next call: its settings, a CPU copy of the weights it was built
# from, and the runner. Building one copies the network onto its device; compiled, or replayed as
# CUDA graphs (the default on CUDA), it then compiles (tens of seconds) or captures each tile batch
# shape again, on every call, which a folder of photos restored one by one would pay per photo.
_kept_runner: tuple[tuple, dict[str, torch.Tensor], ModelRunner] | None = None
_kept_runner_lock = threading.Lock()


def runner_for(model: GamaIR, **settings) -> ModelRunner:
    """``ModelRunner(model, **settings)``, or the last one built again.

    The last runner is handed out again while the settings, the config and every weight (compared
    by value, so an edit through ``.data`` counts and an equal network loaded anew matches) are
    those it was built from: repeated :func:`~.restore.restore` calls then compile, or capture
    CUDA graphs, once. On this project's CPU each compiled call compiled GAMA-IR-XS again for
    12-17 s before, and each eager one spent 21 ms (a tenth of a 512 x 512 photo's restore)
    copying the network. One runner is kept at a time, with its network's copy on its device;
    what ran out of memory in one call is forgotten for the next
    (:meth:`ModelRunner.forget_memory_failures`).
    """
    global _kept_runner
    key = (model.config, sorted({**settings, "device": resolve_device(settings.get("device", "auto"))}.items()))
    weights = model.state_dict()
    with _kept_runner_lock:
        if _kept_runner is not None:
            kept_key, kept_weights, runner = _kept_runner
            if kept_key == key and _same_weights(kept_weights, weights):
                runner.forget_memory_failures()
                return runner
        runner = ModelRunner(model, **settings)
        _kept_runner = key, {name: tensor.detach().to("cpu", copy=True) for name, tensor in weights.items()}, runner
        return runner


def forget_kept_runner() -> None:
    """Drop the kept runner (:func:`runner_for`), and the device memory its network holds."""
    global _kept_runner
    with _kept_runner_lock:
        _kept_runner = None


def _same_weights(kept: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> bool:
    return kept.keys() == current.keys() and all(
        kept[name].dtype == tensor.dtype and torch.equal(kept[name], tensor.detach().cpu())
        for name, tensor in current.items()
    )
