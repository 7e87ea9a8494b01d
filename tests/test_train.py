"""Training: data, patch sampling, masking, schedule, checkpoints, exact resume, fine-tuning."""

import gc
import json
import warnings
import weakref

import dask.array as da
import numpy as np
import pytest
import torch
import zarr

from napari_gama_ir import load_checkpoint, save_checkpoint
from napari_gama_ir.model import GamaIR
from napari_gama_ir.train import (
    NoiseModel,
    Replica,
    ResumeError,
    Trainer,
    TrainingDataError,
    TrainSettings,
    data_from_arrays,
    data_from_paths,
    grey_from_colour,
    learning_rate_at,
    psnr,
    resume_trainer,
    ssim,
    starting_model,
    train,
)
from napari_gama_ir.train.data import Normalizer, PatchSampler, make_planes, split_validation
from napari_gama_ir.train.objectives import blind_spot_mask, neighbour_cells, neighbour_subsample, saved_photo
from napari_gama_ir.train.trainer import ReplicaFailedError

from .conftest import make_tiny_model, tiny_config


def fresh_model(channels=1, seed=0) -> GamaIR:
    torch.manual_seed(seed)
    return GamaIR(tiny_config(channels))


def smooth_stack(planes=6, size=48, seed=0):
    """Clean smooth images in [0.2, 0.8] and a Gaussian-noisy copy (sigma 0.1), float32."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] / size
    clean = np.stack([
        0.5 + 0.3 * np.sin(2 * np.pi * (rng.uniform(1, 3) * x + rng.uniform(1, 3) * y + rng.uniform()))
        for _ in range(planes)
    ]).astype(np.float32)
    noisy = (clean + rng.normal(0, 0.1, clean.shape)).astype(np.float32)
    return noisy, clean


def weights_equal(a: GamaIR, b: GamaIR) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# -- data ------------------------------------------------------------------------------------------
def test_patches_are_aligned_augmented_crops_of_training_planes_only():
    planes_count, size = 5, 40
    base = np.arange(planes_count * size * size, dtype=np.float32).reshape(planes_count, size, size)
    data = data_from_arrays(base, base * 2, axes="ZYX")
    normalizer = Normalizer({"method": "range"})
    planes = make_planes(data, 1, normalizer)
    train_regions, validation = split_validation(planes, 0.2, 16, seed=3)
    held_out = {r.plane for r in validation}
    assert len(held_out) == 1 and held_out.isdisjoint({r.plane for r in train_regions})
    sampler = PatchSampler(planes, train_regions, 16, normalizer)
    batch = sampler.batch(64, np.random.default_rng(0))
    assert batch["noisy"].shape == (64, 1, 16, 16) and batch["noisy"].dtype == np.float32
    assert np.array_equal(batch["clean"], 2 * batch["noisy"])  # same crop, same flips and rotations
    seen_planes = {int(v) // (size * size) for v in batch["noisy"][:, 0, 0, 0]}
    assert seen_planes.isdisjoint(held_out) and len(seen_planes) == planes_count - 1
    # Each patch is a rotated/flipped 16x16 window of one plane: its value set is a window's.
    for patch in batch["noisy"][:, 0]:
        low = int(patch.min())
        plane, offset = divmod(low, size * size)
        top, left = divmod(offset, size)
        window = base[plane, top : top + 16, left : left + 16]
        assert sorted(patch.ravel()) == sorted(window.ravel())
    again = sampler.batch(64, np.random.default_rng(0))
    assert np.array_equal(again["noisy"], batch["noisy"])  # a function of the generator alone


def test_one_plane_is_split_into_disjoint_row_bands():
    data = data_from_arrays(np.zeros((100, 64), np.float32), np.zeros((100, 64), np.float32), axes="YX")
    planes = make_planes(data, 1, Normalizer({"method": "range"}))
    train_regions, validation = split_validation(planes, 0.2, 32, seed=0)
    assert train_regions[0].bottom == validation[0].top == 80 and validation[0].bottom == 100
    with pytest.raises(TrainingDataError, match="cannot hold both"):
        split_validation(planes, 0.2, 96, seed=0)
    with pytest.raises(TrainingDataError, match="smaller than the 128-pixel patch"):
        split_validation(planes, 0.0, 128, seed=0)


def test_sampling_a_huge_lazy_stack_reads_only_the_planes_it_needs():
    read = []

    def mark(block, block_info=None):
        read.append(block_info[0]["chunk-location"][0])
        return block

    stack = da.zeros((1000, 64, 64), chunks=(1, 64, 64), dtype=np.uint16).map_blocks(mark, dtype=np.uint16)
    data = data_from_arrays(stack, axes="ZYX")
    normalizer = Normalizer({"method": "range"})
    planes = make_planes(data, 1, normalizer)
    train_regions, _ = split_validation(planes, 0.0, 32, seed=0)
    PatchSampler(planes, train_regions, 32, normalizer).batch(8, np.random.default_rng(0))
    assert 1 <= len(set(read)) <= 8


def test_kept_planes_stay_under_the_budget_and_give_the_same_patches():
    read = []

    def mark(block, block_id=None):
        read.append(block_id[0])
        return block

    base = np.arange(6 * 64 * 64, dtype=np.uint16).reshape(6, 64, 64)
    stack = da.from_array(base, chunks=(1, 64, 64)).map_blocks(mark, dtype=np.uint16)
    data = data_from_arrays(stack, axes="ZYX")
    normalizer = Normalizer({"method": "range"})
    planes = make_planes(data, 1, normalizer)
    regions, _ = split_validation(planes, 0.0, 16, seed=0)
    plane_bytes = 64 * 64 * 2
    lazy = PatchSampler(planes, regions, 16, normalizer, cache_bytes=0)
    kept = PatchSampler(planes, regions, 16, normalizer, cache_bytes=3 * plane_bytes)
    for step in range(20):
        expected = lazy.batch(8, np.random.default_rng(step))["noisy"]
        assert np.array_equal(kept.batch(8, np.random.default_rng(step))["noisy"], expected)
    assert kept._cached_bytes == 3 * plane_bytes  # three planes kept, the other three read per patch
    read.clear()
    kept.batch(64, np.random.default_rng(99))
    assert set(read) and set(read).isdisjoint(plane for plane, _ in kept._cache)  # kept planes are not read again


def test_prefetched_batches_come_in_step_order_and_equal_in_line_ones():
    from napari_gama_ir.train.trainer import BatchPrefetcher

    noisy, clean = smooth_stack()
    settings = TrainSettings(steps=12, batch=4, patch=16, validation_fraction=0.0)
    trainer = Trainer(fresh_model(), data_from_arrays(noisy, clean, axes="ZYX"), settings, "unused-output")
    prefetcher = BatchPrefetcher(trainer._batch, settings.steps, workers=3)
    try:
        for step in range(settings.steps):
            fetched, direct = prefetcher.take(step), trainer._batch(step)
            assert fetched.keys() == direct.keys()
            assert all(torch.equal(fetched[k], direct[k]) for k in direct)
    finally:
        prefetcher.close()
    assert not prefetcher.pending


def test_mismatched_pairs_are_refused_with_the_reason(tmp_path):
    with pytest.raises(TrainingDataError, match=r"differ in shape: \(4, 32, 32\) vs \(4, 32, 30\)"):
        data_from_arrays(np.zeros((4, 32, 32)), np.zeros((4, 32, 30)), axes="ZYX")
    with pytest.raises(TrainingDataError, match=r"stack \(clean\) holds bool values"):
        data_from_arrays(np.zeros((4, 32, 32)), np.zeros((4, 32, 32), bool), axes="ZYX", name="stack")
    with pytest.raises(TrainingDataError, match=r"has no pixels \(shape \(0, 32, 32\)\)"):
        data_from_arrays(np.zeros((0, 32, 32)), axes="ZYX")
    import imageio.v3 as iio

    (tmp_path / "noisy").mkdir()
    (tmp_path / "clean").mkdir()
    for name in ("a.png", "b.png"):
        iio.imwrite(tmp_path / "noisy" / name, np.zeros((32, 32), np.uint8))
    iio.imwrite(tmp_path / "clean" / "a.png", np.zeros((32, 32), np.uint8))
    with pytest.raises(TrainingDataError, match=r"1 image\(s\) have no counterpart .*b\.png"):
        data_from_paths(tmp_path / "noisy", tmp_path / "clean")
    iio.imwrite(tmp_path / "clean" / "b.png", np.zeros((32, 32), np.uint8))
    data = data_from_paths(tmp_path / "noisy", tmp_path / "clean")
    assert [p.name for p in data.pairs] == ["a.png", "b.png"] and data.has_clean and data.has_noisy


def test_folder_pairs_match_by_name_in_any_format(tmp_path):
    """A camera's IMG_0001.JPG and the IMG_0001.png averaged from its burst had "no counterpart"."""
    import imageio.v3 as iio
    import tifffile

    rng = np.random.default_rng(0)
    noisy, clean = tmp_path / "noisy", tmp_path / "clean"
    noisy.mkdir()
    clean.mkdir()
    pictures = {name: rng.integers(0, 256, (32, 32), dtype=np.uint8) for name in ("IMG_0001", "IMG_0002", "b")}
    iio.imwrite(noisy / "IMG_0001.JPG", pictures["IMG_0001"], extension=".jpg")
    iio.imwrite(clean / "IMG_0001.png", pictures["IMG_0001"])
    iio.imwrite(noisy / "IMG_0002.png", pictures["IMG_0002"])
    tifffile.imwrite(clean / "IMG_0002.tif", pictures["IMG_0002"])
    for folder in (noisy, clean):
        iio.imwrite(folder / "b.png", pictures["b"])
    data = data_from_paths(noisy, clean)
    assert [p.name for p in data.pairs] == ["IMG_0001.JPG", "IMG_0002.png", "b.png"]
    assert np.array_equal(data.pairs[1].clean.compute(), pictures["IMG_0002"])  # the TIFF, paired with the PNG
    iio.imwrite(clean / "b.bmp", pictures["b"])  # b.png has its own counterpart: b.bmp has none
    with pytest.raises(TrainingDataError, match=r"1 image\(s\) have no counterpart .*\(e\.g\. b\.bmp\)"):
        data_from_paths(noisy, clean)
    (clean / "b.bmp").unlink()
    iio.imwrite(noisy / "IMG_0002.bmp", pictures["IMG_0002"])  # which of two noisy ones goes with the TIFF?
    with pytest.raises(TrainingDataError, match=r"3 image\(s\) have no counterpart .*\(e\.g\. IMG_0002\.bmp\)"):
        data_from_paths(noisy, clean)


