"""Tiled, blended, lazy restoration of images and stacks of any size."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
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
from .normalize import Affine, check_normalization, check_pixels, dtype_range_affine, percentile_affine
from .runner import ModelRunner, TileTooLargeError, batch_size, runner_for
from .tiling import Tile, group_by_run_shape, plan_tiles, tile_weights

MEAN_MODES = ("global", "local")
# Tile pixels queued in one call of the runner (2**25: 128 tiles of 512 x 512 on a plane of up to
# about 5000 x 5000 pixels, which runs whole): bounds the memory that huge planes take.
RUN_PIXELS = 2**25
DEFAULT_MEAN_MODE = "global"


class NonFiniteInputError(ValueError):
    """The input holds NaN or infinite values."""


class PlaneTooLargeError(ValueError):
    """One plane needs more memory to restore than the machine has available."""


# Memory beside the planes: torch, the network's activations on a tile, a run of tiles.
RESERVED_BYTES = 2**30


def planes_that_fit(plane_bytes: int, most: int) -> int:
    """How many planes of ``plane_bytes`` (:meth:`RestorePlan.plane_bytes`), up to ``most``, can be
    restored at once in the memory available now; all of them where the system does not say.

    Raises
    ------
    PlaneTooLargeError
        When not even one fits: restoring it would end with the process killed for want of memory,
        perhaps minutes later, instead of this error now.
    """
    available = available_memory()
    if available is None:
        return most
    fitting = (available - RESERVED_BYTES) // plane_bytes
    if fitting < 1:
        raise PlaneTooLargeError(
            f"restoring one plane takes about {(plane_bytes + RESERVED_BYTES) / 1e9:.1f} GB of memory, and "
            f"{available / 1e9:.1f} GB is available; planes this large need a machine with more memory"
        )
    return int(min(most, fitting))


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


def restore_plane(
    plane: np.ndarray,
    runner: ModelRunner,
    tiling: TilingPlan,
    normalize: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Restore one plane of shape (C, H, W) with tiling and blending.

    The plane is normalised already, or ``normalize`` (elementwise, such as :meth:`Affine.forward`)
    maps it to the network's range tile by tile, so that no normalised copy of a whole plane is
    made (4 bytes a pixel). Tiles sit on a grid aligned to the network's down-sampling; each
    tile's output is weighted by a smooth ramp that vanishes at its inner edges, and the weighted
    sum is divided by the summed weights, so there are no seams. Edge tiles, up to
    ``2**levels - 1`` pixels shorter, are padded here as the network would pad them, so all of a
    plane's tiles run as one batch shape. If a single tile does not fit in device memory, the
    tile side is halved and the plane restored again.
    """
    normalize = normalize or _as_given
    height, width = plane.shape[-2:]
    if tiling.tile is None or (height <= tiling.tile and width <= tiling.tile):
        return runner.run(normalize(plane)[None])[0]
    try:
        return _restore_tiled(plane, runner, tiling, normalize)
    except TileTooLargeError:
        smaller = tiling.tile // 2
        if smaller < 4 * runner.config.size_multiple:
            raise
        warnings.warn(f"out of device memory; retrying with tiles of {smaller} pixels", RuntimeWarning, stacklevel=2)
        overlap = min(tiling.overlap, smaller // 2)
        return restore_plane(plane, runner, TilingPlan(smaller, overlap, min(tiling.margin, overlap // 4)), normalize)


def _as_given(values: np.ndarray) -> np.ndarray:
    return values


def _restore_tiled(
    plane: np.ndarray, runner: ModelRunner, tiling: TilingPlan, normalize: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    height, width = plane.shape[1:]
    out_channels = runner.config.out_channels
    multiple = runner.config.size_multiple
    tiles = plan_tiles(height, width, tiling.tile, tiling.overlap, multiple)
    result = np.zeros((out_channels, height, width), np.float32)
    weight_sum = np.zeros((height, width), np.float32)
    for run_shape, group in group_by_run_shape(tiles, multiple).items():
        for part in _runs_of_bounded_size(group, run_shape, runner):
            batch = np.stack([_pad_as_the_network(normalize(plane[:, t.rows, t.cols]), multiple) for t in part])
            restored = runner.run(batch)
            for tile, out in zip(part, restored):
                rows, cols = tile.shape
                weights = tile_weights(tile, height, width, tiling.overlap, tiling.margin)
                result[:, tile.rows, tile.cols] += out[:, :rows, :cols] * weights
                weight_sum[tile.rows, tile.cols] += weights
    result /= weight_sum
    return result


def _runs_of_bounded_size(group: list[Tile], run_shape: tuple[int, int], runner: ModelRunner) -> list[list[Tile]]:
    """``group`` (tiles run at ``run_shape``) cut into runs of at most :data:`RUN_PIXELS` tile pixels.

    A run's tiles and their outputs are held at once (on a GPU all of its batches are queued
    before the first is awaited); unbounded, a gigapixel plane held them all, 2.6 times its
    normalised size with the default tiles. Runs are whole numbers of the runner's batch, so its
    batches keep one size.
    """
    size = batch_size(len(group), runner.batch, runner.batch_stretches)
    per_run = max(1, RUN_PIXELS // (run_shape[0] * run_shape[1] * size)) * size
    return [group[start:start + per_run] for start in range(0, len(group), per_run)]


def _pad_as_the_network(tile: np.ndarray, multiple: int) -> np.ndarray:
    """``tile`` (C, h, w) padded exactly as the network pads its input: the network's output for it
    is the same, with the padding for the engine to crop off."""
    return pad_to_multiple(torch.from_numpy(tile), multiple).numpy()


class StackAffine:
    """Percentiles of a whole stack, computed on first use from a sample of planes, then kept."""

    def __init__(self, stack: da.Array, low: float, high: float, samples: int = 16) -> None:
        self._stack, self._low, self._high, self._samples = stack, low, high, samples
        self._lock = threading.Lock()
        self._affine: Affine | None = None

    def get(self) -> Affine:
        with self._lock:
            if self._affine is None:
                planes = int(np.prod(self._stack.shape[:-3], dtype=np.int64))
                flat = self._stack.reshape((planes,) + self._stack.shape[-3:])
                picks = np.unique(np.linspace(0, planes - 1, min(planes, self._samples)).astype(int))
                values = flat[picks].compute(scheduler="synchronous")
                self._affine = percentile_affine(values, self._low, self._high)
            return self._affine


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

    def affine(self, plane: np.ndarray) -> Affine:
        if self.normalization["method"] == "range":
            return dtype_range_affine(self.input_dtype)
        if self.normalization["scope"] == "stack":
            return self.stack_affine()
        return percentile_affine(plane, self.normalization["low"], self.normalization["high"])

    def __call__(self, plane: np.ndarray, where: str = "the image") -> np.ndarray:
        if not np.isfinite(plane).all():
            raise NonFiniteInputError(f"input contains NaN or Inf values in {where}")
        affine = self.affine(plane)
        restored = restore_plane(plane, self.runner, self.tiling, normalize=affine.forward)
        # In place: a plane's every copy costs its size again, and planes can be gigapixels.
        return _cast_output(affine.inverse(restored, out=restored), self.output_dtype, overwrite=True)


def plane_name(iterated: str, index: tuple[int, ...]) -> str:
    """``"plane Z=3, T=0"`` for the plane at ``index`` along the iterated axes, ``"the image"`` for none."""
    return "plane " + ", ".join(f"{a}={i}" for a, i in zip(iterated, index)) if iterated else "the image"


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

    def plane_bytes(self, out_channels: int) -> int:
        """Memory that restoring one plane takes: its input, the blended sum and the weights
        (float32), the output and dask's assembled copy of it (12-15 bytes a pixel for uint16 grey,
        as measured in docs/performance.md, "Memory of very large planes")."""
        shape = dict(zip(self.axes, self.array.shape))
        channels_in = shape["C"] if self.layout.feed_channels else 1
        channels_out = out_channels if self.layout.feed_channels else 1
        per_pixel = (channels_in * self.array.dtype.itemsize + 4 * channels_out + 4
                     + 2 * channels_out * self.output_dtype.itemsize)
        return shape["Y"] * shape["X"] * per_pixel

    def canonical_planes(self) -> da.Array:
        """The input as ``(*iterated, C, Y, X)`` with one chunk per plane."""
        canonical = to_canonical(self.array, self.layout)
        return canonical.rechunk((1,) * len(self.layout.iterated) + canonical.shape[-3:])


def plan_restore(
    image: Any, model: GamaIR, axes: str | None, tile: int | None, overlap: int, mean_mode: str,
    normalization: dict[str, Any] | None, output_dtype: str | np.dtype, alpha: bool = False,
) -> RestorePlan:
    """Check everything :func:`restore` is asked before any work is done (see its parameters)."""
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
    return RestorePlan(array, lazy, axes, layout, normalization, target_dtype, tiling, opacity)


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
):
    """Restore an image or stack with a GAMA-IR network, plane by plane and tile by tile.

    Parameters
    ----------
    image : array-like
        NumPy, dask or zarr array (any array with ``chunks``, ``shape`` and ``dtype`` is read
        lazily). It is never modified.
    model : GamaIR or str
        A network, a registry name (loaded with its shipped weights) or a checkpoint path.
    axes : str, optional
        One letter per dimension, e.g. ``"YX"``, ``"YXC"``, ``"ZYX"``, ``"TCZYX"``. ``Y`` and ``X``
        are required; ``C`` holds channels. Guessed from the shape when omitted.
    tile : int or None
        Tile side in pixels (rounded down to a multiple of ``2**levels``); ``None`` runs each
        plane whole.
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
        Most tiles per forward pass; defaults to 1 on the CPU and 4 on a GPU. A plane's tiles run
        in as few passes as that allows, of equal size where they divide; the GPU's default goes
        up to 8 where that makes every batch one size (25 tiles as 5 x 5). Halved automatically
        when the device runs out of memory.
    normalization : dict, optional
        Overrides the model's intensity normalisation (see ``GamaIRConfig.normalization``).
    output_dtype : "float32", "input" or dtype
        Dtype of the result. Values stay in the input's intensity units; integer outputs are
        rounded and clipped to the dtype's range, never wrapped.
    on_plane : callable, optional
        Called with the number of pixels (per channel) after each plane is restored.
    compile : bool
        Run the network through ``torch.compile`` with frozen weights. Compiling takes tens of
        seconds per tile shape on a CPU; what it gains is measured in docs/performance.md. Each
        shape's first output is checked against the eager network; any failure falls back to
        eager with a warning. The compiled network is kept for the next call with equal weights
        and settings, which then compiles nothing (one compiled network is kept at a time).
    cuda_graphs : bool or None
        On CUDA, replay the network as a CUDA graph captured once per tile batch shape (one
        launch per batch instead of hundreds), checked and falling back like ``compile``. The
        default ``None`` does so on CUDA unless ``compile`` is set; ``True`` with ``compile``
        captures the compiled network instead. ``False`` runs the eager network.
    alpha : bool
        The last channel of the ``C`` axis is opacity (RGBA, or grey and alpha, as in pictures and
        napari's RGBA layers): it is passed through unchanged, cast to ``output_dtype``, and the
        network restores the other channels (so an RGB network takes RGBA images).

    Returns
    -------
    numpy.ndarray or dask.array.Array
        Same shape and axes as ``image`` (with ``out_channels`` on the ``C`` axis). Lazy dask
        input gives a lazy dask array: nothing is computed until it is read.

    Raises
    ------
    AxesError, ChannelMismatchError, ValueError
        For axes that do not fit, channel counts the model cannot take, or bad settings.
    NonFiniteInputError
        When a plane holds NaN or Inf (raised when that plane is computed).
    """
    if isinstance(model, str):
        model = create_model(model, pretrained=True)
    plan = plan_restore(image, model, axes, tile, overlap, mean_mode, normalization, output_dtype, alpha)
    iterated, target_dtype = plan.layout.iterated, plan.output_dtype
    # A lazy result's reader decides how many planes run at once (planes_that_fit); here, one must.
    threads = host_threads(resolve_device(device))
    workers = planes_that_fit(plan.plane_bytes(model.config.out_channels), 1 if plan.lazy else threads)
    # Only now that the input is known to fit: copy the network onto its device.
    runner = runner_for(
        model, device=device, precision=precision, batch=batch, mean_mode=mean_mode, compile=compile,
        cuda_graphs=cuda_graphs,
    )
    canonical = plan.canonical_planes()
    stack_affine = None
    if plan.normalization["method"] == "percentile" and plan.normalization["scope"] == "stack":
        stack_affine = StackAffine(canonical, plan.normalization["low"], plan.normalization["high"]).get
    restorer = PlaneRestorer(runner, plan.tiling, plan.normalization, plan.array.dtype, target_dtype, stack_affine)

    def restore_block(block: np.ndarray, block_info=None) -> np.ndarray:
        where = block_info[0]["chunk-location"][: len(iterated)] if block_info else ()
        restored = restorer(block.reshape(block.shape[-3:]), plane_name(iterated, where))
        if on_plane is not None:
            on_plane(block.shape[-1] * block.shape[-2])
        return restored.reshape(block.shape)

    restored = canonical.map_blocks(
        restore_block, dtype=target_dtype, meta=np.empty((0,) * canonical.ndim, target_dtype)
    )
    result = from_canonical(restored, plan.layout)
    if plan.alpha is not None:
        channel = plan.axes.index("C")
        opacity = plan.alpha.map_blocks(_cast_output, target_dtype, dtype=target_dtype)
        # One chunk along C, as without alpha: a plane's colour and opacity are read together.
        result = da.concatenate([result, opacity], axis=channel).rechunk({channel: -1})
    if plan.lazy:
        return result
    with dask.config.set(scheduler="threads", num_workers=workers):
        return result.compute()
