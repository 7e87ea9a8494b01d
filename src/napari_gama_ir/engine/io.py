"""Reading images lazily and writing results atomically, chunk by chunk.

Readers never open the input for writing and never load a large file whole: zarr and TIFF are
read through zarr stores, ``.npy`` is memory-mapped. Writers stream chunks into a temporary path
next to the output and rename it into place only when every chunk is written, so a failed or
cancelled run never leaves an output that looks complete.
"""

from __future__ import annotations

import errno
import functools
import glob
import importlib.util
import json
import math
import os
import shutil
import socket
import struct
import threading
import time
import warnings
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
from dask.base import tokenize
from numcodecs import Blosc

from .arrays import as_dask
from .axes import AxesError, parse_axes
from .calibration import ATTRIBUTE as PIXEL_SIZE_ATTRIBUTE
from .calibration import (
    PixelSizes,
    from_attribute,
    from_ome_multiscale,
    from_tiff,
    imagej_calibration,
    ome_tiff_metadata,
    tiff_resolution,
)

ZARR_SUFFIXES = (".zarr", ".ome.zarr")
TIFF_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff")
#: TIFFs under their makers' names, read as TIFFs (tifffile knows each layout): Zeiss LSM,
#: MetaMorph STK, slide scanners' SVS (Aperio), NDPI (Hamamatsu), SCN (Leica) and QPTIFF (Akoya),
#: and BigTIFF's own suffixes.
TIFF_BASED_SUFFIXES = (".lsm", ".stk", ".svs", ".ndpi", ".scn", ".qptiff", ".btf", ".tf8", ".tf2")
#: Photos read where their decoder is installed (:func:`missing_decoders`): HEIF, an iPhone's
#: HEIC photos, and AVIF. A folder restore writes them as JPEG.
DECODED_PHOTO_SUFFIXES = (".heic", ".heif", ".avif")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp") + DECODED_PHOTO_SUFFIXES
#: How much of a HEIF or AVIF file to search for its decoder's settings, which come before the pixels.
CODED_HEADER_BYTES = 1 << 20
NUMPY_SUFFIXES = (".npy",)
READABLE = ZARR_SUFFIXES + TIFF_SUFFIXES + TIFF_BASED_SUFFIXES + PICTURE_SUFFIXES + NUMPY_SUFFIXES
_CONVERT_TO_OME_TIFF = (
    "convert it to OME-TIFF (Fiji's Bio-Formats or bfconvert), or open it in napari with its reader plugin "
    "and restore the layer"
)
_EXPORT_PICTURE = "export it as PNG, JPEG or TIFF, then restore that"
#: Formats that are not read, with what to do instead. Camera raw files hold the sensor's mosaic,
#: not the developed colours the models were trained on.
NOT_READ = {
    ".gif": f"a GIF (256 colours) is not read; restore the original picture, or {_EXPORT_PICTURE}",
    **dict.fromkeys(
        (".dng", ".cr2", ".cr3", ".nef", ".nrw", ".arw", ".raf", ".orf", ".rw2", ".pef", ".srw"),
        "a camera raw file is not read; develop it, and export a 16-bit TIFF from the raw converter",
    ),
    **dict.fromkeys(
        (".czi", ".nd2", ".lif", ".lof", ".oib", ".oif", ".ims", ".vsi", ".sld", ".dv", ".ics", ".mrc"),
        f"this microscope format is not read; {_CONVERT_TO_OME_TIFF}",
    ),
}


@functools.cache
def missing_codecs() -> dict[str, str]:
    """The photo codecs ("heif", "avif") that Pillow cannot decode or save here, with what installs
    them: HEIF needs pillow-heif (the ``heic`` extra: its wheels hold the GPL's x265, so it is not a
    dependency), AVIF a Pillow of 11.3 or later."""
    from PIL import features

    missing = {}
    if importlib.util.find_spec("pillow_heif") is None:
        missing["heif"] = "pillow-heif: pip install 'napari-gama-ir[heic]'"
    if "avif" not in features.modules or not features.check_module("avif"):
        missing["avif"] = "Pillow 11.3 or later: pip install -U pillow"
    return missing


def missing_decoders() -> dict[str, str]:
    """The formats of :data:`DECODED_PHOTO_SUFFIXES` whose decoder is not installed, with what to do."""
    missing = {}
    for suffixes, codec, photo in (((".heic", ".heif"), "heif", "a HEIF photo"), ((".avif",), "avif", "an AVIF photo")):
        if codec in missing_codecs():
            missing.update(dict.fromkeys(suffixes, f"{photo} needs {missing_codecs()[codec]}, or {_EXPORT_PICTURE}"))
    return missing


@functools.cache
def register_heif() -> None:
    """Have Pillow open and save HEIF (an iPhone's HEIC) as its own formats, through pillow-heif
    (once a process)."""
    import pillow_heif

    pillow_heif.register_heif_opener()


def not_read_advice(suffix: str) -> str | None:
    """Why images of ``suffix`` are not read, and what to do instead; None where they are."""
    return NOT_READ.get(suffix) or missing_decoders().get(suffix)


WRITABLE = (".zarr", ".ome.zarr", ".tif", ".tiff", ".ome.tif", ".ome.tiff", ".png", ".jpg", ".jpeg", ".heic", ".heif",
            ".avif", ".npy")
#: Picture outputs -> (their name, the channel counts and the dtypes they hold).
PICTURE_OUTPUTS = {
    ".png": ("PNG", (2, 3, 4), (np.dtype(np.uint8), np.dtype(np.uint16))),
    **dict.fromkeys((".jpg", ".jpeg"), ("JPEG", (3,), (np.dtype(np.uint8),))),
    **dict.fromkeys((".heic", ".heif"), ("HEIF", (3, 4), (np.dtype(np.uint8),))),
    ".avif": ("AVIF", (3, 4), (np.dtype(np.uint8),)),
}
#: The EXIF tag of a picture's orientation; its sub-IFD of photo tags, with the width and height of its pixels.
ORIENTATION_TAG, EXIF_IFD_TAG, PIXEL_WIDTH_TAG, PIXEL_HEIGHT_TAG = 274, 0x8769, 0xA002, 0xA003
#: The orientations whose pixels are turned a quarter (or transposed) to be upright.
QUARTER_TURNS = (5, 6, 7, 8)
# A picture's EXIF orientation -> its stored pixels turned as viewers show them. Done here:
# imageio 2.31's own rotation turned them the wrong way.
UPRIGHT = {
    2: lambda pixels: pixels[:, ::-1],
    3: lambda pixels: pixels[::-1, ::-1],
    4: lambda pixels: pixels[::-1],
    5: lambda pixels: pixels.swapaxes(0, 1),
    6: lambda pixels: np.rot90(pixels, -1),
    7: lambda pixels: pixels[::-1, ::-1].swapaxes(0, 1),
    8: lambda pixels: np.rot90(pixels),
}
# Pictures whose pixels are not colours as shown -> the mode they are read in. A CMYK JPEG's four
# channels were taken for RGB and alpha (colours inverted, the black ink as opacity); a 1-bit scan
# was refused as a bool image.
PICTURE_MODES = {"CMYK": "RGB", "1": "L"}
#: zlib level of PNG outputs. Pillow's default, 6, took 101 ms to write a restored 512 x 512 RGB
#: photo (346 kB), half the shipped CPU model's time to restore it; level 3 took 26 ms (394 kB), and
#: a folder of 20 such photos took 6.7-7.5 s to restore instead of 8.3-8.7 s (docs/engine.md).
PNG_COMPRESS_LEVEL = 3
#: Encoder options of the lossy picture outputs. Re-encoded so, the Kodak24 photos kept (PSNR, mean
#: size; PNG: 434 kB): as JPEGs of quality 95 with full-resolution colours (4:4:4), 42.1 dB at 133 kB
#: (40.4 dB with Pillow's default 4:2:0); as HEIFs of quality 90, 43.5 dB at 181 kB, at 4:2:0 as
#: phones write them (4:4:4 took 48.7 dB at 195 kB, but needs a decoder of HEVC's range extensions);
#: as AVIFs of quality 95 at 4:4:4, 44.6 dB at 122 kB (quality 90 at 4:2:0, 41.2 dB at 80 kB).
LOSSY_OPTIONS = {
    "JPEG": {"quality": 95, "subsampling": 0},
    "HEIF": {"quality": 90},
    "AVIF": {"quality": 95, "subsampling": "4:4:4"},
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OME_TIFF_SUFFIXES = (".ome.tif", ".ome.tiff")
#: Outputs that hold the pixels as they are, so that their size is known before they are written.
UNCOMPRESSED_SUFFIXES = TIFF_SUFFIXES + NUMPY_SUFFIXES
IMAGEJ_ORDER = "TZCYXS"
#: What ImageJ's metadata says of how an image is shown: kept from an ImageJ input in an ImageJ output.
IMAGEJ_DISPLAY = ("LUTs", "mode", "Ranges")
IMAGEJ_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))
CLASSIC_TIFF_BYTES = 2**32 - 2**26  # pixels that leave room for the page entries below 4 GiB
OME_AXIS_TYPES = {"T": "time", "C": "channel", "Z": "space", "Y": "space", "X": "space"}
#: Key of the channels' names (DAPI, GFP...) in outputs' attributes; OME outputs also name them as OME does.
CHANNELS_ATTRIBUTE = "channel_names"
#: An OME-Zarr or OME-TIFF output gets lower-resolution levels until a plane's larger side is at most this.
PYRAMID_SIDE = 2048
#: The TIFF tile side of an OME-TIFF's lower resolutions (and of their scratch zarr's chunks).
PYRAMID_TILE = 512