def test_grey_conversion_uses_luminance():
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 255
    grey = data_from_arrays(clean=rgb, axes="YXC").to_grey()
    assert grey.channels == 1 and grey.pairs[0].axes == "YX"
    assert np.allclose(grey.pairs[0].clean.compute(), 0.7154, atol=1e-6)


def test_a_folder_mixing_grey_and_colour_images_trains_grey(tmp_path):
    import pickle

    import imageio.v3 as iio

    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 1] = 255
    iio.imwrite(tmp_path / "a.png", np.full((32, 32), 51, np.uint8))
    iio.imwrite(tmp_path / "b.png", rgb)
    iio.imwrite(tmp_path / "c.png", np.zeros((32, 32), np.uint8))
    with pytest.raises(TrainingDataError, match=r"channel counts: 1 \(a\.png\), 3 \(b\.png\); convert .* \(--grey\)"):
        data_from_paths(clean=tmp_path)
    data = data_from_paths(clean=tmp_path, grey=True)
    assert data.channels == 1 and [p.axes for p in data.pairs] == ["YX"] * 3
    assert data.sources["converted_to_grey"] and data.reopen["grey"]
    assert np.allclose(data.pairs[1].clean.compute(), 0.7154, atol=1e-6)  # colour: luminance in [0, 1]
    assert data.pairs[0].clean.dtype == np.uint8  # grey images are left as they are
    copy = pickle.loads(pickle.dumps(data))  # a dask worker reopens them the same way
    assert copy.channels == 1 and np.array_equal(copy.pairs[1].clean.compute(), data.pairs[1].clean.compute())



