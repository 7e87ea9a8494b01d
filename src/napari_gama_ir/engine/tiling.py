"""Tile grids and blending weights for seamless tiled inference."""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from collections.abc import Hashable
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


class SharedTiles:
    """The network's outputs on the tiles that meet more than one block of a plane restored in
    square blocks of ``side`` (:func:`~.restore.restore`'s ``block``), kept until each other block
    they meet has taken them, so that such a tile runs once instead of once per block: with
    1024-pixel blocks and 512-pixel tiles, a 2 x 2 view ran 48 tiles for 33. At most ``budget``
    bytes are kept, the least recently kept leaving first (a block that then finds its tile gone
    runs it again). Keys are a plane's index and the tile; safe to share between threads."""

    def __init__(self, side: int, budget: int) -> None:
        self.side, self.budget = side, budget
        self._kept: OrderedDict[tuple, tuple[np.ndarray, int]] = OrderedDict()  # output, blocks still to take it
        self._bytes = 0
        self._lock = threading.Lock()

    def blocks_meeting(self, tile: Tile) -> int:
        rows = (tile.rows.stop - 1) // self.side - tile.rows.start // self.side + 1
        cols = (tile.cols.stop - 1) // self.side - tile.cols.start // self.side + 1
        return rows * cols

    def has(self, plane: Hashable, tile: Tile) -> bool:
        with self._lock:
            return _key(plane, tile) in self._kept

    def take(self, plane: Hashable, tile: Tile) -> np.ndarray | None:
        """The output kept for ``tile`` of ``plane``, or None; let go of once the last block takes it."""
        key = _key(plane, tile)
        with self._lock:
            output, takers = self._kept.get(key, (None, 0))
            if output is None:
                return None
            if takers > 1:
                self._kept[key] = (output, takers - 1)
            else:
                del self._kept[key]
                self._bytes -= output.nbytes
            return output

    def keep(self, plane: Hashable, tile: Tile, output: np.ndarray) -> None:
        """Keep ``output`` (a copy) for the other blocks ``tile`` meets, if any, within the budget."""
        takers = self.blocks_meeting(tile) - 1
        if takers < 1 or output.nbytes > self.budget:
            return
        key = _key(plane, tile)
        with self._lock:
            if key in self._kept:  # run by two blocks at once: the first copy serves
                return
            self._kept[key] = (output.copy(), takers)  # a copy: not the whole run's outputs
            self._bytes += output.nbytes
            while self._bytes > self.budget:
                _, (dropped, _) = self._kept.popitem(last=False)
                self._bytes -= dropped.nbytes


def _key(plane: Hashable, tile: Tile) -> tuple:
    return plane, tile.rows.start, tile.rows.stop, tile.cols.start, tile.cols.stop  # slices hash from 3.12 only


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
