"""Every shipped model loads, matches its registry entry, and denoises (thresholds measured, see each test)."""

import json
from importlib import resources

import numpy as np
import pytest

from napari_gama_ir import create_model, restore
from napari_gama_ir.cli import main
from napari_gama_ir.model import default_model_name, list_models
from napari_gama_ir.train import psnr

SHIPPED = [spec for spec in list_models() if spec.weights]
WEIGHTS = resources.files("napari_gama_ir") / "weights"

# PSNR gain on the astronaut test below: measured when the weights were added, less 1 dB of slack.
MIN_GAIN_DB = {"gama_ir_xs-denoise-rgb": 10.8}  # measured 11.85 dB


def test_something_ships_and_is_the_default():
    assert SHIPPED
    for device in ("cpu", "cuda", "mps"):
        assert default_model_name(3, device) in {spec.name for spec in SHIPPED}
    with pytest.raises(ValueError, match="no shipped model restores 2-channel images"):
        default_model_name(2)


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
    restored = restore((noisy / 255).astype(np.float32), create_model(spec.name, pretrained=True), tile=None) * 255
    gain = psnr(clean, np.clip(restored, 0, 255), 255) - psnr(clean, noisy, 255)
    assert gain > MIN_GAIN_DB[spec.name]


def test_restore_without_a_model_uses_the_default_or_says_why(tmp_path, capsys):
    import imageio.v3 as iio

    iio.imwrite(tmp_path / "rgb.png", np.full((32, 32, 3), 128, np.uint8))
    assert main(["restore", str(tmp_path / "rgb.png"), "-o", str(tmp_path / "out.png"), "--output-dtype", "input", "-q"]) == 0
    assert iio.imread(tmp_path / "out.png").shape == (32, 32, 3)
    np.save(tmp_path / "two.npy", np.zeros((2, 32, 32), np.float32))
    code = main(["restore", str(tmp_path / "two.npy"), "-o", str(tmp_path / "o.npy"), "--axes", "CYX", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "no shipped model restores 2-channel images yet" in err
