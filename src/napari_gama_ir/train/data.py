"""Training data: noisy/clean images read lazily, a validation split, and patches drawn on the fly.

Images stay where they are (numpy arrays such as napari layers, dask, zarr, TIFF, picture files):
a patch is cut out of its plane when a batch needs it, so memory does not grow with the number of
steps or patches, and planes already read are kept only up to a fixed budget. Intensities are
normalised per plane the way the engine normalises them at inference, so a trained network sees
the same input range in both.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from ..engine.arrays import as_dask
from ..engine.axes import guess_axes, parse_axes, plane_layout, to_canonical
from ..engine.io import ImageSource, folder_images, image_suffix, is_zarr_store, no_images_message, open_image
from ..engine.normalize import (
    Affine,
    check_normalization,
    check_pixels,
    dtype_range_affine,
    fill_no_data,
    percentile_affine,
)
from ..engine.restore import split_alpha
from .metrics import scored_pixels

LUMINANCE = (0.2125, 0.7154, 0.0721)  # ITU-R BT.709, as scikit-image's rgb2gray
# Planes the patch sampler keeps in memory once read (CBSD432 in RGB takes 0.2 GB).
PLANE_CACHE_BYTES = 2 << 30
# Training patches drawn in a row that may hold no data before the data are refused: a plane
# padded on a quarter of its patch positions refuses with a chance of 0.25**100.
NO_DATA_DRAWS = 100


class TrainingDataError(ValueError):
    """Training images that cannot be used as given (missing, mismatched, too small)."""


@dataclass
class ImagePair:
    """One image or stack: its noisy and/or clean version (same shape) and their axes; ``colour``
    as :attr:`napari_gama_ir.engine.io.ImageSource.colour` says of its files."""

    name: str
    axes: str
    noisy: da.Array | None
    clean: da.Array | None
    colour: bool | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.noisy if self.noisy is not None else self.clean).shape


@dataclass
class TrainingData:
    """Images to train on. Which of noisy and clean are present decides what training can do.

    - noisy and clean: supervised training (the paper's setting);
    - noisy only: self-supervised training (Noise2Void, Neighbor2Neighbor);
    - clean only: supervised training on synthetic noise added to each patch.

    Data opened from files travels to other processes (dask workers) as the way to open it again,
    since open files and stores do not; data from arrays travels as the arrays.
    """

    pairs: list[ImagePair]
    sources: dict[str, Any] = field(default_factory=dict)
    reopen: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.pairs:
            raise TrainingDataError("no training images")
        for pair in self.pairs:
            for version in ("noisy", "clean"):
                if getattr(pair, version) is not None:
                    check_pixels(getattr(pair, version), f"{pair.name} ({version})", TrainingDataError)
        kinds = {(p.noisy is not None, p.clean is not None) for p in self.pairs}
        if len(kinds) != 1 or (False, False) in kinds:
            raise TrainingDataError("every training image needs the same versions (noisy, clean or both)")
        examples = {self.channels_of(p): p.name for p in reversed(self.pairs)}  # the first image of each count
        if len(examples) != 1:
            found = ", ".join(f"{count} ({name})" for count, name in sorted(examples.items()))
            raise TrainingDataError(
                f"the images have different channel counts: {found}; convert colour images to grey (--grey)"
            )

    @property
    def has_noisy(self) -> bool:
        return self.pairs[0].noisy is not None

    @property
    def has_clean(self) -> bool:
        return self.pairs[0].clean is not None

    @staticmethod
    def channels_of(pair: ImagePair) -> int:
        return pair.shape[pair.axes.index("C")] if "C" in pair.axes else 1

    @property
    def channels(self) -> int:
        """Channels per pixel (the ``C`` axis, 1 without one)."""
        return self.channels_of(self.pairs[0])

    @property
    def colour(self) -> bool | None:
        """False where every image's channels are a microscope's, not colours (see :class:`ImagePair`)."""
        return False if all(pair.colour is False for pair in self.pairs) else None

    @property
    def dtype(self) -> np.dtype:
        first = self.pairs[0]
        return (first.noisy if first.noisy is not None else first.clean).dtype

    def to_grey(self) -> TrainingData:
        """The same images with RGB channels combined into luminance (see :func:`grey_pair`)."""
        if self.channels == 1:
            return self
        reopen = None if self.reopen is None else {**self.reopen, "grey": True}
        return TrainingData([grey_pair(p) for p in self.pairs], {**self.sources, "converted_to_grey": True}, reopen)

    def __reduce_ex__(self, protocol):
        if self.reopen is None:
            return super().__reduce_ex__(protocol)
        return _reopen_training_data, (self.reopen,)

    def describe(self) -> dict[str, Any]:
        """What the data was, for the checkpoint's record."""
        return {
            "sources": self.sources,
            "images": len(self.pairs),
            "shapes": sorted({str(tuple(p.shape)) for p in self.pairs})[:8],
            "axes": sorted({p.axes for p in self.pairs}),
            "dtype": str(self.dtype),
            "has_noisy": self.has_noisy,
            "has_clean": self.has_clean,
        }


def grey_pair(pair: ImagePair) -> ImagePair:
    """``pair`` with its RGB channels combined into luminance, lazily, in [0, 1] floats.

    Grey pairs are returned as they are, so that a mix of grey and colour images becomes all grey.
    """
    channels = TrainingData.channels_of(pair)
    if channels == 1:
        return pair
    if channels != 3:
        raise TrainingDataError(f"{pair.name}: only RGB (3-channel) images can be converted to grey, not {channels}")
    axis = pair.axes.index("C")
    shape = [3 if i == axis else 1 for i in range(len(pair.axes))]
    greys = []
    for array in (pair.noisy, pair.clean):
        if array is not None:
            # Scale integers to [0, 1] first: the float result is read as [0, 1] data.
            scale = dtype_range_affine(array.dtype).scale
            weights = np.array(LUMINANCE, np.float32).reshape(shape) / np.float32(scale)
            array = (array.astype(np.float32) * weights).sum(axis=axis)
        greys.append(array)
    return ImagePair(pair.name, pair.axes.replace("C", ""), *greys)


def _check_same_shape(name: str, noisy: da.Array | None, clean: da.Array | None) -> None:
    if noisy is not None and clean is not None and noisy.shape != clean.shape:
        raise TrainingDataError(
            f"{name}: noisy and clean images differ in shape: {tuple(noisy.shape)} vs {tuple(clean.shape)}"
        )


def data_from_arrays(
    noisy: Any = None, clean: Any = None, axes: str | None = None, name: str = "array", rgb: bool | None = None
) -> TrainingData:
    """Training data from arrays (numpy, dask, zarr, napari layer data), read lazily, never modified.

    Parameters
    ----------
    noisy, clean : array-like, optional
        The same image or stack, noisy and clean; at least one. Same shape when both are given.
    axes : str, optional
        One letter per dimension (``"YX"``, ``"ZYX"``, ``"YXC"``...); guessed when omitted.
    name : str
        Name used in messages and in the checkpoint's record.
    rgb : bool, optional
        Whether a last axis of 3 or 4 holds colours, when guessing the axes; False also says that
        a ``C`` axis holds a microscope's channels (:attr:`ImagePair.colour`), as a napari layer
        that is not RGB does.
    """
    arrays = [None if a is None else as_dask(a)[0] for a in (noisy, clean)]
    present = [a for a in arrays if a is not None]
    if not present:
        raise TrainingDataError("give noisy images, clean images, or both")
    _check_same_shape(name, *arrays)
    shape = present[0].shape
    axes = parse_axes(axes, len(shape)) if axes else guess_axes(shape, rgb=rgb)
    return TrainingData([ImagePair(name, axes, *arrays, colour=False if rgb is False else None)], {"source": name})


def data_from_paths(
    noisy: str | os.PathLike | None = None,
    clean: str | os.PathLike | None = None,
    axes: str | None = None,
    grey: bool = False,
) -> TrainingData:
    """Training data from two folders of images (matched by file name) or two image files/stores.

    Files and stores (zarr, TIFF, .npy, pictures) are opened lazily and never written. Axes are
    ``axes`` when given, else what each file says, else guessed. ``grey`` converts RGB images to
    grey (:func:`grey_pair`), so that a folder may mix grey and colour images.
    """
    given = [None if p is None else Path(p) for p in (noisy, clean)]
    present = [p for p in given if p is not None]
    if not present:
        raise TrainingDataError("give --noisy, --clean, or both")
    for path in present:
        if not path.exists():
            raise TrainingDataError(f"{path}: no such file or folder")
    folders = [p.is_dir() and not is_zarr_store(p) for p in present]
    if any(folders) != all(folders):
        raise TrainingDataError("noisy and clean must both be folders or both be images")
    if all(folders):
        pairs = _folder_pairs(given, axes)
    else:
        sources = [None if p is None else open_image(p) for p in given]
        pairs = [_file_pair(present[0].name, sources, axes)]
    sources = {"noisy": str(given[0]) if given[0] else None, "clean": str(given[1]) if given[1] else None}
    if grey and any(TrainingData.channels_of(p) != 1 for p in pairs):
        pairs = [grey_pair(p) for p in pairs]
        sources["converted_to_grey"] = True
    return TrainingData(pairs, sources, {"noisy": noisy, "clean": clean, "axes": axes, "grey": grey})


def _folder_pairs(folders: list[Path | None], axes: str | None) -> list[ImagePair]:
    """One pair per image of the given folders (noisy, clean), matched by :func:`_matched_names`."""
    listings = [None if p is None else folder_images(p) for p in folders]
    if not any(listings):
        raise TrainingDataError(no_images_message(next(p for p in folders if p is not None)))
    if all(entry is not None for entry in listings):
        matched = _matched_names(*listings)
    else:
        matched = [(name, name) for name in sorted(next(entry for entry in listings if entry is not None))]
    return [
        _file_pair(names[0], [None if entry is None else open_image(entry[name]) for entry, name in zip(listings, names)],
                   axes)
        for names in matched
    ]


def _matched_names(noisy: dict[str, Path], clean: dict[str, Path]) -> list[tuple[str, str]]:
    """The (noisy, clean) file names that go together: the same name, else the same name in another
    format, as a camera's ``IMG_0001.JPG`` beside the ``IMG_0001.png`` averaged from a burst (such
    pairs had "no counterpart"). Raises unless every image has one."""
    pairs = [(name, name) for name in sorted(noisy.keys() & clean.keys())]
    left = [_by_stem(noisy.keys() - clean.keys()), _by_stem(clean.keys() - noisy.keys())]
    pairs += [(left[0][stem], left[1][stem]) for stem in sorted(left[0].keys() & left[1].keys())]
    unmatched = sorted((noisy.keys() | clean.keys()) - {name for pair in pairs for name in pair})
    if unmatched:
        raise TrainingDataError(
            f"{len(unmatched)} image(s) have no counterpart of the same name (in any format) in the other "
            f"folder (e.g. {unmatched[0]})"
        )
    return sorted(pairs)


def _by_stem(names: set[str]) -> dict[str, str]:
    """``names`` by their name without its format's suffix, leaving out a name whose stem is not its own."""
    stems = [name[: len(name) - len(image_suffix(Path(name)))] for name in names]
    return {stem: name for stem, name in zip(stems, names) if stems.count(stem) == 1}


def _file_pair(name: str, sources: list[ImageSource | None], axes: str | None) -> ImagePair:
    """The pair of opened files (noisy, clean), with ``axes``, else the files', else guessed ones.

    An alpha channel is left out: opacity is not restored, so it is not trained on either.
    """
    arrays = [None if s is None else s.array for s in sources]
    _check_same_shape(name, *arrays)
    shape = next(a for a in arrays if a is not None).shape
    file_axes = next((s.axes for s in sources if s is not None and s.axes), None)
    axes = parse_axes(axes or file_axes, len(shape)) if axes or file_axes else guess_axes(shape)
    arrays = [
        split_alpha(s.array, axes)[0] if s is not None and s.alpha and axes.endswith("C") else a
        for s, a in zip(sources, arrays)
    ]
    colours = {s.colour for s in sources if s is not None}
    return ImagePair(name, axes, *arrays, colour=colours.pop() if len(colours) == 1 else None)


def _reopen_training_data(recipe: dict[str, Any]) -> TrainingData:
    return data_from_paths(recipe["noisy"], recipe["clean"], recipe["axes"], grey=recipe.get("grey", False))


# -- planes, normalisation and the validation split ---------------------------------------------
@dataclass
class Plane:
    """One (C, H, W) training plane: lazy noisy and clean versions and their normalisation."""

    source: str
    index: int
    noisy: da.Array | None
    clean: da.Array | None
    affine: Affine | None = None

    @property
    def input(self) -> da.Array:
        """What the network reads at inference: the noisy plane, or the clean one to add noise to."""
        return self.noisy if self.noisy is not None else self.clean

    @property
    def height(self) -> int:
        return self.input.shape[-2]

    @property
    def width(self) -> int:
        return self.input.shape[-1]


class Normalizer:
    """Maps raw intensities to network input exactly as the engine will at inference.

    The mapping is computed from the network's input (the noisy plane; the clean plane when noise
    is synthetic) and applied to noisy and clean alike, so the network learns clean intensities
    in the input's units: restored images come out in the units of the images they restore.
    Range normalisation divides by the input dtype's range; percentile normalisation maps the
    input's percentiles, per plane (``"image"``) or per stack (``"stack"``), to 0 and 1, computed
    once, on first use.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = check_normalization(spec)

    def affine(self, plane: Plane) -> Affine:
        if plane.affine is None:
            if self.spec["method"] == "range":
                plane.affine = dtype_range_affine(plane.input.dtype)
            else:
                values = np.asarray(plane.input.compute(scheduler="synchronous"))
                plane.affine = percentile_affine(values, self.spec["low"], self.spec["high"])
        return plane.affine

    def stack_affine(self, stack: da.Array) -> Affine:
        """Percentiles of a (N, C, H, W) stack, from up to 16 evenly spaced planes (as the engine)."""
        picks = np.unique(np.linspace(0, len(stack) - 1, min(len(stack), 16)).astype(int))
        return percentile_affine(stack[picks].compute(scheduler="synchronous"), self.spec["low"], self.spec["high"])


def make_planes(data: TrainingData, model_channels: int, normalizer: Normalizer) -> list[Plane]:
    """Cut the data into (C, H, W) planes for a ``model_channels``-channel network.

    A one-channel network trains on each channel of a multi-channel image as its own plane.
    Percentile normalisation with stack scope is resolved here, once per stack.
    """
    planes = []
    for pair in data.pairs:
        layout = plane_layout(pair.axes, pair.shape, model_channels)
        canonical = [None if a is None else to_canonical(a, layout) for a in (pair.noisy, pair.clean)]
        noisy, clean = [None if c is None else c.reshape((-1,) + c.shape[-3:]) for c in canonical]
        stack = noisy if noisy is not None else clean
        affine = normalizer.stack_affine(stack) if normalizer.spec.get("scope") == "stack" else None
        for index in range(stack.shape[0]):
            planes.append(Plane(
                pair.name, index, None if noisy is None else noisy[index], None if clean is None else clean[index], affine
            ))
    return planes


@dataclass(frozen=True)
class Region:
    """Rows ``top:bottom`` of plane ``plane`` (all columns)."""

    plane: int
    top: int
    bottom: int

    @property
    def rows(self) -> int:
        return self.bottom - self.top


def split_validation(planes: list[Plane], fraction: float, patch: int, seed: int) -> tuple[list[Region], list[Region]]:
    """Hold out whole planes (or, with one plane, a band of rows) for validation.

    Validation never shares pixels with training: with several planes a seeded choice of
    ``round(fraction * planes)`` planes (at least one) is held out; a single plane is cut into a
    top part for training and a bottom band of ``fraction`` of its rows for validation. Every
    training region must hold a ``patch`` x ``patch`` patch.
    """
    if not 0 <= fraction < 1:
        raise TrainingDataError(f"the validation fraction must be in [0, 1), got {fraction}")
    whole = [Region(i, 0, plane.height) for i, plane in enumerate(planes)]
    if fraction == 0:
        train, validation = whole, []
    elif len(planes) > 1:
        held = max(1, round(fraction * len(planes)))
        if held >= len(planes):
            raise TrainingDataError(f"a validation fraction of {fraction} leaves no plane for training")
        chosen = set(np.random.default_rng(seed).permutation(len(planes))[:held].tolist())
        train = [r for r in whole if r.plane not in chosen]
        validation = [r for r in whole if r.plane in chosen]
    else:
        height = planes[0].height
        band = max(math.ceil(fraction * height), 16)
        if height - band < patch:
            raise TrainingDataError(
                f"one {height}-row plane cannot hold both a {patch}-pixel training patch and a validation band; "
                "use a smaller patch, more images, or no validation (fraction 0)"
            )
        train, validation = [Region(0, 0, height - band)], [Region(0, height - band, height)]
    small = [r for r in train if r.rows < patch or planes[r.plane].width < patch]
    if small:
        plane = planes[small[0].plane]
        raise TrainingDataError(
            f"{len(small)} training plane(s) are smaller than the {patch}-pixel patch "
            f"(e.g. {plane.source} plane {plane.index}: {small[0].rows}x{plane.width})"
        )
    return train, validation


# -- patches ------------------------------------------------------------------------------------
def _augment(patch: np.ndarray, rotation: int, flip: bool) -> np.ndarray:
    patch = np.rot90(patch, rotation, axes=(-2, -1))
    return patch[..., ::-1] if flip else patch


class PatchSampler:
    """Random square patches with random flips and 90-degree rotations, cut when a batch is drawn.

    Patches are drawn uniformly over the training pixels (a large plane gives more patches than a
    small one). No patch is precomputed, and every batch is a function of the generator it is given
    only, which is what makes resumed training identical to an uninterrupted run.

    A plane read for a patch is kept in memory while the kept planes stay under ``cache_bytes``:
    a data set that fits is read from its files once, and cutting a patch is then a numpy slice
    instead of a dask computation (about 1.5 ms a patch, which starved a GPU). Planes past the
    budget are read lazily, patch by patch, so memory stays bounded for any data set.
    """

    def __init__(
        self, planes: list[Plane], regions: list[Region], patch: int, normalizer: Normalizer,
        cache_bytes: int = PLANE_CACHE_BYTES,
    ) -> None:
        if not regions:
            raise TrainingDataError("no training planes")
        self.planes, self.regions, self.patch, self.normalizer = planes, regions, patch, normalizer
        positions = np.array([(r.rows - patch + 1) * (planes[r.plane].width - patch + 1) for r in regions], float)
        self.weights = positions / positions.sum()
        self.cache_bytes = cache_bytes
        self._cache: dict[tuple[int, str], np.ndarray] = {}
        self._cached_bytes = 0
        self._cache_lock = threading.Lock()  # batches may be drawn by prefetching threads

    def _cut(self, plane_index: int, which: str, top: int, left: int) -> np.ndarray:
        plane = self.planes[plane_index]
        array = getattr(plane, which)
        window = (slice(None), slice(top, top + self.patch), slice(left, left + self.patch))
        whole = self._cache.get((plane_index, which))
        if whole is None and self._cached_bytes + array.nbytes <= self.cache_bytes:
            whole = np.asarray(array.compute(scheduler="synchronous"))  # read anyway
            with self._cache_lock:
                if (plane_index, which) not in self._cache:
                    self._cache[(plane_index, which)] = whole
                    self._cached_bytes += whole.nbytes
        raw = whole[window] if whole is not None else np.asarray(array[window].compute(scheduler="synchronous"))
        return self.normalizer.affine(plane).forward(raw)

    def batch(self, size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """``size`` patches as float32 (N, C, p, p): ``"noisy"`` and/or ``"clean"``, equally augmented."""
        drawn = [self._draw(int(region), rng) for region in rng.choice(len(self.regions), size=size, p=self.weights)]
        return {which: np.ascontiguousarray(np.stack([patches[which] for patches in drawn])) for which in drawn[0]}

    def _draw(self, region_index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """A patch of the region's plane, noisy and/or clean, augmented alike. One that holds no
        data (NaN or Inf, such as a registered pair's padding), which would make the loss NaN, is
        drawn again, anywhere, up to :data:`NO_DATA_DRAWS` times in a row."""
        for _ in range(NO_DATA_DRAWS):
            region = self.regions[region_index]
            plane = self.planes[region.plane]
            top = region.top + int(rng.integers(region.rows - self.patch + 1))
            left = int(rng.integers(plane.width - self.patch + 1))
            rotation, flip = int(rng.integers(4)), bool(rng.integers(2))
            patches = {
                which: self._cut(region.plane, which, top, left)
                for which in ("noisy", "clean") if getattr(plane, which) is not None
            }
            if all(np.isfinite(patch).all() for patch in patches.values()):
                return {which: _augment(patch, rotation, flip) for which, patch in patches.items()}
            region_index = int(rng.choice(len(self.regions), p=self.weights))
        raise TrainingDataError(
            f"{NO_DATA_DRAWS} training patches drawn in a row held NaN or Inf (no data), the last from "
            f"{plane.source} plane {plane.index}; crop the images to their data, or use a smaller patch"
        )


def validation_crops(
    planes: list[Plane], regions: list[Region], normalizer: Normalizer, size: int = 256, count: int = 16
) -> list[dict[str, np.ndarray]]:
    """Up to ``count`` fixed crops of at most ``size`` pixels a side from the validation regions.

    The crops tile each region from its top-left corner and are spread evenly over the regions;
    they are read once and kept, so every validation sees the same pixels. A crop that holds no
    data (NaN or Inf, such as a registered pair's padding) has it filled as the engine fills it
    (:func:`~..engine.normalize.fill_no_data`), and under ``"data"`` the mask of the pixels that
    hold data in every image, which its scores are limited to; a crop without one SSIM window of
    data is left out.
    """
    candidates = []
    for region in regions:
        plane = planes[region.plane]
        for top in range(region.top, region.bottom, size):
            for left in range(0, plane.width, size):
                candidates.append((plane, top, min(top + size, region.bottom), left, min(left + size, plane.width)))
    picks = np.unique(np.linspace(0, len(candidates) - 1, min(count, len(candidates))).astype(int)) if candidates else []
    crops = []
    for pick in picks:
        plane, top, bottom, left, right = candidates[pick]
        if min(bottom - top, right - left) < 16:
            continue  # too small for SSIM's window and the network's down-sampling
        crop = {}
        for which in ("noisy", "clean"):
            array = getattr(plane, which)
            if array is not None:
                raw = np.asarray(array[:, top:bottom, left:right].compute(scheduler="synchronous"))
                crop[which] = normalizer.affine(plane).forward(raw)
        data = np.logical_and.reduce([np.isfinite(values) for values in crop.values()])
        if not data.all():
            if not scored_pixels(data).any():
                continue
            crop = {which: fill_no_data(values) for which, values in crop.items()}
            crop["data"] = data
        crops.append(crop)
    return crops
