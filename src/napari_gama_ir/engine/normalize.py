"""Intensity normalisation between raw pixel values and the network's input range."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: How a new network's normalisation is chosen for training (see ``train.default_normalization``).
NORMALIZATION_CHOICES = ("auto", "range", "percentile-image", "percentile-stack")


@dataclass(frozen=True)
class Affine:
    """``network = (raw - offset) / scale`` and back."""

    offset: float
    scale: float

    def forward(self, raw: np.ndarray) -> np.ndarray:
        """A new float32 array (computed in it: planes can be gigapixels)."""
        values = raw.astype(np.float32)
        values -= np.float32(self.offset)
        values /= np.float32(self.scale)
        return values

    def inverse(self, values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Back to raw units, into ``out`` if given (``values`` itself, to save the memory)."""
        out = np.multiply(values, np.float32(self.scale), out=out)
        out += np.float32(self.offset)
        return out


#: What the network is given for no data (NaN or infinite pixels, such as a registered stack's
#: padding), in its range: the low percentile, or the bottom of the dtype range. Of the fills tried
#: (README, "No data"), it restored the pixels beside no data best.
NO_DATA_FILL = 0.0


def fill_no_data(values: np.ndarray) -> np.ndarray:
    """``values`` (normalised, float32) with NaN and infinities set to :data:`NO_DATA_FILL`, in
    place: a single NaN would spread through GAMA's averages to the whole tile, and into a loss."""
    values[~np.isfinite(values)] = NO_DATA_FILL
    return values


def check_pixels(array: Any, what: str, error: type[ValueError] = ValueError) -> None:
    """Raise ``error`` unless ``array`` (anything with ``dtype`` and ``shape``) holds integer or
    real pixel values, and at least one of them: booleans, complex numbers, strings and empty
    arrays have no intensities to normalise."""
    dtype = np.dtype(array.dtype)
    if dtype == np.bool_ or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise error(f"{what} holds {dtype} values; images must hold integers or real numbers")
    if 0 in array.shape:
        raise error(f"{what} has no pixels (shape {tuple(array.shape)})")


def dtype_range_affine(dtype: np.dtype) -> Affine:
    """Integers map their full range to [0, 1]; floats are taken as already in [0, 1]."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return Affine(float(info.min), float(info.max) - float(info.min))
    return Affine(0.0, 1.0)


def percentile_affine(values: np.ndarray, low: float, high: float) -> Affine:
    """Map the ``low`` and ``high`` percentiles of ``values`` to 0 and 1 (CSBDeep's convention),
    of the finite ones: NaN and infinities are no data (the padding of a registered stack)."""
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        values = values[np.isfinite(values)]
        if values.size == 0:  # a plane of no data: nothing to scale
            return Affine(0.0, 1.0)
    lo, hi = np.percentile(values, [low, high])
    # A flat image has no spread to normalise; keep it as is rather than dividing by zero.
    return Affine(float(lo), float(hi - lo) if hi > lo else 1.0)


def check_normalization(spec: dict[str, Any]) -> dict[str, Any]:
    """Validate a normalisation spec (see :class:`~napari_gama_ir.model.GamaIRConfig`)."""
    method = spec.get("method")
    if method == "range":
        return {"method": "range"}
    if method == "percentile":
        full = {"low": 1.0, "high": 99.8, "scope": "image", **spec}
        if not 0 <= full["low"] < full["high"] <= 100:
            raise ValueError("percentile normalisation needs 0 <= low < high <= 100")
        if full["scope"] not in ("image", "stack"):
            raise ValueError("percentile normalisation scope must be 'image' or 'stack'")
        return full
    raise ValueError(f"unknown normalisation method {method!r}; use 'range' or 'percentile'")
