"""Image-quality metrics for validation and evaluation: PSNR and SSIM on (C, H, W) arrays."""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def psnr(reference: np.ndarray, image: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of ``image`` against ``reference`` (same shape)."""
    reference, image = np.asarray(reference, np.float64), np.asarray(image, np.float64)
    with np.errstate(divide="ignore"):  # equal images: infinite PSNR, not a warning
        return float(peak_signal_noise_ratio(reference, image, data_range=data_range))


def ssim(reference: np.ndarray, image: np.ndarray, data_range: float = 1.0) -> float:
    """Structural similarity (Wang et al. 2004, 7x7 window) of (C, H, W) or (H, W) images.

    Channels are scored separately and averaged, as scikit-image does for colour images.
    """
    reference, image = np.asarray(reference, np.float64), np.asarray(image, np.float64)
    channel_axis = 0 if reference.ndim == 3 else None
    return float(structural_similarity(reference, image, data_range=data_range, channel_axis=channel_axis))
