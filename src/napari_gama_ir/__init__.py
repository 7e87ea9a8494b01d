"""napari-gama-ir: fast GAMA-IR image restoration for numpy, dask, zarr and napari."""

from .engine import restore
from .model import GamaIR, GamaIRConfig, create_model, list_models, load_checkpoint, save_checkpoint

__all__ = [
    "GamaIR",
    "GamaIRConfig",
    "create_model",
    "list_models",
    "load_checkpoint",
    "restore",
    "save_checkpoint",
]
__version__ = "0.1.0"
