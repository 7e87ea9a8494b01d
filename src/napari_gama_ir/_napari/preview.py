"""A lazily restored stack that napari can slice without ever running the network on its thread."""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable

import dask.array as da
import numpy as np

from ..engine.device import available_memory
from ..engine.io import Cancelled


class BackgroundPlanes:
    """Array-like view of a lazy restored stack for a napari layer.

    ``__getitem__`` answers at once: planes already restored come from a cache, the others are
    queued for a single background thread and shown as zeros until ready; ``on_ready`` is then
    called (from that thread) with the plane's index so the viewer can refresh. A plane is computed
    with the others of its chunk (small planes share one), which all enter the cache; each is
    computed once while it stays in the cache (least recently used planes leave it beyond
    ``cache_bytes``, except those of the latest request, the whole stack in napari's 3D view).
    Only the ``queue_depth`` most recent requests are kept, so scrolling quickly through
    thousands of planes restores where the user stopped, not every plane passed on the way.
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
        self.shape, self.dtype, self.ndim = lazy.shape, lazy.dtype, lazy.ndim
        self.iterated = tuple(d for d in range(lazy.ndim) if d not in plane_axes)
        self.on_ready = on_ready
        self.cache_bytes, self.queue_depth = cache_bytes, queue_depth
        plane_shape = tuple(lazy.shape[d] for d in range(lazy.ndim) if d not in self.iterated)
        self._placeholder = np.zeros(plane_shape, lazy.dtype)
        self._placeholder.flags.writeable = False
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
        ranges = [
            range(self.shape[d])[key[d]] if isinstance(key[d], slice) else [range(self.shape[d])[key[d]]]
            for d in self.iterated
        ]
        planes = self._planes(list(itertools.product(*ranges)))
        slab = np.stack(planes).reshape([len(r) for r in ranges] + list(self._placeholder.shape))
        # slab holds the iterated dimensions first; put every dimension back in place.
        order = list(self.iterated) + [d for d in range(self.ndim) if d not in self.iterated]
        slab = slab.transpose(np.argsort(order))
        rest = tuple(
            (0 if not isinstance(key[d], slice) else slice(None)) if d in self.iterated else key[d]
            for d in range(self.ndim)
        )
        return slab[rest]

    # -- cache and worker ----------------------------------------------------------------------
    @property
    def computed(self) -> list[tuple[int, ...]]:
        """Indices of the planes in the cache, oldest first."""
        with self._condition:
            return list(self._cache)

    def is_ready(self, index: tuple[int, ...]) -> bool:
        with self._condition:
            return index in self._cache

    def _planes(self, indices: list[tuple[int, ...]]) -> list[np.ndarray]:
        """The planes at ``indices`` (one request): cached ones, else placeholders while they are queued."""
        with self._condition:
            refusal = self._refusal(indices)
        if refusal is not None:
            if refusal and self.on_ready is not None:
                # From another thread, so that the report, and the refresh it brings (not refused
                # again), reach the viewer after this request rather than inside it.
                threading.Thread(target=self.on_ready, args=(indices[0],), daemon=True).start()
            return [self._placeholder] * len(indices)
        planes = []
        with self._condition:
            self._refused = frozenset()  # a view refused before is reported again if asked for again
            self._on_screen = frozenset(indices)
            self._evict()  # what a larger view kept beyond the budget
            for index in indices:
                if index in self._cache:
                    self._cache.move_to_end(index)
                    planes.append(self._cache[index])
                    continue
                if index not in self._busy:
                    self._queue(index)
                elif self._cancel is not None and self._cancel.is_set() and not self._closed:
                    # Back on a plane being given up (scrolled away and back within a pass): keep
                    # computing it, or, if it was given up already, compute it again.
                    self._cancel.clear()
                    self._queue(index)
                planes.append(self._placeholder)
            missing = any(plane is self._placeholder for plane in planes)
            if self._cancel is not None and self._busy and missing and self._busy.isdisjoint(indices):
                self._cancel.set()  # the planes being computed are not on screen any more
        return planes

    def _refusal(self, indices: list[tuple[int, ...]]) -> bool | None:
        """``None`` where the planes of a request fit in memory once restored (under the lock);
        else whether to report it: once per request, so that the refresh the report brings does not
        report it again. Only a request larger than the cache is checked (napari's 3D view of a
        large stack): kept whole, its planes would take the memory napari needs for its own copy
        of the volume, and the viewer would be killed for want of it."""
        missing = sum(self._placeholder.nbytes for index in indices if index not in self._cache)
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
        """Ask for ``index`` as the newest request (under the lock)."""
        self._wanted.pop(index, None)
        self._wanted[index] = None
        while len(self._wanted) > self.queue_depth:
            self._wanted.popitem(last=False)  # forget the oldest request
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
                self._busy = frozenset(itertools.product(*(spans[d] for d in self.iterated)))
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
                for neighbour in itertools.product(*(spans[d] for d in self.iterated)):
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
            share = self._pixels_done / max(1, len(self._busy) * self.pixels_per_plane)
            asked = None if self._closed else self._asked
        if self.on_progress is not None and asked is not None:
            self.on_progress(asked, min(1.0, share))

    def _chunk_spans(self, index: tuple[int, ...]) -> dict[int, range]:
        """For each iterated dimension, the positions of the chunk of ``lazy`` that holds ``index``:
        the engine restores small planes a few to a chunk, so each of them costs the chunk."""
        spans = {}
        for d, position in zip(self.iterated, index):
            ends = np.cumsum(self.lazy.chunks[d])
            chunk = int(np.searchsorted(ends, position, side="right"))
            spans[d] = range(int(ends[chunk - 1]) if chunk else 0, int(ends[chunk]))
        return spans

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
