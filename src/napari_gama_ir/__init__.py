"""napari-gama-ir: fast GAMA-IR image restoration for numpy, dask, zarr and napari."""

import os as _os

# Before torch is imported: its CPU allocator then backs tensors of 2 MB and more with transparent
# huge pages (Linux; read once, at torch's first allocation): 14-43x fewer page faults and GAMA-IR-S
# 1.24-1.46x faster on the project's 2-core CPU (docs/performance.md). A value the user set is kept.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

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
