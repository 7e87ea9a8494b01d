"""Axis strings such as "YX", "ZYXC" or "TCZYX" describing an array's dimensions."""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da


class AxesError(ValueError):
    """An axes string that does not describe the array."""


class ChannelMismatchError(ValueError):
    """The image's channels do not fit the model's."""


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


@dataclass(frozen=True)
class PlaneLayout:
    """How an image's axes map onto the network's (C, Y, X) planes.

    ``order`` lists the axes in canonical order: the iterated axes as they come, then ``C`` when
    its channels are fed to the network together, then ``Y`` and ``X``. When ``C`` is not fed
    (a one-channel network on a multi-channel image) it is iterated like ``Z`` or ``T``.
    """

    axes: str
    order: str
    feed_channels: bool

    @property
    def iterated(self) -> str:
        return self.order[:-3] if self.feed_channels else self.order[:-2]


def plane_layout(axes: str, shape: tuple[int, ...], channels: int) -> PlaneLayout:
    """The layout that feeds an image with ``axes`` and ``shape`` to a ``channels``-channel network.

    Raises
    ------
    ChannelMismatchError
        When the image's ``C`` axis has another count than ``channels`` and the network is not a
        one-channel network (which would restore each channel on its own).
    """
    if "C" in axes:
        found = shape[axes.index("C")]
        if found == channels:
            feed = True
        elif channels == 1:
            feed = False
        else:
            raise ChannelMismatchError(f"the model expects {channels} channels but the image's C axis has {found}")
    elif channels == 1:
        feed = False
    else:
        raise ChannelMismatchError(f"the model expects {channels} channels but axes {axes!r} have no C axis")
    iterated = "".join(a for a in axes if a not in "YX" and (a != "C" or not feed))
    return PlaneLayout(axes, iterated + ("C" if feed else "") + "YX", feed)


def to_canonical(array: da.Array, layout: PlaneLayout) -> da.Array:
    """Transpose to ``(*iterated, C, Y, X)``, adding a length-1 ``C`` when channels are not fed."""
    canonical = array.transpose([layout.axes.index(a) for a in layout.order])
    return canonical if layout.feed_channels else canonical[..., None, :, :]


def from_canonical(array: da.Array, layout: PlaneLayout) -> da.Array:
    """The inverse of :func:`to_canonical`."""
    if not layout.feed_channels:
        array = array[..., 0, :, :]
    return array.transpose([layout.order.index(a) for a in layout.axes])
