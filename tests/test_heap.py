"""glibc heap settings around CPU forward passes (engine/heap.py)."""

import ctypes
import threading
import time

import pytest
import torch

from napari_gama_ir.engine import heap
from napari_gama_ir.engine.heap import heap_kept_for_reuse, release_kept_heap


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


def big_tensor() -> torch.Tensor:
    return torch.ones(BIG // 4, dtype=torch.float32)


def test_large_blocks_come_from_the_heap_only_inside():
    before = mapped_bytes()
    with heap_kept_for_reuse():
        inside = big_tensor()
        assert mapped_bytes() - before < BIG
    release_kept_heap()
    outside = big_tensor()
    assert mapped_bytes() - before >= BIG
    del inside, outside


def test_other_devices_leave_the_heap_alone():
    release_kept_heap()
    before = mapped_bytes()
    with heap_kept_for_reuse("cuda"):
        block = big_tensor()
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
    block = big_tensor()
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
    after_all = big_tensor()
    seen["after all left"] = mapped_bytes() - before
    assert seen["while other inside"] < BIG <= seen["after all left"], seen
    del still_kept, after_all
