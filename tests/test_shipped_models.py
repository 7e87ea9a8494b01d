"""Every shipped model loads, matches its registry entry, and denoises (thresholds measured, see each test)."""

import json
from importlib import resources

import numpy as np
import pytest

from napari_gama_ir import create_model, restore
from napari_gama_ir.cli import main
from napari_gama_ir.model import default_model_name, list_models
from napari_gama_ir.model.registry import SUBSAMPLED_COLOURS_MODEL
from napari_gama_ir.train import psnr
from napari_gama_ir.train.objectives import saved_photo

SHIPPED = [spec for spec in list_models() if spec.weights]
WEIGHTS = resources.files("napari_gama_ir") / "weights"

# PSNR gain on the astronaut test below: measured when the weights were added, less 1 dB of slack.
MIN_GAIN_DB = {  # measured 11.85, 10.23, 12.60 and 10.58 dB; the JPEG model's on a JPEG of it, 7.44 dB
    "gama_ir_xs-denoise-rgb": 10.8, "gama_ir_xs-denoise-grey": 9.2, "gama_ir_s-denoise-rgb": 11.6,
    "gama_ir_s-denoise-grey": 9.5, "gama_ir_xs-denoise-rgb-jpeg": 6.4,
}
# PSNR gain on the fluorescence stack below, measured likewise (13.75 and 14.16 dB), less 1 dB.
MIN_FLUORESCENCE_GAIN_DB = {"gama_ir_xs-denoise-grey": 12.75, "gama_ir_s-denoise-grey": 13.15}


def test_every_channel_count_has_a_shipped_default():
    shipped = {spec.name: spec for spec in SHIPPED}
    for device in ("cpu", "cuda", "mps"):
        assert shipped[default_model_name(3, device)].config.channel_meaning == "rgb"
        # Colours kept at half resolution (a camera's JPEG) smear the noise into blotches, which the
        # models trained on white noise leave.
        assert default_model_name(3, device, colours_subsampled=True) == "gama_ir_xs-denoise-rgb-jpeg"
        assert default_model_name(1, device, colours_subsampled=True) == default_model_name(1, device)
        # Grey images, and any count but three: the grey model restores each channel alone.
        for channels in (1, 2, 4):
            assert shipped[default_model_name(channels, device)].config.channel_meaning == "grey"


@pytest.mark.parametrize("spec", SHIPPED, ids=lambda spec: spec.name)
def test_shipped_weights_load_and_match_the_registry(spec):
    record = json.loads((WEIGHTS / f"{spec.weights}.json").read_text())
    weights = WEIGHTS / f"{spec.weights}.safetensors"
    assert record["dtype"] == "float16" and weights.stat().st_size < 25 * 2**20
    model = create_model(spec.name, pretrained=True)
    assert all(p.dtype.is_floating_point and p.element_size() == 4 for p in model.parameters())  # fp32 at load
    assert model.config.replace(metadata={}) == spec.config.replace(metadata={})
    assert model.config.metadata["training"]["step"] == model.config.metadata["training"]["settings"]["steps"]
    assert (spec.name in MIN_GAIN_DB) and model.config.channel_meaning in ("rgb", "grey")


@pytest.mark.parametrize("spec", SHIPPED, ids=lambda spec: spec.name)
def test_shipped_model_denoises(spec):
    from skimage import data

    clean = data.astronaut()[96:224, 160:288].astype(np.float64)  # 128 x 128, face and background
    if spec.config.in_channels == 1:
        clean = clean @ np.array([0.2125, 0.7154, 0.0721])
    noisy = clean + np.random.default_rng(0).normal(0, 25, clean.shape)
    if spec.name.endswith("-jpeg"):  # as a camera saves it
        noisy = saved_photo(noisy, "jpeg", 90).astype(np.float64)
    restored = restore((noisy / 255).astype(np.float32), create_model(spec.name, pretrained=True), tile=None) * 255
    gain = psnr(clean, np.clip(restored, 0, 255), 255) - psnr(clean, noisy, 255)
    assert gain > MIN_GAIN_DB[spec.name]


