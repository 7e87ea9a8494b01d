import importlib
import threading
import warnings

import dask.array as da
import numpy as np
import pytest
import torch
import zarr

from napari_gama_ir import restore
from napari_gama_ir.engine import AxesError, ChannelMismatchError, ModelRunner, TileTooLargeError
from napari_gama_ir.engine.io import Cancelled
from napari_gama_ir.engine.restore import TilingPlan, restore_plane
from napari_gama_ir.engine.runner import batch_size
from napari_gama_ir.engine.tiling import plan_tiles, tile_starts, tile_weights

from .conftest import assert_alike, make_tiny_model, recorded_passes


def model_output(model, image):
    """The network applied directly to a whole (H, W) or (H, W, C) float image."""
    x = torch.from_numpy(image if image.ndim == 3 else image[..., None]).permute(2, 0, 1)[None]
    with torch.no_grad():
        y = model(x.float())[0].permute(1, 2, 0).numpy()
    return y if image.ndim == 3 else y[..., 0]


@pytest.mark.parametrize("length,tile,overlap", [(100, 32, 8), (257, 64, 16), (64, 64, 8), (65, 64, 16), (10, 64, 8)])
def test_tile_grid_is_aligned_overlapping_and_covering(length, tile, overlap):
    starts = tile_starts(length, tile, overlap, multiple=8)
    assert all(s % 8 == 0 for s in starts)
    ends = [min(s + tile, length) for s in starts]
    assert starts[0] == 0 and ends[-1] == length
    for (s0, e0), s1 in zip(zip(starts, ends), starts[1:]):
        assert e0 - s1 >= overlap  # neighbours overlap by at least `overlap`
    assert all(e - s > tile - 8 for s, e in zip(starts, ends)) or length <= tile


def test_blend_weights_cover_every_pixel():
    tiles = plan_tiles(300, 200, 64, 16, 8)
    total = np.zeros((300, 200), np.float32)
    for tile in tiles:
        total[tile.rows, tile.cols] += tile_weights(tile, 300, 200, 16, 4)
    assert total.min() > 0.05


def test_tiled_plane_is_the_weighted_mean_of_its_tiles():
    # The engine's blending, written plainly: each tile's output weighted by its ramp, over the summed ramps.
    model = make_tiny_model(2)
    plane = np.random.default_rng(1).random((2, 150, 230), dtype=np.float32)
    plan = TilingPlan(tile=64, overlap=24, margin=6)
    runner = ModelRunner(model, "cpu")
    total, weight_sum = np.zeros_like(plane), np.zeros(plane.shape[1:], np.float32)
    for tile in plan_tiles(150, 230, 64, 24, model.config.size_multiple):
        weights = tile_weights(tile, 150, 230, 24, 6)
        total[:, tile.rows, tile.cols] += runner.run(plane[None, :, tile.rows, tile.cols])[0] * weights
        weight_sum[tile.rows, tile.cols] += weights
    assert np.abs(restore_plane(plane, runner, plan) - total / weight_sum).max() < 1e-5


class _PassRecordingRunner(ModelRunner):
    """Records the shape of every forward pass."""

    def _forward(self, tiles, outputs):
        self.passes = [*getattr(self, "passes", []), tuple(tiles.shape)]
        super()._forward(tiles, outputs)


def test_a_plane_runs_as_one_batch_shape_with_its_edge_tiles_padded():
    # 150 x 230 in 64-px tiles leaves edge tiles a few pixels short in both directions; padded as
    # the network pads, they join the full tiles in one batch shape (one compilation, one graph).
    model = make_tiny_model(1)
    multiple = model.config.size_multiple
    tiles = plan_tiles(150, 230, 64, 24, multiple)
    assert len({t.shape for t in tiles}) == 4
    plane = np.random.default_rng(2).random((1, 150, 230), dtype=np.float32)
    runner = _PassRecordingRunner(model, "cpu", batch=len(tiles))
    restore_plane(plane, runner, TilingPlan(tile=64, overlap=24, margin=6))
    assert runner.passes == [(len(tiles), 1, 64, 64)]
    # test_tiled_plane_is_the_weighted_mean_of_its_tiles checks the values against unpadded tiles.


def test_whole_plane_equals_the_network():
    model = make_tiny_model(1)
    image = np.random.default_rng(0).random((50, 70), dtype=np.float32)
    out = restore(image, model, "YX", tile=None)
    assert np.allclose(out, model_output(model, image), atol=1e-5)


def test_local_mode_tiles_equal_the_whole_image():
    model = make_tiny_model(1)
    radius = model.receptive_radius()
    image = np.random.default_rng(0).random((420, 500), dtype=np.float32)
    whole = restore(image, model, "YX", tile=None, mean_mode="local")
    tiled = restore(image, model, "YX", tile=320, overlap=2 * radius + 8, mean_mode="local")
    assert len(plan_tiles(420, 500, 320, 2 * radius + 8, 4)) >= 4
    assert np.abs(whole - tiled)[radius:-radius, radius:-radius].max() < 1e-4
    # The caller's network is left as it was: mean mode and memory layout.
    assert model.mean_mode == "global"
    assert model.intro.weight.is_contiguous()


def test_global_mode_tiles_blend_without_seams():
    model = make_tiny_model(1)
    image = np.random.default_rng(0).random((200, 200), dtype=np.float32)
    tiled = restore(image, model, "YX", tile=96, overlap=32)
    whole = restore(image, model, "YX", tile=None)
    # Tiles see other means than the whole image; blending keeps that difference small and smooth.
    assert np.abs(tiled - whole).mean() < 0.1 * np.abs(whole - image).mean() + 1e-3
    assert np.isfinite(tiled).all()


def test_dask_input_gives_a_lazy_result_that_computes_only_what_is_read():
    model = make_tiny_model(1)
    computed = []

    def mark(block, block_info=None):
        computed.append(block_info[0]["chunk-location"][0])
        return block

    # Planes of 512 x 512 run one to a chunk (smaller ones share chunks: see the test below).
    stack = da.random.random((40, 512, 512), chunks=(1, 512, 512)).astype(np.float32)
    watched = stack.map_blocks(mark, dtype=np.float32)
    result = restore(watched, model, "ZYX", tile=None)
    assert isinstance(result, da.Array) and result.shape == (40, 512, 512)
    assert computed == []
    plane = result[7].compute()
    assert computed == [7]
    assert np.allclose(plane, model_output(model, stack[7].compute()), atol=1e-5)