def test_images_from_files_keep_their_axes_and_leave_out_alpha(tmp_path):
    import imageio.v3 as iio
    import tifffile

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    grey_alpha = rng.integers(0, 256, (32, 32, 2), dtype=np.uint8)
    for folder in ("noisy", "clean"):
        (tmp_path / folder).mkdir()
        iio.imwrite(tmp_path / folder / "rgba.png", rgba)
    data = data_from_paths(tmp_path / "noisy", tmp_path / "clean")
    assert data.channels == 3 and np.array_equal(data.pairs[0].noisy.compute(), rgba[..., :3])
    iio.imwrite(tmp_path / "grey_alpha.png", grey_alpha)  # would be guessed as 32 planes of 32 x 2
    data = data_from_paths(clean=tmp_path / "grey_alpha.png")
    assert data.channels == 1 and data.pairs[0].axes == "YXC"
    assert np.array_equal(data.pairs[0].clean.compute()[..., 0], grey_alpha[..., 0])
    (tmp_path / "stacks").mkdir()
    cells = rng.random((4, 32, 32), dtype=np.float32)
    tifffile.imwrite(tmp_path / "stacks" / "cells.tif", cells, photometric="minisblack", metadata={"axes": "CYX"})
    data = data_from_paths(clean=tmp_path / "stacks")
    assert data.pairs[0].axes == "CYX" and data.channels == 4  # the file's axes, not a guessed ZYX
    (tmp_path / "arrays").mkdir()  # folders of .npy files and zarr stores were "no images found"
    np.save(tmp_path / "arrays" / "a.npy", cells)
    zarr.open_array(str(tmp_path / "arrays" / "b.zarr"), mode="w", shape=cells.shape, dtype=cells.dtype)[:] = cells
    data = data_from_paths(clean=tmp_path / "arrays", axes="ZYX")
    assert [p.name for p in data.pairs] == ["a.npy", "b.zarr"]
    assert all(np.array_equal(p.clean.compute(), cells) for p in data.pairs)


