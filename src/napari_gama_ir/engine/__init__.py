"""Restoration engine: tiling, blending, normalisation, devices and lazy I/O."""

from .axes import AxesError, ChannelMismatchError, guess_axes, parse_axes
from .restore import restore, restore_plane
from .runner import ModelRunner, TileTooLargeError

__all__ = [
    "AxesError",
    "ChannelMismatchError",
    "ModelRunner",
    "TileTooLargeError",
    "guess_axes",
    "parse_axes",
    "restore",
    "restore_plane",
]
