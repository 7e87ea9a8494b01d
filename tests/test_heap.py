"""glibc heap settings around CPU forward passes (engine/heap.py)."""

import ctypes
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from napari_gama_ir.engine import heap
from napari_gama_ir.engine.heap import heap_kept_for_reuse, on_the_network_thread, release_kept_heap


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


try:
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallinfo2.restype = MallInfo2
except (OSError, AttributeError):
    _libc = None

pytestmark = pytest.mark.skipif(_libc is None, reason="needs glibc 2.33 or newer")

BIG = 64 * 2**20  # above glibc's largest mmap threshold


def mapped_bytes() -> int:
    """Bytes glibc currently serves by mmap rather than from its heap."""
    return _libc.mallinfo2().hblkhd


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def big_tensor(nbytes: int = BIG) -> torch.Tensor:
    return torch.ones(nbytes // 4, dtype=torch.float32)


def more_than_the_heap_has_free() -> int:
    """Bytes that no free block of glibc's heap can serve: a block freed by an earlier test, below
    blocks still in use, serves a BIG request from the heap even with mmap allowed."""
    return BIG + _libc.mallinfo2().fordblks


def test_large_blocks_come_from_the_heap_only_inside():
    before = mapped_bytes()
    with heap_kept_for_reuse():
        inside = big_tensor()
        assert mapped_bytes() - before < BIG
    release_kept_heap()
    outside = big_tensor(more_than_the_heap_has_free())
    assert mapped_bytes() - before >= BIG
    del inside, outside


def test_other_devices_leave_the_heap_alone():
    release_kept_heap()
    before = mapped_bytes()
    with heap_kept_for_reuse("cuda"):
        block = big_tensor(more_than_the_heap_has_free())
        assert mapped_bytes() - before >= BIG
    del block


def test_freed_memory_is_kept_inside_and_returned_on_leaving():
    start = resident_bytes()
    with heap_kept_for_reuse():
        blocks = [big_tensor() for _ in range(4)]  # 256 MB, touched
        del blocks
        assert resident_bytes() - start > 3 * BIG
    release_kept_heap()
    assert resident_bytes() - start < BIG


def test_settings_end_by_themselves_once_idle(monkeypatch):
    monkeypatch.setattr(heap, "IDLE_BEFORE_RELEASE_S", 0.05)
    with heap_kept_for_reuse():
        pass
    before = mapped_bytes()
    deadline = time.monotonic() + 10
    while heap._kept_active and time.monotonic() < deadline:
        time.sleep(0.02)
    block = big_tensor(more_than_the_heap_has_free())
    assert mapped_bytes() - before >= BIG
    del block


def test_settings_stay_while_any_thread_is_inside():
    first_in, second_out = threading.Event(), threading.Event()
    seen = {}

    def other_thread():
        with heap_kept_for_reuse():
            first_in.set()
            second_out.wait(10)

    thread = threading.Thread(target=other_thread)
    thread.start()
    first_in.wait(10)
    with heap_kept_for_reuse():
        pass
    release_kept_heap()  # refused: the other thread is inside
    before = mapped_bytes()
    still_kept = big_tensor()
    seen["while other inside"] = mapped_bytes() - before
    second_out.set()
    thread.join()
    release_kept_heap()
    before = mapped_bytes()
    after_all = big_tensor(more_than_the_heap_has_free())
    seen["after all left"] = mapped_bytes() - before
    assert seen["while other inside"] < BIG <= seen["after all left"], seen
    del still_kept, after_all


# Run in a fresh interpreter: threads with arenas of their own (some ended, some alive) come first,
# as in a napari session that imports the plugin late.
LATE_START = """
import json
from concurrent.futures import ThreadPoolExecutor
import numpy as np

def allocate(_=None):
    return float(np.ones(10_000).sum())

for _ in range(3):
    with ThreadPoolExecutor(3) as ended:
        list(ended.map(allocate, range(6)))
alive = ThreadPoolExecutor(4)
list(alive.map(allocate, range(8)))

from napari_gama_ir.engine.heap import allocates_from_the_main_arena, on_the_network_thread
plain = ThreadPoolExecutor(1).submit(allocates_from_the_main_arena).result()
chosen = on_the_network_thread(allocates_from_the_main_arena)
print(json.dumps({"plain": plain, "network": chosen}))
"""


def test_the_network_thread_allocates_from_the_main_arena_even_when_started_late():
    environment = {name: value for name, value in os.environ.items() if name != "MALLOC_ARENA_MAX"}
    finished = subprocess.run([sys.executable, "-c", LATE_START], capture_output=True, text=True, timeout=120,
                              check=False, env=environment)
    assert finished.returncode == 0, finished.stderr
    seen = json.loads(finished.stdout.strip().splitlines()[-1])
    assert seen["plain"] is False  # the setup did give new threads arenas of their own
    assert seen["network"] is True


def test_work_asked_from_the_network_thread_itself_runs_at_once():
    network = on_the_network_thread(threading.get_ident)
    assert network != threading.get_ident()
    # Nested: waiting for the thread's own queue would never return.
    assert on_the_network_thread(on_the_network_thread, threading.get_ident) == network