def test_data_from_files_travels_as_the_way_to_reopen_it(tmp_path):
    import pickle

    import tifffile

    rgb = np.random.default_rng(0).integers(0, 255, (2, 24, 24, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "clean.tif", rgb, metadata={"axes": "ZYXC"})
    data = data_from_paths(clean=tmp_path / "clean.tif").to_grey()
    copy = pickle.loads(pickle.dumps(data))  # what a dask worker receives
    assert copy.reopen == {**data.reopen, "grey": True} and copy.describe() == data.describe()
    assert np.array_equal(copy.pairs[0].clean.compute(), data.pairs[0].clean.compute())
    in_memory = data_from_arrays(clean=rgb, axes="ZYXC")
    assert in_memory.reopen is None  # arrays travel as arrays
    assert np.array_equal(pickle.loads(pickle.dumps(in_memory)).pairs[0].clean.compute(), rgb)


# -- noise, masking, sub-sampling --------------------------------------------------------------------
def test_noise_models():
    rng = np.random.default_rng(0)
    clean = np.full((4, 1, 64, 64), 0.5, np.float32)
    noisy = NoiseModel.parse("gaussian:25-25")(clean, rng)
    assert abs(np.std(noisy - clean) - 25 / 255) < 0.005
    photon = NoiseModel.parse("poisson-gaussian:100-100")
    assert photon.sigma == (0.0, 55.0)
    noisy = NoiseModel("poisson-gaussian", sigma=(0, 0), photons=(100, 100))(clean, rng)
    assert abs(np.var(noisy) - 0.5 / 100) < 0.001  # Poisson: variance = mean / photons
    assert NoiseModel.parse("gaussian:25") == NoiseModel("gaussian", sigma=(25, 25))
    assert NoiseModel.parse("poisson-gaussian:50").photons == (50.0, 50.0)
    for text in ("gaussian:loud", "gaussian:1-2-3"):
        with pytest.raises(ValueError, match="LOW-HIGH or one LEVEL"):
            NoiseModel.parse(text)
    with pytest.raises(ValueError, match="noise must be one of"):
        NoiseModel.parse("speckle")


def test_jpeg_after_the_noise_is_a_cameras_compression_of_the_noisy_patch(tmp_path):
    """A phone's noisy JPEGs were restored by networks trained on white noise only, which gained
    1.5 dB on them; clean photos can now be made noisy as a camera makes them."""
    import io

    from PIL import Image

    model = NoiseModel.parse("gaussian:0-55+jpeg:60-95")
    assert (model.sigma, model.quality, model.codecs) == ((0.0, 55.0), (60, 95), ("jpeg",))
    assert model.to_dict()["quality"] == [60, 95] and model.to_dict()["codecs"] == ["jpeg"]
    assert NoiseModel.parse("mixed+jpeg:90").quality == (90, 90)
    for text, message in [("gaussian+blur:3", "after the noise comes \\+CODEC:LOW-HIGH"),
                          ("gaussian+jpeg", "after the noise comes"),
                          ("gaussian+jpeg,gif:90", "codecs among jpeg, jpeg-4:2:2"),
                          ("gaussian+jpeg:high", "qualities must read LOW-HIGH or one LEVEL"),
                          ("gaussian+jpeg:0-90", "qualities must satisfy 1 <= low")]:
        with pytest.raises(ValueError, match=message):
            NoiseModel.parse(text)
    y, x = np.mgrid[:32, :48] / 48
    rgb = np.stack([x, y, (x + y) / 2])[None].astype(np.float32)
    compressed = NoiseModel.parse("gaussian:0+jpeg:80")(rgb, np.random.default_rng(0))
    for subsampling, same in (("4:2:0", True), ("4:4:4", False)):  # colours at half resolution, as cameras save them
        encoded = io.BytesIO()
        Image.fromarray(np.rint(rgb[0].transpose(1, 2, 0) * 255).astype(np.uint8)).save(
            encoded, "JPEG", quality=80, subsampling=subsampling)
        expected = np.asarray(Image.open(encoded), np.float32).transpose(2, 0, 1)[None] / 255
        assert np.array_equal(compressed, expected) == same
    assert compressed.dtype == np.float32
    grey = NoiseModel.parse("gaussian:10-30+jpeg:60-95")
    drawn = [grey(rgb[:, :1], np.random.default_rng(1)) for _ in range(2)]
    assert np.array_equal(*drawn) and drawn[0].shape == (1, 1, 32, 48)  # reproducible: a function of the generator
    assert np.allclose(drawn[0] * 255, np.rint(drawn[0] * 255), atol=1e-3)  # 8-bit values, as a JPEG's
    data = data_from_arrays(clean=np.zeros((2, 2, 32, 32), np.float32), axes="ZCYX")
    with pytest.raises(ValueError, match="jpeg compression takes grey or RGB images, not 2 channels"):
        Trainer(fresh_model(2), data, TrainSettings(steps=2, patch=16, noise="gaussian+jpeg:90"), tmp_path)


def test_a_noise_model_saves_each_patch_with_a_codec_drawn_among_several():
    """A network trained on JPEGs alone softened clean HEIF, AVIF and WebP photos by 0.8-2.7 dB
    (docs/models/gama_ir_xs-denoise-rgb-jpeg.md); it can now be trained on the phones' codecs too."""
    pytest.importorskip("pillow_heif")
    y, x = np.mgrid[:48, :48] / 48
    rgb = np.stack([x, y, (x + y) / 2]).astype(np.float32)
    batch = np.stack([rgb] * 12)
    model = NoiseModel.parse("gaussian:0+webp,heif,avif:80-95")
    assert model.codecs == ("webp", "heif", "avif")
    noisy = model(batch, np.random.default_rng(0))
    assert np.array_equal(noisy, model(batch, np.random.default_rng(0)))  # reproducible
    pixels = rgb.transpose(1, 2, 0) * 255
    matched = []
    for patch in noisy:  # each patch is one codec's decoded picture at some quality of the range
        saved = patch.transpose(1, 2, 0) * 255
        matched.append({codec for codec in model.codecs for quality in range(80, 96)
                        if np.allclose(saved_photo(pixels, codec, quality), saved, atol=1e-3)})
    assert all(len(codecs) >= 1 for codecs in matched)
    assert set().union(*matched) == {"webp", "heif", "avif"}  # all three drawn in 12 patches
    with pytest.raises(ValueError, match="webp, heif, avif compression takes RGB images, not 1 channel$"):
        model(batch[:, :1], np.random.default_rng(0))
    with pytest.raises(ValueError, match="codecs must be some of"):
        NoiseModel(quality=(90, 90), codecs=("png",))


def test_training_on_a_codec_that_is_not_installed_says_what_to_install(tmp_path, monkeypatch):
    from napari_gama_ir.train import objectives

    monkeypatch.setattr(objectives, "missing_codecs", lambda: {"heif": "pillow-heif: pip install 'napari-gama-ir[heic]'"})
    data = data_from_arrays(clean=np.zeros((2, 32, 32, 3), np.float32), axes="ZYXC")
    settings = TrainSettings(steps=2, patch=16, noise="gaussian+jpeg,heif:90")
    with pytest.raises(ValueError, match=r"^heif compression needs pillow-heif: pip install 'napari-gama-ir\[heic\]'$"):
        Trainer(fresh_model(3), data, settings, tmp_path)


def test_blind_spot_mask_replaces_one_pixel_per_cell_by_a_neighbour():
    rng = np.random.default_rng(0)
    noisy = rng.random((2, 3, 32, 24)).astype(np.float32)
    original = noisy.copy()
    masked, mask = blind_spot_mask(noisy, rng, cell=8, radius=2)
    assert np.array_equal(noisy, original)  # input untouched
    assert mask.shape == (2, 1, 32, 24) and mask.sum() == 2 * 4 * 3
    assert np.array_equal(masked[:, :, ~mask[0, 0]][0], noisy[:, :, ~mask[0, 0]][0])
    for n, _, r, c in zip(*np.nonzero(mask)):
        window = noisy[n, :, max(r - 2, 0) : r + 3, max(c - 2, 0) : c + 3]
        matches = np.all(window == masked[n, :, r, c][:, None, None], axis=0)
        assert matches.any()  # copied from inside the 5x5 window
        assert not np.array_equal(masked[n, :, r, c], noisy[n, :, r, c])  # not the pixel itself


def test_neighbour_subsample_takes_two_adjacent_pixels_per_cell():
    image = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    cells = torch.from_numpy(neighbour_cells(image.shape, np.random.default_rng(0)))
    first, second = neighbour_subsample(image, cells)
    assert first.shape == second.shape == (2, 1, 4, 4)
    for a, b in zip(first.flatten().tolist(), second.flatten().tolist()):
        (na, ra, ca), (nb, rb, cb) = (np.unravel_index(int(v), (2, 8, 8)) for v in (a, b))
        assert na == nb and (ra // 2, ca // 2) == (rb // 2, cb // 2)  # same image, same cell
        assert abs(ra - rb) + abs(ca - cb) == 1  # horizontal or vertical neighbours


# -- optimiser and schedule --------------------------------------------------------------------------
def test_cosine_schedule_and_paper_optimiser(tmp_path):
    settings = TrainSettings(steps=100)
    assert learning_rate_at(0, settings) == pytest.approx(1e-3)
    assert learning_rate_at(50, settings) == pytest.approx((1e-3 + 1e-7) / 2)
    assert learning_rate_at(100, settings) == pytest.approx(1e-7)
    rates = [learning_rate_at(s, settings) for s in range(101)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    noisy, clean = smooth_stack()
    trainer = Trainer(fresh_model(), data_from_arrays(noisy, clean, axes="ZYX"), TrainSettings(steps=3, patch=16), tmp_path)
    group = trainer.optimiser.param_groups[0]
    assert isinstance(trainer.optimiser, torch.optim.AdamW) and group["betas"] == (0.9, 0.9)
    with pytest.raises(ValueError, match="patch must be at least 16"):
        TrainSettings(patch=8)
    with pytest.raises(ValueError, match="synthetic noise is for supervised"):
        TrainSettings(objective="noise2void", noise="gaussian")


# -- training, checkpoints and resume ----------------------------------------------------------------
def test_short_training_lowers_the_loss_and_beats_the_noisy_input(tmp_path):
    noisy, clean = smooth_stack(planes=8, size=64)
    before = noisy.copy()
    data = data_from_arrays(noisy, clean, axes="ZYX")
    settings = TrainSettings(steps=120, batch=4, patch=32, validate_every=40, learning_rate=2e-3)
    events = []
    result = train(fresh_model(), data, settings, tmp_path / "run", on_event=events.append)
    assert np.array_equal(noisy, before)  # inputs never modified
    losses = [e.loss for e in events]
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:20])
    last = result.history[-1]
    assert last["psnr"] > last["psnr_input"] + 5  # measured: +10.0 and +10.2 dB (seeds 0, 1)
    assert [h["step"] for h in result.history] == [40, 80, 120]
    # model.json is the best validated network, and says so.
    best_step = max(result.history, key=lambda h: h["psnr"])["step"]
    record = json.loads(result.model_path.read_text())
    assert record["config"]["metadata"]["training"]["best"]["step"] == best_step == result.best["step"]
    assert record["config"]["metadata"]["training"]["settings"]["steps"] == 120
    assert load_checkpoint(result.model_path).config.in_channels == 1


def test_a_run_its_caller_stops_iterating_keeps_its_steps(tmp_path):
    # The napari widget's worker can be dropped mid-run; the steps made were lost without a checkpoint.
    noisy, clean = smooth_stack()
    settings = TrainSettings(steps=10, batch=2, patch=16, checkpoint_every=100)
    trainer = Trainer(fresh_model(), data_from_arrays(noisy, clean, axes="ZYX"), settings, tmp_path)
    steps = trainer.run()
    for event in steps:
        if event.step == 4:
            break
    steps.close()
    assert resume_trainer(tmp_path, data_from_arrays(noisy, clean, axes="ZYX")).step == 4


@pytest.mark.parametrize("objective", ["supervised", "noise2void", "neighbor2neighbor"])
def test_resume_after_a_stop_equals_an_uninterrupted_run(tmp_path, objective):
    noisy, clean = smooth_stack()
    data = data_from_arrays(noisy, clean if objective == "supervised" else None, axes="ZYX")
    settings = TrainSettings(steps=10, batch=2, patch=16, validate_every=4, checkpoint_every=3, objective=objective)
    whole = train(fresh_model(), data, settings, tmp_path / "whole")

    trainer = Trainer(fresh_model(), data, settings, tmp_path / "parts")
    for event in trainer.run():
        if event.step == 5:
            trainer.stop()  # as Cancel or Ctrl-C do
    assert trainer.step == 5 and trainer.result().stopped_early
    files = sorted(p.name for p in (tmp_path / "parts" / "checkpoint").iterdir())
    assert files == ["model.json", "model.safetensors", "optimiser.safetensors", "training.json"]
    resumed = resume_trainer(tmp_path / "parts", data)
    assert resumed.step == 5
    list(resumed.run())
    parts = resumed.result()
    assert weights_equal(load_checkpoint(tmp_path / "whole" / "checkpoint" / "model"),
                         load_checkpoint(tmp_path / "parts" / "checkpoint" / "model"))
    assert parts.history == whole.history and parts.best == whole.best
    assert weights_equal(load_checkpoint(whole.model_path), load_checkpoint(parts.model_path))


def test_resume_refuses_other_settings_or_data(tmp_path):
    noisy, clean = smooth_stack()
    data = data_from_arrays(noisy, clean, axes="ZYX")
    settings = TrainSettings(steps=4, batch=2, patch=16)
    train(fresh_model(), data, settings, tmp_path)
    with pytest.raises(ResumeError, match="steps cannot change"):
        resume_trainer(tmp_path, data, steps=8)
    other = data_from_arrays(noisy[:5], clean[:5], axes="ZYX")
    with pytest.raises(ResumeError, match="other training data"):
        resume_trainer(tmp_path, other)
    with pytest.raises(ResumeError, match="no checkpoint"):
        resume_trainer(tmp_path / "nothing", data)


def test_every_session_makes_a_step_however_short_its_time_limit(tmp_path):
    noisy, clean = smooth_stack()
    data = data_from_arrays(noisy, clean, axes="ZYX")
    # A limit already spent when the loop starts (a slow start does the same to a short --minutes).
    result = train(fresh_model(), data, TrainSettings(steps=4, batch=2, patch=16, time_limit=0.0), tmp_path)
    assert result.stopped_early and result.steps_done == 1
    resumed = resume_trainer(tmp_path, data)
    list(resumed.run())
    assert resumed.step == 2 and resumed.result().stopped_early


def test_cpu_steps_run_on_the_network_thread_and_give_the_same_weights_from_any_thread(tmp_path, monkeypatch):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    noisy, clean = smooth_stack()
    data = data_from_arrays(noisy, clean, axes="ZYX")
    settings = TrainSettings(steps=3, batch=2, patch=16, validation_fraction=0)
    step_threads = []
    original_forward = Trainer._loss

    def noting_forward(self, tensors):
        step_threads.append(threading.current_thread().name)
        return original_forward(self, tensors)

    monkeypatch.setattr(Trainer, "_loss", noting_forward)
    here = train(fresh_model(), data, settings, tmp_path / "here")
    with ThreadPoolExecutor(1, thread_name_prefix="caller") as elsewhere:
        there = elsewhere.submit(train, fresh_model(), data, settings, tmp_path / "there").result()
    assert len(step_threads) == 6 and all(name.startswith("gama-ir-network") for name in step_threads)
    assert weights_equal(load_checkpoint(here.model_path), load_checkpoint(there.model_path))


def test_same_seed_same_weights(tmp_path):
    noisy, clean = smooth_stack()
    data = data_from_arrays(noisy, clean, axes="ZYX")
    settings = TrainSettings(steps=5, batch=2, patch=16, validation_fraction=0)
    a = train(fresh_model(), data, settings, tmp_path / "a")
    b = train(fresh_model(), data, settings, tmp_path / "b")
    assert weights_equal(load_checkpoint(a.model_path), load_checkpoint(b.model_path))
    assert a.best is None and a.history[-1]["step"] == 5  # no validation: the last network


def test_synthetic_noise_on_clean_images(tmp_path):
    _, clean = smooth_stack()
    data = data_from_arrays(clean=clean, axes="ZYX")
    with pytest.raises(ValueError, match="synthetic noise model"):
        Trainer(fresh_model(), data, TrainSettings(steps=2, patch=16), tmp_path)
    result = train(fresh_model(), data, TrainSettings(steps=3, batch=2, patch=16, noise="gaussian:10-30"), tmp_path)
    assert result.history[-1]["psnr_input"] < 30  # the validation crops carry the synthetic noise


def test_fine_tuning_starts_from_a_checkpoint_with_matching_channels(tmp_path):
    rgb = save_checkpoint(make_tiny_model(3), tmp_path / "rgb")
    model, start = starting_model(3, source=rgb)
    assert start["from"] == str(rgb) and len(start["checkpoint_sha256"]) == 64
    three = save_checkpoint(make_tiny_model(3, channel_meaning="3 channels"), tmp_path / "three")
    with pytest.raises(ValueError, match="takes 3 channel"):
        starting_model(1, source=three)  # only RGB has a grey meaning
    grey = save_checkpoint(make_tiny_model(1), tmp_path / "grey")
    model, _ = starting_model(2, source=grey)  # a grey network trains on each channel alone
    assert model.config.in_channels == 1
    new, start = starting_model(3, architecture="gama_ir_xs", patch=48, seed=1)
    assert new.config.in_channels == 3 and new.config.train_patch_size == 48 and start["from"] == "scratch"
    again, _ = starting_model(3, architecture="gama_ir_xs", patch=48, seed=1)
    assert weights_equal(new, again)
    with pytest.raises(ValueError, match="no pretrained weights"):
        starting_model(3, source="gama_ir_s")
    # A microscope's three channels made an "rgb" network, which grey fine-tuning then averaged.
    assert new.config.channel_meaning == "rgb"
    stains, _ = starting_model(3, architecture="gama_ir_xs", colour=False)
    assert stains.config.channel_meaning == "3 channels"
    with pytest.raises(ValueError, match="takes 3 channel"):
        starting_model(1, source=save_checkpoint(stains, tmp_path / "stains"))


def test_a_colour_network_made_grey_gives_the_mean_of_its_colour_outputs(tmp_path):
    colour = make_tiny_model(3)
    before = {name: tensor.clone() for name, tensor in colour.state_dict().items()}
    percentiles = {"method": "percentile", "low": 1.0, "high": 99.8, "scope": "image"}
    grey, start = starting_model(1, source=save_checkpoint(colour, tmp_path / "rgb"), normalization=percentiles)
    assert start["converted"] == "rgb to grey"
    assert (grey.config.in_channels, grey.config.out_channels, grey.config.channel_meaning) == (1, 1, "grey")
    assert grey.config.normalization == percentiles and grey.config.width == colour.config.width
    image = torch.rand(2, 1, 40, 36)
    with torch.no_grad():
        expected = colour(image.expand(-1, 3, -1, -1)).mean(dim=1, keepdim=True)
        torch.testing.assert_close(grey.eval()(image), expected, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(before[name], tensor) for name, tensor in colour.state_dict().items())
    with pytest.raises(ValueError, match="only an RGB network"):
        grey_from_colour(grey)


def test_out_of_memory_names_what_to_change(tmp_path, monkeypatch):
    from napari_gama_ir.train import TrainingMemoryError

    noisy, clean = smooth_stack()
    trainer = Trainer(fresh_model(), data_from_arrays(noisy, clean, axes="ZYX"), TrainSettings(steps=3, patch=16), tmp_path)

    def out_of_memory(tensors):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "_loss", out_of_memory)
    with pytest.raises(TrainingMemoryError, match="a batch of 8 patches of 16 pixels does not fit in cpu memory"):
        list(trainer.run())


