"""glibc's heap around CPU forward passes: freed feature maps are reused, not mapped afresh.

torch allocates every feature map anew on every forward pass and frees it soon after. glibc serves
blocks above its mmap threshold (at most 32 MB, so every full-resolution feature map of a 512-pixel
tile) as fresh mappings that the kernel zero-fills on first touch, and it hands freed memory at the
top of its heap back to the kernel. Either way the next pass pays page faults and zero-filling for
memory it just had. Everything here does nothing where the C library is not glibc.

glibc also gives threads other than the main one arenas of their own, whose heaps hold at most
64 MB in one piece: there, larger blocks are fresh mappings whatever the limits say, and emptied
heaps are unmapped. The engine's CPU forward passes therefore run on one thread that allocates
from the main arena (:func:`on_the_network_thread`), whichever thread (dask's, napari's) asks for them.
"""

from __future__ import annotations

import contextvars
import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from typing import Any, TypeVar

T = TypeVar("T")

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -3, -4, -8
_NON_MAIN_ARENA = 0x4  # flag in a glibc chunk's size word: the chunk belongs to another arena
_GLIBC_MMAP_MAX = 65536  # glibc's default limit on blocks served by mmap
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int
_MMAP_THRESHOLD = 32 * 2**20  # glibc's upper limit for its adaptive mmap threshold

# Settings stay this long after the last forward pass, so that a stack's planes, restored one
# after another, do not switch them off and on (and return and re-fault their memory) in between.
IDLE_BEFORE_RELEASE_S = 2.0

_kept_lock = threading.Lock()
_kept_users = 0
_kept_active = False
_release_timer: threading.Timer | None = None
_hand_backs = 0  # of the heap's free pages to the kernel, so far (heap_handed_back_count)


@cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def start_thread_on_the_main_arena(tries: int = 64) -> ThreadPoolExecutor:
    """A one-thread executor whose thread allocates from glibc's main arena, if one can be had.

    glibc gives a thread its arena at the thread's first allocation, for good. After
    ``mallopt(M_ARENA_MAX, 1)`` it makes no new arena: a new thread takes an arena that an ended
    thread left, or else shares the existing ones in turn. So threads are started one at a time,
    each kept alive (holding its arena) until one allocates from the main arena; the others then
    end. If none does within ``tries``, or the C library is not glibc, the first thread is kept:
    no worse than any other thread. The arena limit stays set for the whole process (glibc fixes
    it the first time it would make an arena), so threads started later share arenas too; a
    ``MALLOC_ARENA_MAX`` the user set is left as it is.
    """
    libc = _glibc()
    if libc is not None and "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(_M_ARENA_MAX, 1)
    candidates: list[ThreadPoolExecutor] = []
    for _ in range(tries):
        candidates.append(ThreadPoolExecutor(1, thread_name_prefix="gama-ir-network"))
        if candidates[-1].submit(allocates_from_the_main_arena).result() is not False:
            break
    else:
        candidates.reverse()  # none found: keep the first
    chosen = candidates.pop()
    for candidate in candidates:
        candidate.shutdown(wait=False)
    return chosen


# Per process (a forked child starts its own): the network thread's executor and its thread's id.
_network_threads: dict[int, tuple[ThreadPoolExecutor, int]] = {}
_network_threads_lock = threading.Lock()


