"""What the network learns from: synthetic noise models and the training objectives.

Which objective fits which data (also in ``docs/training.md``):

- ``supervised``: noisy/clean pairs, or clean images with a synthetic noise model. The paper's
  setting (section 5) and the best results when clean targets exist. Loss L1 or PSNR (NAFNet).
- ``noise2void``: noisy images only, noise independent from pixel to pixel (shot and read noise
  of cameras). A stratified set of pixels is replaced by random neighbours and the loss is taken
  on those pixels only, so the network cannot copy its input (Krull et al., CVPR 2019).
- ``neighbor2neighbor``: noisy images only, same noise assumption; trains on pairs of
  sub-sampled neighbour images with a regulariser (Huang et al., CVPR 2021). Usually sharper than
  Noise2Void, at twice the cost per step.

Every random choice (noise, masks, sub-sampling cells) is drawn per image in ``Objective.inputs``
from a ``numpy.random.Generator``, so each training step is a function of (seed, step) alone, and
a data-parallel replica's share of a batch keeps the choices it would have had in the whole batch.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.io import missing_codecs, register_heif

OBJECTIVES = ("supervised", "noise2void", "neighbor2neighbor")
LOSSES = ("l1", "psnr")


# -- synthetic noise ----------------------------------------------------------------------------
@dataclass(frozen=True)
class NoiseModel:
    """Synthetic noise added to clean patches (on the network's [0, 1] intensity scale).

    ``kind`` is ``"gaussian"`` (white noise, sigma drawn per patch uniformly in ``sigma`` on the
    0-255 scale, as in the denoising literature; the noisy patch is not clipped),
    ``"poisson-gaussian"`` (photon noise with a peak of ``photons`` counts drawn log-uniformly per
    patch, plus Gaussian read noise with ``sigma``), or ``"mixed"`` (each patch takes one of the two
    at random).

    With ``quality`` (a range), each noisy patch is then saved as a camera or phone saves its
    photos: clipped to 8 bits (the [0, 1] range as 0-255), compressed with one of ``codecs`` (drawn
    per patch; keys of :data:`PHOTO_CODECS`, a JPEG at 4:2:0 by default) at a quality drawn
    uniformly in the range, and decoded. The compression smears the noise into blocks and colour
    blotches, which a network trained on white noise leaves
    (docs/models/gama_ir_xs-denoise-rgb-jpeg.md).
    """

    kind: str = "gaussian"
    sigma: tuple[float, float] = (0.0, 55.0)
    photons: tuple[float, float] = (5.0, 200.0)
    quality: tuple[int, int] | None = None
    codecs: tuple[str, ...] = ("jpeg",)

    KINDS = ("gaussian", "poisson-gaussian", "mixed")

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", tuple(float(s) for s in self.sigma))
        object.__setattr__(self, "photons", tuple(float(p) for p in self.photons))
        object.__setattr__(self, "codecs", tuple(self.codecs))
        if self.quality is not None:
            object.__setattr__(self, "quality", tuple(int(q) for q in self.quality))
            if not 1 <= self.quality[0] <= self.quality[1] <= 100:
                raise ValueError(f"qualities must satisfy 1 <= low <= high <= 100, got {self.quality}")
        unknown = [codec for codec in self.codecs if codec not in PHOTO_CODECS]
        if unknown or not self.codecs:
            raise ValueError(f"codecs must be some of {', '.join(PHOTO_CODECS)}, got {', '.join(unknown) or 'none'}")
        if self.kind not in self.KINDS:
            raise ValueError(f"noise must be one of {', '.join(self.KINDS)}, got {self.kind!r}")
        if not 0 <= self.sigma[0] <= self.sigma[1]:
            raise ValueError(f"noise sigma range must satisfy 0 <= low <= high, got {self.sigma}")
        if not 0 < self.photons[0] <= self.photons[1]:
            raise ValueError(f"photon range must satisfy 0 < low <= high, got {self.photons}")

    @classmethod
    def parse(cls, text: str) -> NoiseModel:
        """``"gaussian"``, ``"gaussian:0-55"``, ``"gaussian:25"`` (one level), ``"poisson-gaussian:5-200"``
        or ``"mixed"``, each optionally followed by ``"+CODEC:LOW-HIGH"`` (or one quality), where
        CODEC is one of :data:`PHOTO_CODECS` or several separated by commas, e.g.
        ``"gaussian:0-55+jpeg:60-95"`` or ``"gaussian:0-55+jpeg,webp,heif,avif:70-100"``."""
        noise, _, compression = text.partition("+")
        kind, _, levels = noise.partition(":")
        compressed = {}
        if compression:
            stage, _, qualities = compression.rpartition(":")  # codec names hold colons: jpeg-4:2:2
            codecs = tuple(stage.split(","))
            if not set(codecs) <= set(PHOTO_CODECS) or not qualities:
                raise ValueError(f"after the noise comes +CODEC:LOW-HIGH (qualities), e.g. +jpeg:60-95 or "
                                 f"+jpeg,webp:70-100, with codecs among {', '.join(PHOTO_CODECS)}; got {text!r}")
            compressed = {"codecs": codecs, "quality": _levels(qualities, "qualities", "+jpeg:60-95 or +jpeg:90", text)}
        if not levels:
            return cls(kind, **compressed)
        low, high = _levels(levels, "noise levels", "gaussian:0-55 or gaussian:25", text)
        if kind == "gaussian":
            return cls(kind, sigma=(low, high), **compressed)
        return cls(kind, photons=(low, high), **compressed)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "sigma": list(self.sigma), "photons": list(self.photons),
                "quality": None if self.quality is None else list(self.quality), "codecs": list(self.codecs)}

    def _gaussian(self, clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        sigma = rng.uniform(*self.sigma) / 255.0
        return clean + rng.standard_normal(clean.shape, np.float32) * np.float32(sigma)

    def _poisson_gaussian(self, clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        photons = math.exp(rng.uniform(math.log(self.photons[0]), math.log(self.photons[1])))
        counts = rng.poisson(np.clip(clean, 0, None) * photons).astype(np.float32) / np.float32(photons)
        return self._gaussian(counts, rng)

    def _compressed(self, noisy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``noisy`` (C, H, W) saved with a codec drawn in :attr:`codecs` at a quality drawn in
        :attr:`quality`, decoded."""
        codec = self.codecs[rng.integers(len(self.codecs))]
        quality = int(rng.integers(self.quality[0], self.quality[1] + 1))
        pixels = noisy.transpose(1, 2, 0) * 255
        decoded = saved_photo(pixels[..., 0] if len(noisy) == 1 else pixels, codec, quality)
        return (decoded.astype(np.float32) / np.float32(255)).reshape(pixels.shape).transpose(2, 0, 1)

    def __call__(self, clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Noisy versions of a (N, C, H, W) batch, each patch with its own noise level (and codec and quality)."""
        if self.quality is not None:
            check_codecs(self.codecs, clean.shape[1])
        out = np.empty_like(clean)
        for i, patch in enumerate(clean):
            kind = self.kind if self.kind != "mixed" else ("gaussian", "poisson-gaussian")[rng.integers(2)]
            out[i] = self._gaussian(patch, rng) if kind == "gaussian" else self._poisson_gaussian(patch, rng)
            if self.quality is not None:
                out[i] = self._compressed(out[i], rng)
        return out


#: Pillow's format and options for each codec a photo can be saved with: a JPEG at 4:2:0 (a
#: camera's), at 4:2:2 and at 4:4:4, a lossy WebP (always 4:2:0), and HEIF (an iPhone's HEIC,
#: through pillow-heif) and AVIF at 4:2:0 and at 4:4:4. Only the JPEGs take grey pictures.
PHOTO_CODECS = {
    "jpeg": ("JPEG", {"subsampling": "4:2:0"}),
    "jpeg-4:2:2": ("JPEG", {"subsampling": "4:2:2"}),
    "jpeg-4:4:4": ("JPEG", {"subsampling": "4:4:4"}),
    "webp": ("WEBP", {}),
    "heif": ("HEIF", {}),
    "heif-4:4:4": ("HEIF", {"chroma": 444}),
    "avif": ("AVIF", {}),
    "avif-4:4:4": ("AVIF", {"subsampling": "4:4:4"}),
}


def check_codecs(codecs: tuple[str, ...], channels: int) -> None:
    """Raise ValueError unless pictures of ``channels`` channels can be saved with every one of
    ``codecs`` here."""
    for codec in codecs:
        if (needs := missing_codecs().get(codec.split("-")[0])) is not None:
            raise ValueError(f"{codec} compression needs {needs}")
    takes_grey = all(codec.startswith("jpeg") for codec in codecs)
    if channels != 3 and not (channels == 1 and takes_grey):
        raise ValueError(f"{', '.join(codecs)} compression takes {'grey or RGB' if takes_grey else 'RGB'} "
                         f"images, not {channels} channel{'s' * (channels != 1)}")


def saved_photo(pixels: np.ndarray, codec: str = "jpeg", quality: int = 90) -> np.ndarray:
    """``pixels`` ((H, W) or (H, W, 3) on [0, 255]) as a camera or phone saves a photo: rounded and
    clipped to 8 bits, saved with ``codec`` (a key of :data:`PHOTO_CODECS`) at ``quality``, and
    decoded (uint8)."""
    from PIL import Image

    if codec.startswith("heif"):
        register_heif()
    form, options = PHOTO_CODECS[codec]
    encoded = io.BytesIO()
    Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).save(encoded, form, quality=quality, **options)
    with Image.open(encoded) as decoded:
        return np.asarray(decoded)


def _levels(text: str, what: str, example: str, whole: str) -> tuple[float, float]:
    """``"LOW-HIGH"`` or one ``"LEVEL"`` (a fixed one) of ``whole``, as two numbers."""
    try:
        values = [float(v) for v in text.split("-")]
        low, high = values if len(values) == 2 else values * 2
    except ValueError:
        raise ValueError(f"{what} must read LOW-HIGH or one LEVEL, e.g. {example}, got {whole!r}") from None
    return low, high


# -- losses -------------------------------------------------------------------------------------
def psnr_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative PSNR per image (data range 1), averaged: NAFNet's PSNR loss, in dB."""
    mse = ((output - target) ** 2).flatten(1).mean(1)
    return (10 / math.log(10)) * torch.log(mse + 1e-8).mean()


def pixel_loss(name: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if name == "l1":
        return F.l1_loss(output, target)
    if name == "psnr":
        return psnr_loss(output, target)
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")


# -- Noise2Void blind-spot masking --------------------------------------------------------------
def blind_spot_mask(
    noisy: np.ndarray, rng: np.random.Generator, cell: int = 8, radius: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Noise2Void's stratified masking: one pixel per ``cell`` x ``cell`` cell is replaced.

    Each chosen pixel takes the value of a random other pixel within ``radius`` (a 5x5
    neighbourhood by default, centre excluded), the same pixel in every channel.

    Returns
    -------
    masked : ndarray
        A copy of ``noisy`` (N, C, H, W) with the chosen pixels replaced.
    mask : ndarray of bool
        (N, 1, H, W), true at the replaced pixels: the loss is taken there only.
    """
    n, _, height, width = noisy.shape
    rows = np.arange(0, height, cell)
    cols = np.arange(0, width, cell)
    grid_r, grid_c = np.meshgrid(rows, cols, indexing="ij")
    count = grid_r.size
    batch = np.repeat(np.arange(n), count)
    r = np.minimum(np.tile(grid_r.ravel(), n) + rng.integers(cell, size=n * count), height - 1)
    c = np.minimum(np.tile(grid_c.ravel(), n) + rng.integers(cell, size=n * count), width - 1)
    # Offsets in the (2 radius + 1)^2 window without the centre.
    side = 2 * radius + 1
    pick = rng.integers(side * side - 1, size=n * count)
    pick += pick >= (side * side) // 2
    dr, dc = pick // side - radius, pick % side - radius
    # Reflect offsets that fall outside the patch back inside.
    src_r = np.where((r + dr < 0) | (r + dr >= height), r - dr, r + dr)
    src_c = np.where((c + dc < 0) | (c + dc >= width), c - dc, c + dc)
    masked = noisy.copy()
    masked[batch, :, r, c] = noisy[batch, :, src_r, src_c]
    mask = np.zeros((n, 1, height, width), bool)
    mask[batch, 0, r, c] = True
    return masked, mask


# -- Neighbor2Neighbor sub-sampling -------------------------------------------------------------
def neighbour_cells(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Neighbor2Neighbor's random choice for images of ``shape`` (N, C, H, W), H and W even.

    Returns (N, 2, H/2, W/2) int64: in every 2x2 cell (positions 0 1 / 2 3) the pixel of the first
    sub-image, and the one of the second, a horizontal or vertical neighbour of it (p^1 is in the
    same row, p^2 in the same column). Drawn per image, so a share of a batch keeps its choices.
    """
    n, _, h, w = shape
    first = rng.integers(4, size=(n, h // 2, w // 2))
    second = first ^ rng.integers(1, 3, size=(n, h // 2, w // 2))
    return np.stack([first, second], axis=1)


def neighbour_subsample(images: torch.Tensor, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair of sub-images (N, C, H/2, W/2) that ``cells`` (from :func:`neighbour_cells`) pick."""
    n, c, h, w = images.shape
    grouped = images.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    picks = cells.to(images.device)[:, :, None, :, :, None].expand(n, 2, c, h // 2, w // 2, 1)
    return grouped.gather(-1, picks[:, 0])[..., 0], grouped.gather(-1, picks[:, 1])[..., 0]


class Objective:
    """Turns a batch of patches into a loss for ``model``; see the module docstring."""

    def __init__(self, name: str, loss: str = "l1", noise: NoiseModel | None = None, regulariser: float = 2.0):
        if name not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {name!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.name, self.loss, self.noise, self.regulariser = name, loss, noise, regulariser

    @property
    def needs_clean(self) -> bool:
        return self.name == "supervised"

    def inputs(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The numpy arrays a step needs (synthetic noise and masks drawn here, from ``rng``)."""
        if self.name == "supervised":
            noisy = batch["noisy"] if "noisy" in batch else self.noise(batch["clean"], rng)
            return {"input": noisy, "target": batch["clean"]}
        if self.name == "noise2void":
            masked, mask = blind_spot_mask(batch["noisy"], rng)
            return {"input": masked, "target": batch["noisy"], "mask": mask}
        return {"input": batch["noisy"], "cells": neighbour_cells(batch["noisy"].shape, rng)}

    def __call__(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.name == "supervised":
            return pixel_loss(self.loss, model(tensors["input"]), tensors["target"])
        if self.name == "noise2void":
            mask = tensors["mask"].expand_as(tensors["target"])
            return ((model(tensors["input"]) - tensors["target"]) ** 2)[mask].mean()
        # Neighbor2Neighbor: f(g1(y)) should match g2(y); the regulariser compares the same
        # difference with the sub-sampled denoised full image (no gradient through it).
        noisy, cells = tensors["input"], tensors["cells"]
        first, second = neighbour_subsample(noisy, cells)
        with torch.no_grad():  # the same cells for the denoised image
            full_first, full_second = neighbour_subsample(model(noisy), cells)
        output = model(first)
        difference = output - second
        reconstruction = (difference**2).mean()
        regularisation = ((difference - (full_first - full_second)) ** 2).mean()
        return reconstruction + self.regulariser * regularisation

    def describe(self) -> dict[str, Any]:
        record: dict[str, Any] = {"objective": self.name}
        if self.name == "supervised":
            record["loss"] = self.loss
            record["noise"] = self.noise.to_dict() if self.noise else "pairs"
        if self.name == "neighbor2neighbor":
            record["regulariser"] = self.regulariser
        return record