def test_a_cpu_step_beyond_the_memory_available_is_refused_before_it_runs(tmp_path, monkeypatch):
    # Run, it would have the process killed: 16 patches of 1024 x 1024 through GAMA-IR-S did so
    # after 65 s on a 24 GB machine, with no message (inside napari, the viewer with it).
    from napari_gama_ir.engine import memory as host_memory
    from napari_gama_ir.engine.memory import training_step_peak_bytes
    from napari_gama_ir.train import TrainingMemoryError

    noisy, clean = smooth_stack()
    model = fresh_model()
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    settings = TrainSettings(steps=3, patch=16, batch=4, device="cpu")
    data = data_from_arrays(noisy, clean, axes="ZYX")
    trainer = Trainer(model, data, settings, tmp_path / "run")
    peak = training_step_peak_bytes(model, (4, 1, 16, 16))
    monkeypatch.setattr(host_memory, "available_memory", lambda: peak)  # its tensors fit, the allocator's share not
    refused = r"^a training step on 4 patches of 16x16 pixels takes about .* GB of memory, and .* GB is available; "
    with pytest.raises(TrainingMemoryError, match=refused + "use a smaller batch or patch$"):
        list(trainer.run())
    assert trainer.step == 0 and trainer.step_peak_bytes == peak
    assert all(torch.equal(weights[name], tensor) for name, tensor in model.state_dict().items())
    assert not (tmp_path / "run").exists()  # the folder it made, empty, is gone; one that was there stays:
    (tmp_path / "given").mkdir()
    with pytest.raises(TrainingMemoryError):
        list(Trainer(fresh_model(), data, settings, tmp_path / "given").run())
    assert (tmp_path / "given").is_dir()
    monkeypatch.setattr(host_memory, "available_memory", lambda: 4 * peak)
    assert [event.step for event in trainer.run()] == [1, 2, 3]
    assert (tmp_path / "run" / "model.json").is_file()


