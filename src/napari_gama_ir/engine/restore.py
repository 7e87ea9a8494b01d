"""Tiled, blended, lazy restoration of images and stacks of any size."""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch

from ..model import GamaIR, create_model
from ..model.layers import pad_to_multiple
from .arrays import as_dask
from .axes import (
    ChannelMismatchError,
    PlaneLayout,
    from_canonical,
    guess_axes,
    parse_axes,
    plane_layout,
    to_canonical,
)
from .device import available_memory, host_threads, resolve_device
from .io import cancelling_on_exit, check_cancel
from .memory import USABLE_SHARE
from .normalize import Affine, check_normalization, check_pixels, dtype_range_affine, fill_no_data, percentile_affine
from .runner import CPU_PASS_PIXELS, ModelRunner, TileTooLargeError, batch_size, runner_for
from .tiling import SharedTiles, Tile, group_by_run_shape, plan_tiles, tile_weights

MEAN_MODES = ("global", "local")
# Tile pixels queued in one call of a GPU's runner (2**25: 128 tiles of 512 x 512 on a plane of up
# to about 5000 x 5000 pixels, which runs whole): bounds the memory that huge planes take. The CPU's
# runner takes one pass a call.
RUN_PIXELS = 2**25
DEFAULT_MEAN_MODE = "global"
# Sides tried, largest first, for planes too large to restore whole (multiples of 16: TIFF tiles).
BLOCK_SIDES = (16384, 8192, 4096, 2048, 1024)
# Pixels (per channel) sampled for percentiles that a huge plane or a stack's planes give.
SAMPLED_PIXELS = 2**22


class PlaneTooLargeError(ValueError):
    """One plane needs more memory to restore than the machine has available."""


# Memory beside the planes: torch, and the network's activations on a tile.
RESERVED_BYTES = 2**30
# At most this much of the memory left beside blocks keeps the tiles they share (SharedTiles): a
# plane 20,000 pixels wide has 45 tiles of 512 across, one or two rows of which (45-90 MB in grey)
# wait for the next row of blocks.
SHARED_TILE_BYTES = 2**28


def chunks_that_fit(chunk_bytes: int, most: int, result_bytes: int = 0) -> int:
    """How many chunks of ``chunk_bytes`` (planes or blocks: :meth:`RestorePlan.chunk_bytes`), up
    to ``most``, can be restored at once in the memory available now (:data:`USABLE_SHARE` of it,
    less :data:`RESERVED_BYTES`, less ``result_bytes`` of a result that fills in memory meanwhile);
    all of them where the system does not say.

    Raises
    ------
    PlaneTooLargeError
        When not even one fits: restoring it would end with the process killed for want of memory,
        perhaps minutes later, instead of this error now.
    """
    available = available_memory()
    if available is None:
        return most
    needs = f"restoring one plane, or one block of it, takes about {(chunk_bytes + RESERVED_BYTES) / 1e9:.1f} GB of memory"
    if _room(available) < chunk_bytes:
        raise PlaneTooLargeError(f"{needs}, and {available / 1e9:.1f} GB is available; this needs a machine with more memory")
    fitting = (_room(available) - result_bytes) // chunk_bytes
    if fitting < 1:
        raise PlaneTooLargeError(f"{needs} beside the {result_bytes / 1e9:.1f} GB result, and {available / 1e9:.1f} GB "
                                 "is available; restore it to a zarr store")
    return int(min(most, fitting))


def _spare_bytes(planned: int) -> int:
    """The memory available beyond ``planned`` bytes (and :func:`chunks_that_fit`'s reserve), up
    to :data:`SHARED_TILE_BYTES`."""
    available = available_memory()
    return SHARED_TILE_BYTES if available is None else max(0, min(SHARED_TILE_BYTES, _room(available) - planned))


def _fits(chunk_bytes: int) -> bool:
    available = available_memory()
    return available is None or _room(available) >= chunk_bytes


def _room(available: int) -> int:
    return int(available * USABLE_SHARE) - RESERVED_BYTES


@dataclass(frozen=True)
class TilingPlan:
    """How planes are cut: tile side (``None``: whole plane), overlap and untrusted margin."""

    tile: int | None
    overlap: int
    margin: int


def make_tiling(model: GamaIR, tile: int | None, overlap: int, mean_mode: str) -> TilingPlan:
    """Check tile and overlap against the network and choose the blending margin.

    The tile is rounded down to a multiple of the network's size multiple. In local mode the
    margin is the network's receptive radius whenever the overlap can hold it on both sides, which
    makes the tiled result equal to the whole-image result; otherwise a quarter of the overlap.
    """
    multiple = model.config.size_multiple
    if tile is None or tile == 0:
        return TilingPlan(None, 0, 0)
    minimum = 4 * multiple
    if tile < minimum:
        raise ValueError(f"tile {tile} is smaller than this network's minimum of {minimum} pixels")
    tile = tile // multiple * multiple
    if not 0 <= overlap <= tile // 2:
        raise ValueError(f"overlap must be between 0 and half the tile ({tile // 2}), got {overlap}")
    margin = overlap // 4
    if mean_mode == "local" and 2 * model.receptive_radius() < overlap:
        margin = model.receptive_radius()
    return TilingPlan(tile, overlap, margin)


@dataclass(frozen=True)
class Window:
    """Where a part of a plane lies: the plane is ``height`` x ``width``, the part given starts at
    (``top``, ``left``), and ``core`` (rows, columns of the plane) is what is to be restored."""

    height: int
    width: int
    top: int
    left: int
    core: tuple[slice, slice]

    @classmethod
    def whole(cls, height: int, width: int) -> Window:
        return cls(height, width, 0, 0, (slice(0, height), slice(0, width)))


