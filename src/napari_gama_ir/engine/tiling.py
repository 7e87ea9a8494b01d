"""Tile grids and blending weights for seamless tiled inference."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tile:
    """One tile of a plane: the slices it covers."""

    rows: slice
    cols: slice

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows.stop - self.rows.start, self.cols.stop - self.cols.start)


def tile_starts(length: int, tile: int, overlap: int, multiple: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` pixels.

    Every start is a multiple of ``multiple`` (the network's down-sampling factor), so each tile
    sees the same pixel grouping as the whole image would; neighbouring tiles overlap by at least
    ``overlap``. The last tile ends at the border and is at most ``multiple - 1`` pixels shorter.
    """
    if length <= tile:
        return [0]
    step = max(multiple, (tile - overlap) // multiple * multiple)
    last = math.ceil((length - tile) / multiple) * multiple
    return list(range(0, last, step)) + [last]


def plan_tiles(height: int, width: int, tile: int, overlap: int, multiple: int) -> list[Tile]:
    """All tiles of a ``height`` x ``width`` plane, row by row."""
    return [
        Tile(slice(r, min(r + tile, height)), slice(c, min(c + tile, width)))
        for r in tile_starts(height, tile, overlap, multiple)
        for c in tile_starts(width, tile, overlap, multiple)
    ]


def group_by_run_shape(tiles: list[Tile], multiple: int) -> dict[tuple[int, int], list[Tile]]:
    """``tiles`` grouped, in their order, by the shape the network runs them at: each side rounded
    up to a multiple of ``multiple``, as the network pads its input.

    A grid's edge tiles are up to ``multiple - 1`` pixels shorter than the others, so padded they
    share the others' shape: a plane then makes one batch shape instead of up to four, which is
    one compilation or CUDA graph capture instead of four, and fuller batches.
    """
    groups: dict[tuple[int, int], list[Tile]] = {}
    for tile in tiles:
        rows, cols = tile.shape
        groups.setdefault((-(-rows // multiple) * multiple, -(-cols // multiple) * multiple), []).append(tile)
    return groups


def edge_ramp(length: int, overlap: int, margin: int, taper_start: bool, taper_end: bool) -> np.ndarray:
    """1-D blending weights of one tile side.

    On a side shared with a neighbour the weight is zero for the outer ``margin`` pixels (where a
    tile is least reliable: conv padding, and the local means' shifted windows), then rises as a
    raised cosine to one over the rest of the ``overlap``. Sides on the image border are not
    tapered. Overlapping ramps of two neighbours add up to about one, and the engine divides by
    the summed weights, so the result is a smooth partition of unity.
    """
    weights = np.ones(length, dtype=np.float32)
    rise = max(overlap - 2 * margin, 1)
    position = np.arange(length, dtype=np.float32)
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.clip((position - margin + 0.5) / rise, 0.0, 1.0))
    ramp[:margin] = 0.0
    if taper_start:
        weights = np.minimum(weights, ramp)
    if taper_end:
        weights = np.minimum(weights, ramp[::-1])
    return weights


def tile_weights(tile: Tile, height: int, width: int, overlap: int, margin: int) -> np.ndarray:
    """2-D blending weights of ``tile`` inside a ``height`` x ``width`` plane (read-only, cached)."""
    tapers = (tile.rows.start > 0, tile.rows.stop < height, tile.cols.start > 0, tile.cols.stop < width)
    return _weights(tile.shape, tapers, overlap, margin)


@functools.lru_cache(maxsize=64)
def _weights(shape: tuple[int, int], tapers: tuple[bool, ...], overlap: int, margin: int) -> np.ndarray:
    # A plane has at most nine distinct tile geometries; caching spares recomputing them per tile.
    along_rows = edge_ramp(shape[0], overlap, margin, tapers[0], tapers[1])
    along_cols = edge_ramp(shape[1], overlap, margin, tapers[2], tapers[3])
    weights = along_rows[:, None] * along_cols[None, :]
    weights.flags.writeable = False
    return weights
