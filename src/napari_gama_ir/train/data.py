"""Training data: clean images, patches drawn on the fly, synthetic noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def load_image_folder(folder: str | Path, grey: bool = False) -> list[np.ndarray]:
    """Every image of a folder as float32 (C, H, W) arrays scaled to [0, 1]."""
    import imageio.v3 as iio

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"{folder}: no images found")
    images = []
    for path in paths:
        pixels = np.asarray(iio.imread(path))
        scale = np.float32(np.iinfo(pixels.dtype).max) if pixels.dtype.kind in "ui" else np.float32(1)
        image = pixels.astype(np.float32) / scale
        image = image[..., None] if image.ndim == 2 else image[..., :3]
        if grey and image.shape[-1] == 3:
            image = image @ np.array([0.2125, 0.7154, 0.0721], np.float32)[:, None]
        images.append(np.ascontiguousarray(image.transpose(2, 0, 1)))
    return images


class PatchSampler:
    """Random square patches with random flips and 90-degree rotations, drawn per batch.

    Nothing is precomputed: memory stays at the size of the images however many steps run.
    """

    def __init__(self, images: list[np.ndarray], patch: int, seed: int = 0) -> None:
        small = [i for i, image in enumerate(images) if min(image.shape[-2:]) < patch]
        if small:
            raise ValueError(f"{len(small)} image(s) are smaller than the {patch}-pixel patch")
        self.images, self.patch = images, patch
        self.rng = np.random.default_rng(seed)

    def batch(self, size: int) -> np.ndarray:
        patches = []
        for _ in range(size):
            image = self.images[self.rng.integers(len(self.images))]
            top = self.rng.integers(image.shape[-2] - self.patch + 1)
            left = self.rng.integers(image.shape[-1] - self.patch + 1)
            patch = image[:, top : top + self.patch, left : left + self.patch]
            patch = np.rot90(patch, self.rng.integers(4), axes=(1, 2))
            if self.rng.integers(2):
                patch = patch[:, :, ::-1]
            patches.append(patch)
        return np.ascontiguousarray(np.stack(patches))


class GaussianNoise:
    """Additive white Gaussian noise with a per-patch sigma drawn uniformly (blind denoising).

    Sigmas are on the 0-255 scale, as in the denoising literature; the noisy patch is not clipped.
    """

    def __init__(self, sigma_min: float = 0.0, sigma_max: float = 55.0, seed: int = 0) -> None:
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.rng = np.random.default_rng(seed)

    def __call__(self, clean: np.ndarray) -> np.ndarray:
        sigma = self.rng.uniform(self.sigma_min, self.sigma_max, size=(len(clean), 1, 1, 1)) / 255.0
        return (clean + self.rng.standard_normal(clean.shape) * sigma).astype(np.float32)
