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


def noisy_fluorescence_stack(
    planes: int = 24, size: int = 256, photons: float = 30.0, read_noise: float = 3.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A fluorescence-like Z-Y-X stack of blurred blobs with Poisson-Gaussian camera noise.

    ``photons`` is the expected photon count at the brightest structures; ``read_noise`` the
    camera's Gaussian read noise in counts. Returns ``(noisy, clean)``: noisy uint16 counts with an
    offset of 100, and the clean expected counts (float32, same offset) for measuring a restoration.
    """
    from scipy.ndimage import gaussian_filter, zoom
    from skimage.data import binary_blobs

    # Blobs on a coarse 3-D grid, enlarged in Y and X: a fraction of the cost of full-size blobs.
    coarse = size // 4
    blobs = binary_blobs(length=coarse, n_dim=3, volume_fraction=0.15, blob_size_fraction=0.1, rng=seed)
    blobs = blobs[np.arange(planes) * coarse // max(planes, 1)]
    structure = gaussian_filter(zoom(blobs.astype(np.float32), (1, 4, 4), order=1), sigma=(0.7, 2.0, 2.0))
    expected = photons * structure / max(float(structure.max()), 1e-6) + 2.0  # background 2 photons
    rng = np.random.default_rng(seed)
    counts = rng.poisson(expected) + rng.normal(0, read_noise, expected.shape) + 100.0
    noisy = np.clip(np.rint(counts), 0, 65535).astype(np.uint16)
    return noisy, (expected + 100.0).astype(np.float32)