class ImageIOError(ValueError):
    """A file that cannot be read or written as asked."""


class OutputExistsError(ImageIOError):
    """An output that exists already, where replacing it was not asked for."""


class Cancelled(Exception):
    """Raised inside a write when its cancel event is set."""


@dataclass
class ImageSource:
    """A lazily opened image: the array, its axes when the file says them, and file metadata.

    ``alpha`` says that the last channel of the ``C`` axis is opacity (RGBA or grey and alpha
    pictures, TIFFs whose extra sample is alpha); ``pixel_size`` gives the physical size of a
    pixel along the axes the file calibrates (see :mod:`.calibration`). ``icc_profile`` is the
    colour profile of a picture or TIFF (a phone's photo is in Display P3, not sRGB), ``exif`` a
    picture's EXIF block with its orientation made upright, as the pixels are: outputs that can
    hold them keep them (:func:`write_image_steps`). ``colour`` says whether the image is a photo,
    whose ``C`` axis (if any) holds colours (True: a picture, grey ones too, or an RGB TIFF), or one
    whose channels the file names as such (False: a microscope's, in an ImageJ, OME-TIFF or
    OME-Zarr image), and is None where the file does not say.
    ``levels`` are an OME-Zarr's lower resolutions, in ``array``'s axes, for a viewer to show.
    ``channel_names`` name the channels of the ``C`` axis (an OME image's, or this package's
    outputs'), which outputs keep under :data:`CHANNELS_ATTRIBUTE`. ``imagej_display`` is how an
    ImageJ image is shown: its channels' colours (``LUTs``), ``mode`` (composite) and display
    ``Ranges``, which an ImageJ output keeps (:func:`write_image_steps`).
    """

    array: da.Array
    axes: str | None
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)
    alpha: bool = False
    pixel_size: PixelSizes = field(default_factory=dict)
    icc_profile: bytes | None = None
    exif: bytes | None = None
    colour: bool | None = None
    levels: list[da.Array] = field(default_factory=list)
    imagej_display: dict[str, Any] = field(default_factory=dict)
    channel_names: list[str] = field(default_factory=list)


def image_suffix(path: Path) -> str:
    """The format suffix of ``path``, compound ones whole (``.ome.tif``), lower-case."""
    name = path.name.lower()
    for suffix in sorted(READABLE + WRITABLE, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _axes_from_names(names: list[str]) -> str | None:
    letters = "".join(str(n)[:1].upper() for n in names)
    return letters if len(set(letters)) == len(letters) else None


def _open_zarr(path: Path) -> ImageSource:
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as error:  # zarr raises several types for a folder that is not a store
        raise ImageIOError(f"{path}: not a readable zarr store ({error})") from None
    if isinstance(node, zarr.Array):
        axes = node.attrs.get("axes")
        axes = axes if isinstance(axes, str) else None
        pixel_size = from_attribute(node.attrs.get(PIXEL_SIZE_ATTRIBUTE), axes)
        return ImageSource(_zarr_pixels(node, path), axes, path, dict(node.attrs), pixel_size=pixel_size,
                           channel_names=_names(node.attrs.get(CHANNELS_ATTRIBUTE)))
    attrs = dict(node.attrs)
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if multiscales:  # OME-Zarr: the first (full-resolution) dataset of the first multiscale
        first = multiscales[0]
        names = [a["name"] if isinstance(a, dict) else a for a in first.get("axes", [])]
        array, *lower = (node[dataset["path"]] for dataset in first["datasets"])
        axes = _axes_from_names(names) if names else None
        pixel_size = from_ome_multiscale(first, axes if axes and len(axes) == array.ndim else None)
        colour = False if axes and "C" in axes else None  # OME-Zarr's channel axis: a microscope's channels
        omero = attrs.get("omero") or attrs.get("ome", {}).get("omero") or {}
        labels = [channel.get("label") for channel in omero.get("channels", []) if isinstance(channel, dict)]
        return ImageSource(_zarr_pixels(array, path), axes, path, attrs, pixel_size=pixel_size, colour=colour,
                           levels=[_zarr_pixels(level, path) for level in lower], channel_names=_names(labels))
    arrays = [name for name, item in node.members() if isinstance(item, zarr.Array)]
    if len(arrays) != 1:
        raise ImageIOError(f"{path}: zarr group with {len(arrays)} arrays and no OME-Zarr metadata; open one array")
    return _open_zarr(path / arrays[0])


def _names(names: Any) -> list[str]:
    """``names`` if they are a list of strings, every channel named, else none."""
    ok = isinstance(names, list) and names and all(isinstance(name, str) and name for name in names)
    return list(names) if ok else []


def _ome_channel_names(xml: str) -> list[str]:
    """The channels' names of an OME-TIFF's first image, where every channel has one."""
    import tifffile

    try:
        images = tifffile.xml2dict(xml)["OME"]["Image"]
        channels = (images[0] if isinstance(images, list) else images)["Pixels"].get("Channel", [])
    except (KeyError, IndexError, TypeError, ValueError):
        return []
    channels = channels if isinstance(channels, list) else [channels]
    return _names([channel.get("Name") for channel in channels if isinstance(channel, dict)])


def _channels_of(attrs: dict[str, Any], axes: str, shape: tuple[int, ...]) -> list[str]:
    """The channel names of ``attrs`` where they name every channel of an image of ``axes`` and ``shape``."""
    names = _names(attrs.get(CHANNELS_ATTRIBUTE))
    return names if "C" in axes and len(names) == shape[axes.index("C")] else []


def _zarr_pixels(array: zarr.Array, path: Path) -> da.Array:
    """``array`` as ``dask.array.from_zarr`` gives it, but with a corrupt chunk named in one line."""
    return da.from_array(_NamedReadErrors(array, path), chunks=array.chunks, name=f"from-zarr-{tokenize(array)}")


def _read(pixels: Any, key: Any, path: Path) -> np.ndarray:
    """``pixels[key]``; a corrupt chunk or strip, which stopped the run with a traceback from its
    decoder (numcodecs and imagecodecs raise RuntimeErrors), raises :class:`ImageIOError` instead."""
    try:
        return np.asarray(pixels[key])
    except (RuntimeError, ValueError, zlib.error) as error:
        raise ImageIOError(f"{path}: its pixels cannot be read ({error})") from None


class _NamedReadErrors:
    """A zarr array that dask reads through :func:`_read`."""

    def __init__(self, array: zarr.Array, path: Path) -> None:
        self.array, self.path = array, path
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, key: Any) -> np.ndarray:
        return _read(self.array, key, self.path)