@pytest.mark.parametrize("objective", ["supervised", "noise2void", "neighbor2neighbor"])
def test_a_cpu_step_is_judged_by_the_memory_of_its_own_objective(tmp_path, objective):
    # Neighbor2Neighbor trains on sub-images of a quarter of the pixels, but its steps were judged
    # as supervised ones on whole patches: 64 patches of 256 x 256 through GAMA-IR-XS were refused
    # at 31.9 GB on a 24 GB machine, and they run at 15.5 GB.
    from napari_gama_ir.engine.memory import training_step_peak_bytes

    noisy, clean = smooth_stack()
    model = fresh_model()
    settings = TrainSettings(steps=1, patch=16, batch=4, device="cpu", objective=objective, validation_fraction=0)
    data = data_from_arrays(noisy, clean if objective == "supervised" else None, axes="ZYX")
    trainer = Trainer(model, data, settings, tmp_path)
    assert [event.step for event in trainer.run()] == [1]
    whole_patches = training_step_peak_bytes(model, (4, 1, 16, 16))
    if objective == "neighbor2neighbor":
        assert 0.1 * whole_patches < trainer.step_peak_bytes < 0.5 * whole_patches
    else:  # Noise2Void's masked loss cannot run on the meta device; the loss on the whole output stands in
        assert trainer.step_peak_bytes == pytest.approx(whole_patches, rel=0.05)


