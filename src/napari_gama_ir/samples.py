"""Small noisy sample images built from scikit-image's bundled pictures (no download, seeded)."""

from __future__ import annotations

import numpy as np


def noisy_rgb_photos(sigma: float = 25.0, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three RGB photos (astronaut, coffee, chelsea), ``size`` x ``size`` crops, as a Z-Y-X-C stack.

    Returns ``(noisy, clean)`` as uint8 arrays; the noise is white Gaussian with ``sigma`` on the
    0-255 scale, clipped to the uint8 range as a camera would.
    """
    from skimage import data

    clean = np.stack([image[:size, :size] for image in (data.astronaut(), data.coffee(), data.chelsea())])
    rng = np.random.default_rng(seed)
    noisy = np.clip(clean + rng.normal(0, sigma, clean.shape), 0, 255).astype(np.uint8)
    return noisy, clean
