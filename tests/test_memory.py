"""Host memory of CPU forward passes: the estimate, the check before a pass, and what the engine and
the benchmark do with a pass that would not fit."""

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from napari_gama_ir import create_model, restore
from napari_gama_ir.engine import TileTooLargeError
from napari_gama_ir.engine import memory as host_memory
from napari_gama_ir.engine.benchmark import benchmark, format_table
from napari_gama_ir.engine.device import HostMemoryError, is_out_of_memory
from napari_gama_ir.engine.heap import _glibc, heap_kept_for_reuse, release_freed_heap
from napari_gama_ir.engine.memory import (
    KEPT_HEAP_GROWTH,
    RETURNED_HEAP_GROWTH,
    USABLE_SHARE,
    forward_peak_bytes,
    memory_for_pass,
    training_step_peak_bytes,
)

from .conftest import assert_alike, make_tiny_model


def _available(monkeypatch, room: float) -> None:
    """The memory available, as the check sees it, leaves ``room`` bytes to plan on, and no pass
    has left memory in the heap for the next to reuse."""
    monkeypatch.setattr(host_memory, "available_memory", lambda: math.ceil(room / USABLE_SHARE) + 2)
    monkeypatch.setattr(host_memory, "_kept_pass", (-1, 0))


class _Viewed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        features = self.conv(x)
        return features.view(-1)[:64].view(1, 1, 8, 8)  # views of one storage: counted once


def test_the_peak_is_the_most_bytes_of_tensors_alive_at_once():
    # conv -> 4 x 8 x 8 floats (1 kB); ReLU makes a second kB while the first is alive; the first
    # is then freed, and the last conv adds 256 bytes beside the ReLU's output: the peak is 2 kB.
    network = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))
    assert forward_peak_bytes(network, (1, 1, 8, 8)) == 2048
    assert forward_peak_bytes(network, (3, 1, 8, 8)) == 3 * 2048
    assert forward_peak_bytes(_Viewed(), (1, 1, 8, 8)) == 1024
    assert next(network.parameters()).device.type == "cpu"  # traced on a copy


def test_a_gama_networks_peak_grows_with_its_pixels():
    model = create_model("gama_ir_xs", in_channels=1, out_channels=1)
    per_pixel = [forward_peak_bytes(model, shape) / (shape[0] * shape[2] * shape[3])
                 for shape in ((1, 1, 256, 256), (1, 1, 512, 768), (2, 1, 512, 512))]
    assert max(per_pixel) / min(per_pixel) < 1.01
    # 32 channels at full resolution: many float32 feature maps of 128 bytes a pixel are alive at once.
    assert 4 * 128 < per_pixel[0] < 16 * 128


def test_a_training_step_keeps_the_forward_pass_for_the_backward_pass_and_grows_with_the_batch():
    model = make_tiny_model(1)
    weights = sum(parameter.numel() * 4 for parameter in model.parameters())
    one, four = (training_step_peak_bytes(model, (batch, 1, 64, 64)) for batch in (1, 4))
    # The feature maps of every layer stay alive until the backward pass: several forward peaks.
    assert one > 4 * forward_peak_bytes(model, (1, 1, 64, 64))
    # The weights' gradients and AdamW's two moments do not grow with the batch; the maps do.
    assert one > 3 * weights and 3.9 < (four - 3 * weights) / (one - 3 * weights) < 4.1
    assert all(parameter.device.type == "cpu" and parameter.grad is None for parameter in model.parameters())


def test_a_refused_cpu_allocation_counts_as_out_of_memory():
    # Under an address-space limit the allocator itself refuses, with its own words.
    code = textwrap.dedent("""
        import resource, torch
        from napari_gama_ir.engine.device import is_out_of_memory
        size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (size + 2**29, resource.RLIM_INFINITY))
        try:
            torch.empty(2**31, dtype=torch.uint8)
        except RuntimeError as error:
            print(is_out_of_memory(error), error)
    """)
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("True") and "can't allocate memory" in result.stdout, result.stdout + result.stderr
    assert is_out_of_memory(HostMemoryError("a pass takes about 9 GB")) and not is_out_of_memory(RuntimeError("shape"))


def test_a_pass_runs_as_usual_with_the_heap_handed_back_or_is_refused(monkeypatch):
    peak = 2 * 10**9
    _available(monkeypatch, KEPT_HEAP_GROWTH * peak)
    with memory_for_pass(peak, "a pass") as kept:
        assert kept
    _available(monkeypatch, (KEPT_HEAP_GROWTH + RETURNED_HEAP_GROWTH) / 2 * peak)
    with memory_for_pass(peak, "a pass") as kept:
        assert not kept
    _available(monkeypatch, RETURNED_HEAP_GROWTH * peak * 0.8)
    refused = pytest.raises(HostMemoryError, match=r"a pass takes about 2\.5 GB of memory, and 2\.2 GB is available")
    with refused, memory_for_pass(peak, "a pass"):
        pytest.fail("a pass that does not fit must not run")
    monkeypatch.setattr(host_memory, "available_memory", lambda: None)  # the system does not say
    with memory_for_pass(10**15, "a pass") as kept:
        assert kept


