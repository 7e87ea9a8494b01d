"""A lazily restored stack that napari can slice without ever running the network on its thread,
and, for planes too large to restore whole for a look, the levels of a multiscale layer that restore
only the part of a plane in view."""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable

import dask.array as da
import numpy as np

from ..engine.arrays import as_dask
from ..engine.device import available_memory
from ..engine.io import Cancelled

COARSEST_SIDE = 256  # a multiscale preview's levels halve down to this side: napari's thumbnail


class BackgroundPlanes:
    """Array-like view of a lazy restored stack for a napari layer.

    ``__getitem__`` answers at once: planes already restored come from a cache, the others are
    queued for a single background thread and shown as zeros until ready; ``on_ready`` is then
    called (from that thread) with the plane's index so the viewer can refresh. A plane is computed
    with the others of its chunk (small planes share one), which all enter the cache; each is
    computed once while it stays in the cache (least recently used planes leave it beyond
    ``cache_bytes``, except those of the latest request, the whole stack in napari's 3D view).
    Only the ``queue_depth`` most recent requests are kept, besides those of the view on screen,
    so scrolling quickly through thousands of planes restores where the user stopped, not every
    plane passed on the way.
    With ``cancel``, the event that :func:`napari_gama_ir.restore` was given for ``lazy``, the
    chunk being computed is also given up within a forward pass once a request names only planes
    of other chunks, instead of being finished first (15-30 s for a 2048 x 2048 plane with GAMA-IR-S
    on a 2-core CPU); it is kept if asked for again before the pass ends, else computed again from
    the start when asked for. With ``on_progress`` and ``pixels_per_plane``, :meth:`count_pixels`
    as ``lazy``'s ``on_plane`` says how far the chunk being computed is, pass by pass, so that a
    plane shown black for many seconds is seen to be on its way.

    Parameters
    ----------
    lazy : dask.array.Array
        The engine's restored stack (from :func:`napari_gama_ir.restore` on a lazy input).
    plane_axes : tuple of int
        Dimensions that belong to one plane (Y, X, and C when the model takes the channels);
        the others are iterated.
    cancel : threading.Event, optional
        The event ``lazy``'s restore checks at each forward pass; this class sets and clears it.
    on_progress : callable, optional
        Called from the background thread with the index of the plane asked for and the share of
        its chunk restored: 0.0 when the chunk starts, then as :meth:`count_pixels` is called.
    pixels_per_plane : int, optional
        The pixels (per channel) of one plane, as ``lazy``'s ``on_plane`` counts them; needed by
        :meth:`count_pixels`.
    """

    def __init__(
        self,
        lazy: da.Array,
        plane_axes: tuple[int, ...],
        on_ready: Callable[[tuple[int, ...]], None] | None = None,
        cache_bytes: int = 1 << 30,
        queue_depth: int = 4,
        cancel: threading.Event | None = None,
        on_progress: Callable[[tuple[int, ...], float], None] | None = None,
        pixels_per_plane: int | None = None,
    ) -> None:
        self.lazy = lazy
        self._cancel = cancel
        self.on_progress, self.pixels_per_plane = on_progress, pixels_per_plane
        self._asked: tuple[int, ...] | None = None  # the plane whose request started that chunk
        self._pixels_done = 0  # of the chunk being computed, as count_pixels is told
        self.shape, self.dtype, self.ndim, self.size = lazy.shape, lazy.dtype, lazy.ndim, lazy.size
        self.iterated = tuple(d for d in range(lazy.ndim) if d not in plane_axes)
        self.on_ready = on_ready
        self.cache_bytes, self.queue_depth = cache_bytes, queue_depth
        self.blocked = tuple(d for d in plane_axes if len(lazy.chunks[d]) > 1)
        self._chunk_ends = {d: np.cumsum(lazy.chunks[d]) for d in self.iterated + self.blocked}
        self._chunk_pixels = 1  # of the chunk being computed
        self._cache: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._wanted: OrderedDict[tuple[int, ...], None] = OrderedDict()
        self._busy: frozenset[tuple[int, ...]] = frozenset()  # the planes of the chunk being computed
        self._on_screen: frozenset[tuple[int, ...]] = frozenset()  # the planes of the latest request
        self._refused: frozenset[tuple[int, ...]] = frozenset()  # the last request too large to keep
        self._condition = threading.Condition()
        self._closed = False
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._work, name="gama-ir-preview", daemon=True)
        self._thread.start()

    # -- the array interface napari uses ------------------------------------------------------
    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[tuple(slice(None) for _ in self.shape)], dtype=dtype)

    def __getitem__(self, key) -> np.ndarray:
        key = _full_key(key, self.ndim)
        positions = [_positions(k, n) for k, n in zip(key, self.shape)]
        elements = [positions[d] for d in self.iterated]
        blocks = [self._blocks_meeting(d, positions[d]) for d in self.blocked]
        items = list(itertools.product(*elements, *blocks))
        if self.blocked:  # nearest the centre of the view last: the newest request, computed first
            centre = [(r[0] + r[-1]) / 2 if r else 0 for r in (positions[d] for d in self.blocked)]
            items.sort(key=lambda item: -self._distance(item, centre))
        pieces = self._pieces(items)
        # What the pieces cover: the chosen planes, the blocks met whole, the other dimensions whole.
        cover = {d: positions[d] for d in self.iterated}
        for d, met in zip(self.blocked, blocks):
            cover[d] = range(self._chunk_start(d, met[0]), int(self._chunk_ends[d][met[-1]])) if met else range(0)
        cover.update({d: range(n) for d, n in enumerate(self.shape) if d not in cover})
        region = np.zeros([len(cover[d]) for d in range(self.ndim)], self.dtype)
        for item, piece in zip(items, pieces):
            if piece is None:
                continue  # black until restored
            at = dict(zip(self.iterated, item))
            spans = self._chunk_spans(item)
            region[tuple(
                cover[d].index(at[d]) if d in at
                else slice(spans[d].start - cover[d].start, spans[d].stop - cover[d].start) if d in spans
                else slice(None)
                for d in range(self.ndim)
            )] = piece
        return region[tuple(
            (0 if isinstance(key[d], int) else slice(None)) if d in self.iterated
            else _relative(positions[d], cover[d].start, isinstance(key[d], int))
            for d in range(self.ndim)
        )]

    # -- cache and worker ----------------------------------------------------------------------
    @property
    def computed(self) -> list[tuple[int, ...]]:
        """Indices of the planes (or blocks) in the cache, oldest first."""
        with self._condition:
            return list(self._cache)

    def is_ready(self, index: tuple[int, ...]) -> bool:
        with self._condition:
            return index in self._cache

    def block_region(self, index: tuple[int, ...]) -> dict[int, range]:
        """The positions that the block at ``index`` covers along each dimension it is cut along."""
        return {d: span for d, span in self._chunk_spans(index).items() if d in self.blocked}

    def restored_pieces(self) -> list[tuple[dict[int, range], np.ndarray]]:
        """The planes and blocks restored so far, each with the positions it covers along the
        iterated and blocked dimensions (the others it covers whole)."""
        with self._condition:
            cached = list(self._cache.items())
        return [
            ({**{d: range(p, p + 1) for d, p in zip(self.iterated, index)}, **self.block_region(index)}, piece)
            for index, piece in cached
        ]

    def _chunk_start(self, d: int, chunk: int) -> int:
        return int(self._chunk_ends[d][chunk - 1]) if chunk else 0

    def _blocks_meeting(self, d: int, positions: range) -> range:
        """The blocks along dimension ``d`` that hold any of ``positions``."""
        if not positions:
            return range(0)
        first, last = min(positions[0], positions[-1]), max(positions[0], positions[-1])
        ends = self._chunk_ends[d]
        return range(int(np.searchsorted(ends, first, side="right")), int(np.searchsorted(ends, last, side="right")) + 1)

    def _distance(self, item: tuple[int, ...], centre: list[float]) -> float:
        """How far the block at ``item`` lies from ``centre`` (one position per blocked dimension)."""
        spans = self._chunk_spans(item)
        return sum(((spans[d].start + spans[d].stop - 1) / 2 - c) ** 2 for d, c in zip(self.blocked, centre))

    def _item_bytes(self, index: tuple[int, ...]) -> int:
        """The bytes of the plane, or block, at ``index`` once restored."""
        spans = self._chunk_spans(index)
        sides = [len(spans[d]) if d in self.blocked else n for d, n in enumerate(self.shape) if d not in self.iterated]
        return int(np.prod(sides, dtype=np.int64)) * self.dtype.itemsize

    def _pieces(self, indices: list[tuple[int, ...]]) -> list[np.ndarray | None]:
        """The planes or blocks at ``indices`` (one request): cached ones, else None while they are queued."""
        with self._condition:
            refusal = self._refusal(indices)
        if refusal is not None:
            if refusal and self.on_ready is not None:
                # From another thread, so that the report, and the refresh it brings (not refused
                # again), reach the viewer after this request rather than inside it.
                threading.Thread(target=self.on_ready, args=(indices[0],), daemon=True).start()
            return [None] * len(indices)
        pieces = []
        with self._condition:
            self._refused = frozenset()  # a view refused before is reported again if asked for again
            self._on_screen = frozenset(indices)
            self._evict()  # what a larger view kept beyond the budget
            for index in indices:
                if index in self._cache:
                    self._cache.move_to_end(index)
                    pieces.append(self._cache[index])
                    continue
                if index not in self._busy:
                    self._queue(index)
                elif self._cancel is not None and self._cancel.is_set() and not self._closed:
                    # Back on a plane being given up (scrolled away and back within a pass): keep
                    # computing it, or, if it was given up already, compute it again.
                    self._cancel.clear()
                    self._queue(index)
                pieces.append(None)
            missing = any(piece is None for piece in pieces)
            if self._cancel is not None and self._busy and missing and self._busy.isdisjoint(indices):
                self._cancel.set()  # the planes being computed are not on screen any more
        return pieces

    def _refusal(self, indices: list[tuple[int, ...]]) -> bool | None:
        """``None`` where the planes of a request fit in memory once restored (under the lock);
        else whether to report it: once per request, so that the refresh the report brings does not
        report it again. Only a request larger than the cache is checked (napari's 3D view of a
        large stack): kept whole, its planes would take the memory napari needs for its own copy
        of the volume, and the viewer would be killed for want of it."""
        missing = sum(self._item_bytes(index) for index in indices if index not in self._cache)
        if missing <= self.cache_bytes:
            return None
        available = available_memory()
        if available is None or missing <= available // 2:
            return None
        request = frozenset(indices)
        if request == self._refused:
            return False
        self._refused = request
        self.errors.append(MemoryError(
            f"this view needs {missing / 1e9:.1f} GB more of restored planes, and {available / 1e9:.1f} GB is free; "
            "restore all to a zarr store and view that"
        ))
        return True

    def _queue(self, index: tuple[int, ...]) -> None:
        """Ask for ``index`` as the newest request (under the lock). Beyond ``queue_depth``, the
        oldest requests are forgotten, but not those on screen: the blocks of one view."""
        self._wanted.pop(index, None)
        self._wanted[index] = None
        stale = [wanted for wanted in self._wanted if wanted not in self._on_screen]
        for forgotten in stale[: max(0, len(self._wanted) - self.queue_depth)]:
            del self._wanted[forgotten]
        self._condition.notify()

    def _work(self) -> None:
        while True:
            with self._condition:
                while not self._wanted and not self._closed:
                    self._condition.wait()
                if self._closed:
                    return
                index, _ = self._wanted.popitem(last=True)  # newest request first
                spans = self._chunk_spans(index)
                self._busy = frozenset(self._items_of(index, spans))
                self._chunk_pixels = len(self._busy) * (self.pixels_per_plane or 0) * int(np.prod(
                    [len(spans[d]) for d in self.blocked])) // int(np.prod([self.shape[d] for d in self.blocked]))
                if self._cancel is not None:
                    self._cancel.clear()  # under the lock: only a later request gives this chunk up
                self._asked, self._pixels_done = index, 0
            if self.on_progress is not None:
                self.on_progress(index, 0.0)
            key = tuple(slice(spans[d].start, spans[d].stop) if d in spans else slice(None) for d in range(self.ndim))
            try:
                chunk = np.asarray(self.lazy[key].compute(scheduler="synchronous"))
            except Cancelled:  # given up for newer requests, which the loop takes next
                with self._condition:
                    self._busy = frozenset()
                    self._condition.notify_all()
                continue
            except BaseException as error:  # surfaced by the widget; the worker keeps serving
                with self._condition:
                    self.errors.append(error)
                    self._busy = frozenset()
                    self._condition.notify_all()
                if self.on_ready is not None:
                    self.on_ready(index)
                continue
            with self._condition:
                if self._closed:  # finished after all (without ``cancel``): nobody will show it
                    self._busy = frozenset()
                    self._condition.notify_all()
                    return
                for neighbour in self._items_of(index, spans):
                    at = dict(zip(self.iterated, neighbour))
                    # A copy, so that a cached plane does not keep its whole chunk alive.
                    self._cache[neighbour] = chunk[tuple(
                        at[d] - spans[d].start if d in at else slice(None) for d in range(self.ndim)
                    )].copy()
                    self._wanted.pop(neighbour, None)
                self._cache.move_to_end(index)
                self._busy = frozenset()
                self._evict()
                self._condition.notify_all()
            if self.on_ready is not None:
                self.on_ready(index)

    def _evict(self) -> None:
        """Drop least recently used planes beyond ``cache_bytes`` (under the lock), but never one of
        the latest request: a 3D view asks for every plane at once, and with planes of its own
        view dropped it recomputed them at every refresh without ever showing the whole volume."""
        cached = sum(plane.nbytes for plane in self._cache.values())
        for index in [i for i in self._cache if i not in self._on_screen]:  # oldest first
            if cached <= self.cache_bytes or len(self._cache) == 1:
                break
            cached -= self._cache.pop(index).nbytes

    def count_pixels(self, pixels: int) -> None:
        """``lazy``'s ``on_plane``: ``pixels`` more of the chunk being computed are restored."""
        with self._condition:
            self._pixels_done += pixels
            share = self._pixels_done / max(1, self._chunk_pixels)
            asked = None if self._closed else self._asked
        if self.on_progress is not None and asked is not None:
            self.on_progress(asked, min(1.0, share))

    def _chunk_spans(self, index: tuple[int, ...]) -> dict[int, range]:
        """For each iterated and blocked dimension, the positions of the chunk of ``lazy`` that holds
        the plane or block at ``index``: the engine restores small planes a few to a chunk, so each
        of them costs the chunk."""
        spans = {}
        for d, position in zip(self.iterated, index):
            chunk = int(np.searchsorted(self._chunk_ends[d], position, side="right"))
            spans[d] = range(self._chunk_start(d, chunk), int(self._chunk_ends[d][chunk]))
        for d, block in zip(self.blocked, index[len(self.iterated):]):
            spans[d] = range(self._chunk_start(d, block), int(self._chunk_ends[d][block]))
        return spans

    def _items_of(self, index: tuple[int, ...], spans: dict[int, range]) -> list[tuple[int, ...]]:
        """The planes, or blocks, that the chunk holding ``index`` (of ``spans``) holds."""
        block = index[len(self.iterated):]
        return [plane + block for plane in itertools.product(*(spans[d] for d in self.iterated))]

    def wait(self, timeout: float = 60.0) -> bool:
        """Block until no plane is queued or being computed (for scripts and tests)."""
        with self._condition:
            return self._condition.wait_for(lambda: not self._wanted and not self._busy, timeout) or False

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has stopped the background thread."""
        return self._closed

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the background thread to stop after :meth:`close`;
        return whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self) -> None:
        """Stop the background thread, giving up the plane it computes (with ``cancel``), and let go
        of the cached planes."""
        with self._condition:
            self._closed = True
            self._wanted.clear()
            self._cache.clear()
            if self._cancel is not None:
                self._cancel.set()
            self._condition.notify_all()


class PreviewLevel:
    """One level of a multiscale preview layer, as napari slices it: indexing narrows the
    selection only, and ``fetch`` (given an int or a slice per dimension) is asked for the pixels
    when napari turns it into an array. napari first cuts out the region in view with every other
    dimension whole, then picks the plane: fetched at once, that cut would restore (or read) the
    region of every plane of a stack."""

    def __init__(self, fetch: Callable[[tuple], np.ndarray], shape: tuple[int, ...], dtype,
                 selection: tuple[range | int, ...] | None = None) -> None:
        self._fetch = fetch
        self._selection = selection if selection is not None else tuple(range(n) for n in shape)
        self.shape = tuple(len(s) for s in self._selection if isinstance(s, range))
        self.dtype = np.dtype(dtype)
        self.ndim, self.size = len(self.shape), int(np.prod(self.shape, dtype=np.int64))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> PreviewLevel:
        narrowing = iter(_full_key(key, self.ndim))
        selection = tuple(s if isinstance(s, int) else s[next(narrowing)] for s in self._selection)
        return PreviewLevel(self._fetch, (), self.dtype, selection)

    def __array__(self, dtype=None, copy=None):
        key = tuple(s if isinstance(s, int) else _relative(s, 0, False) for s in self._selection)
        return np.asarray(self._fetch(key), dtype=dtype)


class _CoarseLevel:
    """The ``fetch`` of a coarse :class:`PreviewLevel`: the input at that scale (``source``, whose
    position ``i`` is the full resolution's ``i * factors[d]`` along dimension ``d``) with the planes
    and blocks that ``planes`` has restored so far laid over it, one pixel in ``factors``."""

    def __init__(self, source: da.Array, factors: dict[int, int], planes: BackgroundPlanes) -> None:
        self.source, self.factors, self.planes = source, factors, planes

    def __call__(self, key: tuple) -> np.ndarray:
        positions = [_positions(k, n) for k, n in zip(key, self.source.shape)]
        # Single positions kept as dimensions of one until the end, so that every piece lands alike.
        region = np.array(self.source[tuple(_relative(p, 0, False) for p in positions)], dtype=self.planes.dtype)
        for covers, piece in self.planes.restored_pieces():
            piece = np.expand_dims(piece, self.planes.iterated)
            into, taken = [], []
            for d, wanted in enumerate(positions):
                at = np.asarray(wanted) * self.factors.get(d, 1)
                cover = covers.get(d, range(self.planes.shape[d]))
                inside = (at >= cover.start) & (at < cover.stop)
                into.append(np.flatnonzero(inside))
                taken.append(at[inside] - cover.start)
            if all(len(i) for i in into):
                region[np.ix_(*into)] = piece[np.ix_(*taken)]
        return region[tuple(0 if isinstance(k, int) else slice(None) for k in key)]


def preview_levels(planes: BackgroundPlanes, inputs: list, spatial: tuple[int, int]) -> list[PreviewLevel]:
    """The levels of a multiscale layer showing ``planes``, a stack restored in blocks: the restored
    stack, then coarser levels halving down to :data:`COARSEST_SIDE` pixels, each the input at that
    scale with the blocks restored so far laid over it. ``inputs`` are the input layer's levels
    (its one array if it has no others), in the axes of ``planes``; ``spatial`` its Y and X
    dimensions. napari shows the level that fits the view: zoomed in to full resolution it asks
    for the region in view, which restores only the blocks that meet it; zoomed out it shows the
    input, restored where the user has looked, without restoring the whole plane for an overview."""
    full = planes.shape
    sources = [(as_dask(inputs[0])[0], 1)]
    for level in inputs[1:]:  # the input's own lower resolutions, where they scale Y and X alone
        shape = level.shape
        factor = round(full[spatial[0]] / shape[spatial[0]])
        others_alike = all(shape[d] == full[d] for d in range(len(full)) if d not in spatial)
        if not others_alike or factor <= sources[-1][1] or round(full[spatial[1]] / shape[spatial[1]]) != factor:
            break
        sources.append((as_dask(level)[0], factor))
    while max(sources[-1][0].shape[d] for d in spatial) > COARSEST_SIDE:
        source, factor = sources[-1]
        halved = tuple(slice(None, None, 2) if d in spatial else slice(None) for d in range(len(full)))
        sources.append((source[halved], 2 * factor))
    levels = [PreviewLevel(planes.__getitem__, full, planes.dtype)]
    for source, factor in sources[1:]:
        fetch = _CoarseLevel(source, dict.fromkeys(spatial, factor), planes)
        levels.append(PreviewLevel(fetch, source.shape, planes.dtype))
    return levels


def _full_key(key, ndim: int) -> tuple:
    """Expand a key to one int or slice per dimension."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        at = key.index(Ellipsis)
        key = key[:at] + (slice(None),) * (ndim - len(key) + 1) + key[at + 1 :]
    key = key + (slice(None),) * (ndim - len(key))
    for k in key:
        if not isinstance(k, (slice, int, np.integer)):
            raise TypeError(f"preview arrays take ints and slices, not {type(k).__name__}")
    return tuple(int(k) if isinstance(k, np.integer) else k for k in key)


def _positions(key: int | slice, length: int) -> range:
    """The positions ``key`` picks along a dimension of ``length``."""
    if isinstance(key, slice):
        return range(length)[key]
    at = range(length)[key]  # IndexError beyond the dimension, as numpy
    return range(at, at + 1)


def _relative(positions: range, start: int, single: bool) -> int | slice:
    """``positions`` of a dimension as an index into a region of it that begins at ``start``."""
    if single:
        return positions[0] - start
    if not positions:
        return slice(0, 0)
    stop = positions.start - start + len(positions) * positions.step
    return slice(positions.start - start, None if stop < 0 else stop, positions.step)