def restore_plane(
    plane: np.ndarray,
    runner: ModelRunner,
    tiling: TilingPlan,
    normalize: Callable[[np.ndarray], np.ndarray] | None = None,
    window: Window | None = None,
    on_progress: Callable[[float], None] | None = None,
    shared: SharedTiles | None = None,
    plane_index: Hashable = None,
) -> np.ndarray:
    """Restore one plane of shape (C, H, W) with tiling and blending, or a block of one.

    The plane is normalised already, or ``normalize`` (elementwise, such as :meth:`Affine.forward`)
    maps it to the network's range tile by tile, so that no normalised copy of a whole plane is
    made (4 bytes a pixel). Tiles sit on a grid aligned to the network's down-sampling; each
    tile's output is weighted by a smooth ramp that vanishes at its inner edges, and the weighted
    sum is divided by the summed weights, so there are no seams. Edge tiles, up to
    ``2**levels - 1`` pixels shorter, are padded here as the network would pad them, so all of a
    plane's tiles run as one batch shape.

    If a single tile (or a plane no larger than a tile, run whole) does not fit in device memory,
    the tile side is halved and the plane restored again. The runner keeps the size that failed,
    so the planes and blocks after it are cut small enough from the start.

    With a ``window``, ``plane`` is the part of a larger plane that it says, holding every tile of
    the plane's grid that meets the window's core, and the result is the core alone, equal to that
    part of the whole plane's result. With ``shared`` too, the tiles that the plane's other blocks
    have run are taken from it instead of run again, and those run here that meet other blocks are
    kept in it for them; ``plane_index`` names the plane there.

    ``on_progress`` is called after each call of the runner on tiles (a forward pass on the CPU,
    a queued run of them on a GPU) with the share of the plane's tiles restored so far; what it
    raises stops the plane there. A plane restored again in smaller tiles starts again from 0.

    Raises
    ------
    TileTooLargeError
        When a plane run whole (``tiling.tile`` is ``None``), or a tile of the smallest side the
        network takes, does not fit in device memory.
    """
    normalize = normalize or _as_given
    window = window or Window.whole(*plane.shape[-2:])
    tiling = _tiling_that_fits(tiling, runner, window)
    while True:
        try:
            if tiling.tile is None or (window.height <= tiling.tile and window.width <= tiling.tile):
                return runner.run(normalize(plane)[None])[0]
            return _restore_tiled(plane, runner, tiling, normalize, window, on_progress, shared, plane_index)
        except TileTooLargeError:
            pass  # the runner has kept the size that failed
        tiling = _tiling_that_fits(tiling, runner, window)
        warnings.warn(f"out of device memory; retrying with tiles of {tiling.tile} pixels", RuntimeWarning, stacklevel=2)


