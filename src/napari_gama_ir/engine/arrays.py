"""Any array as a dask array, without copying it."""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np


class _Referenced:
    """An array as ``dask.array.from_array`` takes it without a copy: recent dask copies anything
    with a ``copy`` method, so a napari layer restored or trained on took its size again, and a
    memory-mapped file was read whole. Dask then reads it only through ``__getitem__``."""

    def __init__(self, array: Any) -> None:
        self.array = array
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.array[key])


def as_dask(image: Any) -> tuple[da.Array, bool]:
    """``image`` as a dask array that refers to it, and whether it was lazy already.

    Dask arrays are returned as they are (refused, with a ValueError, where their chunk sizes are
    unknown); arrays read in chunks (zarr, h5py) keep their chunks and count as lazy; anything else
    (numpy, memory maps, napari layer data, nested lists) is one chunk, from which slicing a plane
    or a patch is a numpy view.
    """
    if isinstance(image, da.Array):
        if any(np.isnan(size) for sizes in image.chunks for size in sizes):
            # Tiling needs each plane's place: it failed deep inside, "cannot convert float NaN to integer".
            raise ValueError("the dask array's chunk sizes are unknown (as after boolean indexing); "
                             "call its compute_chunk_sizes() first")
        return image, True
    chunks = getattr(image, "chunks", None)
    lazy = bool(chunks) and hasattr(image, "shape") and hasattr(image, "dtype")
    array = image if lazy or isinstance(image, np.ndarray) else np.asarray(image)
    # name=False: a random name, instead of hashing every byte of the array to make one.
    return da.from_array(_Referenced(array), chunks=chunks if lazy else array.shape, name=False), lazy