def test_normalisation_of_a_new_network_follows_the_choice_or_the_dtype():
    from napari_gama_ir.train import default_normalization

    percentiles = {"method": "percentile", "low": 1.0, "high": 99.8, "scope": "image"}
    assert default_normalization(np.uint8) == default_normalization(np.float32) == {"method": "range"}
    assert default_normalization(np.uint16) == percentiles
    assert default_normalization(np.uint16, "range") == {"method": "range"}
    assert default_normalization(np.uint8, "percentile-stack") == {**percentiles, "scope": "stack"}
    with pytest.raises(ValueError, match="normalization must be one of"):
        default_normalization(np.uint8, "percentile")


def test_training_leaves_out_no_data_and_scores_only_data(tmp_path):
    # A registered pair's NaN padding was refused; one NaN in a patch makes the loss NaN.
    noisy, clean = smooth_stack(planes=3, size=64)
    noisy[:, :, :20] = np.nan  # a band of every plane, validation's among them
    clean[:, 50:, :] = np.inf
    data = data_from_arrays(noisy, clean, axes="ZYX", name="registered")
    normalizer = Normalizer({"method": "percentile", "scope": "image"})
    planes = make_planes(data, 1, normalizer)
    sampler = PatchSampler(planes, split_validation(planes, 0, 16, seed=0)[0], 16, normalizer)
    batch = sampler.batch(64, np.random.default_rng(0))
    assert all(np.isfinite(patches).all() for patches in batch.values())
    settings = TrainSettings(steps=4, patch=16, batch=2, validation_fraction=0.34, validate_every=2)
    result = train(fresh_model(), data, settings, tmp_path)
    assert [h["step"] for h in result.history] == [2, 4]
    assert all(np.isfinite(h[key]) for h in result.history for key in ("train_loss", "psnr", "ssim", "psnr_input"))
    trainer = Trainer(fresh_model(), data, settings, tmp_path / "again")
    crop = trainer.validation[0]
    assert crop["data"].sum() == 50 * 44 and np.isfinite(crop["noisy"]).all()
    # Nothing but no data: refused in one line, not trained into a NaN loss.
    data = data_from_arrays(np.full_like(noisy, np.nan), clean, axes="ZYX", name="empty")
    with pytest.raises(TrainingDataError, match=r"100 training patches drawn in a row held NaN or Inf \(no data\), "
                                                r"the last from empty plane \d; crop the images to their data"):
        train(fresh_model(), data, TrainSettings(steps=3, patch=16, batch=2, validation_fraction=0), tmp_path / "x")


