"""Axis strings such as "YX", "ZYXC" or "TCZYX" describing an array's dimensions."""

from __future__ import annotations


class AxesError(ValueError):
    """An axes string that does not describe the array."""


def parse_axes(axes: str, ndim: int) -> str:
    """Check ``axes`` against an array of ``ndim`` dimensions and return it upper-cased.

    One letter per dimension, each at most once; ``Y`` and ``X`` are required, ``C`` is the
    channel axis and any other letter (``T``, ``Z``, ``S``...) is iterated over.
    """
    normalized = axes.upper()
    if len(normalized) != ndim:
        raise AxesError(f"axes {axes!r} name {len(normalized)} dimensions but the image has {ndim}")
    if not normalized.isalpha() or len(set(normalized)) != len(normalized):
        raise AxesError(f"axes {axes!r} must be distinct letters, one per dimension")
    if "Y" not in normalized or "X" not in normalized:
        raise AxesError(f"axes {axes!r} must contain both Y and X")
    return normalized


def guess_axes(shape: tuple[int, ...], rgb: bool | None = None) -> str:
    """A plausible axes string for ``shape``, as napari would display it.

    A last axis of 3 or 4 is read as RGB(A) channels unless ``rgb`` says otherwise; up to two
    leading axes are guessed as ``Z`` then ``TZ``. Anything else must be given explicitly.
    """
    ndim = len(shape)
    if ndim < 2:
        raise AxesError(f"an image needs at least 2 dimensions, got shape {tuple(shape)}")
    channels_last = rgb if rgb is not None else (ndim >= 3 and shape[-1] in (3, 4))
    core = "YXC" if channels_last else "YX"
    leading = ndim - len(core)
    if leading > 2:
        raise AxesError(f"cannot guess the axes of a {ndim}-D image; pass them (e.g. 'TCZYX')")
    return "TZ"[2 - leading :] + core
