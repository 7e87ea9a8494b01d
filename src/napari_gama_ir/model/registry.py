"""Named architectures and shipped weights, in the style of timm's ``create_model``."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint, save_checkpoint
from .config import GamaIRConfig
from .network import GamaIR


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: a config, a description and optionally shipped weights."""

    name: str
    config: GamaIRConfig
    description: str
    weights: str | None = None  # checkpoint stem inside the package's ``weights`` folder


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> None:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


def list_models() -> list[ModelSpec]:
    """All registered models, in registration order."""
    return list(_REGISTRY.values())


def shipped_model_names() -> list[str]:
    """The registered models whose weights ship inside the package, in registration order."""
    return [spec.name for spec in _REGISTRY.values() if spec.weights]


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(_REGISTRY)
        raise KeyError(f"unknown model {name!r}; known models: {known}") from None


def user_models_dir() -> Path:
    """Where the user's own checkpoints live, found by name like registered models.

    ``$NAPARI_GAMA_IR_HOME/models`` if that variable is set, else the user data folder
    (``$XDG_DATA_HOME/napari-gama-ir/models``, by default ``~/.local/share/napari-gama-ir/models``).
    """
    home = os.environ.get("NAPARI_GAMA_IR_HOME")
    if home:
        return Path(home) / "models"
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data / "napari-gama-ir" / "models"


def user_model_names() -> list[str]:
    """Names of the checkpoints in :func:`user_models_dir`."""
    folder = user_models_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def check_user_model_name(name: str, overwrite: bool = False) -> str:
    """Check that ``name`` can name a new user model; return it stripped."""
    name = name.strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name.endswith((".json", ".safetensors")):
        raise ValueError(f"model name {name!r} must be letters, digits, '_', '-' or '.', with no file suffix")
    if name in _REGISTRY:
        raise ValueError(f"{name!r} is the name of a registered architecture; choose another name")
    folder = user_models_dir()
    if not overwrite and (folder / f"{name}.json").exists():
        raise ValueError(f"a model named {name!r} exists already in {folder}; choose another name")
    # Checked now, before the hours of training that precede the saving, not after them.
    nearest = next(path for path in (folder, *folder.parents) if path.exists())
    if not nearest.is_dir() or not os.access(nearest, os.W_OK):
        raise ValueError(f"your models folder {folder} cannot be made or written; set NAPARI_GAMA_IR_HOME to a folder that can")
    return name


def save_user_model(model: GamaIR, name: str, overwrite: bool = False) -> Path:
    """Save ``model`` among the user's models, where ``create_model(name)`` finds it."""
    name = check_user_model_name(name, overwrite)
    return save_checkpoint(model, user_models_dir() / name)


def _looks_like_path(name: str) -> bool:
    return os.sep in name or name.endswith((".json", ".safetensors")) or Path(name).exists()


def create_model(name: str | os.PathLike, pretrained: bool = False, **overrides: Any) -> GamaIR:
    """Build a GAMA-IR network by registry name, or load one from a checkpoint path.

    Parameters
    ----------
    name : str or path-like
        A registry name (``"gama_ir_s"``, ``"gama_ir_l"``...), the name of a checkpoint in
        :func:`user_models_dir`, or a checkpoint path.
    pretrained : bool
        Load the weights shipped with the package for this name.
    **overrides
        Config fields to change (``in_channels=1``...); only for untrained networks.

    Returns
    -------
    GamaIR
        The network, in eval mode.
    """
    if not isinstance(name, str) or _looks_like_path(name):
        if overrides:
            raise ValueError("config overrides cannot be applied to a checkpoint")
        return load_checkpoint(name)
    if name not in _REGISTRY and (user_models_dir() / f"{name}.json").is_file():
        if overrides:
            raise ValueError("config overrides cannot be applied to a checkpoint")
        return load_checkpoint(user_models_dir() / f"{name}.json")
    spec = get_spec(name)
    if pretrained:
        if spec.weights is None:
            shipped = ", ".join(n for n in shipped_model_names() if n.startswith(f"{name}-"))
            raise ValueError(f"no pretrained weights are shipped for the architecture {name!r}"
                             + (f"; its trained models: {shipped}" if shipped else ""))
        if overrides:
            raise ValueError("config overrides cannot be applied to pretrained weights")
        with resources.as_file(resources.files("napari_gama_ir") / "weights" / spec.weights) as stem:
            return load_checkpoint(stem)
    return GamaIR(spec.config.replace(**overrides)).eval()


# The paper gives width and depth but not the split over levels. Three levels (smallest map 1/8)
# keep the network shallow as the paper intends: the GAMA blocks, not extra down-sampling, provide
# the global receptive field. The blocks sit mostly in the middle, where the maps are smallest and
# a block costs the least time and memory; two per level keep some full-resolution processing.
# This also keeps GAMA-IR-S at 5.4 M parameters (under 11 MB as float16).
_S = GamaIRConfig(width=42, encoder_blocks=(2, 2, 2), middle_blocks=6, decoder_blocks=(2, 2, 2))
register_model(
    ModelSpec(
        "gama_ir_s",
        _S,
        "GAMA-IR-S, width 42, depth 18 (paper's small model)",
    )
)
register_model(
    ModelSpec(
        "gama_ir_l",
        GamaIRConfig(width=80, encoder_blocks=(2, 2, 2), middle_blocks=7, decoder_blocks=(2, 2, 2)),
        "GAMA-IR-L, width 80, depth 19 (paper's large model)",
    )
)
# Not in the paper: a CPU-friendly size (a quarter of GAMA-IR-S's parameters) for training and
# fine-tuning on machines without a GPU, one block per level.
_XS = GamaIRConfig(width=24, encoder_blocks=(1, 1, 1), middle_blocks=4, decoder_blocks=(1, 1, 1))
register_model(ModelSpec("gama_ir_xs", _XS, "GAMA-IR-XS, width 24, depth 10 (small CPU variant, not in the paper)"))

