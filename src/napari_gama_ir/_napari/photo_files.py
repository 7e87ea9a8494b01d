"""Opens and saves in napari the photos that napari's own readers and writers refuse: an iPhone's
HEIC, and HEIF and AVIF."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.io import DECODED_PHOTO_SUFFIXES, image_suffix, open_image, write_image
from .preview import BackgroundPlanes

#: The layer metadata in which an opened photo keeps what its saved copy needs again.
KEPT_FROM_PHOTO = ("icc_profile", "exif")


def get_photo_reader(path: str | os.PathLike | list) -> Callable[[str], list[tuple]] | None:
    """npe2 reader hook: :func:`read_photo` for one HEIC, HEIF or AVIF file, else None (a stack of
    several photos is no image napari could show as one)."""
    paths = path if isinstance(path, list) else [path]
    if len(paths) != 1 or image_suffix(Path(paths[0])) not in DECODED_PHOTO_SUFFIXES:
        return None
    return read_photo


def read_photo(path: str | os.PathLike | list) -> list[tuple]:
    """The photo at ``path`` as one image layer: upright, as its EXIF orientation says, in the
    colours it shows, RGB where it has colours, with its colour profile and EXIF in the layer's
    metadata (which a restored layer keeps, and :func:`write_photo` writes again). A missing
    decoder (pillow-heif, for HEIC) or an unreadable file raises
    :class:`~napari_gama_ir.engine.io.ImageIOError` in one line, which napari shows."""
    path = Path(path[0] if isinstance(path, list) else path)
    source = open_image(path)
    pixels = source.array.compute()
    rgb = pixels.ndim == 3 and pixels.shape[-1] in (3, 4)
    kept = {key: getattr(source, key) for key in KEPT_FROM_PHOTO if getattr(source, key)}
    return [(pixels, {"name": path.stem, "rgb": rgb, "metadata": kept}, "image")]


def write_photo(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 writer of one image layer as a HEIC, HEIF or AVIF photo (napari's own writers take
    neither), with the colour profile and EXIF that :func:`read_photo` kept. What a photo cannot
    hold (a stack, floats), and a preview whose planes are not all restored yet, raise an OSError
    in one line: npe2 takes a ValueError from a writer for "not this writer's layers", and napari
    then says only that."""
    if meta.get("multiscale"):
        data = data[0]
    if isinstance(data, BackgroundPlanes) and len(data.computed) < np.prod([data.shape[d] for d in data.iterated]):
        raise OSError(f"{path}: this preview has planes not restored yet; save the layer that Restore all makes")
    axes = "YXC" if meta.get("rgb") else "YX"
    if np.ndim(data) != len(axes):  # before any plane of a lazy stack is read
        raise OSError(f"{path}: a photo holds one picture, not a stack of shape {np.shape(data)}; save it as .tif or .zarr")
    photo = meta.get("metadata") or {}
    try:
        write_image(np.asarray(data), path, axes, overwrite=True, **{key: photo.get(key) for key in KEPT_FROM_PHOTO})
    except ValueError as error:
        raise OSError(str(error)) from None
    return [path]
