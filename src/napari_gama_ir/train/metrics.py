"""Image-quality metrics for validation and evaluation: PSNR and SSIM on (C, H, W) arrays."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_erosion
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

SSIM_WINDOW = 7  # scikit-image's default, Wang et al.'s 7 x 7 uniform window


def psnr(reference: np.ndarray, image: np.ndarray, data_range: float = 1.0, where: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB of ``image`` against ``reference`` (same shape), over the
    pixels ``where`` is True (no data left out) if given."""
    reference, image = np.asarray(reference, np.float64), np.asarray(image, np.float64)
    if where is not None:
        reference, image = reference[where], image[where]
    with np.errstate(divide="ignore"):  # equal images: infinite PSNR, not a warning
        return float(peak_signal_noise_ratio(reference, image, data_range=data_range))


def ssim(reference: np.ndarray, image: np.ndarray, data_range: float = 1.0, where: np.ndarray | None = None) -> float:
    """Structural similarity (Wang et al. 2004, 7x7 window) of (C, H, W) or (H, W) images.

    Channels are scored separately and averaged, as scikit-image does for colour images. With
    ``where``, the mean is over the pixels whose whole window lies where it is True
    (:func:`scored_pixels`); without, over those whose window lies inside the image, as
    scikit-image's own mean.
    """
    reference, image = np.asarray(reference, np.float64), np.asarray(image, np.float64)
    channel_axis = 0 if reference.ndim == 3 else None
    if where is None:
        return float(structural_similarity(reference, image, data_range=data_range, channel_axis=channel_axis))
    _, similarity = structural_similarity(reference, image, data_range=data_range, channel_axis=channel_axis, full=True)
    return float(similarity[scored_pixels(where)].mean())


def scored_pixels(where: np.ndarray) -> np.ndarray:
    """The pixels of ``where`` ((C, H, W) or (H, W), boolean) whose whole SSIM window lies in it."""
    window = np.ones((1,) * (where.ndim - 2) + (SSIM_WINDOW, SSIM_WINDOW), bool)
    return binary_erosion(where, structure=window, border_value=0)