# Shipped weights (docs/models/<name>.md is each one's model card), stored under the model's name.
# The config must equal the shipped JSON's, metadata aside; a test checks it.
def _register_shipped(name: str, config: GamaIRConfig, description: str) -> None:
    register_model(ModelSpec(name, config, description, weights=name))


_COLOUR_TASK = "blind colour Gaussian denoiser (sigma 0-55)"
_register_shipped(
    "gama_ir_s-denoise-rgb", _S.replace(train_patch_size=128, channel_meaning="rgb"),
    f"GAMA-IR-S {_COLOUR_TASK}, trained on CBSD432 on a GPU",
)
_register_shipped(
    "gama_ir_xs-denoise-rgb", _XS.replace(train_patch_size=96, channel_meaning="rgb"),
    f"GAMA-IR-XS {_COLOUR_TASK}, trained on CBSD432 on a CPU",
)
_register_shipped(
    "gama_ir_xs-denoise-rgb-jpeg", _XS.replace(train_patch_size=96, channel_meaning="rgb"),
    "GAMA-IR-XS colour denoiser for photos saved with colours at half resolution: camera JPEGs, HEIC, "
    "lossy WebP and AVIF (trained on Gaussian noise, sigma 0-55, then those codecs at quality 70-100), "
    "fine-tuned from gama_ir_xs-denoise-rgb on CBSD432 on a CPU",
)
# The grey denoisers also serve fluorescence counts, so they see each plane through its own
# percentiles (CSBDeep's 1 and 99.8) rather than the dtype's range.
_GREY = {"in_channels": 1, "out_channels": 1, "channel_meaning": "grey",
         "normalization": {"method": "percentile", "low": 1.0, "high": 99.8, "scope": "image"}}
_GREY_TASK = "blind grey denoiser (Gaussian and Poisson-Gaussian noise; photos and fluorescence)"
_register_shipped(
    "gama_ir_s-denoise-grey", _S.replace(train_patch_size=128, **_GREY),
    f"GAMA-IR-S {_GREY_TASK}, fine-tuned from the colour one on CBSD432 in grey on a CPU",
)
_register_shipped(
    "gama_ir_xs-denoise-grey", _XS.replace(train_patch_size=96, **_GREY),
    f"GAMA-IR-XS {_GREY_TASK}, trained on CBSD432 in grey on a CPU",
)

# The shipped model used when none is named, by channel count and device kind; other channel
# counts get the grey model, which restores each channel alone. A CPU keeps the XS models: GAMA-IR-S
# restores better but takes about four times as long there (296 against 70 ms at 256 x 256).
DEFAULT_MODELS = {
    ("cpu", 3): "gama_ir_xs-denoise-rgb",
    ("gpu", 3): "gama_ir_s-denoise-rgb",
    ("cpu", 1): "gama_ir_xs-denoise-grey",
    ("gpu", 1): "gama_ir_s-denoise-grey",
}


#: The default on any device for colour photos whose codec kept their colours at half resolution
#: (a camera's JPEG, a phone's HEIC, a lossy WebP or AVIF): the models trained on white noise left
#: most of the noise that it smeared into colour blotches (docs/models/gama_ir_xs-denoise-rgb-jpeg.md).
SUBSAMPLED_COLOURS_MODEL = "gama_ir_xs-denoise-rgb-jpeg"


def default_model_name(
    channels: int = 3, device_type: str = "cpu", colour: bool | None = None, colours_subsampled: bool = False,
) -> str:
    """The shipped model that restores ``channels``-channel images by default on a device type.

    ``device_type`` is a torch device type (``"cpu"``, ``"cuda"``, ``"mps"``); every accelerator
    counts as ``"gpu"``. ``colour`` False says the channels are no picture's colours (a
    microscope's): the grey model restores them each on its own, since the colour one, trained on
    photos, would mix three of them as if they were red, green and blue. ``colours_subsampled`` says
    a lossy codec kept the image's colours at a lower resolution
    (:func:`napari_gama_ir.engine.io.colours_subsampled`): a colour one gets
    :data:`SUBSAMPLED_COLOURS_MODEL`.
    """
    if colour is False:
        channels = 1
    if colours_subsampled and channels == 3:
        return SUBSAMPLED_COLOURS_MODEL
    kind = "cpu" if device_type == "cpu" else "gpu"
    try:
        return DEFAULT_MODELS.get((kind, channels)) or DEFAULT_MODELS[(kind, 1)]
    except KeyError:
        raise ValueError(
            f"no shipped model restores {channels}-channel images yet; name one with --model "
            "(see 'napari-gama-ir models') or train one with 'napari-gama-ir train'"
        ) from None