class _ReopenableFile:
    """A TIFF's or ``.npy`` file's pixels as an array that dask slices lazily, and that travels to
    other processes (dask workers) as its path: an open TIFF store holds a lock, which cannot
    travel, and a memory map would travel as all of its bytes.

    TIFFs are read through tifffile's zarr store (the full resolution of the first series),
    ``.npy`` files through a read-only memory map.
    """

    def __init__(self, path: Path, kind: str) -> None:
        self.path, self.kind = path, kind
        self._lock = threading.Lock()
        self._pixels = None
        pixels = self._opened()
        self.shape, self.dtype, self.ndim = pixels.shape, pixels.dtype, pixels.ndim
        self.chunks = getattr(pixels, "chunks", None)  # the TIFF store's: strips or tiles

    def _opened(self):
        with self._lock:
            if self._pixels is None:
                if self.kind == "npy":
                    self._pixels = np.load(self.path, mmap_mode="r", allow_pickle=False)
                else:
                    import tifffile

                    store = tifffile.imread(self.path, aszarr=True, series=0, level=0)  # a pyramid's full resolution
                    self._pixels = zarr.open(store, mode="r")
            return self._pixels

    def __getitem__(self, key) -> np.ndarray:
        return _read(self._opened(), key, self.path)

    def __reduce__(self):
        return _ReopenableFile, (self.path, self.kind)

    def __dask_tokenize__(self):
        stat = self.path.stat()
        return str(self.path.resolve()), self.kind, stat.st_mtime_ns, stat.st_size


def _open_picture(path: Path) -> ImageSource:
    """A PNG, JPEG, BMP, WebP, HEIF or AVIF picture, read whole, upright, in the colours it shows."""
    import imageio.v3 as iio

    if image_suffix(path) in (".heic", ".heif"):
        register_heif()
    try:
        with _pictures_of_any_size():
            meta = iio.immeta(path, plugin="pillow", exclude_applied=False)
            mode = PICTURE_MODES.get(meta.get("mode"))
            if _is_deep_colour_png(path):
                import imagecodecs

                array = imagecodecs.png_decode(path.read_bytes())
            else:
                array = np.asarray(iio.imread(path, plugin="pillow", mode=mode))
    except Exception as error:  # imageio raises plugin-specific errors
        reason = str(error).partition("\n")[0]  # some explain over several lines
        raise ImageIOError(f"{path}: not a readable picture ({reason})") from None
    orientation = meta.get("Orientation", 1)
    if orientation in UPRIGHT:
        # As viewers show it: a phone's portrait photo is stored sideways, with an EXIF
        # orientation tag, which the restored PNG cannot carry (it came out sideways).
        array = np.ascontiguousarray(UPRIGHT[orientation](array))
    # A picture's third axis is its colours (grey + alpha too), never a stack.
    axes = {2: "YX", 3: "YXC"}.get(array.ndim)
    alpha = axes == "YXC" and array.shape[-1] in (2, 4)
    # A CMYK profile does not describe the RGB the pixels were converted to.
    icc_profile = None if mode else meta.get("icc_profile")
    # pillow-heif turns a HEIF photo upright itself, and keeps how it was turned apart.
    turned = meta.get("original_orientation", orientation)
    return ImageSource(as_dask(array)[0], axes, path, alpha=alpha, icc_profile=icc_profile,
                       exif=_upright_exif(meta.get("exif"), turned), colour=True)


@contextmanager
def _pictures_of_any_size() -> Iterator[None]:
    """Lift Pillow's limit of 179 million pixels a picture, a guard against decompression bombs in
    uploads that a server opens; here the user opens their own (a stitched scan would not open:
    "An unknown error occurred while initializing plugin `pillow`")."""
    from PIL import Image

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _is_deep_colour_png(path: Path) -> bool:
    """Whether ``path`` is a PNG of 16-bit colours (with or without alpha), which Pillow reads as
    8-bit ones without a word (imagecodecs reads them whole)."""
    with open(path, "rb") as file:
        header = file.read(26)  # the signature, then the IHDR chunk up to its colour type
    return header[:8] == PNG_SIGNATURE and header[24] == 16 and header[25] != 0


def _png_with_chunks(encoded: bytes, icc_profile: bytes | None, exif: bytes | None) -> bytes:
    """``encoded`` (a PNG) with the colour profile and EXIF chunks that Pillow would have written."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    extra = b""
    if icc_profile:  # a profile name, its end, and the compression method (0: zlib)
        extra += chunk(b"iCCP", b"ICC profile\0\0" + zlib.compress(icc_profile))
    if exif:  # a PNG's eXIf chunk holds the TIFF structure without JPEG's "Exif" prefix
        extra += chunk(b"eXIf", exif.removeprefix(b"Exif\0\0"))
    header_end = len(PNG_SIGNATURE) + 25  # IHDR, always first: length, type, 13 bytes, CRC
    return encoded[:header_end] + extra + encoded[header_end:]


def _upright_exif(exif: bytes | None, orientation: int) -> bytes | None:
    """A picture's EXIF block (camera, date taken...) with its orientation 1, since the pixels are
    turned upright when read (a restored photo kept its tag 6 and was shown turned twice), and,
    where they were turned a quarter, its pixel width and height swapped as the pixels' are."""
    if not exif:
        return None
    from PIL import Image

    tags = Image.Exif()
    tags.load(exif)
    if ORIENTATION_TAG in tags:
        tags[ORIENTATION_TAG] = 1
    photo = tags.get_ifd(EXIF_IFD_TAG)
    if orientation in QUARTER_TURNS and PIXEL_WIDTH_TAG in photo and PIXEL_HEIGHT_TAG in photo:
        photo[PIXEL_WIDTH_TAG], photo[PIXEL_HEIGHT_TAG] = photo[PIXEL_HEIGHT_TAG], photo[PIXEL_WIDTH_TAG]
    return tags.tobytes()


def _open_tiff(path: Path) -> ImageSource:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes = series.axes
            others = sum(not _is_companion(other) for other in tif.series[1:])
            # EXTRASAMPLE 1 and 2: associated and unassociated alpha, stored after the colours.
            alpha = axes.endswith("S") and series.keyframe.extrasamples[-1:] in ((1,), (2,))
            pixel_size = from_tiff(tif, axes)
            icc_profile = series.keyframe.iccprofile
            rgb_pages = series.keyframe.photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
            # A palette picture's pixels are indices into its colours: restored as intensities, they
            # became noise. ImageJ's palette is a display LUT over the intensities, so it stays.
            palette = series.keyframe.photometric == tifffile.PHOTOMETRIC.PALETTE and not tif.is_imagej
            colour_map = series.keyframe.colormap if palette else None
            channel_names = _ome_channel_names(tif.ome_metadata) if tif.is_ome else []
            shown = (tif.imagej_metadata or {}) if tif.is_imagej else {}
            imagej_display = {key: value for key, value in shown.items() if key in IMAGEJ_DISPLAY}
            try:
                cut = _tiff_cut_short(tif, series, path.stat().st_size)
            except (AttributeError, TypeError, struct.error):  # a layout this check does not know
                cut = None
        if cut:
            raise ImageIOError(f"{path}: the file is cut short: {cut} (an unfinished copy or download?)")
        if others:  # e.g. several positions of one acquisition, or a thumbnail
            shape = " x ".join(map(str, series.shape))
            warnings.warn(
                f"{path.name} holds {others + 1} image series; reading only the first ({shape}, axes {axes})",
                UserWarning, stacklevel=3,
            )
        pixels = _ReopenableFile(path, "tiff")
        array = da.from_array(pixels, chunks=pixels.chunks)
    except (OSError, tifffile.TiffFileError, IndexError) as error:
        raise ImageIOError(f"{path}: not a readable TIFF ({error})") from None
    if colour_map is not None:
        # TIFF colour maps are 16-bit; an 8-bit colour v is stored as v * 257, which >> 8 gives back.
        colours = np.ascontiguousarray((colour_map >> 8).astype(np.uint8).T)
        array = array.map_blocks(lambda block: colours[block], dtype=np.uint8, new_axis=array.ndim,
                                 chunks=(*array.chunks, (3,)))
        axes, rgb_pages = axes + "C", True
    if "C" not in axes:
        axes = axes.replace("S", "C")  # tifffile's S (samples per pixel) are channels
    try:
        axes = parse_axes(axes, array.ndim)
    except AxesError:
        axes = None
    alpha = alpha and axes is not None and axes.endswith("C")
    # RGB pages hold colours; any other C axis, a microscope's channels.
    colour = True if rgb_pages else (False if axes and "C" in axes else None)
    return ImageSource(array, axes, path, alpha=alpha, pixel_size=pixel_size if axes else {}, icc_profile=icc_profile,
                       colour=colour, imagej_display=imagej_display, channel_names=channel_names)


def _is_companion(series) -> bool:
    """Whether a TIFF series only accompanies the image: a thumbnail or lower level (pages marked
    reduced, as every Zeiss LSM's thumbnails), or a slide's label or macro picture. Each such file
    was said to hold several image series, "reading only the first", which is all there is."""
    return series.keyframe.is_reduced or series.name in ("Thumbnail", "Label", "Macro")


