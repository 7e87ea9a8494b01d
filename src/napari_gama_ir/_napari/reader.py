"""Opens in napari the photos that napari's own readers refuse: an iPhone's HEIC, HEIF and AVIF."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..engine.io import DECODED_PHOTO_SUFFIXES, image_suffix, open_image


def get_photo_reader(path: str | os.PathLike | list) -> Callable[[str], list[tuple]] | None:
    """npe2 reader hook: :func:`read_photo` for one HEIC, HEIF or AVIF file, else None (a stack of
    several photos is no image napari could show as one)."""
    paths = path if isinstance(path, list) else [path]
    if len(paths) != 1 or image_suffix(Path(paths[0])) not in DECODED_PHOTO_SUFFIXES:
        return None
    return read_photo


def read_photo(path: str | os.PathLike | list) -> list[tuple]:
    """The photo at ``path`` as one image layer: upright, as its EXIF orientation says, in the
    colours it shows, RGB where it has colours. A missing decoder (pillow-heif, for HEIC) or an
    unreadable file raises :class:`~napari_gama_ir.engine.io.ImageIOError` in one line, which
    napari shows."""
    path = Path(path[0] if isinstance(path, list) else path)
    source = open_image(path)
    pixels = source.array.compute()
    rgb = pixels.ndim == 3 and pixels.shape[-1] in (3, 4)
    return [(pixels, {"name": path.stem, "rgb": rgb}, "image")]
