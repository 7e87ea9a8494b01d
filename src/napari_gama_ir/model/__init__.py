"""GAMA-IR in pure PyTorch: config, modules, registry and safe checkpoints."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import GamaIRConfig
from .gama import GamaBlock
from .network import GamaIR, GamaIRBlock
from .registry import (
    ModelSpec,
    check_user_model_name,
    create_model,
    default_model_name,
    get_spec,
    list_models,
    register_model,
    save_user_model,
    shipped_model_names,
    user_model_names,
    user_models_dir,
)

__all__ = [
    "CheckpointError",
    "GamaBlock",
    "GamaIR",
    "GamaIRBlock",
    "GamaIRConfig",
    "ModelSpec",
    "check_user_model_name",
    "create_model",
    "default_model_name",
    "get_spec",
    "list_models",
    "load_checkpoint",
    "register_model",
    "save_checkpoint",
    "save_user_model",
    "shipped_model_names",
    "user_model_names",
    "user_models_dir",
]