def _tiff_cut_short(tif, series, size: int) -> str | None:
    """How a TIFF of ``size`` bytes is cut short (an interrupted copy), or None.

    A truncated stack opened anyway: an ImageJ hyperstack of 5 x 2 planes, or a stack of 5 pages,
    cut at 90% of its bytes, opened as its single first plane (tifffile stops at the first page
    whose place lies past the end, and reads the pages before it as the whole image), and a
    contiguous stack cut at 60% failed at its first missing plane, with "corrupted strip cannot be
    reshaped", after the planes before it were restored.
    """
    if series.dataoffset is not None:  # contiguous, as most microscopy stacks
        data_end = series.dataoffset + series.nbytes
    else:
        last = series.pages[-1] or series.keyframe
        data_end = max((offset + count for offset, count in zip(last.dataoffsets, last.databytecounts)), default=0)
    if data_end > size:
        return f"it ends at byte {size:,}, and its pixels run to byte {data_end:,}"
    if series.kind == "shaped":  # tifffile's own: its first page says the whole shape
        written = tif.shaped_metadata[0].get("shape") if tif.shaped_metadata else None
        if written and math.prod(written) > math.prod(series.shape):
            return f"its pages hold an image of shape {tuple(series.shape)} of the {tuple(written)} written"
        return None
    if series.kind not in ("generic", "uniform"):  # read without every page's entry: no chain to follow
        return None
    # Every page's entry is loaded by now: the last one's link to the next must be 0, or within the file.
    form, handle = tif.tiff, tif.filehandle
    last_entry = tif.pages[len(tif.pages) - 1].offset
    handle.seek(last_entry)
    (tags,) = struct.unpack(form.tagnoformat, handle.read(form.tagnosize))
    handle.seek(last_entry + form.tagnosize + tags * form.tagsize)
    link = handle.read(form.offsetsize)
    (following,) = struct.unpack(form.offsetformat, link) if len(link) == form.offsetsize else (size,)
    if following >= size:
        return f"it ends at byte {size:,}, and its page {len(tif.pages) + 1} would start at byte {following:,}"
    return None


def folder_images(folder: Path) -> dict[str, Path]:
    """The images of ``folder`` (files and zarr stores it holds directly, of a readable format), by name.

    Hidden files are left out: macOS writes a ``._NAME`` companion beside every file it copies to
    a FAT or exFAT drive (a camera's card), and ``._IMG_0001.JPG``, no picture, failed the folder.
    """
    return {
        p.name: p for p in sorted(folder.iterdir())
        if p.name.lower().endswith(READABLE) and not p.name.startswith(".") and not not_read_advice(image_suffix(p))
    }