@pytest.mark.parametrize("block", [0, 64])
def test_however_many_threads_compute_a_lazy_result_two_chunks_are_restored_at_once(monkeypatch, block):
    # dask's default threads are one per core: on a machine of many cores, as many large planes
    # (or blocks) were restored at once, each holding many times its input.
    import time

    import dask

    engine = importlib.import_module("napari_gama_ir.engine.restore")
    running, most = [0], [0]
    lock, two_in = threading.Lock(), threading.Event()

    def watched(method):
        def run(*args, **kwargs):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
                if running[0] == 2:
                    two_in.set()
            two_in.wait(timeout=10)  # the first waits for a second, however slowly threads start
            time.sleep(0.05)  # long enough for every thread to come in, were they let
            try:
                return method(*args, **kwargs)
            finally:
                with lock:
                    running[0] -= 1

        return run

    entry = "__call__" if block else "restore_planes"  # a chunk's way in (restore_planes calls __call__)
    monkeypatch.setattr(engine.PlaneRestorer, entry, watched(getattr(engine.PlaneRestorer, entry)))
    stack = da.random.random((8, 128, 128), chunks=(1, 128, 128)).astype(np.float32)
    lazy = restore(stack, make_tiny_model(1), "ZYX", tile=64, overlap=16, block=block, device="cpu")
    with dask.config.set(scheduler="threads", num_workers=8):
        restored = lazy.compute()
    assert most[0] == 2  # the CPU's host threads (engine.device.host_threads)
    expected = restore(stack.compute(), make_tiny_model(1), "ZYX", tile=64, overlap=16, device="cpu")
    assert_alike(restored, expected, scale=1)


def test_zarr_input_is_read_lazily_and_never_modified(tmp_path):
    model = make_tiny_model(1)
    data = (np.random.default_rng(0).random((3, 40, 48)) * 4000).astype(np.uint16)
    store = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=data.shape, chunks=(1, 40, 48), dtype=np.uint16)
    store[:] = data
    readonly = zarr.open_array(str(tmp_path / "in.zarr"), mode="r")
    result = restore(readonly, model, "ZYX", tile=None)
    assert isinstance(result, da.Array)
    out = result.compute()
    expected = model_output(model, data[1].astype(np.float32) / 65535) * 65535
    # 1.5e-6 of the uint16 range: the three planes share a forward pass, which rounds otherwise than one plane.
    assert np.allclose(out[1], expected, atol=0.1)
    assert np.array_equal(readonly[:], data)


def test_numpy_input_is_not_modified_and_result_is_reproducible():
    model = make_tiny_model(3)
    image = np.random.default_rng(0).random((2, 40, 40, 3), dtype=np.float32)
    before = image.copy()
    first = restore(image, model, "ZYXC", tile=32, overlap=8)
    second = restore(image, model, "ZYXC", tile=32, overlap=8)
    assert np.array_equal(image, before)
    assert isinstance(first, np.ndarray) and np.array_equal(first, second)


@pytest.mark.parametrize("axes,shape", [("YXC", (30, 40, 3)), ("CYX", (3, 30, 40)), ("TCZYX", (2, 3, 2, 30, 40))])
def test_channel_axis_anywhere_keeps_the_layout(axes, shape):
    model = make_tiny_model(3)
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    out = restore(image, model, axes, tile=None)
    assert out.shape == shape
    as_yxc = np.moveaxis(image, axes.index("C"), -1).reshape((-1, 30, 40, 3))[0]
    out_yxc = np.moveaxis(out, axes.index("C"), -1).reshape((-1, 30, 40, 3))[0]
    assert np.allclose(out_yxc, model_output(model, as_yxc), atol=1e-5)


def test_grey_model_restores_each_channel_separately():
    model = make_tiny_model(1)
    image = np.random.default_rng(0).random((30, 40, 2), dtype=np.float32)
    out = restore(image, model, "YXC", tile=None)
    for c in range(2):
        assert np.allclose(out[..., c], model_output(model, image[..., c]), atol=1e-5)


def test_integer_output_is_clipped_not_wrapped():
    model = make_tiny_model(1)
    image = np.full((32, 32), 255, np.uint8)
    image[::2] = 0
    out = restore(image, model, "YX", tile=None, output_dtype="input")
    assert out.dtype == np.uint8
    raw = restore(image, model, "YX", tile=None)
    assert raw.dtype == np.float32
    assert np.array_equal(out, np.clip(np.rint(raw), 0, 255).astype(np.uint8))


def test_percentile_normalisation_maps_back_to_input_units():
    model = make_tiny_model(1)
    image = (np.random.default_rng(0).random((40, 40)) * 1000 + 500).astype(np.float32)
    spec = {"method": "percentile", "low": 1, "high": 99}
    out = restore(image, model, "YX", tile=None, normalization=spec)
    lo, hi = np.percentile(image, [1, 99])
    expected = model_output(model, (image - lo) / (hi - lo)) * (hi - lo) + lo
    assert np.allclose(out, expected, rtol=1e-4, atol=1e-2)
    stack = np.stack([image, image * 2])
    per_stack = restore(stack, model, "ZYX", tile=None, normalization={**spec, "scope": "stack"})
    assert per_stack.shape == stack.shape and np.isfinite(per_stack).all()


def test_bad_axes_and_channels_are_refused():
    grey, rgb = make_tiny_model(1), make_tiny_model(3)
    image = np.zeros((20, 30), np.float32)
    with pytest.raises(AxesError, match="name 3 dimensions but the image has 2"):
        restore(image, grey, "ZYX")
    with pytest.raises(AxesError, match="must contain both Y and X"):
        restore(image, grey, "ZX")
    with pytest.raises(ChannelMismatchError, match="expects 3 channels"):
        restore(image, rgb, "YX")
    with pytest.raises(ChannelMismatchError, match="C axis has 2"):
        restore(np.zeros((20, 30, 2), np.float32), rgb, "YXC")
    with pytest.raises(ValueError, match="smaller than this network's minimum"):
        restore(image, grey, "YX", tile=8)
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        restore(image, grey, "YX", device="cpu", precision="fp16")