def on_the_network_thread(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` inside :func:`heap_kept_for_reuse`, on the thread that runs this
    process's CPU forward passes and training steps, started on first use
    (:func:`start_thread_on_the_main_arena`); called from that thread itself, it runs at once.

    On a thread with an arena of its own the passes of a 512-pixel tile do not fit it: glibc maps
    their largest feature maps afresh on every pass, whatever :func:`heap_kept_for_reuse` asks
    (GAMA-IR-S's 84-channel maps are 88 MB; a thread arena's heaps hold 64 MB). On a dask thread
    with an arena of its own, GAMA-IR-S ran 1.12-1.34x slower with 28-50x the page faults, and the
    CPU engine kept 79-80% of the bare network's speed, against 95-96% with this thread
    (docs/performance.md).
    """
    with _network_threads_lock:
        pid = os.getpid()
        if pid not in _network_threads:
            executor = start_thread_on_the_main_arena()
            _network_threads[pid] = executor, executor.submit(threading.get_ident).result()
        executor, ident = _network_threads[pid]
    if threading.get_ident() == ident:
        return _with_heap_kept(function, *args)
    # In the caller's context, as asyncio.to_thread does: a dask worker's task finds its worker
    # there (the memory checks read its memory limit).
    return executor.submit(contextvars.copy_context().run, _with_heap_kept, function, *args).result()


def _with_heap_kept(function: Callable[..., T], *args: Any) -> T:
    with heap_kept_for_reuse():
        return function(*args)


def allocates_from_the_main_arena() -> bool | None:
    """Whether the calling thread's blocks come from glibc's main arena (``None`` without glibc).

    Reads the arena flag of a fresh 4 kB block (above glibc's per-thread cache, below its mmap
    threshold): a diagnostic for tests and benchmarks.
    """
    libc = _glibc()
    if libc is None:
        return None
    libc.malloc.restype = ctypes.c_void_p
    block = libc.malloc(4096)
    try:
        size_word = ctypes.c_size_t.from_address(block - ctypes.sizeof(ctypes.c_size_t)).value
    finally:
        libc.free(ctypes.c_void_p(block))
    return not size_word & _NON_MAIN_ARENA


def reuse_freed_heap() -> None:
    """Set glibc's limits to the values it adapts to in a long-running process.

    dask starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also freezes glibc's mmap
    threshold at 128 KB: every feature map is then a fresh mapping that the kernel zero-fills on
    first touch (a 1-worker restore took 1.6x as long, docs/distributed.md). This sets glibc's
    own upper limits instead: mmap above 32 MB, trim above 64 MB.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)


def release_freed_heap() -> None:
    """Return the heap's free pages to the kernel (``malloc_trim``)."""
    global _hand_backs
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
        _hand_backs += 1


def heap_handed_back_count() -> int:
    """How often the heap's free pages have gone back to the kernel so far: while it stays the
    same, the memory that freed feature maps left in the kept heap is still there to be reused."""
    return _hand_backs


@contextmanager
def heap_kept_for_reuse(device_type: str = "cpu") -> Iterator[None]:
    """Serve every block from glibc's heap and keep freed ones there, while inside.

    Forward passes inside then reuse the memory of the passes before them: GAMA-IR-S on 512 x 512
    inputs ran 1.3-1.4x faster on the project's 2-core CPU (docs/performance.md). The heap fragments
    in exchange: on 1024 x 1024 inputs GAMA-IR-S ran 1.7-1.9x faster, and the process's resident set
    rose by 3.5-3.9 GB during the passes instead of 1.6 GB; the engine's 512-pixel tiles keep the
    extra small. Threads may enter together. :data:`IDLE_BEFORE_RELEASE_S` after the last one
    leaves, unless one enters again, :func:`release_kept_heap` sets glibc's limits back, so the
    process, idle, holds no more memory than it would have and frees what napari or NumPy release
    as usual. For a ``device_type`` other than ``"cpu"`` the network's memory is the device's, and
    nothing is changed.
    """
    global _kept_users, _kept_active, _release_timer
    libc = _glibc()
    if libc is None or device_type != "cpu":
        yield
        return
    with _kept_lock:
        if _release_timer is not None:
            _release_timer.cancel()
            _release_timer = None
        if not _kept_active:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
            _kept_active = True
        _kept_users += 1
    try:
        yield
    finally:
        with _kept_lock:
            _kept_users -= 1
            if _kept_users == 0:
                _release_timer = threading.Timer(IDLE_BEFORE_RELEASE_S, release_kept_heap)
                _release_timer.daemon = True
                _release_timer.start()


def release_kept_heap() -> None:
    """End :func:`heap_kept_for_reuse`'s settings now, unless a thread is inside it.

    mmap is allowed again, glibc's limits are set as by :func:`reuse_freed_heap`, and the heap's
    free pages go back to the kernel.
    """
    global _kept_active
    libc = _glibc()
    with _kept_lock:
        if libc is None or _kept_users or not _kept_active:
            return
        libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
        reuse_freed_heap()
        release_freed_heap()
        _kept_active = False


@contextmanager
def heap_returned_while_kept() -> Iterator[None]:
    """Inside :func:`heap_kept_for_reuse`, serve large blocks as glibc does outside it (fresh
    mappings above 32 MB, handed back when freed) for as long as this lasts.

    For a pass too large for the kept heap's growth: over four passes of GAMA-IR-S on 2048 x 2048
    RGB inputs, the process's resident set rose to 3.1x torch's own peak with the heap kept (20.5
    GB), and no further than that peak (6.6 GB) with it handed back, each pass taking 1.25x as
    long. Outside :func:`heap_kept_for_reuse`, or without glibc, this changes nothing.
    """
    libc = _glibc()
    with _kept_lock:
        suspended = libc is not None and _kept_active
        if suspended:
            libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    try:
        yield
    finally:
        with _kept_lock:
            if suspended and _kept_active:
                libc.mallopt(_M_MMAP_MAX, 0)