def colours_subsampled(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a photo that a lossy codec saved with its colours at a lower resolution
    than its brightness: a JPEG at 4:2:0, 4:2:2, 4:1:1 or 4:4:0 (a camera's), a lossy WebP (always
    4:2:0), or a HEIF (an iPhone's HEIC) or AVIF at 4:2:0 or 4:2:2. Its noise is then smeared into colour
    blotches, which the models trained on white noise leave; at 4:4:4 they do better than the model
    for such photos (docs/models/gama_ir_xs-denoise-rgb-jpeg.md). Only the file's header is read;
    any other file, or one that cannot be read, gives False."""
    if path is None:
        return False
    path = Path(path)
    suffix = image_suffix(path)
    try:
        if suffix in (".jpg", ".jpeg"):
            return _jpeg_colours_subsampled(path)
        if suffix == ".webp":
            return _webp_is_lossy(path)
        if suffix in DECODED_PHOTO_SUFFIXES:
            return _coded_colours_subsampled(path)
    except OSError:
        return False
    return False


def _jpeg_colours_subsampled(path: Path) -> bool:
    from PIL import Image, JpegImagePlugin

    with _pictures_of_any_size(), Image.open(path) as image:
        # Grey and CMYK JPEGs have no colours apart. Pillow's get_sampling names 4:2:2 and 4:2:0
        # only; the frame header's factors also tell 4:1:1 and 4:4:0 (colours at a quarter of the
        # columns, or half the rows), which some cameras write.
        if not isinstance(image, JpegImagePlugin.JpegImageFile) or image.layers != 3:
            return False
        (_, luma_across, luma_down, _), *colours = image.layer
        return any(across < luma_across or down < luma_down for _, across, down, _ in colours)


def _webp_is_lossy(path: Path) -> bool:
    """Whether the WebP ``path`` holds lossy (VP8, always 4:2:0) rather than lossless (VP8L) pixels:
    the first such chunk, after an extended file's header and metadata, or in an animation's first frame."""
    with open(path, "rb") as file:
        head = file.read(12)
        if head[:4] != b"RIFF" or head[8:] != b"WEBP":
            return False
        while len(chunk := file.read(8)) == 8:
            kind, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if kind in (b"VP8 ", b"VP8L"):
                return kind == b"VP8 "
            # A frame's own chunks follow its 16-byte header; other chunks are skipped, padded to even.
            file.seek(16 if kind == b"ANMF" else size + size % 2, os.SEEK_CUR)
    return False


def _coded_colours_subsampled(path: Path) -> bool:
    """Whether a HEIF (HEVC-coded) or AVIF (AV1-coded) photo's colours are subsampled, as the
    decoder's settings in its header say: hvcC's chroma format (1 is 4:2:0, 2 is 4:2:2) or av1C's
    horizontal subsampling flag. Where neither is found, True: phones and cameras write 4:2:0."""
    with open(path, "rb") as file:
        head = file.read(CODED_HEADER_BYTES)
    at = head.find(b"hvcC")
    if at >= 4 and len(head) > at + 20:
        return head[at + 20] & 3 in (1, 2)  # the record's 17th byte, after the box type
    at = head.find(b"av1C")
    if at >= 4 and len(head) > at + 6:
        flags = head[at + 6]  # the record's 3rd byte: ..., monochrome, subsampling x, y, position
        return not flags & 0x10 and bool(flags & 0x08)
    return True


def image_folders(folder: Path) -> list[Path]:
    """``folder`` and every folder in it, at any depth, in name order: those its images may lie in.
    Hidden folders, zarr stores (images themselves) and links (which may lead back up) are left out."""
    found = [folder]
    for path in sorted(folder.iterdir()):
        if path.is_dir() and not path.is_symlink() and not path.name.startswith(".") and not is_zarr_store(path):
            found += image_folders(path)
    return found


def folder_not_read(folder: Path) -> dict[str, int]:
    """How many files of each format of :data:`NOT_READ` ``folder`` holds (``folder_images`` leaves
    them out): a folder of an iPhone's HEIC photos was "no images found", and HEIC photos beside
    JPEGs were left out without a word."""
    suffixes = [image_suffix(p) for p in folder.iterdir() if not p.name.startswith(".")]
    return {suffix: suffixes.count(suffix) for suffix in sorted(set(suffixes)) if not_read_advice(suffix)}


def no_images_message(folder: Path) -> str:
    """Why ``folder`` gives no images: the formats read, and those of its files that are not."""
    message = f"{folder}: no images found ({', '.join(READABLE)})"
    for suffix, count in folder_not_read(folder).items():
        message += f"; {count} {suffix} file(s): {not_read_advice(suffix)}"
    return message


def is_zarr_store(path: Path) -> bool:
    """Whether ``path`` names a zarr store (by suffix, or a folder with zarr metadata)."""
    return image_suffix(path) in ZARR_SUFFIXES or (
        path.is_dir() and any((path / m).exists() for m in ("zarr.json", ".zarray", ".zgroup"))
    )


def open_image(path: str | os.PathLike) -> ImageSource:
    """Open an image file or store lazily.

    Supports zarr arrays and groups (OME-Zarr 0.4 and 0.5 multiscales), TIFF (through tifffile's
    zarr store; the TIFF-based LSM, STK, SVS, NDPI, SCN and QPTIFF too), ``.npy`` (memory-mapped)
    and PNG/JPEG/BMP/WebP pictures (small, read whole), HEIF and AVIF photos too where their
    decoder is installed. Formats of :data:`NOT_READ`, and those photos where it is not, are
    refused with what to do instead.

    Raises
    ------
    ImageIOError
        The path does not exist, has an unknown format, or cannot be read.
    """
    path = Path(path)
    if not path.exists():
        raise ImageIOError(f"{path}: no such file or folder")
    suffix = image_suffix(path)
    if is_zarr_store(path):
        return _open_zarr(path)
    if suffix in TIFF_SUFFIXES + TIFF_BASED_SUFFIXES:
        return _open_tiff(path)
    if suffix in NUMPY_SUFFIXES:
        try:
            pixels = _ReopenableFile(path, "npy")
        except (OSError, ValueError) as error:
            raise ImageIOError(f"{path}: not a readable .npy file ({error})") from None
        chunks = (1,) * (pixels.ndim - 2) + pixels.shape[-2:] if pixels.ndim > 2 else pixels.shape
        return ImageSource(da.from_array(pixels, chunks=chunks), None, path)
    if not_read_advice(suffix):
        raise ImageIOError(f"{path}: {not_read_advice(suffix)}")
    if suffix in PICTURE_SUFFIXES:
        return _open_picture(path)
    supported = ", ".join(READABLE)
    raise ImageIOError(f"{path}: unknown image format (supported: {supported})")


def check_output_path(output: str | os.PathLike, inputs: list[str | os.PathLike], overwrite: bool) -> Path:
    """Refuse outputs that would clobber an input, exist already, or cannot be written."""
    output = Path(output)
    if image_suffix(output) not in WRITABLE:
        raise ImageIOError(f"{output}: cannot write this format (use one of {', '.join(WRITABLE)})")
    for source in inputs:
        if output.resolve() == Path(source).resolve():
            raise ImageIOError(f"{output}: the output must not be the input")
        if source and output.resolve().is_relative_to(Path(source).resolve()):  # a store is a folder
            raise ImageIOError(f"{output}: the output must not be inside the input {source}")
        if source and Path(source).resolve().is_relative_to(output.resolve()):  # replacing it removes the input
            raise ImageIOError(f"{output}: the output must not hold the input {source}")
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output}: already exists (pass --overwrite to replace it)")
    parent = output.resolve().parent
    if parent.exists() and not parent.is_dir():
        raise ImageIOError(f"{output}: {parent} is not a folder")
    if not parent.is_dir():
        raise ImageIOError(f"{output}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ImageIOError(f"{output}: folder {parent} is not writable")
    return output


def picture_shape(output: Path, shape: tuple[int, ...], axes: str, dtype: np.dtype) -> tuple[int, ...]:
    """The shape in which an image of ``shape``, ``axes`` and ``dtype`` goes into a picture
    (:data:`PICTURE_OUTPUTS`).

    Each holds one picture, grey (``YX``) or with channels last (``YXC``): a PNG 2-4 channels of
    8- or 16-bit integers, a JPEG 3 of 8-bit integers (no opacity), a HEIF or AVIF 3-4 of 8-bit
    integers. Other axes of length 1, a single channel included, are dropped. Anything else raises
    :class:`ImageIOError`, before any pixel is computed.
    """
    name, channels, dtypes = PICTURE_OUTPUTS[image_suffix(output)]
    a_name = f"{'an' if name == 'AVIF' else 'a'} {name}"
    kept = [(a, n) for a, n in zip(axes, shape) if a in "YX" or n != 1]
    picture_axes = "".join(a for a, _ in kept)
    if picture_axes != "YX" and not (picture_axes == "YXC" and kept[-1][1] in channels):
        counts = "-".join(map(str, (channels[0], channels[-1]) if len(channels) > 1 else channels))
        other = "write .png for opacity, or " if name == "JPEG" and picture_axes == "YXC" else "write "
        raise ImageIOError(
            f"{output}: {a_name} holds one picture (axes YX, or YXC with {counts} channels), not axes {axes} of "
            f"shape {tuple(shape)}; {other}.tif, .zarr or .npy"
        )
    dtype = np.dtype(dtype)
    if dtype not in dtypes:
        bits = "- or ".join(str(d.itemsize * 8) for d in dtypes)
        raise ImageIOError(f"{output}: {a_name} holds {bits}-bit integers, not {dtype}; write .tif, .zarr or .npy")
    return tuple(n for _, n in kept)


def check_output_format(output: str | os.PathLike, shape: tuple[int, ...], axes: str, dtype: np.dtype) -> None:
    """Refuse, before any pixel is computed, an image that ``output``'s format cannot hold."""
    suffix = image_suffix(Path(output))
    if is_ome_zarr_output(output):
        check_ome_axes(output, axes)
    if suffix in TIFF_SUFFIXES and not axes.endswith(("YX", "YXC")):
        raise ImageIOError(f"{output}: TIFF output needs axes ending in YX or YXC, got {axes!r}")
    if suffix in OME_TIFF_SUFFIXES and not set(axes) <= set("TCZYX"):
        raise ImageIOError(f"{output}: OME-TIFF axes are T, C, Z, Y and X, not {axes!r}; write .tif, .zarr or .npy")
    if suffix in PICTURE_OUTPUTS:
        picture_shape(Path(output), shape, axes, dtype)
        codec = PICTURE_OUTPUTS[suffix][0].lower()
        if codec in missing_codecs():
            raise ImageIOError(f"{output}: writing {codec.upper()} needs {missing_codecs()[codec]}")
    if suffix in UNCOMPRESSED_SUFFIXES:
        _check_free_space(Path(output), math.prod(shape) * np.dtype(dtype).itemsize)


def _check_free_space(output: Path, size: int) -> None:
    """Refuse an output of ``size`` bytes that its disk has no room for: found out at the end, a
    TIFF failed with tifffile's "262144 requested and 261964 written", and a memory-mapped
    ``.npy`` had the process killed (SIGBUS), after all the work. A zarr store compresses: its
    size is not known, and a full disk fails it with "No space left on device"."""
    folder = output.resolve().parent
    free = shutil.disk_usage(folder).free
    if size > free:
        raise ImageIOError(
            f"{output}: the result takes {_in_units(size)}, and the disk of {folder} has {_in_units(free)} free"
        )


def _allocate(path: Path, output: Path) -> None:
    """Give the file at ``path`` its disk blocks now. numpy leaves a memory-mapped ``.npy`` sparse,
    and a write into a page that the disk then has no room for kills the process (SIGBUS) instead
    of raising; the check of the free space before cannot see other writers filling the disk."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows: the check of the free space alone
        return
    with open(path, "r+b") as file:
        try:
            os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise ImageIOError(f"{output}: its disk has no room left for the result") from None
            if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):  # filesystems without it
                raise


def _in_units(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


@contextmanager
def _atomic_path(output: Path, overwrite: bool):
    """Yield a temporary sibling path; move it onto ``output`` only if the block succeeds."""
    _remove_abandoned_partials(output)
    temporary = output.with_name(f".{output.name}.partial-{_HOST}-{os.getpid()}")
    _remove(temporary)
    try:
        yield temporary
    except BaseException:
        _remove(temporary)
        raise
    if output.exists():
        if not overwrite:
            _remove(temporary)
            raise ImageIOError(f"{output}: appeared while writing; not replaced")
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
        os.replace(temporary, output)
        _remove(old)
    else:
        os.replace(temporary, output)


_HOST = socket.gethostname().replace("-", "_")  # the partial outputs' names split at "-"


def _remove_abandoned_partials(output: Path) -> None:
    """Remove the partial outputs that runs on this host left when they were killed (a killed run
    cannot clean up, and a partial zarr store may hold most of a stack's size).

    Only partials of processes that no longer run on this host are removed; those of other hosts
    (a shared file system) are left alone.
    """
    for partial in output.parent.glob(f".{glob.escape(output.name)}.partial-{glob.escape(_HOST)}-*"):
        pid = partial.name.rpartition("-")[2]
        if pid.isdigit() and not _is_running(int(pid)):
            warnings.warn(f"removing {partial.name}, left by a run that ended before finishing", UserWarning,
                          stacklevel=4)
            _remove(partial)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        _remove_folder(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _remove_folder(path: Path, settle_s: float = 5.0) -> None:
    """``shutil.rmtree``, again until the folder stays gone.

    A Ctrl-C or SIGTERM that lands inside a zarr call leaves zarr's own I/O thread writing into the
    store for a moment: rmtree then failed with "Directory not empty", or the store came back
    (3 of 10 interrupted restores to zarr on a loaded 2-core machine, zarr 3.0.8).
    """
    deadline = time.monotonic() + settle_s
    while True:
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            pass
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)
        if not path.exists():
            return
        if time.monotonic() > deadline:
            raise OSError(errno.ENOTEMPTY, "still being written into while it was removed", str(path))


def check_cancel(cancel: threading.Event | None) -> None:
    """Raise :class:`Cancelled` if ``cancel`` is set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled()


@contextmanager
def cancelling_on_exit(cancel: threading.Event | None):
    """Set ``cancel`` where the block is left by an exception (an error in a chunk, Ctrl-C, a
    generator closed early): the chunks still computing on other threads (a pool waits for them on
    its way out; dask's go on after its caller has left) then stop at their next forward pass where
    :func:`~.restore.restore` was given the same event, instead of running to their end (minutes
    for one huge plane)."""
    try:
        yield
    except BaseException:
        if cancel is not None:
            cancel.set()
        raise


#: How output chunks are compressed: LZ4 on byte-shuffled values through Blosc, zarr-python 2's
#: default and readable by every zarr v2 reader. On a restored 2048 x 2048 float32 plane it packs
#: 1.34x in 6 ms where zarr 3's default Zstd packs 1.14x in 19 ms, and reads back 6x faster
#: (docs/engine.md): compressing was most of the host's work per plane.
OUTPUT_COMPRESSOR = Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE)


def create_zarr_output(path: str | os.PathLike, shape: tuple[int, ...], chunks: tuple[int, ...],
                       dtype: np.dtype) -> zarr.Array:
    """A new zarr v2 array for restored data, compressed with :data:`OUTPUT_COMPRESSOR`."""
    return zarr.open_array(str(path), mode="w", shape=shape, chunks=chunks, dtype=dtype, zarr_format=2,
                           compressor=OUTPUT_COMPRESSOR)


def is_ome_zarr_output(output: str | os.PathLike) -> bool:
    """Whether ``output`` names an OME-Zarr image (``.ome.zarr``) rather than a plain zarr array."""
    return image_suffix(Path(output)) == ".ome.zarr"


def ome_order(axes: str) -> tuple[int, ...]:
    """The transposition that puts ``axes`` in an OME-Zarr image's order: T, C, then Z, Y, X."""
    return tuple(axes.index(a) for a in "TCZYX" if a in axes)


def check_ome_axes(output: str | os.PathLike, axes: str) -> None:
    """Refuse axes that an OME-Zarr (0.4) image cannot have: any but T, C, Z, Y and X. The writers
    put them in the order OME-Zarr fixes (a photo's YXC, an ImageJ stack's TZCYX were refused)."""
    others = "".join(a for a in axes if a not in "TCZYX")
    if others:
        raise ImageIOError(
            f"{output}: OME-Zarr images have the axes T, C, Z, Y and X only, not {others!r} (of {axes!r}); "
            "write .zarr, .tif or .npy"
        )


def create_ome_zarr_output(path: str | os.PathLike, shape: tuple[int, ...], chunks: tuple[int, ...],
                           dtype: np.dtype, axes: str) -> zarr.Array:
    """A new OME-Zarr 0.4 image (a zarr v2 group) whose full resolution is the array ``"0"``;
    :func:`write_ome_levels` adds the lower ones once it is written, then :func:`set_output_attrs`
    the metadata of every level, with the axes and the pixel sizes in :data:`PIXEL_SIZE_ATTRIBUTE`."""
    check_ome_axes(path, axes)
    zarr.open_group(str(path), mode="w", zarr_format=2)
    return create_zarr_output(Path(path) / "0", shape, chunks, dtype)


def set_output_attrs(path: str | os.PathLike, axes: str, attrs: dict[str, Any], ome: bool) -> None:
    """Write ``attrs`` (provenance, pixel sizes) into a zarr output; an OME-Zarr's also as its metadata."""
    if not ome:
        zarr.open_array(str(path), mode="r+").attrs.update({"axes": axes, **attrs})
        return
    sizes = from_attribute(attrs.get(PIXEL_SIZE_ATTRIBUTE), axes)
    ome_axes = []
    for axis in axes:
        entry = {"name": axis.lower(), "type": OME_AXIS_TYPES[axis]}
        if sizes.get(axis, (1.0, None))[1]:
            entry["unit"] = sizes[axis][1]
        ome_axes.append(entry)
    scale = [sizes.get(axis, (1.0, None))[0] for axis in axes]
    group = zarr.open_group(str(path), mode="r+")
    datasets = []
    for level in range(len(list(group.array_keys()))):
        # Level n's pixel is 2**n of level 0's along Y and X; its centre lies (2**n - 1) / 2 of them in.
        factor = [2**level if axis in "YX" else 1 for axis in axes]
        transforms = [{"type": "scale", "scale": [size * f for size, f in zip(scale, factor)]}]
        if level:
            transforms.append({"type": "translation",
                               "translation": [size * (f - 1) / 2 for size, f in zip(scale, factor)]})
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    multiscale = {"version": "0.4", "axes": ome_axes, "datasets": datasets}
    names = _channels_of(attrs, axes, group["0"].shape)
    omero = {"omero": {"channels": [{"label": name} for name in names]}} if names else {}  # napari's layer names
    group.attrs.update({"multiscales": [multiscale], **omero, **attrs})


def write_ome_levels(path: str | os.PathLike, axes: str, workers: int = 2,
                     cancel: threading.Event | None = None) -> None:
    """Write the lower-resolution levels ``"1"``, ``"2"``... (:func:`pyramid_levels`) of the
    OME-Zarr image at ``path``, whose level ``"0"`` is written: each the mean of 2 x 2 pixels of
    the one before. napari shows the level that fits the screen; a restored slide scan of one
    level was read whole to be shown. Chunks are those of level 0, read back from it."""
    y, x = axes.index("Y"), axes.index("X")
    level = zarr.open_array(str(Path(path) / "0"), mode="r")
    chunks = level.chunks
    for number in range(1, len(pyramid_levels(level.shape[y], level.shape[x])) + 1):
        doubled = tuple(2 * c if i in (y, x) else c for i, c in enumerate(chunks))
        halved = da.coarsen(_mean_as, da.from_array(level, chunks=doubled), {y: 2, x: 2}, trim_excess=True,
                            dtype=level.dtype)
        target = create_zarr_output(Path(path) / str(number), halved.shape, chunks, level.dtype)
        for _ in store_chunks(halved.rechunk(chunks), target, workers, cancel):
            pass
        level = target


def pyramid_levels(height: int, width: int) -> list[tuple[int, int]]:
    """The (Y, X) sizes of the lower resolutions that an OME output of ``height`` x ``width``
    planes gets: each halves the one before (an odd last row or column left out), until the larger
    side is at most :data:`PYRAMID_SIDE` or the smaller a single pixel (a line scan's)."""
    levels = []
    while max(height, width) > PYRAMID_SIDE and min(height, width) > 1:
        height, width = height // 2, width // 2
        levels.append((height, width))
    return levels


def _halved(pixels: np.ndarray) -> np.ndarray:
    """The mean of each 2 x 2 pixels of a (Y, X[, S]) part, an odd last row or column left out,
    in its dtype (as :func:`write_ome_levels`)."""
    rows, cols = pixels.shape[0] // 2, pixels.shape[1] // 2
    blocks = pixels[: 2 * rows, : 2 * cols].reshape(rows, 2, cols, 2, *pixels.shape[2:])
    return _mean_as(blocks, axis=(1, 3), dtype=pixels.dtype)


def _mean_as(pixels: np.ndarray, axis: tuple[int, ...] | None = None, *, dtype: np.dtype) -> np.ndarray:
    """The mean of ``pixels`` along ``axis``, in ``dtype`` (integers rounded); dask first calls it
    without ``axis``, on a one-pixel array, to learn what it returns."""
    mean = pixels.mean(axis=axis, dtype=np.float32)
    return (np.rint(mean) if np.issubdtype(dtype, np.integer) else mean).astype(dtype)


def block_regions(array: da.Array) -> list[tuple[tuple[int, ...], tuple[slice, ...]]]:
    """Every chunk of ``array`` as (block index, the slices it covers), in C order."""
    offsets = [np.concatenate([[0], np.cumsum(c)]) for c in array.chunks]
    return [
        (index, tuple(slice(int(o[i]), int(o[i + 1])) for o, i in zip(offsets, index)))
        for index in np.ndindex(array.numblocks)
    ]


def write_image(array: da.Array | np.ndarray, output: str | os.PathLike, axes: str, **options: Any) -> Path:
    """Compute ``array`` chunk by chunk into ``output`` (:data:`WRITABLE`), atomically.

    Zarr output keeps the array's chunks (from :func:`restore`: a plane, a few small planes, or a
    block of a huge plane), so only a few chunks are in memory at a time. ``options`` are those of
    :func:`write_image_steps` (``overwrite``, ``attrs``, ``workers``, ``cancel``); this runs its
    steps to the end.
    """
    for _ in write_image_steps(array, output, axes, **options):
        pass
    return Path(output)


def write_image_steps(
    array: da.Array | np.ndarray,
    output: str | os.PathLike,
    axes: str,
    *,
    overwrite: bool = False,
    attrs: dict[str, Any] | None = None,
    workers: int = 2,
    cancel: threading.Event | None = None,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
    imagej_display: dict[str, Any] | None = None,
) -> Iterator[tuple[int, int]]:
    """Write ``array`` into ``output``, yielding ``(chunks written, total)`` as it goes.

    ``attrs`` (provenance) go to the zarr attributes or the TIFF metadata, ``icc_profile`` (the
    input's colours, :class:`ImageSource`) to a TIFF or picture, ``exif`` to a picture,
    ``imagej_display`` (:class:`ImageSource`) to an ImageJ TIFF of as many channels; an existing
    output is replaced only with ``overwrite``; ``workers`` threads compute chunks. Setting
    ``cancel`` raises :class:`Cancelled` at the next chunk, and stops the chunks being computed
    where they check it too (:func:`~.restore.restore` does, at each forward pass); an error,
    Ctrl-C or closing the generator early sets it. Any of these removes the partial output: the
    output appears under its name only after the last step. An OME-Zarr gets its lower
    resolutions (:func:`write_ome_levels`) after the last chunk of its full one.
    """
    output = Path(output)
    suffix = image_suffix(output)
    array, _ = as_dask(array)
    check_output_format(output, array.shape, axes, array.dtype)
    with cancelling_on_exit(cancel), _atomic_path(output, overwrite) as temporary, \
            dask.config.set(scheduler="threads", num_workers=workers):
        if suffix in (".zarr", ".ome.zarr"):
            ome = is_ome_zarr_output(output)
            if ome:
                order = ome_order(axes)
                array, axes = array.transpose(order), "".join(axes[i] for i in order)
            chunks = tuple(c[0] for c in array.chunks)
            if ome:
                target = create_ome_zarr_output(temporary, array.shape, chunks, array.dtype, axes)
            else:
                target = create_zarr_output(temporary, array.shape, chunks, array.dtype)
            yield from store_chunks(array, target, workers, cancel)
            if ome:
                write_ome_levels(temporary, axes, workers, cancel)
            set_output_attrs(temporary, axes, attrs or {}, ome=ome)
        elif suffix in TIFF_SUFFIXES:
            yield from _write_tiff(array, temporary, axes, attrs or {}, suffix in OME_TIFF_SUFFIXES, workers, cancel,
                                   icc_profile, imagej_display)
        elif suffix == ".npy":
            target = np.lib.format.open_memmap(temporary, mode="w+", dtype=array.dtype, shape=array.shape)
            try:
                _allocate(temporary, output)
                yield from store_chunks(array, target, workers, cancel)
                target.flush()
            finally:
                del target  # unmapped before the file is renamed or removed
        else:
            import imageio.v3 as iio

            picture = np.asarray(array.compute()).reshape(picture_shape(output, array.shape, axes, array.dtype))
            kept = {name: value for name, value in (("icc_profile", icc_profile), ("exif", exif)) if value}
            form = PICTURE_OUTPUTS[suffix][0]
            if form != "PNG":  # through Pillow itself: imageio knows neither HEIF's suffixes nor AVIF's
                from PIL import Image

                if form == "HEIF":
                    register_heif()
                Image.fromarray(picture).save(temporary, format=form, **LOSSY_OPTIONS[form], **kept)
            elif picture.dtype == np.uint16 and picture.ndim == 3:  # Pillow writes 16-bit colours as 8-bit ones
                import imagecodecs

                encoded = imagecodecs.png_encode(picture, level=PNG_COMPRESS_LEVEL)
                temporary.write_bytes(_png_with_chunks(encoded, icc_profile, exif))
            else:
                iio.imwrite(temporary, picture, extension=suffix, compress_level=PNG_COMPRESS_LEVEL, **kept)
            yield 1, 1


def store_chunks(
    array: da.Array, target: zarr.Array | np.ndarray, workers: int, cancel: threading.Event | None = None
) -> Iterator[tuple[int, int]]:
    """Compute and write every chunk of ``array`` into ``target`` (a zarr array, a numpy array or
    memory map of its shape), ``workers`` chunks at a time; setting ``cancel`` raises
    :class:`Cancelled` at the next chunk, and leaving early sets it (:func:`cancelling_on_exit`).

    A new chunk starts as soon as one is written, so the threads (and the network they feed)
    never wait at a barrier for the slowest chunk of a group; twice as many chunks as threads are
    queued. Yields ``(chunks written, total)`` in completion order.
    """

    def store(index: tuple[int, ...], region: tuple[slice, ...]) -> None:
        target[region] = np.asarray(array.blocks[index].compute(scheduler="synchronous"))

    blocks = iter(block_regions(array))
    total, done = array.npartitions, 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="write-chunk") as pool, \
            cancelling_on_exit(cancel):
        pending: set[Future] = set()
        try:
            while True:
                while len(pending) < 2 * workers and not (cancel is not None and cancel.is_set()):
                    chunk = next(blocks, None)
                    if chunk is None:
                        break
                    pending.add(pool.submit(store, *chunk))
                check_cancel(cancel)
                if not pending:
                    return
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    future.result()  # an error in a chunk stops the write here
                done += len(finished)
                yield done, total
        finally:
            for future in pending:
                future.cancel()


def _write_tiff(
    array: da.Array, path: Path, axes: str, attrs: dict, ome: bool, workers: int, cancel: threading.Event | None,
    icc_profile: bytes | None = None,
    imagej_display: dict[str, Any] | None = None,
) -> Iterator[tuple[int, int]]:
    """Write a TIFF page by page, in order, while ``workers`` threads compute the chunks after
    the one being written (:func:`_computed_in_order`, which ``cancel`` stops as :func:`store_chunks`):
    an ImageJ hyperstack where ImageJ's format holds the image (:func:`_imagej_holds`), else a BigTIFF.

    An array restored in blocks (square chunks of a multiple of 16 along Y and X, smaller than a
    page) is written as a tiled TIFF, a block a tile, so that no page is ever held whole.
    ``attrs`` go into the description as JSON (an ImageJ hyperstack's: into its Info, beside its
    calibration and the ``imagej_display`` that fits it); an OME-TIFF's description is its
    OME-XML, which then holds the pixel sizes and channel names, and ``attrs`` as the image's
    description. An OME-TIFF of grey or RGB planes larger than :data:`PYRAMID_SIDE` gets the
    lower resolutions an OME-Zarr gets (:func:`pyramid_levels`), as tiled SubIFDs of each page:
    QuPath shows a slide from them, and read a restored slide of one level whole. Each level is
    halved from the one before as that is written, through a scratch zarr beside the file; whole
    pages are then written in :data:`PYRAMID_TILE` tiles too.
    """
    import tifffile

    page_ndim = 3 if axes.endswith("C") else 2
    pages = array.reshape((-1,) + array.shape[-page_ndim:])
    rgb = page_ndim == 3 and array.shape[-1] in (3, 4)
    tile = _tiff_tile(pages, page_ndim == 2 or rgb)
    count, height, width = pages.shape[:3]
    if tile is None:  # a chunk of several small planes is computed once, not once a page
        starts = np.cumsum((0,) + pages.chunks[0][:-1])
        chunks = (pages[start:start + size] for start, size in zip(starts, pages.chunks[0]))
        parts = (page for chunk in _computed_in_order(chunks, workers, cancel) for page in chunk)
        places = [(index, 0, 0) for index in range(count)]
    else:
        places = _tile_places(count, height, width, tile)
        parts = _computed_in_order((
            pages[(index, slice(row, row + tile[0]), slice(col, col + tile[1]))] for index, row, col in places
        ), workers, cancel)
    sizes = from_attribute(attrs.get(PIXEL_SIZE_ATTRIBUTE), axes)
    page_axes = axes.replace("C", "S") if rgb else axes
    metadata = {"axes": page_axes}
    writer = {"bigtiff": True, "ome": ome}
    resolution = tiff_resolution(sizes)
    levels = pyramid_levels(height, width) if ome and (page_ndim == 2 or rgb) else []
    if ome:
        metadata.update({"Description": json.dumps(attrs), **ome_tiff_metadata(sizes)})
        names = _channels_of(attrs, axes, array.shape)
        if names:
            metadata["Channel"] = {"Name": names}
    elif _imagej_holds(page_axes, array.dtype, array.nbytes, rgb, tile):
        # Fiji opens an ImageJ hyperstack with its axes and calibration; it took a TZCYX stack
        # written as a plain BigTIFF for one long stack, and lost its Z spacing.
        calibration = imagej_calibration(sizes)
        metadata.update(calibration["metadata"], Info=json.dumps(attrs))
        metadata.update(_display_for(imagej_display or {}, array.shape[axes.index("C")] if "C" in axes else 1))
        writer, resolution = {"imagej": True, "ome": False}, {"resolution": calibration.get("resolution")}
    else:
        metadata.update(attrs)
    photometric = "rgb" if rgb else "minisblack"
    # Named as this process's partial output is, so that a killed run's goes with it (_remove_abandoned_partials).
    head, _, pid = path.name.rpartition("-")
    scratch = path.with_name(f"{head}-levels-{pid}")
    try:
        samples = pages.shape[3:]
        stores = [
            create_zarr_output(scratch / str(level), (count, *size, *samples), (1, PYRAMID_TILE, PYRAMID_TILE, *samples),
                               array.dtype)
            for level, size in enumerate(levels, 1)
        ]
        lower = [*stores, None]  # the level below each: level 0's is lower[0]
        written = _halving_into(parts, places, lower[0])
        if levels and tile is None:
            # A viewer reads a pyramid's full resolution a region at a time too: in strips, a
            # 512-pixel view of a slide 8192 pixels wide read 16 times its pixels. Pages are still
            # halved whole: a tile's half filled a quarter of a level's zarr chunk, read back thrice.
            tile = (PYRAMID_TILE, PYRAMID_TILE)
            page_tiles = _tile_places(1, height, width, tile)
            written = (page[row:row + PYRAMID_TILE, col:col + PYRAMID_TILE] for page in written
                       for _, row, col in page_tiles)
        with tifffile.TiffWriter(path, **writer) as tif:
            tif.write(
                data=written, tile=tile, shape=array.shape, dtype=array.dtype,
                photometric=photometric, metadata=metadata, iccprofile=icc_profile, subifds=len(levels) or None,
                **resolution,
            )
            for level, (store, size) in enumerate(zip(stores, levels), 1):
                level_places = _tile_places(count, *size, (PYRAMID_TILE, PYRAMID_TILE))
                level_parts = (_read_checked(store, place, cancel) for place in level_places)
                tif.write(
                    data=_halving_into(level_parts, level_places, lower[level]),
                    tile=(PYRAMID_TILE, PYRAMID_TILE), shape=(count, *size, *samples), dtype=array.dtype,
                    photometric=photometric, subfiletype=1, metadata=None, **_reduced(resolution, 2**level),
                )
    except OSError as error:
        # A disk that others filled after the check of its free space: tifffile says only
        # "262144 requested and 261964 written".
        if shutil.disk_usage(path.parent).free >= pages[0].nbytes:
            raise
        raise ImageIOError(f"{path.parent}: its disk ran out of space while the TIFF was written ({error})") from None
    finally:
        _remove(scratch)
    yield count, count


def _tile_places(count: int, height: int, width: int, tile: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(page, row, column) of each tile of ``count`` pages of ``height`` x ``width``, in TIFF order."""
    return [(index, row, col) for index in range(count)
            for row in range(0, height, tile[0]) for col in range(0, width, tile[1])]


def _read_checked(store: zarr.Array, place: tuple[int, int, int], cancel: threading.Event | None) -> np.ndarray:
    """The :data:`PYRAMID_TILE` tile of ``store`` at ``place``, unless ``cancel`` is set."""
    check_cancel(cancel)
    index, row, col = place
    return store[index, row:row + PYRAMID_TILE, col:col + PYRAMID_TILE]


def _halving_into(
    parts: Iterator[np.ndarray], places: list[tuple[int, int, int]], lower: zarr.Array | None,
) -> Iterator[np.ndarray]:
    """``parts`` (pages or tiles, at ``places``: page, row, column) as they come, each also halved
    (:func:`_halved`) into its place in ``lower``, the next lower resolution, if there is one."""
    for part, (index, row, col) in zip(parts, places):
        if lower is not None:
            half = _halved(part)
            lower[index, row // 2:row // 2 + half.shape[0], col // 2:col // 2 + half.shape[1]] = half
        yield part


def _reduced(resolution: dict[str, Any], factor: int) -> dict[str, Any]:
    """The TIFF resolution arguments of a level ``factor`` times coarser: as many fewer pixels a unit."""
    if not resolution:
        return {}
    return {**resolution, "resolution": tuple(r / factor for r in resolution["resolution"])}


def _display_for(display: dict[str, Any], channels: int) -> dict[str, Any]:
    """The entries of an ImageJ input's ``display`` that fit an output of ``channels`` channels: a
    restored hyperstack opened in Fiji grey, channel after channel, where its input was a
    composite of coloured channels."""
    fits = {"LUTs": len(display.get("LUTs", ())) == channels, "Ranges": len(display.get("Ranges", ())) == 2 * channels,
            "mode": True}
    return {key: value for key, value in display.items() if fits[key]}


def _imagej_holds(page_axes: str, dtype: np.dtype, size: int, rgb: bool, tile: tuple[int, int] | None) -> bool:
    """Whether ImageJ's hyperstack format holds these pages: axes in its order T, Z, C, Y, X (S:
    RGB samples, 8-bit only), 8- or 16-bit integers or float32, whole pages (ImageJ reads no
    tiles), and within a classic TIFF's 4 GB (ImageJ's format is no BigTIFF)."""
    in_order = "".join(a for a in IMAGEJ_ORDER if a in page_axes) == page_axes
    dtype = np.dtype(dtype)
    return (in_order and tile is None and dtype in IMAGEJ_DTYPES and (not rgb or dtype == np.uint8)
            and size < CLASSIC_TIFF_BYTES)


def _computed_in_order(
    parts: Iterator[da.Array], workers: int, cancel: threading.Event | None = None,
) -> Iterator[np.ndarray]:
    """Each of ``parts`` computed, in order, with up to ``workers`` of the next ones computing on
    their own threads meanwhile: a TIFF is written in order, one page or tile after the other, and
    computing only the next one left the network idle while the host read, blended and wrote
    (docs/engine.md). Closing early cancels what has not started; setting ``cancel`` raises
    :class:`Cancelled` at the next part, and leaving early sets it (:func:`cancelling_on_exit`)."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tiff-chunk") as pool, \
            cancelling_on_exit(cancel):
        ahead: deque[Future] = deque()
        try:
            for part in parts:
                check_cancel(cancel)
                ahead.append(pool.submit(part.compute, scheduler="synchronous"))
                if len(ahead) > workers:
                    yield ahead.popleft().result()
            while ahead:
                check_cancel(cancel)
                yield ahead.popleft().result()
        finally:
            for future in ahead:
                future.cancel()


def _tiff_tile(pages: da.Array, tileable: bool) -> tuple[int, int] | None:
    """The TIFF tile that writes ``pages`` (``(page, Y, X[, samples])``) a chunk at a time, or None
    where they are chunked by whole pages, or their chunks cannot be TIFF tiles."""
    rows, cols = pages.chunks[1], pages.chunks[2]
    if not tileable or (len(rows) == 1 and len(cols) == 1) or (len(pages.chunks) == 4 and len(pages.chunks[3]) > 1):
        return None
    sides = (_tile_side(rows), _tile_side(cols))
    return None if None in sides else sides


def _tile_side(chunks: tuple[int, ...]) -> int | None:
    """A TIFF tile side (a multiple of 16) that holds one chunk of ``chunks``, if there is one."""
    if len(chunks) == 1:  # tifffile pads a tile past the image's edge
        return -(-chunks[0] // 16) * 16
    regular = len(set(chunks[:-1])) == 1 and chunks[-1] <= chunks[0]
    return chunks[0] if regular and chunks[0] % 16 == 0 else None