def test_a_pass_reuses_the_heap_that_a_pass_as_large_left_until_it_is_handed_back(monkeypatch):
    # The kept heap's free pages count as used: judged as a first pass, every pass after a large
    # one would hand them back and fault them in again (GAMA-IR-S training steps 1.13-1.2x slower).
    peak = 10**9
    _available(monkeypatch, KEPT_HEAP_GROWTH * peak)
    with memory_for_pass(peak, "a pass") as kept:
        assert kept
    monkeypatch.setattr(host_memory, "available_memory", lambda: math.ceil(1.5 * peak / USABLE_SHARE))
    handed_back = host_memory.heap_handed_back_count()
    for size in (peak, peak // 2):  # as large, or smaller: its memory is in the heap
        with memory_for_pass(size, "a pass") as kept:
            assert kept and host_memory.heap_handed_back_count() == handed_back
    with memory_for_pass(peak + 1, "a larger pass") as kept:  # it may need more than the heap holds
        assert not kept and host_memory.heap_handed_back_count() == handed_back + 1
    with memory_for_pass(peak, "a pass") as kept:  # the heap was handed back for the larger pass
        assert not kept


def _resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(_glibc() is None, reason="the heap's settings are glibc's")
def test_a_pass_with_the_heap_handed_back_returns_its_large_blocks_as_they_are_freed(monkeypatch):
    def resident_left_by_a_freed_block(peak_room: float) -> int:
        _available(monkeypatch, peak_room)
        with heap_kept_for_reuse(), memory_for_pass(10**9, "a pass"):
            release_freed_heap()  # no free memory left in the heap for the block to reuse
            before = _resident()
            block = np.ones(2**27, np.uint8)  # 128 MB, above glibc's largest mmap threshold
            del block
            return _resident() - before

    assert resident_left_by_a_freed_block(KEPT_HEAP_GROWTH * 10**9) > 2**26  # kept for the next pass
    assert resident_left_by_a_freed_block(2 * 10**9) < 2**24  # handed back


def test_a_whole_plane_beyond_the_memory_available_is_refused_and_a_large_tile_halved(monkeypatch):
    model = make_tiny_model(1)
    image = np.random.default_rng(0).random((600, 600), dtype=np.float32)  # more than the default pass
    peak = forward_peak_bytes(model, (1, 1, 600, 600))
    _available(monkeypatch, RETURNED_HEAP_GROWTH * peak * 0.9)
    with pytest.raises(TileTooLargeError, match="a whole 600x600 plane does not fit in cpu memory; restore it in tiles"):
        restore(image, model, "YX", tile=None)
    # Tiles of the default pass or smaller are not checked: their memory is planned beside the planes.
    with pytest.warns(RuntimeWarning, match="retrying with tiles of 512 pixels"):
        halved = restore(image, model, "YX", tile=1024, overlap=64)
    assert_alike(halved, restore(image, model, "YX", tile=512, overlap=64), scale=1)


def test_a_plane_that_fits_only_with_the_heap_handed_back_is_restored_as_usual(monkeypatch):
    model = make_tiny_model(1)
    image = np.random.default_rng(1).random((600, 600), dtype=np.float32)
    expected = restore(image, model, "YX", tile=None)
    _available(monkeypatch, 2 * forward_peak_bytes(model, (1, 1, 600, 600)))
    handed_back = []
    returned = host_memory.heap_returned_while_kept

    def recorded():
        handed_back.append(True)
        return returned()

    monkeypatch.setattr(host_memory, "heap_returned_while_kept", recorded)
    np.testing.assert_array_equal(restore(image, model, "YX", tile=None), expected)
    assert handed_back == [True]


def test_the_benchmark_skips_a_size_that_would_not_fit_and_measures_the_others(monkeypatch):
    model = make_tiny_model(1)
    _available(monkeypatch, RETURNED_HEAP_GROWTH * forward_peak_bytes(model, (1, 1, 128, 128)) * 0.9)
    report = benchmark({"tiny": model}, [32, 128], channels=1, device="cpu", warmup=0, runs=1)
    assert [(m["shape"], m["heap_kept"]) for m in report["measurements"]] == [([1, 1, 32, 32], True)]
    [skipped] = report["skipped"]
    assert skipped["shape"] == [1, 1, 128, 128] and skipped["reason"].startswith("a pass takes about")
    assert format_table(report).endswith(f"\n\nNot measured: tiny 1x1x128x128: {skipped['reason']}.")


def test_the_benchmark_goes_on_after_a_device_runs_out_of_memory(monkeypatch):
    from napari_gama_ir.engine import benchmark as benchmark_module

    measure = benchmark_module.measure

    def short_of_memory_at_128(model, shape, **settings):
        if shape[-1] == 128:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return measure(model, shape, **settings)

    monkeypatch.setattr(benchmark_module, "measure", short_of_memory_at_128)
    report = benchmark({"tiny": make_tiny_model(1)}, [128, 32], channels=1, device="cpu", warmup=0, runs=1)
    assert [m["shape"] for m in report["measurements"]] == [[1, 1, 32, 32]]
    assert report["skipped"] == [{"model": "tiny", "shape": [1, 1, 128, 128], "reason": "out of cpu memory"}]