def _tiling_that_fits(tiling: TilingPlan, runner: ModelRunner, window: Window) -> TilingPlan:
    """``tiling`` with its tile side halved until a tile is smaller than any the runner's device
    could not hold on its own (:meth:`ModelRunner.fits_alone`)."""
    multiple = runner.config.size_multiple
    while not runner.fits_alone(_run_shape(tiling, window, multiple)):
        if tiling.tile is None:
            raise TileTooLargeError(
                f"a whole {window.height}x{window.width} plane does not fit in {runner.device} memory; "
                "restore it in tiles"
            )
        smaller = tiling.tile // 2 // multiple * multiple
        if smaller < 4 * multiple:
            raise TileTooLargeError(
                f"one {tiling.tile}x{tiling.tile} tile, the smallest this network takes, does not fit in "
                f"{runner.device} memory"
            )
        overlap = min(tiling.overlap, smaller // 2)
        tiling = TilingPlan(smaller, overlap, min(tiling.margin, overlap // 4))
    return tiling


def _run_shape(tiling: TilingPlan, window: Window, multiple: int) -> tuple[int, int]:
    """The largest shape the network runs ``window``'s plane at: a tile, or the plane when it runs whole."""
    height, width = window.height, window.width
    if tiling.tile is not None and (height > tiling.tile or width > tiling.tile):
        height, width = min(height, tiling.tile), min(width, tiling.tile)
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def _as_given(values: np.ndarray) -> np.ndarray:
    return values


def _restore_tiled(
    plane: np.ndarray, runner: ModelRunner, tiling: TilingPlan, normalize: Callable[[np.ndarray], np.ndarray],
    window: Window, on_progress: Callable[[float], None] | None, shared: SharedTiles | None = None,
    plane_index: Hashable = None,
) -> np.ndarray:
    out_channels = runner.config.out_channels
    multiple = runner.config.size_multiple
    core_rows, core_cols = window.core
    # The tiles of the whole plane's grid that meet the core, in the grid's order: every core
    # pixel then sums the same tiles' outputs in the same order as the whole plane would.
    tiles = [
        t for t in plan_tiles(window.height, window.width, tiling.tile, tiling.overlap, multiple)
        if t.rows.start < core_rows.stop and core_rows.start < t.rows.stop
        and t.cols.start < core_cols.stop and core_cols.start < t.cols.stop
    ]
    result = np.zeros((out_channels, core_rows.stop - core_rows.start, core_cols.stop - core_cols.start), np.float32)
    weight_sum = np.zeros(result.shape[1:], np.float32)
    # Tiles that a neighbouring block has run already: taken from ``shared`` as they are blended.
    kept = {i for i, t in enumerate(tiles) if shared is not None and shared.has(plane_index, t)}
    position = {id(t): i for i, t in enumerate(tiles)}
    outputs: dict[int, np.ndarray] = {}  # run and not blended yet, by position in ``tiles``
    blended = 0

    def run(part: list[Tile]) -> np.ndarray:
        return runner.run(np.stack([
            _pad_as_the_network(normalize(plane[:, _shifted(t.rows, window.top), _shifted(t.cols, window.left)]), multiple)
            for t in part
        ]))

    def blend_in_order() -> None:
        """Blend the tiles whose outputs are at hand, in the grid's order, up to the first that is not."""
        nonlocal blended
        while blended < len(tiles):
            tile = tiles[blended]
            if blended in outputs:
                out = outputs.pop(blended)
            elif blended in kept:
                out = shared.take(plane_index, tile)
                if out is None:  # dropped since, for the budget: run it after all
                    out = run([tile])[0]
            else:
                return
            weights = tile_weights(tile, window.height, window.width, tiling.overlap, tiling.margin)
            rows = slice(max(tile.rows.start, core_rows.start), min(tile.rows.stop, core_rows.stop))
            cols = slice(max(tile.cols.start, core_cols.start), min(tile.cols.stop, core_cols.stop))
            in_tile = (_shifted(rows, tile.rows.start), _shifted(cols, tile.cols.start))
            in_core = (_shifted(rows, core_rows.start), _shifted(cols, core_cols.start))
            result[(slice(None),) + in_core] += out[(slice(None),) + in_tile] * weights[in_tile]
            weight_sum[in_core] += weights[in_tile]
            blended += 1

    to_run = [t for i, t in enumerate(tiles) if i not in kept]
    for run_shape, group in group_by_run_shape(to_run, multiple).items():
        for part in _runs_of_bounded_size(group, run_shape, runner):
            if shared is not None:  # kept meanwhile by a block restored at the same time: not run again
                kept.update(position[id(t)] for t in part if shared.has(plane_index, t))
                part = [t for t in part if position[id(t)] not in kept]
            for tile, out in zip(part, run(part) if part else []):
                outputs[position[id(tile)]] = out
                if shared is not None:
                    shared.keep(plane_index, tile, out)
            blend_in_order()
            if on_progress is not None:
                on_progress(blended / len(tiles))
    blend_in_order()
    result /= weight_sum
    return result


def _shifted(span: slice, origin: int) -> slice:
    return slice(span.start - origin, span.stop - origin)


def _runs_of_bounded_size(group: list[Tile], run_shape: tuple[int, int], runner: ModelRunner) -> list[list[Tile]]:
    """``group`` (tiles run at ``run_shape``) cut into runs of at most :data:`RUN_PIXELS` tile
    pixels on a GPU, of one forward pass on the CPU.

    A run's tiles and their outputs are held at once (on a GPU all of its batches are queued
    before the first is awaited); unbounded, a gigapixel plane held them all, 2.6 times its
    normalised size with the default tiles. Runs are whole numbers of the runner's batch, so its
    batches keep one size. The CPU gains nothing from holding more than a pass: with runs of
    :data:`RUN_PIXELS` a 24-megapixel photo's restore rose 2.4-2.5 GB above the process's start,
    against 0.9-1.0 GB a pass at a time, and took 1.1x as long (docs/engine.md).
    """
    size = runner.pass_size(len(group), run_shape)
    per_run = max(1, RUN_PIXELS // (run_shape[0] * run_shape[1] * size)) * size if runner.queues_passes else size
    return [group[start:start + per_run] for start in range(0, len(group), per_run)]


def _pad_as_the_network(tile: np.ndarray, multiple: int) -> np.ndarray:
    """``tile`` (C, h, w) padded exactly as the network pads its input: the network's output for it
    is the same, with the padding for the engine to crop off."""
    return pad_to_multiple(torch.from_numpy(tile), multiple).numpy()


def percentile_sample(stack: da.Array, samples: int = 16) -> da.Array:
    """The pixels of ``stack`` (``(planes, C, Y, X)``) that its percentiles are taken from, lazily:
    up to ``samples`` planes spread over the stack, every ``stride``-th pixel of them along Y and X,
    with the stride that keeps it to :data:`SAMPLED_PIXELS` pixels (a channel). That is all of the
    pixels of 16 planes of 512 x 512, and never more than 16 MB of a gigapixel plane."""
    planes = int(np.prod(stack.shape[:-3], dtype=np.int64))
    flat = stack.reshape((planes,) + stack.shape[-3:])
    picks = np.unique(np.linspace(0, planes - 1, min(planes, samples)).astype(int))
    stride = max(1, int(np.ceil(np.sqrt(len(picks) * stack.shape[-2] * stack.shape[-1] / SAMPLED_PIXELS))))
    return flat[picks][..., ::stride, ::stride]


class StackAffine:
    """Percentiles of a stack (``(planes, C, Y, X)``), computed on first use from its
    :func:`percentile_sample`, then kept."""

    def __init__(self, stack: da.Array, low: float, high: float) -> None:
        self._stack, self._low, self._high = stack, low, high
        self._lock = threading.Lock()
        self._affine: Affine | None = None

    def get(self) -> Affine:
        with self._lock:
            if self._affine is None:
                values = percentile_sample(self._stack).compute(scheduler="synchronous")
                self._affine = percentile_affine(values, self._low, self._high)
            return self._affine


class PlaneAffines:
    """Each plane's own percentiles (scope ``"image"``) when planes are restored in blocks: from a
    sample of the plane (:class:`StackAffine` of that plane alone), computed once per plane."""

    def __init__(self, canonical: da.Array, low: float, high: float) -> None:
        self._canonical, self._low, self._high = canonical, low, high
        self._lock = threading.Lock()
        self._planes: dict[tuple[int, ...], StackAffine] = {}

    def get(self, index: tuple[int, ...]) -> Affine:
        with self._lock:
            plane = self._planes.setdefault(index, StackAffine(self._canonical[index][None], self._low, self._high))
        return plane.get()  # outside the lock: other planes' blocks need not wait for this one's sample


def _cast_output(values: np.ndarray, dtype: np.dtype, overwrite: bool = False) -> np.ndarray:
    """``values`` as ``dtype``, integers rounded and clipped to its range; ``overwrite`` rounds in
    ``values`` itself (a buffer of the caller's) instead of in new arrays."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        rounded = np.rint(values, out=values if overwrite else None)
        return np.clip(rounded, info.min, info.max, out=rounded).astype(dtype)
    return values.astype(dtype, copy=False)


@dataclass
class PlaneRestorer:
    """What :func:`restore` does to one plane (C, Y, X): check it, normalise it, restore it tile by
    tile, map it back to the input's units and cast it.

    ``stack_affine`` gives the normalisation of ``"stack"``-scope percentile normalisation (computed
    once for the whole stack); the other normalisations need only the plane or the input dtype.
    """

    runner: ModelRunner
    tiling: TilingPlan
    normalization: dict[str, Any]
    input_dtype: np.dtype
    output_dtype: np.dtype
    stack_affine: Callable[[], Affine] | None = None
    planes_per_chunk: int = 1  # of a full chunk (RestorePlan.planes_per_chunk); the last may hold fewer

    def affine(self, plane: np.ndarray) -> Affine:
        if self.normalization["method"] == "range":
            return dtype_range_affine(self.input_dtype)
        if self.normalization["scope"] == "stack":
            return self.stack_affine()
        return percentile_affine(plane, self.normalization["low"], self.normalization["high"])

    def __call__(
        self, plane: np.ndarray, window: Window | None = None, affine: Affine | None = None,
        on_progress: Callable[[float], None] | None = None, shared: SharedTiles | None = None,
        plane_index: Hashable = None,
    ) -> np.ndarray:
        """Restore ``plane``, or with ``window`` a block of one (see :func:`restore_plane`, which
        also says what ``on_progress``, ``shared`` and ``plane_index`` are), whose normalisation
        ``affine`` then comes from the whole plane (:class:`PlaneAffines`)."""
        affine = affine or self.affine(plane)
        restored = restore_plane(plane, self.runner, self.tiling, self._network_input(affine), window, on_progress,
                                 shared, plane_index)
        if window is not None:  # the result is the core: so is what it keeps of the plane
            rows, cols = window.core
            plane = plane[..., _shifted(rows, window.top), _shifted(cols, window.left)]
        return self._to_output(restored, affine, plane)

    def restore_planes(self, planes: np.ndarray, on_progress: Callable[[float], None] | None = None) -> np.ndarray:
        """Restore ``planes`` (N, C, Y, X): a chunk of small planes (:attr:`RestorePlan.plane_chunks`),
        each run whole, as one tile, in shared forward passes, or a chunk of one plane, tiled where
        it is larger than a tile, which reports to ``on_progress`` as :func:`restore_plane` says.
        Small planes that do not fit in device memory one to a pass are restored a plane at a
        time, in smaller tiles."""
        if self.planes_per_chunk > 1 and self.runner.fits_alone(planes.shape):
            try:
                return self._restore_together(planes)
            except TileTooLargeError:  # the runner has kept the size: each plane is tiled below it
                warnings.warn(f"out of device memory; restoring {planes.shape[-2]}x{planes.shape[-1]} planes one "
                              "at a time, in smaller tiles", RuntimeWarning, stacklevel=2)
        if len(planes) == 1:  # no stacked copy: a plane can be gigapixels
            return self(planes[0], on_progress=on_progress)[None]
        return np.stack([self(plane) for plane in planes])

    def _restore_together(self, planes: np.ndarray) -> np.ndarray:
        affines = [self.affine(plane) for plane in planes]
        normalised = np.stack([self._network_input(affine)(plane) for affine, plane in zip(affines, planes)])
        restored = self.runner.run(normalised, planned=self.planes_per_chunk)
        return np.stack([self._to_output(*outcome) for outcome in zip(restored, affines, planes)])

    def _network_input(self, affine: Affine) -> Callable[[np.ndarray], np.ndarray]:
        """What maps raw pixels to the network's range: ``affine``, and for floats, which can hold
        no data, that data filled in (:func:`fill_no_data`)."""
        if self.input_dtype.kind != "f":
            return affine.forward
        return lambda raw: fill_no_data(affine.forward(raw))

    def _to_output(self, restored: np.ndarray, affine: Affine, raw: np.ndarray) -> np.ndarray:
        """``restored`` in the input's units and the output dtype, with ``raw``'s no data kept."""
        # In place: a plane's every copy costs its size again, and planes can be gigapixels.
        values = affine.inverse(restored, out=restored)
        if self.input_dtype.kind == "f":
            keep_no_data(values, raw, self.output_dtype)
        return _cast_output(values, self.output_dtype, overwrite=True)


def keep_no_data(values: np.ndarray, raw: np.ndarray, output_dtype: np.dtype) -> None:
    """Copy ``raw``'s NaN and infinite pixels (no data: the padding of a registered or stitched
    stack) into ``values``, their restored counterparts, as they are. An integer output holds no
    NaN: there they are 0 (infinities are clipped to its range by :func:`_cast_output`)."""
    no_data = ~np.isfinite(raw)
    if no_data.any():
        kept = raw[no_data]
        values[no_data] = np.where(np.isnan(kept), 0, kept) if np.issubdtype(output_dtype, np.integer) else kept


@dataclass(frozen=True)
class RestorePlan:
    """A checked request: the input as dask, its axes and plane layout, and the settings to apply."""

    array: da.Array
    lazy: bool  # the caller gave a lazy array (dask or zarr)
    axes: str
    layout: PlaneLayout
    normalization: dict[str, Any]
    output_dtype: np.dtype
    tiling: TilingPlan
    alpha: da.Array | None = None  # the input's opacity channel, passed through; ``array`` is without it
    block: int | None = None  # side of the spatial blocks planes are restored in; None: whole planes
    plane_chunks: tuple[int, ...] | None = None  # planes a chunk spans along each iterated axis; None: one

    @property
    def planes_per_chunk(self) -> int:
        return int(np.prod(self.plane_chunks)) if self.plane_chunks else 1

    @property
    def planes(self) -> int:
        """How many planes are restored: the product of the iterated axes (channels among them,
        where the network restores them one at a time; a passed-through alpha channel is not)."""
        shape = dict(zip(self.axes, self.array.shape))
        return int(np.prod([shape[a] for a in self.layout.iterated], dtype=np.int64))

    def chunk_bytes(self, out_channels: int, block: int | None = None) -> int:
        """Memory that restoring one chunk takes: a plane (or the plan's :attr:`plane_chunks`), or
        one block of ``block`` (default: the plan's). For each plane, or block: its input with the
        tiles around it; the blended sum and the weights (float32); the output four times: dask's
        assembled copy, and zarr's copies as it encodes a chunk (18 bytes a pixel for uint16 grey;
        measured 12-15 restoring a numpy plane, 17-18 from zarr to zarr: docs/performance.md,
        "Memory of very large planes" and "Planes in blocks"); and one call's tiles, normalised and
        restored (float32), which each chunk restored at once holds: up to :data:`RUN_PIXELS` of
        them on a GPU. On the CPU a call is one forward pass, so the estimate is high there by up
        to that much (0.27 GB grey, 0.8 GB RGB), which the plan, made before the device is known,
        leaves as a margin."""
        block = block or self.block
        shape = dict(zip(self.axes, self.array.shape))
        height, width = shape["Y"], shape["X"]
        tile, overlap = self.tiling.tile, self.tiling.overlap
        core = (min(block, height) * min(block, width)) if block else height * width
        region = min(block + 2 * tile, height) * min(block + 2 * tile, width) if block else core
        # Overlapping tiles cover the region (tile / step)**2 times over; a call takes RUN_PIXELS at most.
        tile_pixels = min(RUN_PIXELS, int(region * (tile / (tile - overlap)) ** 2)) if tile else region
        channels_in = shape["C"] if self.layout.feed_channels else 1
        channels_out = out_channels if self.layout.feed_channels else 1
        planes = 1 if block else self.planes_per_chunk
        return planes * (region * channels_in * self.array.dtype.itemsize
                         + core * (4 * channels_out + 4 + 4 * channels_out * self.output_dtype.itemsize)
                         + tile_pixels * 4 * (channels_in + channels_out))

    def block_window(self, core: tuple[slice, slice]) -> tuple[Window, tuple[slice, slice]]:
        """The window of the block ``core`` (rows, columns of a plane) and the rows and columns it
        reads: the core and a tile's width around it, which holds every tile that meets the core."""
        height, width = (self.array.shape[self.axes.index(a)] for a in "YX")
        reach = self.tiling.tile
        reads = tuple(slice(max(0, s.start - reach), min(n, s.stop + reach)) for s, n in zip(core, (height, width)))
        return Window(height, width, reads[0].start, reads[1].start, core), reads

    def canonical(self) -> da.Array:
        """The input as ``(*iterated, C, Y, X)``."""
        return to_canonical(self.array, self.layout)

    def canonical_planes(self) -> da.Array:
        """The input as ``(*iterated, C, Y, X)`` with a chunk per plane, or per :attr:`plane_chunks`."""
        canonical = self.canonical()
        return canonical.rechunk((self.plane_chunks or (1,) * len(self.layout.iterated)) + canonical.shape[-3:])


def plan_restore(
    image: Any, model: GamaIR, axes: str | None, tile: int | None, overlap: int, mean_mode: str,
    normalization: dict[str, Any] | None, output_dtype: str | np.dtype, alpha: bool = False,
    block: int | None = None,
) -> RestorePlan:
    """Check everything :func:`restore` is asked before any work is done (see its parameters), and
    choose the blocks that planes too large for the memory available are restored in."""
    if mean_mode not in MEAN_MODES:
        raise ValueError(f"mean_mode must be one of {MEAN_MODES}, got {mean_mode!r}")
    config = model.config
    if config.in_channels != config.out_channels:
        raise ChannelMismatchError("the engine restores with models whose input and output channels agree")
    array, lazy = as_dask(image)
    check_pixels(array, "the image")
    axes = parse_axes(axes, array.ndim) if axes else guess_axes(array.shape)
    array, opacity = split_alpha(array, axes) if alpha else (array, None)
    normalization = check_normalization(normalization or config.normalization)
    try:
        target_dtype = array.dtype if str(output_dtype) == "input" else np.dtype(output_dtype)
    except TypeError:
        raise ValueError(f"unknown output dtype {output_dtype!r}; use float32, input or a numpy dtype") from None
    tiling = make_tiling(model, tile, overlap, mean_mode)
    layout = plane_layout(axes, array.shape, config.in_channels)
    plan = RestorePlan(array, lazy, axes, layout, normalization, target_dtype, tiling, opacity)
    plan = replace(plan, block=_block_side(plan, block, config.out_channels))
    return replace(plan, plane_chunks=_plane_chunks(plan))


def chunks_at_once(plan: RestorePlan, out_channels: int, device: str | torch.device, result_bytes: int = 0) -> int:
    """How many chunks of a lazy restored stack its reader should compute at once: one per host
    thread around the network on ``device`` (:func:`~.device.host_threads`), as many of them as
    fit in the memory available now beside ``result_bytes`` of a result held in memory
    (:func:`chunks_that_fit`, which raises :class:`PlaneTooLargeError` when none does)."""
    return chunks_that_fit(plan.chunk_bytes(out_channels), host_threads(resolve_device(device)), result_bytes)


def _block_side(plan: RestorePlan, block: int | None, out_channels: int) -> int | None:
    """``block`` checked and rounded down to a multiple of 16, None for 0 (whole planes); where it
    is not given, None when a plane fits in the memory available, and otherwise the largest of
    :data:`BLOCK_SIDES` (no smaller than a tile) that fits, or failing that the smallest, which
    :func:`chunks_that_fit` then refuses."""
    tile = plan.tiling.tile
    if block == 0:
        return None
    if block is not None:
        if tile is None:
            raise ValueError("restoring planes in blocks needs tiles (a tile side)")
        if block // 16 * 16 < tile:
            raise ValueError(f"block must be at least the tile side ({tile}), got {block}")
        return block // 16 * 16
    if tile is None or _fits(plan.chunk_bytes(out_channels)):
        return None
    sides = [side for side in BLOCK_SIDES if side >= tile] or [-(-tile // 16) * 16]
    return next((side for side in sides if _fits(plan.chunk_bytes(out_channels, side))), sides[-1])


def _plane_chunks(plan: RestorePlan) -> tuple[int, ...] | None:
    """How many planes a chunk spans along each iterated axis. Where each plane runs whole, as one
    tile, a chunk holds as many as make a CPU forward pass (:data:`~.runner.CPU_PASS_PIXELS`), which
    the runner then restores in shared passes: whole axes from the last one up while they fit (the
    channels of a time-lapse restored a channel at a time), then an even share of the next axis.
    None (a plane a chunk) otherwise. It follows from the shape and the tiling alone, so that a
    run resumed on another device, or on a cluster, is chunked alike."""
    iterated = plan.layout.iterated
    height, width = (plan.array.shape[plan.axes.index(a)] for a in "YX")
    tile = plan.tiling.tile
    if not iterated or plan.block is not None or (tile is not None and max(height, width) > tile):
        return None
    room, spans = max(1, CPU_PASS_PIXELS // (height * width)), []
    for length in reversed([plan.array.shape[plan.axes.index(a)] for a in iterated]):
        spans.append(length if length <= room else batch_size(length, room))
        room = room // length if length <= room else 1
    return tuple(reversed(spans))


def split_alpha(array: da.Array, axes: str) -> tuple[da.Array, da.Array]:
    """The colour (or grey) channels of an image whose last ``C`` channel is opacity, and that channel."""
    if "C" not in axes or array.shape[axes.index("C")] < 2:
        raise ChannelMismatchError(f"an alpha channel needs a C axis of 2 or more channels, not axes {axes!r} "
                                   f"of shape {tuple(array.shape)}")
    channel = axes.index("C")
    count = array.shape[channel]
    before = (slice(None),) * channel
    return array[(*before, slice(0, count - 1))], array[(*before, slice(count - 1, count))]


def restore(
    image: Any,
    model: GamaIR | str,
    axes: str | None = None,
    *,
    tile: int | None = 512,
    overlap: int = 64,
    mean_mode: str = DEFAULT_MEAN_MODE,
    device: str = "auto",
    precision: str = "fp32",
    batch: int | None = None,
    normalization: dict[str, Any] | None = None,
    output_dtype: str | np.dtype = "float32",
    on_plane: Callable[[int], None] | None = None,
    compile: bool = False,
    cuda_graphs: bool | None = None,
    alpha: bool = False,
    block: int | None = None,
    cancel: threading.Event | None = None,
):
    """Restore an image or stack with a GAMA-IR network, plane by plane and tile by tile.

    Parameters
    ----------
    image : array-like
        NumPy, dask or zarr array (any array with ``chunks``, ``shape`` and ``dtype`` is read
        lazily). It is never modified. NaN and infinite pixels are no data (the padding of a
        registered or stitched stack): they are copied to the result as they are (NaN as 0 in an
        integer result), and the network sees them as the bottom of the intensity range.
    model : GamaIR or str
        A network, a registry name (loaded with its shipped weights) or a checkpoint path.
    axes : str, optional
        One letter per dimension, e.g. ``"YX"``, ``"YXC"``, ``"ZYX"``, ``"TCZYX"``. ``Y`` and ``X``
        are required; ``C`` holds channels. Guessed from the shape when omitted.
    tile : int or None
        Tile side in pixels (rounded down to a multiple of ``2**levels``); ``None`` runs each
        plane whole. Halved automatically when a single tile does not fit in device memory, for
        that plane and the planes after it.
    overlap : int
        Overlap of neighbouring tiles in pixels; outputs are blended across it.
    mean_mode : {"global", "local"}
        How the GAMA blocks average: over the whole tile (the paper) or over sliding windows the
        size of the training patch, which makes tiled output match whole-image output.
    device : str
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    precision : {"fp32", "fp16", "bf16"}
        Autocast precision; fp16 needs a GPU.
    batch : int, optional
        Most tiles per forward pass; by default as many as make 512 x 512 pixels on the CPU (one
        tile of 512) and four times that on a GPU. A plane's tiles run in as few passes as that
        allows, of equal size where they divide; a GPU's default goes up to twice that where it
        makes every batch one size (25 tiles of 512 as 5 x 5). Planes no larger than a tile are
        restored a few at a time, as many as make 512 x 512 pixels (a chunk of the result: whole
        iterated axes from the last one up, then a share of the next), and share passes as tiles
        do. Halved automatically when the device runs out of memory.
    normalization : dict, optional
        Overrides the model's intensity normalisation (see ``GamaIRConfig.normalization``).
    output_dtype : "float32", "input" or dtype
        Dtype of the result. Values stay in the input's intensity units; integer outputs are
        rounded and clipped to the dtype's range, never wrapped.
    on_plane : callable, optional
        Called with the number of pixels (per channel) restored, as they are: in a plane (or
        block) restored in tiles, after each forward pass on the CPU (each queued run of them on
        a GPU), in proportion to its tiles; otherwise after each chunk (a plane, or a few small
        planes). The counts add up to the image's pixels, whatever was restored again in smaller
        tiles after running out of memory.
    compile : bool
        Run the network through ``torch.compile`` with frozen weights. Compiling takes tens of
        seconds per tile shape on a CPU; what it gains is measured in docs/performance.md. Each
        shape's first output is checked against the eager network; any failure falls back to
        eager with a warning. The network's copy on its device, compiled or not, is kept for the
        next call with equal weights and settings, which then compiles (or captures CUDA graphs)
        nothing anew; one is kept at a time (:func:`~.runner.forget_kept_runner` drops it).
    cuda_graphs : bool or None
        On CUDA, replay the network as a CUDA graph captured once per tile batch shape (one
        launch per batch instead of hundreds), checked and falling back like ``compile``. The
        default ``None`` does so on CUDA unless ``compile`` is set; ``True`` with ``compile``
        captures the compiled network instead. ``False`` runs the eager network.
    alpha : bool
        The last channel of the ``C`` axis is opacity (RGBA, or grey and alpha, as in pictures and
        napari's RGBA layers): it is passed through unchanged, cast to ``output_dtype``, and the
        network restores the other channels (so an RGB network takes RGBA images).
    block : int, optional
        Restore each plane in square blocks of this side (at least the tile; rounded down to a
        multiple of 16), each with the tiles around it, so that memory follows the block, not the
        plane; 0 restores planes whole whatever their size. The result is the same as restoring
        planes whole, where percentile normalisation takes its percentiles from a sample of at
        most 4 M pixels a plane, which equals the plane itself up to 2048 x 2048. By default planes
        are restored whole when one fits in the memory available, and otherwise in the largest
        blocks that fit (16384 down to 1024).
    cancel : threading.Event, optional
        Setting it stops the restore within a forward pass (a queued run of them on a GPU): each
        chunk being computed, or starting, raises :class:`~.io.Cancelled` instead of running to
        its end, which for one huge plane takes minutes. The writers of :mod:`.io` set the event
        they are given when they stop early (an error, Ctrl-C, a cancelled worker), and so does
        this function for a numpy input, computed here: after Ctrl-C (``KeyboardInterrupt``) no
        thread goes on restoring in the background.

    Returns
    -------
    numpy.ndarray or dask.array.Array
        Same shape and axes as ``image`` (with ``out_channels`` on the ``C`` axis). Lazy dask
        input gives a lazy dask array: nothing is computed until it is read. However many threads
        compute it, no more chunks are restored at once than the host's threads around the network
        and the memory available allow (:func:`chunks_at_once`).

    Raises
    ------
    AxesError, ChannelMismatchError, ValueError
        For axes that do not fit, channel counts the model cannot take, or bad settings.
    PlaneTooLargeError
        When not even one plane, or block of one, fits in the memory available, or, for an
        in-memory input, not one fits beside the result (a zarr or dask input gives a lazy result).
    Cancelled
        When ``cancel`` is set (raised when computed).
    TileTooLargeError
        When a tile of the smallest side the network takes, or a whole plane with ``tile=None``,
        does not fit in device memory (raised when computed).
    """
    if isinstance(model, str):
        model = create_model(model, pretrained=True)
    plan = plan_restore(image, model, axes, tile, overlap, mean_mode, normalization, output_dtype, alpha, block)
    if cancel is None and not plan.lazy:
        cancel = threading.Event()  # set below if the caller is interrupted, so that dask's threads stop too
    target_dtype = plan.output_dtype
    # How many chunks are restored at once, whatever the threads that compute them (dask's default:
    # one per core, which for large planes would not fit in memory). An in-memory result (the
    # input's shape: channels in and out agree) fills beside them.
    out_channels = model.config.out_channels
    result_bytes = 0 if plan.lazy else int(np.prod(np.shape(image))) * target_dtype.itemsize
    workers = chunks_at_once(plan, out_channels, device, result_bytes)
    at_once = threading.BoundedSemaphore(workers)
    # Only now that the input is known to fit: copy the network onto its device.
    runner = runner_for(
        model, device=device, precision=precision, batch=batch, mean_mode=mean_mode, compile=compile,
        cuda_graphs=cuda_graphs,
    )
    canonical = plan.canonical_planes() if plan.block is None else plan.canonical()
    stack_affine = None
    if plan.normalization["method"] == "percentile" and plan.normalization["scope"] == "stack":
        stack_affine = StackAffine(canonical, plan.normalization["low"], plan.normalization["high"]).get
    restorer = PlaneRestorer(
        runner, plan.tiling, plan.normalization, plan.array.dtype, target_dtype, stack_affine, plan.planes_per_chunk
    )
    progress = functools.partial(_ChunkProgress, on_plane=on_plane, cancel=cancel)
    if plan.block is None:
        restored = _restore_planes(canonical, restorer, progress, at_once)
    else:
        # The memory left beside the blocks restored at once keeps the tiles they share.
        shared = SharedTiles(plan.block, _spare_bytes(workers * plan.chunk_bytes(out_channels) + result_bytes))
        restored = _restore_blocks(canonical, plan, restorer, progress, at_once, shared)
    result = from_canonical(restored, plan.layout)
    if plan.alpha is not None:
        channel = plan.axes.index("C")
        opacity = plan.alpha.map_blocks(_cast_output, target_dtype, dtype=target_dtype)
        # In the colour's chunks: in the input's, concatenating cut the colour's planes and blocks
        # at the input's chunk edges too, and each piece read alone restored its plane again.
        opacity = opacity.rechunk({d: chunks for d, chunks in enumerate(result.chunks) if d != channel})
        # One chunk along C, as without alpha: a plane's colour and opacity are read together.
        result = da.concatenate([result, opacity], axis=channel).rechunk({channel: -1})
    if plan.lazy:
        return result
    # Each chunk goes into the output as it is done: compute() would hold every chunk, then their
    # concatenation, twice the output at its peak.
    output = np.empty(result.shape, result.dtype)
    with cancelling_on_exit(cancel), dask.config.set(scheduler="threads", num_workers=workers):
        da.store(result, output, lock=False)
    return output


class _ChunkProgress:
    """Tells ``on_plane`` how many of a chunk's ``pixels`` are restored as its tiles are, and stops
    the chunk once ``cancel`` is set (see :func:`restore`). One per chunk, used by its thread."""

    def __init__(
        self, pixels: int, on_plane: Callable[[int], None] | None, cancel: threading.Event | None,
    ) -> None:
        self._pixels, self._on_plane, self._cancel = pixels, on_plane, cancel
        self._reported = 0

    def check(self) -> None:
        check_cancel(self._cancel)

    def share_done(self, share: float) -> None:
        """The ``on_progress`` of :func:`restore_plane`: ``share`` of the chunk's tiles are restored."""
        self._report(int(share * self._pixels))
        self.check()

    def finish(self) -> None:
        self._report(self._pixels)

    def _report(self, pixels: int) -> None:
        # A plane restored again in smaller tiles starts from 0: only what passes the count is new.
        if pixels > self._reported:
            if self._on_plane is not None:
                self._on_plane(pixels - self._reported)
            self._reported = pixels


def _restore_planes(
    canonical: da.Array, restorer: PlaneRestorer, progress: Callable[[int], _ChunkProgress],
    at_once: threading.Semaphore,
) -> da.Array:
    """``canonical`` (a chunk a plane, or a few small planes) restored lazily, chunk by chunk, as
    many at once as ``at_once`` lets in (the others wait, holding their input only)."""

    def restore_block(block: np.ndarray) -> np.ndarray:
        planes = block.reshape((-1,) + block.shape[-3:])
        chunk = progress(planes.shape[0] * block.shape[-1] * block.shape[-2])
        with at_once:
            chunk.check()  # cancelled while this chunk waited for its turn
            restored = restorer.restore_planes(planes, chunk.share_done)
        chunk.finish()
        return restored.reshape(block.shape[:-3] + restored.shape[-3:])

    return canonical.map_blocks(
        restore_block, dtype=restorer.output_dtype, meta=np.empty((0,) * canonical.ndim, restorer.output_dtype)
    )


def _restore_blocks(
    canonical: da.Array, plan: RestorePlan, restorer: PlaneRestorer, progress: Callable[[int], _ChunkProgress],
    at_once: threading.Semaphore, shared: SharedTiles,
) -> da.Array:
    """``canonical`` restored lazily in square blocks of ``plan.block``: each reads its core and the
    tiles that meet it (``plan.tiling.tile`` pixels around it) and restores its core, as many at
    once as ``at_once`` lets in (the others wait before reading), running only the tiles that
    ``shared`` does not hold from its neighbours."""
    iterated, side = plan.layout.iterated, plan.block
    height, width = canonical.shape[-2:]
    chunks = tuple((1,) * n for n in canonical.shape[:-3]) + (
        (canonical.shape[-3],), _regular(height, side), _regular(width, side),
    )
    plane_affines = None
    if plan.normalization["method"] == "percentile" and plan.normalization["scope"] == "image":
        plane_affines = PlaneAffines(canonical, plan.normalization["low"], plan.normalization["high"])

    def restore_block(block_id: tuple[int, ...]) -> np.ndarray:
        index, (row, col) = block_id[: len(iterated)], block_id[-2:]
        core = (slice(row * side, min((row + 1) * side, height)), slice(col * side, min((col + 1) * side, width)))
        window, reads = plan.block_window(core)
        chunk = progress((core[0].stop - core[0].start) * (core[1].stop - core[1].start))
        with at_once:
            chunk.check()
            pixels = canonical[index + (slice(None), *reads)].compute(scheduler="synchronous")
            affine = plane_affines.get(index) if plane_affines else None
            restored = restorer(pixels, window, affine, chunk.share_done, shared, index)
        chunk.finish()
        return restored.reshape((1,) * len(iterated) + restored.shape)

    return da.map_blocks(
        restore_block, chunks=chunks, dtype=restorer.output_dtype,
        meta=np.empty((0,) * canonical.ndim, restorer.output_dtype),
    )


def _regular(length: int, side: int) -> tuple[int, ...]:
    """Chunks of ``side`` along ``length``, the last one shorter: chunks that zarr and TIFF tiles take."""
    return (side,) * (length // side) + ((length % side,) if length % side else ())