@pytest.mark.parametrize("image, message", [
    (np.ones((20, 30), bool), "holds bool values"),
    (np.ones((20, 30), np.complex64), "holds complex64 values"),
    (np.full((20, 30), "a"), "holds <U1 values"),
    (da.zeros((0, 30), chunks=(1, 30)), r"has no pixels \(shape \(0, 30\)\)"),
    # Boolean indexing leaves the chunk sizes unknown; it failed with "cannot convert float NaN to integer".
    (da.ones((4, 20, 30), chunks=(2, 20, 30))[da.arange(4) > 0], r"chunk sizes are unknown .* compute_chunk_sizes"),
])
def test_images_that_cannot_be_restored_are_refused_before_any_work(image, message):
    # They ended in numpy's own errors (a traceback from the CLI), an empty one in an IndexError.
    with pytest.raises(ValueError, match=message):
        restore(image, make_tiny_model(1), "ZYX"[-image.ndim:])


def test_bf16_on_the_cpu_runs_the_network_in_bfloat16_and_returns_float32():
    model = make_tiny_model(1)
    image = np.random.default_rng(0).random((40, 56), dtype=np.float32)
    full = restore(image, model, "YX", tile=None, device="cpu")
    half = restore(image, model, "YX", tile=None, device="cpu", precision="bf16")
    assert half.dtype == np.float32 and half.shape == image.shape
    difference = np.abs(half - full).max()
    # bfloat16 keeps 8 bits of mantissa: the result moves, but by far less than the image's range.
    assert 1e-4 < difference < 5e-2


def test_no_data_is_kept_as_it_is_and_the_rest_restored():
    # Registered and stitched stacks pad with NaN, which was refused; fed to the network, one NaN
    # would spread through GAMA's averages to its whole tile.
    model = make_tiny_model(1)
    stack = np.random.default_rng(0).random((3, 40, 48), dtype=np.float32)
    holed = stack.copy()
    holed[2, :, :12] = np.nan
    holed[2, 30, 40], holed[2, 31, 40] = np.inf, -np.inf
    given = holed.copy()
    no_data = ~np.isfinite(holed)
    for scope in ("stack", "image"):
        normalization = {"method": "percentile", "scope": scope}
        restored = restore(holed, model, "ZYX", tile=32, overlap=8, normalization=normalization)
        assert np.isnan(restored[2, :, :12]).all() and restored[2, 30, 40] == np.inf and restored[2, 31, 40] == -np.inf
        assert np.isfinite(restored[~no_data]).all()
    # Each plane on its own percentiles: the planes without no data are restored as they would be alone.
    assert_alike(restored[:2], restore(stack[:2], model, "ZYX", tile=32, overlap=8, normalization=normalization), scale=1)
    assert np.array_equal(holed, given, equal_nan=True)  # the input is untouched
    # The network sees no data as the bottom of the range (0 here, with the dtype range).
    filled = np.where(no_data, 0, holed)
    in_range = restore(holed, model, "ZYX", tile=32, overlap=8, normalization={"method": "range"})
    expected = restore(filled, model, "ZYX", tile=32, overlap=8, normalization={"method": "range"})
    assert_alike(in_range[~no_data], expected[~no_data], scale=1)
    # Integers hold no NaN: it is 0 there, and infinities are clipped as any value.
    as_integers = restore(holed * 1000, model, "ZYX", tile=32, overlap=8, output_dtype="uint16")
    assert (as_integers[2, :, :12] == 0).all() and as_integers[2, 30, 40] == 65535 and as_integers[2, 31, 40] == 0


class _OutOfMemoryAboveBatch(ModelRunner):
    """A runner whose device 'runs out of memory' for batches larger than one tile."""

    def _forward(self, tiles, outputs):
        if len(tiles) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        super()._forward(tiles, outputs)


def test_out_of_memory_halves_the_batch_and_gives_the_same_result():
    model = make_tiny_model(1)
    image = np.random.default_rng(0).random((1, 100, 100), dtype=np.float32)
    plan = TilingPlan(tile=48, overlap=16, margin=4)
    reference = restore_plane(image, ModelRunner(model, "cpu", batch=1), plan)
    runner = _OutOfMemoryAboveBatch(model, "cpu", batch=8)
    assert np.allclose(restore_plane(image, runner, plan), reference, atol=1e-6)
    assert runner.batch == 1


def _device_holding(monkeypatch, most_pixels: int) -> list[tuple[int, ...]]:
    """Every runner's device 'runs out of memory' for passes of more than ``most_pixels`` tile
    pixels; returns the list each pass's shape is appended to, run or not."""
    passes = []
    forward = ModelRunner._forward

    def limited(self, tiles, outputs):
        passes.append(tuple(tiles.shape))
        if tiles.shape[0] * tiles.shape[-2] * tiles.shape[-1] > most_pixels:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        forward(self, tiles, outputs)

    monkeypatch.setattr(ModelRunner, "_forward", limited)
    return passes


def test_a_tile_too_large_for_the_device_is_halved_once_for_a_whole_stack(monkeypatch):
    # Every plane, and every block of a plane, ran out of memory on the large tile before retrying.
    model = make_tiny_model(1)
    stack = np.random.default_rng(5).random((3, 150, 150), dtype=np.float32)
    expected = restore(stack, model, "ZYX", tile=32, overlap=16)  # what halving 64 / 16 gives
    as_asked = restore(stack, model, "ZYX", tile=64, overlap=16, batch=1)
    passes = _device_holding(monkeypatch, 40 * 40)
    for block in (None, 64):
        passes.clear()
        lazy = restore(da.from_array(stack, chunks=(1, 150, 150)), model, "ZYX", tile=64, overlap=16, batch=1,
                       block=block)
        with pytest.warns(RuntimeWarning, match="retrying with tiles of 32 pixels") as caught:
            assert_alike(lazy.compute(scheduler="synchronous"), expected, scale=1)  # one chunk at a time
        assert len(caught) == 1
        assert sum(shape[-1] == 64 for shape in passes) == 1  # the first chunk's first tile only
    # The runner is kept for the next call with these settings, but not what ran out of memory:
    # with room again, the next call restores at the tile asked for, as a new process would.
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(restore(stack, model, "ZYX", tile=64, overlap=16, batch=1), as_asked)


