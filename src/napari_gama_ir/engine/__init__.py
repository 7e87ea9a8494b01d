"""Restoration engine: tiling, blending, normalisation, devices and lazy I/O."""

from .axes import AxesError, ChannelMismatchError, guess_axes, parse_axes
from .restore import NonFiniteInputError, restore, restore_plane
from .runner import ModelRunner, TileTooLargeError

__all__ = [
    "AxesError",
    "ChannelMismatchError",
    "ModelRunner",
    "NonFiniteInputError",
    "TileTooLargeError",
    "guess_axes",
    "parse_axes",
    "restore",
    "restore_plane",
]