def test_scores_limited_to_data_leave_out_every_window_that_meets_no_data():
    rng = np.random.default_rng(0)
    reference, image = rng.random((3, 40, 40)), rng.random((3, 40, 40))
    everywhere = np.ones(reference.shape, bool)
    assert psnr(reference, image, where=everywhere) == psnr(reference, image)
    assert ssim(reference, image, where=everywhere) == pytest.approx(ssim(reference, image), abs=1e-12)
    data = everywhere.copy()
    data[:, :, :10] = False
    spoiled = np.where(data, image, 5.0)  # filled, as no data is: NaN would spread through the filters
    assert psnr(reference, spoiled, where=data) == psnr(reference[data], image[data])
    assert ssim(reference, spoiled, where=data) == pytest.approx(ssim(reference[:, :, 10:], image[:, :, 10:]), abs=1e-9)


def test_psnr_of_equal_images_is_infinite_without_a_warning():
    image = np.random.default_rng(0).random((8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a training run on pairs that match printed numpy's divide warning
        assert psnr(image, image) == np.inf
    assert psnr(image, image + 0.1) == pytest.approx(20.0)


def test_a_replica_keeps_the_tensors_of_its_collectives(monkeypatch):
    """torch's gloo thread may drop a collective's tensor after the collective returned; where that
    was the last reference, it needs the GIL, and torch 2.3 destroys a gloo group holding the GIL
    while it waits for that thread: a deadlock (a CI run hung 10 minutes; 2 of 2 stress runs under
    load, benchmarks/replica_teardown.py). So every tensor a replica sends outlives its calls."""
    sent, other_replica_sends = [], [0.0]

    def all_reduce(tensor):
        sent.append(weakref.ref(tensor))
        tensor.add_(other_replica_sends[0])

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "gloo")
    replica = Replica(rank=1, world=2)
    with replica.together():
        pass
    with pytest.raises(OSError, match="disk full"), replica.together():  # this replica's own failure
        raise OSError("disk full")
    other_replica_sends[0] = 1.0
    assert replica.any(False) and replica.mean(torch.tensor(0.5, requires_grad=True) * 1) == 0.75
    with pytest.raises(ReplicaFailedError, match="1 other replica"), replica.together():
        pass
    gc.collect()
    assert len(sent) == 5 and all(tensor() is not None for tensor in sent)