def test_progress_comes_pass_by_pass_and_cancel_stops_a_plane_within_a_pass(monkeypatch):
    # A plane is one chunk: its progress, and Cancel or Ctrl-C, waited for all of its tiles
    # (minutes for a slide scan or a large photo).
    model = make_tiny_model(1)
    image = np.random.default_rng(7).random((300, 300), dtype=np.float32)
    settings = {"tile": 48, "overlap": 16, "batch": 1}  # a pass a tile, as 512-pixel tiles run on the CPU
    expected = restore(image, model, "YX", **settings)
    passes = recorded_passes(monkeypatch)
    pixels = []
    assert np.array_equal(restore(image, model, "YX", on_plane=pixels.append, **settings), expected)
    assert len(passes) == 81 and len(pixels) == 81 and sum(pixels) == 300 * 300  # a count a pass (a tile each)
    cancel = threading.Event()
    passes.clear()
    lazy = restore(da.from_array(image), model, "YX", cancel=cancel, on_plane=lambda _: len(passes) == 3 and cancel.set(),
                   **settings)
    with pytest.raises(Cancelled):
        lazy.compute()
    assert len(passes) == 3  # stopped right after the pass during which it was set
    with pytest.raises(Cancelled):  # set before a chunk starts: no pass at all
        lazy.compute()
    assert len(passes) == 3