def test_a_colour_jpeg_is_restored_by_the_model_for_jpegs(tmp_path, capsys):
    """And so are other photos whose colours were kept at half resolution, as a lossy WebP's,
    which had the white-noise model; a JPEG at 4:4:4, which it restores better, keeps it."""
    import imageio.v3 as iio
    import tifffile
    from PIL import Image
    from skimage import data

    clean = data.astronaut()[96:224, 160:288].astype(np.float64)
    noisy = saved_photo(clean + np.random.default_rng(0).normal(0, 25, clean.shape), "jpeg", 90).astype(np.float64)
    names = ("gama_ir_xs-denoise-rgb", SUBSAMPLED_COLOURS_MODEL)
    models = {name: create_model(name, pretrained=True) for name in names}
    gains = {name: psnr(clean, np.clip(restore(noisy.astype(np.uint8), model, "YXC"), 0, 255), 255)
             - psnr(clean, noisy, 255) for name, model in models.items()}
    assert gains[SUBSAMPLED_COLOURS_MODEL] > gains["gama_ir_xs-denoise-rgb"] + 3  # measured 1.40 and 7.44 dB
    saved = (("photo.jpg", {"quality": 95}, SUBSAMPLED_COLOURS_MODEL),
             ("photo.webp", {"quality": 90}, SUBSAMPLED_COLOURS_MODEL),
             ("finest.jpg", {"quality": 95, "subsampling": "4:4:4"}, "gama_ir_xs-denoise-rgb"),
             ("photo.png", {}, "gama_ir_xs-denoise-rgb"))
    for name, options, expected in saved:
        Image.fromarray(noisy.astype(np.uint8)).save(tmp_path / name, **options)
        assert main(["restore", str(tmp_path / name), "-o", str(tmp_path / f"{name}.tif")]) == 0
        assert f"restoring with {expected}: 100%" in capsys.readouterr().err  # the bar names it
        with tifffile.TiffFile(tmp_path / f"{name}.tif") as tif:
            assert json.loads(tif.imagej_metadata["Info"])["model"] == expected, name
    # evaluate chooses as restore does, by the noisy images, one or a folder of them.
    for folder in ("noisy", "clean"):
        (tmp_path / folder).mkdir()
    (tmp_path / "photo.jpg").rename(tmp_path / "noisy" / "photo.jpg")
    iio.imwrite(tmp_path / "clean" / "photo.png", clean.astype(np.uint8))  # matched by its name, in another format
    for noisy_name, clean_name in ("photo.jpg", "photo.png"), ("", ""):  # then the folders
        assert main(["evaluate", "--noisy", str(tmp_path / "noisy" / noisy_name),
                     "--clean", str(tmp_path / "clean" / clean_name), "--json", str(tmp_path / "scores.json")]) == 0
        assert json.loads((tmp_path / "scores.json").read_text())["model"] == SUBSAMPLED_COLOURS_MODEL
        assert f"evaluating {SUBSAMPLED_COLOURS_MODEL} on 1 image(s)" in capsys.readouterr().err


def test_restore_without_a_model_uses_the_default_or_says_why(tmp_path, capsys):
    import imageio.v3 as iio

    iio.imwrite(tmp_path / "rgb.png", np.full((32, 32, 3), 128, np.uint8))
    assert main(["restore", str(tmp_path / "rgb.png"), "-o", str(tmp_path / "out.png"), "--output-dtype", "input", "-q"]) == 0
    assert iio.imread(tmp_path / "out.png").shape == (32, 32, 3)
    np.save(tmp_path / "two.npy", np.random.default_rng(0).random((2, 32, 32), dtype=np.float32))
    assert main(["restore", str(tmp_path / "two.npy"), "-o", str(tmp_path / "o.npy"), "--axes", "CYX", "-q"]) == 0
    grey = create_model("gama_ir_xs-denoise-grey", pretrained=True)
    expected = np.stack([restore(plane, grey, "YX", tile=512) for plane in np.load(tmp_path / "two.npy")])
    assert np.allclose(np.load(tmp_path / "o.npy"), expected, atol=1e-6)  # each channel alone


@pytest.mark.parametrize("name", sorted(MIN_FLUORESCENCE_GAIN_DB))
def test_grey_model_denoises_a_fluorescence_stack(name):
    from napari_gama_ir.samples import noisy_fluorescence_stack

    noisy, clean = noisy_fluorescence_stack(planes=4, size=128, seed=3)  # uint16 counts, Poisson + read noise
    restored = restore(noisy, create_model(name, pretrained=True), "ZYX", tile=None)
    data_range = float(clean.max() - clean.min())
    gain = psnr(clean, restored, data_range) - psnr(clean, noisy.astype(np.float32), data_range)
    assert gain > MIN_FLUORESCENCE_GAIN_DB[name]
    # ... and more than the best plain smoothing of the same planes.
    from scipy.ndimage import gaussian_filter

    smoothed = max(psnr(clean, np.stack([gaussian_filter(p.astype(np.float32), sigma) for p in noisy]), data_range)
                   for sigma in (1.0, 1.5, 2.0, 3.0))
    assert psnr(clean, restored, data_range) > smoothed + 0.5