def test_ctrl_c_during_a_numpy_restore_leaves_no_thread_restoring(monkeypatch):
    # dask's threads went on with the plane after KeyboardInterrupt reached the caller (a notebook's
    # next cell then shared the CPU with a restore nobody wanted).
    import time

    model = make_tiny_model(1)
    image = np.random.default_rng(9).random((300, 300), dtype=np.float32)
    passes = recorded_passes(monkeypatch, pause=0.05, interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        restore(image, model, "YX", tile=48, overlap=16, batch=1)  # 81 passes
    time.sleep(1)  # some 20 passes, were they still running
    assert 3 <= len(passes) <= 6


def test_progress_adds_up_when_a_plane_runs_out_of_memory_partway(monkeypatch):
    # Another process took the device's memory: the plane is restored again in smaller tiles, and
    # its count starts again from 0, reporting only what passes what it had reported.
    model = make_tiny_model(1)
    image = np.random.default_rng(8).random((200, 200), dtype=np.float32)
    sides = []
    forward = ModelRunner._forward

    def short_of_memory_at_the_fifth_pass(self, tiles, outputs):
        sides.append(tiles.shape[-1])
        if len(sides) == 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        forward(self, tiles, outputs)

    monkeypatch.setattr(ModelRunner, "_forward", short_of_memory_at_the_fifth_pass)
    pixels = []
    with pytest.warns(RuntimeWarning, match="retrying with tiles of 32 pixels"):
        restore(image, model, "YX", tile=64, overlap=16, batch=1, on_plane=pixels.append)
    assert sides.count(64) == 5 and sides.count(32) == 144
    assert sum(pixels) == 200 * 200 and min(pixels) > 0


def test_a_plane_run_whole_that_does_not_fit_is_tiled_smaller_or_refused(monkeypatch):
    model = make_tiny_model(1)
    image = np.random.default_rng(6).random((60, 60), dtype=np.float32)  # one tile of 64
    expected = restore(image, model, "YX", tile=32, overlap=16)
    _device_holding(monkeypatch, 40 * 40)
    with pytest.warns(RuntimeWarning, match="retrying with tiles of 32 pixels"):
        assert_alike(restore(image, model, "YX", tile=64, overlap=16), expected, scale=1)
    with pytest.raises(TileTooLargeError, match="a whole 60x60 plane does not fit in cpu memory; restore it in tiles"):
        restore(image, model, "YX", tile=None)
    _device_holding(monkeypatch, 15 * 15)
    with pytest.warns(RuntimeWarning, match="retrying with tiles") as caught, \
            pytest.raises(TileTooLargeError, match="one 16x16 tile, the smallest this network takes, does not fit"):
        restore(image, model, "YX", tile=64, overlap=16)
    assert [str(w.message)[-9:] for w in caught] == ["32 pixels", "16 pixels"]


def test_small_planes_that_do_not_fit_a_pass_each_are_restored_alone_in_smaller_tiles(monkeypatch):
    model = make_tiny_model(1)
    stack = np.random.default_rng(7).random((128, 48, 48), dtype=np.float32)
    expected = restore(stack, model, "ZYX", tile=32, overlap=16)
    passes = _device_holding(monkeypatch, 48 * 48 - 1)
    lazy = restore(da.from_array(stack), model, "ZYX", tile=64, overlap=16)
    assert lazy.chunks[0] == (64, 64)  # two chunks of planes, each meant for shared passes
    with pytest.warns(RuntimeWarning, match="restoring 48x48 planes one at a time, in smaller tiles") as caught:
        assert_alike(lazy.compute(scheduler="synchronous"), expected, scale=1)
    assert len(caught) == 1
    # The batch halves down to a plane a pass, which fails too; the second chunk goes a plane at a time.
    assert [shape[0] for shape in passes if shape[-1] == 48] == [64, 32, 16, 8, 4, 2, 1]


@pytest.mark.parametrize("count, batches", [(9, [3, 3, 3]), (25, [4, 4, 4, 4, 4, 4, 1]), (3, [3]), (1, [1])])
def test_tiles_run_in_the_fewest_batches_of_equal_size_where_they_divide(count, batches):
    runner = _PassRecordingRunner(make_tiny_model(1), "cpu", batch=4)
    tiles = np.random.default_rng(0).random((count, 1, 32, 32), dtype=np.float32)
    assert runner.run(tiles).shape == (count, 1, 32, 32)
    assert [shape[0] for shape in runner.passes] == batches


@pytest.mark.parametrize("queues, runs", [(True, [9, 9, 9, 9]), (False, [3] * 12)])
def test_a_huge_plane_runs_its_tiles_in_bounded_runs_of_whole_batches(monkeypatch, queues, runs):
    # All of a plane's tiles, and their outputs, were held at once: three times a gigapixel plane.
    # A GPU queues runs of many passes; the CPU, which runs each pass to its end, takes one a run.
    import importlib

    engine = importlib.import_module("napari_gama_ir.engine.restore")  # the module, not the function

    image = np.random.default_rng(0).random((1, 200, 200), dtype=np.float32)
    plan = TilingPlan(tile=48, overlap=16, margin=4)  # 36 tiles, run at 48 x 48
    reference = restore_plane(image, ModelRunner(make_tiny_model(1), "cpu", batch=3), plan)
    monkeypatch.setattr(engine, "RUN_PIXELS", 10 * 48 * 48)
    runner = _PassRecordingRunner(make_tiny_model(1), "cpu", batch=3)
    runner.queues_passes = queues
    calls, shares = [], []
    run = runner.run
    monkeypatch.setattr(runner, "run", lambda tiles: calls.append(len(tiles)) or run(tiles))
    assert np.array_equal(restore_plane(image, runner, plan, on_progress=shares.append), reference)
    assert calls == runs  # at most 10 tiles' pixels a run, in whole batches of 3
    assert {shape[0] for shape in runner.passes} == {3}
    assert shares == pytest.approx(list(np.cumsum(runs) / 36))  # the plane's share done after each run


@pytest.mark.parametrize("count, stretched", [(25, 5), (9, 3), (10, 5), (14, 7), (18, 6), (16, 4), (49, 7),
                                              (81, 3), (11, 4), (121, 4), (1, 1), (2, 2)])
def test_a_default_batch_stretches_to_a_divisor_of_the_tile_count(count, stretched):
    # A GPU's default of 4: the even split where it divides, else the largest divisor from 2 to 8, else the even split.
    assert batch_size(count, 4, stretch=True) == stretched
    assert batch_size(count, 4) == -(-count // -(-count // 4))  # a batch the user gave is never exceeded
    assert batch_size(count, 1, stretch=True) == 1  # one tile a pass: the CPU's default for tiles of 512


def test_a_runner_stretches_only_a_default_batch_and_stops_after_running_out_of_memory():
    tiles = np.random.default_rng(0).random((25, 1, 32, 32), dtype=np.float32)
    given = _PassRecordingRunner(make_tiny_model(1), "cpu", batch=4)
    default = _PassRecordingRunner(make_tiny_model(1), "cpu")
    default.pass_pixels, default.batch_stretches = 4 * 32 * 32, True  # a GPU runner's defaults, on the CPU
    given.run(tiles), default.run(tiles)
    assert [shape[0] for shape in given.passes] == [4] * 6 + [1]
    assert [shape[0] for shape in default.passes] == [5] * 5
    short_of_memory = _OutOfMemoryAboveBatch(make_tiny_model(1), "cpu")
    short_of_memory.pass_pixels, short_of_memory.batch_stretches = 4 * 32 * 32, True
    assert np.allclose(short_of_memory.run(tiles), default.run(tiles), atol=1e-6)
    assert (short_of_memory.batch, short_of_memory.batch_stretches) == (1, False)


def test_a_default_pass_takes_512_x_512_pixels_of_tiles_on_the_cpu():
    # One 64 x 64 tile a pass spent most of the pass on per-layer overheads.
    runner = _PassRecordingRunner(make_tiny_model(1), "cpu")
    runner.run(np.zeros((20, 1, 64, 64), np.float32))
    runner.run(np.zeros((2, 1, 512, 512), np.float32))
    assert [shape[0] for shape in runner.passes] == [20, 1, 1]
    assert runner.pass_size(130, (64, 64)) == 44  # 64 a pass at most, split evenly: never more memory
    assert runner.pass_size(10, (256, 256)) == 4  # 4, 4, 2: a GPU's default would stretch to 5, 5
    given = _PassRecordingRunner(make_tiny_model(1), "cpu", batch=8)
    given.run(np.zeros((20, 1, 64, 64), np.float32))
    assert [shape[0] for shape in given.passes] == [7, 7, 6]


@pytest.mark.parametrize("normalization", [{"method": "range"}, {"method": "percentile", "scope": "image"}])
def test_small_planes_are_restored_a_chunk_at_a_time_in_shared_passes(monkeypatch, normalization):
    # A time-lapse of small planes ran a forward pass a plane: GAMA-IR-XS restored 64 x 64 planes at
    # 0.26 Mpx/s, a fifth of its 1.36 Mpx/s with 64 of them a pass (docs/performance.md).
    rng = np.random.default_rng(4)
    brightness = 1 + np.arange(300)[:, None, None] % 5  # per-image percentiles must stay per image
    stack = (rng.random((300, 40, 48)) * 800 * brightness).astype(np.uint16)
    model = make_tiny_model(1)
    passes = []
    forward = ModelRunner._forward
    monkeypatch.setattr(ModelRunner, "_forward", lambda self, tiles, outputs: passes.append(len(tiles)) or
                        forward(self, tiles, outputs))
    pixels = []
    lazy = restore(da.from_array(stack, chunks=(1, 40, 48)), model, "ZYX", normalization=normalization,
                   on_plane=pixels.append)
    # 136 planes of 40 x 48 make 512 x 512 pixels: 300 planes go as three chunks of 100.
    assert lazy.chunks[0] == (100, 100, 100)
    result = lazy.compute()
    assert passes == [100, 100, 100] and pixels == [100 * 40 * 48] * 3
    alone = [restore(stack[z], model, "YX", normalization=normalization) for z in (0, 157, 299)]
    assert_alike(result[[0, 157, 299]], np.stack(alone))
    assert np.array_equal(restore(stack, model, "ZYX", normalization=normalization), result)  # numpy in: the same


def test_a_chunk_of_small_planes_takes_whole_axes_from_the_last_one_up():
    # A two-channel time-lapse restored a channel at a time grouped only its two channels.
    model = make_tiny_model(1)
    lazy = da.zeros((500, 2, 64, 64), chunks=(1, 1, 64, 64), dtype=np.uint16)
    assert restore(lazy, model, "TCYX").chunks[:2] == ((32,) * 15 + (20,), (2,))  # 64 planes of 64 x 64
    assert restore(lazy, model, "TCYX", tile=32, overlap=8).chunks[:2] == ((1,) * 500, (1, 1))  # tiled: a plane a chunk
    assert restore(da.zeros((3, 4, 100, 100), chunks=(1, 1, 100, 100)), model, "TZYX").chunks[:2] == ((3,), (4,))


def test_no_data_in_a_chunk_of_small_planes_stays_in_its_plane():
    # Small planes share forward passes: a NaN fed to one would be no concern of the others, but
    # its own plane's other pixels would all be NaN.
    model = make_tiny_model(1)
    image = np.random.default_rng(1).random((2, 5, 32, 32), dtype=np.float32)
    holed = image.copy()
    holed[1, 3, 4, 4] = np.nan
    for axes in ("TZYX", "TCYX"):  # a one-channel network restores each channel as a plane
        restored = restore(holed, model, axes)
        assert np.isnan(restored[1, 3, 4, 4]) and np.isfinite(restored).sum() == restored.size - 1
        others = np.ones((2, 5), bool)
        others[1, 3] = False
        assert_alike(restored[others], restore(image, model, axes)[others], scale=1)


def test_runner_matches_the_plain_eager_network():
    # The runner's CPU path (channels_last, inference mode) must match plain NCHW eager output.
    model = make_tiny_model(3)
    tiles = np.random.default_rng(0).random((2, 3, 40, 56), dtype=np.float32)
    with torch.no_grad():
        reference = model(torch.from_numpy(tiles)).numpy()
    assert np.abs(ModelRunner(model, "cpu").run(tiles) - reference).max() < 1e-5


def test_runner_threads_do_not_race():
    model = make_tiny_model(1)
    runner = ModelRunner(model, "cpu")
    tiles = np.random.default_rng(0).random((2, 1, 32, 32), dtype=np.float32)
    expected = runner.run(tiles)
    results = [None] * 4

    def work(i):
        results[i] = runner.run(tiles)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(r, expected) for r in results)


class _RecordingThreads(ModelRunner):
    """A runner that notes which thread runs each forward pass."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.threads = []

    def _forward(self, tiles, outputs):
        self.threads.append(threading.current_thread().name)
        super()._forward(tiles, outputs)


def test_cpu_passes_run_on_the_network_thread_whichever_thread_asks():
    runner = _RecordingThreads(make_tiny_model(1), "cpu", batch=1)
    tiles = np.random.default_rng(0).random((2, 1, 32, 32), dtype=np.float32)
    from_here = runner.run(tiles)
    from_elsewhere = {}
    asker = threading.Thread(target=lambda: from_elsewhere.setdefault("out", runner.run(tiles)), name="asker")
    asker.start()
    asker.join()
    assert np.array_equal(from_here, from_elsewhere["out"])
    assert len(runner.threads) == 4 and all(name.startswith("gama-ir-network") for name in runner.threads)
    assert len(set(runner.threads)) == 1


def test_alpha_is_passed_through_and_the_colours_restored():
    model = make_tiny_model(3)
    rgba = np.random.default_rng(0).integers(0, 256, (2, 40, 48, 4), dtype=np.uint8)
    restored = restore(rgba, model, "ZYXC", tile=None, alpha=True)
    assert restored.shape == rgba.shape and restored.dtype == np.float32
    assert np.array_equal(restored[..., :3], restore(rgba[..., :3], model, "ZYXC", tile=None))
    assert np.array_equal(restored[..., 3], rgba[..., 3].astype(np.float32))
    lazy = restore(da.from_array(rgba, chunks=(1, 40, 48, 4)), model, "ZYXC", tile=None, alpha=True, output_dtype="input")
    # A plane's colours and opacity in one chunk; the two small planes share one, as the engine restores them.
    assert lazy.chunks == ((2,), (40,), (48,), (4,))
    assert np.array_equal(lazy[..., 3].compute(), rgba[..., 3])
    with pytest.raises(ChannelMismatchError, match="the model expects 3 channels but the image's C axis has 4"):
        restore(rgba, model, "ZYXC")  # without alpha, four channels do not fit an RGB network
    with pytest.raises(ChannelMismatchError, match="an alpha channel needs a C axis of 2 or more channels"):
        restore(rgba[..., 0], make_tiny_model(1), "ZYX", alpha=True)


def test_in_memory_images_are_not_copied(tmp_path):
    # dask's from_array copies anything with a copy method: a napari layer restored or trained on
    # took its size again, and a .npy input was read whole into memory when opened.
    import tracemalloc

    from napari_gama_ir.engine.arrays import as_dask
    from napari_gama_ir.engine.io import open_image
    from napari_gama_ir.train import data_from_arrays

    image = np.zeros((16, 512, 512), np.float32)  # 16 MB, 1 MB a plane
    np.save(tmp_path / "stack.npy", image)
    da.zeros((2, 2)).compute()  # dask's first computation allocates caches of its own (12 MB)
    tracemalloc.start()
    lazy, was_lazy = as_dask(image)
    data = data_from_arrays(image, image, axes="ZYX")
    source = open_image(tmp_path / "stack.npy")
    planes = [a[3].compute(scheduler="synchronous") for a in (lazy, data.pairs[0].noisy, source.array)]
    allocated = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert allocated < image.nbytes / 4 and not was_lazy  # a few planes' worth, not the stack
    assert all(plane.shape == (512, 512) for plane in planes)
    assert as_dask(source.array)[0] is source.array


def test_a_plane_too_large_for_memory_is_restored_in_blocks_or_refused_before_any_work(
    monkeypatch, tmp_path, capsys
):
    # A 200000 x 200000 plane was read, then the process was killed for want of memory.
    import importlib

    from napari_gama_ir.cli import main
    from napari_gama_ir.engine.restore import PlaneTooLargeError, chunks_that_fit

    engine = importlib.import_module("napari_gama_ir.engine.restore")
    huge = zarr.open_array(str(tmp_path / "huge.zarr"), mode="w", shape=(2, 200_000, 200_000), chunks=(1, 4096, 4096),
                           dtype="uint16", fill_value=0)
    model = make_tiny_model(1)
    monkeypatch.setattr(engine, "available_memory", lambda: 24 * 10**9)
    lazy = restore(huge, model, "ZYX")  # in the largest blocks that fit: nothing computed yet
    assert lazy.shape == huge.shape and lazy.chunks[1][:2] == (16384, 16384) and lazy.chunks[1][-1] == 200_000 % 16384
    with pytest.raises(PlaneTooLargeError, match=r"one block of it, takes about 1361\.1 GB of memory, and 24\.0 GB is"):
        restore(huge, model, "ZYX", tile=None)  # one tile: 34 bytes a pixel from uint16 to float32, 1 GiB beside
    with pytest.raises(PlaneTooLargeError, match=r"1041\.3 GB"):
        restore(huge, model, "ZYX", block=0)  # whole planes asked for
    # Where not even a block of 1024 x 1024 (with the tiles around it) fits, nothing starts.
    monkeypatch.setattr(engine, "available_memory", lambda: engine.RESERVED_BYTES + 10**7)
    with pytest.raises(PlaneTooLargeError, match=r"takes about 1\.2 GB of memory, and 1\.1 GB is available"):
        restore(huge, model, "ZYX")
    assert main(["restore", str(tmp_path / "huge.zarr"), "-o", str(tmp_path / "out.zarr"), "--untrained", "-q"]) == 2
    err = capsys.readouterr().err
    assert "this needs a machine with more memory" in err and "--untrained runs a RANDOMLY INITIALISED network" in err
    assert not any(p.name.startswith(".out.zarr") for p in tmp_path.iterdir())  # nothing started
    # Where two chunks do not fit but one does, one runs at a time; the system may not say at all.
    monkeypatch.setattr(engine, "available_memory", lambda: (engine.RESERVED_BYTES + 3 * 10**9) / engine.USABLE_SHARE)
    assert chunks_that_fit(2 * 10**9, 2) == 1 and chunks_that_fit(10**9, 2) == 2 and chunks_that_fit(1.6 * 10**9, 2) == 1
    # A result filling in memory meanwhile (napari's new layer) takes its share first.
    assert chunks_that_fit(10**9, 2, result_bytes=10**9) == 2 and chunks_that_fit(10**9, 2, result_bytes=1.5 * 10**9) == 1
    with pytest.raises(PlaneTooLargeError, match=r"beside the 2\.5 GB result, .*; restore it to a zarr store$"):
        chunks_that_fit(10**9, 2, result_bytes=2.5 * 10**9)
    # So does the array restore returns for an in-memory input: 8 uint16 planes of 512 x 512 to float32.
    stack = np.zeros((8, 512, 512), np.uint16)
    chunk = engine.plan_restore(stack, model, "ZYX", 512, 64, "global", None, "float32").chunk_bytes(1)
    monkeypatch.setattr(engine, "available_memory", lambda: (engine.RESERVED_BYTES + chunk + 2 * 10**6) / engine.USABLE_SHARE)
    with pytest.raises(PlaneTooLargeError, match=r"beside the 0\.0 GB result"):  # 8.4 MB
        restore(stack, model, "ZYX")
    assert restore(stack[:1], model, "ZYX").shape == (1, 512, 512)  # 1 MB: fits
    monkeypatch.setattr(engine, "available_memory", lambda: None)
    assert chunks_that_fit(10**15, 2) == 2


@pytest.mark.parametrize("normalization", [
    {"method": "range"},
    {"method": "percentile", "scope": "image"},
    {"method": "percentile", "scope": "stack"},
])
def test_planes_restored_in_blocks_equal_planes_restored_whole(normalization):
    # Blocks (and the last, short ones) sum the same tiles of the plane's grid in the same order.
    # One tile a pass (the CPU's default for tiles of 512): a tile's output then does not depend
    # on the tiles that share its pass, which differ between a block and the whole plane.
    rng = np.random.default_rng(3)
    stack = (rng.random((2, 203, 250)) * 4000).astype(np.uint16)
    model = make_tiny_model(1)
    settings = {"tile": 48, "overlap": 16, "normalization": normalization, "output_dtype": "input", "batch": 1}
    whole = restore(stack, model, "ZYX", **settings)
    pixels = []
    blocks = restore(da.from_array(stack, chunks=(1, 64, 64)), model, "ZYX", block=80, on_plane=pixels.append,
                     **settings)
    assert blocks.chunks == ((1, 1), (80, 80, 43), (80, 80, 80, 10))
    assert np.array_equal(blocks.compute(), whole) and whole.dtype == np.uint16
    # Counted pass by pass (a tile a pass here: 198 passes for the 24 blocks), adding up to the stack's pixels.
    assert sum(pixels) == 2 * 203 * 250 and len(pixels) > 4 * 24
    # Colour with opacity, channels last: the blocks keep the channels, and the opacity passes through.
    rgba = rng.random((150, 170, 4)).astype(np.float32)
    colour = make_tiny_model(3)
    whole = restore(rgba, colour, "YXC", tile=48, overlap=16, alpha=True, batch=1)
    blocks = restore(rgba, colour, "YXC", tile=48, overlap=16, alpha=True, batch=1, block=64)
    assert np.array_equal(blocks, whole) and np.array_equal(blocks[..., 3], rgba[..., 3])


def test_blocks_run_the_tiles_they_share_once(monkeypatch):
    # A tile meeting two blocks ran once for each: 1.3x the tiles of a whole 8192 x 8192 plane in
    # blocks of 2048, up to 3x in the 1024-pixel blocks of napari's preview of a large plane.
    engine = importlib.import_module("napari_gama_ir.engine.restore")
    stack = (np.random.default_rng(4).random((2, 203, 250)) * 4000).astype(np.uint16)
    model = make_tiny_model(1)
    settings = {"tile": 48, "overlap": 16, "batch": 1, "output_dtype": "input"}
    passes = recorded_passes(monkeypatch)
    whole = restore(stack, model, "ZYX", **settings)
    grid = len(passes)
    assert grid == 2 * len(plan_tiles(203, 250, 48, 16, 4))
    lazy = restore(da.from_array(stack), model, "ZYX", block=64, **settings)
    passes.clear()
    assert np.array_equal(lazy.compute(scheduler="synchronous"), whole)  # blended alike
    assert len(passes) == grid  # each tile once
    passes.clear()
    assert np.array_equal(lazy.compute(scheduler="threads"), whole)
    # Neighbours restored at once check before each pass: a tile shared runs twice only if both run it
    # at the same moment (120 passes before they checked, 96-97 in five runs after).
    shared_at_once = len(passes)
    assert shared_at_once < 1.1 * grid
    # With no memory to spare beyond the blocks, the shared tiles run again for each block.
    monkeypatch.setattr(engine, "SHARED_TILE_BYTES", 0)
    passes.clear()
    assert np.array_equal(restore(da.from_array(stack), model, "ZYX", block=64, **settings).compute(), whole)
    assert len(passes) > 2 * grid > shared_at_once
    # With room for 3 tiles, tiles planned as kept by a neighbour are dropped before their turn: run then.
    monkeypatch.setattr(engine, "SHARED_TILE_BYTES", 3 * 48 * 48 * 4)
    misses = []
    take = engine.SharedTiles.take

    def counted(*args):
        output = take(*args)
        misses.append(output is None)
        return output

    monkeypatch.setattr(engine.SharedTiles, "take", counted)
    assert np.array_equal(restore(da.from_array(stack), model, "ZYX", block=64, **settings).compute(), whole)
    assert any(misses)


def test_an_opacity_channel_keeps_the_chunks_of_the_colour():
    # Concatenated in the input's chunks, the opacity cut each restored plane (or block) at the
    # input's chunk edges too: each piece, read alone (napari's preview), restored the plane again.
    rgba = da.from_array(np.random.default_rng(0).random((300, 280, 4)).astype(np.float32), chunks=(100, 100, 4))
    model = make_tiny_model(3)
    assert restore(rgba, model, "YXC", tile=32, overlap=8, alpha=True).chunks == ((300,), (280,), (4,))
    blocks = restore(rgba, model, "YXC", tile=32, overlap=8, alpha=True, block=128)
    assert blocks.chunks == ((128, 128, 44), (128, 128, 24), (4,))
    np.testing.assert_array_equal(blocks[..., 3].compute(), rgba[..., 3].compute())


def test_blocks_are_checked_and_keep_no_data():
    model = make_tiny_model(1)
    image = np.random.default_rng(3).random((2, 100, 100), dtype=np.float32)
    with pytest.raises(ValueError, match="block must be at least the tile side"):
        restore(image, model, "ZYX", tile=64, overlap=16, block=32)
    with pytest.raises(ValueError, match="needs tiles"):
        restore(image, model, "ZYX", tile=None, block=64)
    image[1, 90, 5] = np.nan
    image[1, 10:20, 60:] = np.nan
    blocks = restore(image, model, "ZYX", tile=32, overlap=8, block=48)
    assert np.isnan(blocks).sum() == 1 + 10 * 40
    assert_alike(blocks, restore(image, model, "ZYX", tile=32, overlap=8, block=0), scale=1)  # NaN where NaN


def test_an_in_memory_result_is_filled_chunk_by_chunk_not_concatenated():
    # compute() held every plane's output and then their concatenation: twice the result.
    import tracemalloc

    stack = np.random.default_rng(0).random((256, 128, 128), dtype=np.float32)
    model = make_tiny_model(1)
    restore(stack[:1], model, "ZYX", tile=64, overlap=16)  # allocations made once, before measuring
    tracemalloc.start()
    restored = restore(stack, model, "ZYX", tile=64, overlap=16)  # tiles: outputs numpy allocates
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.array_equal(restored[5], restore(stack[5], model, "YX", tile=64, overlap=16))
    assert peak < 1.5 * restored.nbytes


def test_a_plane_restored_in_blocks_holds_a_block_not_the_plane(tmp_path):
    # What the engine allocates with numpy for a 2048 x 2048 plane, whole and in blocks of 512.
    import tracemalloc

    from napari_gama_ir.engine.io import write_image

    plane = zarr.open_array(str(tmp_path / "plane.zarr"), mode="w", shape=(2048, 2048), chunks=(512, 512),
                            dtype="uint16")
    plane[:] = np.random.default_rng(0).integers(0, 4000, (2048, 2048), dtype=np.uint16)
    model = make_tiny_model(1)
    peaks = {}
    for block in (None, 512):
        restored = restore(plane, model, "YX", tile=128, overlap=32, block=block, output_dtype="input")
        tracemalloc.start()
        write_image(restored, tmp_path / f"{block}.zarr", "YX", workers=1)
        peaks[block] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert np.array_equal(zarr.open_array(str(tmp_path / "512.zarr"))[:], zarr.open_array(str(tmp_path / "None.zarr"))[:])
    # The plane's float32 sum and weights and its uint16 output (12.9 bytes a pixel in all with the
    # pinned versions, 10.9 with the oldest, since tiles run a pass at a time on the CPU).
    assert peaks[None] > 2048 * 2048 * 10
    assert peaks[512] < peaks[None] / 4


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_a_cgroup_memory_limit_lowers_the_memory_available(tmp_path, version):
    # In a container or a SLURM job the machine's MemAvailable overstates what the job may use.
    from napari_gama_ir.engine.device import cgroup_memory_room

    gib = 2**30
    if version == "v2":
        (tmp_path / "proc").write_text("0::/job_42\n")
        folder = tmp_path / "job_42"
        names, inactive = ("memory.max", "memory.current"), "inactive_file"
    else:
        (tmp_path / "proc").write_text("9:cpu:/\n4:memory:/job_42\n")
        folder = tmp_path / "memory" / "job_42"
        names, inactive = ("memory.limit_in_bytes", "memory.usage_in_bytes"), "total_inactive_file"
    folder.mkdir(parents=True)
    (folder / names[0]).write_text(f"{16 * gib}\n")
    (folder / names[1]).write_text(f"{10 * gib}\n")
    (folder / "memory.stat").write_text(f"anon {6 * gib}\n{inactive} {3 * gib}\n")
    assert cgroup_memory_room(tmp_path, tmp_path / "proc") == 9 * gib  # 16 - (10 - 3 reclaimable)
    (folder / names[0]).write_text("max\n" if version == "v2" else f"{2**63 - 4096}\n")
    assert cgroup_memory_room(tmp_path, tmp_path / "proc") is None  # no limit
    assert cgroup_memory_room(tmp_path, tmp_path / "missing") is None


def test_memory_is_known_while_another_thread_imports_distributed(monkeypatch):
    """dask's first compute imports distributed, for seconds, in the thread that computes (a napari
    preview's): "Restore all" clicked meanwhile found the module without its get_worker, and failed
    with an AttributeError."""
    import sys
    import types

    from napari_gama_ir.engine import device

    monkeypatch.setitem(sys.modules, "distributed", types.ModuleType("distributed"))  # as partway imported
    assert device.dask_worker_memory_room() is None
    room = device.available_memory()  # raised AttributeError
    assert room is None or room > 0


def test_available_memory_is_the_smaller_of_the_machine_and_the_cgroup(monkeypatch):
    from napari_gama_ir.engine import device

    machine = device.available_memory()
    monkeypatch.setattr(device, "cgroup_memory_room", lambda: 10**6)
    assert device.available_memory() == (10**6 if machine is None else min(machine, 10**6))
