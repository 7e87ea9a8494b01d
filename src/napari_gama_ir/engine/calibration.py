"""Physical pixel sizes (calibration), carried from an input file to its restored output.

Read from OME-Zarr scale transforms, OME-TIFF, ImageJ, Zeiss LSM and Aperio SVS metadata, TIFF
resolution tags and this package's own outputs; written into the output's attributes (zarr), OME
metadata (OME-Zarr, OME-TIFF), ImageJ metadata (a TIFF that ImageJ's format can hold) or
description (other TIFFs), and into a TIFF's resolution tags, so that a restored stack keeps its
input's voxel size in napari, Fiji and later runs of this package.
"""

from __future__ import annotations

import math
from typing import Any

# axis letter -> (size of one pixel along it, unit or None); only axes whose size is known.
PixelSizes = dict[str, tuple[float, str | None]]
ATTRIBUTE = "pixel_size"  # key in zarr attributes and TIFF descriptions: {"Z": [0.5, "micrometer"], ...}

# The names OME-Zarr uses (UDUNITS-2), for the spellings found in OME-TIFF and ImageJ files.
_UNIT_NAMES = {
    "nm": "nanometer", "um": "micrometer", "µm": "micrometer", "μm": "micrometer", "micron": "micrometer",
    "microns": "micrometer", "mm": "millimeter", "cm": "centimeter", "m": "meter", "in": "inch",
    "s": "second", "sec": "second", "ms": "millisecond", "min": "minute", "h": "hour",
}
_CENTIMETERS = {"nanometer": 1e-7, "micrometer": 1e-4, "millimeter": 0.1, "centimeter": 1.0, "meter": 100.0}
# ImageJ's spellings of the length units above (it shows "micron" as µm).
_IMAGEJ_UNITS = {
    "nanometer": "nm", "micrometer": "micron", "millimeter": "mm", "centimeter": "cm", "meter": "m", "inch": "inch",
}
# OME-XML's symbols (UnitsLength, UnitsTime) for the units above.
_OME_SYMBOLS = {
    "nanometer": "nm", "micrometer": "µm", "millimeter": "mm", "centimeter": "cm", "meter": "m", "inch": "in",
    "second": "s", "millisecond": "ms", "minute": "min", "hour": "h",
}


def unit_name(unit: Any) -> str | None:
    """The OME-Zarr name of a unit as files spell it (``"µm"``, ``"micron"`` -> ``"micrometer"``)."""
    if unit is None or str(unit).strip().lower() in ("", "pixel", "pixels", "px"):
        return None
    text = str(unit).strip()
    return _UNIT_NAMES.get(text.lower(), _UNIT_NAMES.get(text, text))


def _usable(size: Any) -> bool:
    return isinstance(size, (int, float)) and math.isfinite(size) and size > 0


def to_attribute(sizes: PixelSizes) -> dict[str, list]:
    """``sizes`` as JSON: ``{"Z": [0.5, "micrometer"], ...}``."""
    return {axis: [size, unit] for axis, (size, unit) in sizes.items()}


def from_attribute(value: Any, axes: str | None) -> PixelSizes:
    """Pixel sizes stored by :func:`to_attribute`, for the axes in ``axes``; ``{}`` if unreadable."""
    if not isinstance(value, dict) or not axes:
        return {}
    sizes = {}
    for axis, entry in value.items():
        if axis in axes and isinstance(entry, (list, tuple)) and len(entry) == 2 and _usable(entry[0]):
            sizes[axis] = (float(entry[0]), unit_name(entry[1]))
    return sizes


def from_ome_multiscale(multiscale: dict[str, Any], axes: str | None) -> PixelSizes:
    """The full-resolution pixel sizes of an OME-Zarr multiscale (its first dataset's scale)."""
    if not axes:
        return {}
    scale = [1.0] * len(axes)
    transforms = multiscale["datasets"][0].get("coordinateTransformations", [])
    for transform in [*transforms, *multiscale.get("coordinateTransformations", [])]:
        values = transform.get("scale") if transform.get("type") == "scale" else None
        if isinstance(values, list) and len(values) == len(axes):
            scale = [a * b if _usable(b) else a for a, b in zip(scale, values)]
    units = [entry.get("unit") if isinstance(entry, dict) else None for entry in multiscale.get("axes", [])]
    units += [None] * (len(axes) - len(units))
    return {
        axis: (float(size), unit_name(unit))
        for axis, size, unit in zip(axes, scale, units)
        if axis != "C" and (size != 1.0 or unit_name(unit))
    }


def from_tiff(tif: Any, axes: str | None) -> PixelSizes:
    """Pixel sizes of an open ``tifffile.TiffFile`` whose first series has ``axes``.

    In order of trust: this package's own description, OME-XML, ImageJ, LSM or SVS metadata, then
    the X and Y resolution tags (when they name a unit).
    """
    if not axes:
        return {}
    shaped = tif.shaped_metadata[0] if tif.is_shaped and tif.shaped_metadata else {}
    if ATTRIBUTE in shaped:
        return from_attribute(shaped[ATTRIBUTE], axes)
    if tif.is_ome:
        found = _from_ome_xml(tif.ome_metadata)
    elif tif.is_imagej:
        found = _from_imagej(tif.imagej_metadata or {}, tif.pages[0].resolution)
    elif tif.is_lsm:
        found = _from_lsm(tif.lsm_metadata or {})
    elif tif.is_svs:
        found = _from_svs(tif.pages[0].description)
    else:
        found = _from_resolution(tif.pages[0])
    return {axis: entry for axis, entry in found.items() if axis in axes}


def _from_ome_xml(xml: str) -> PixelSizes:
    import tifffile

    try:
        image = tifffile.xml2dict(xml)["OME"]["Image"]
        pixels = (image[0] if isinstance(image, list) else image)["Pixels"]
    except (KeyError, IndexError, TypeError, ValueError):
        return {}
    sizes = {}
    for axis in "XYZ":  # OME's default length unit is the micrometer, its time unit the second
        if _usable(pixels.get(f"PhysicalSize{axis}")):
            sizes[axis] = (float(pixels[f"PhysicalSize{axis}"]), unit_name(pixels.get(f"PhysicalSize{axis}Unit", "µm")))
    if _usable(pixels.get("TimeIncrement")):
        sizes["T"] = (float(pixels["TimeIncrement"]), unit_name(pixels.get("TimeIncrementUnit", "s")))
    return sizes


def _from_imagej(metadata: dict[str, Any], resolution: tuple[float, float]) -> PixelSizes:
    unit = unit_name(metadata.get("unit"))
    sizes = {}
    if unit is not None:  # an uncalibrated ImageJ image still has resolution tags, of 1 pixel per pixel
        for axis, per_unit in zip("XY", resolution):
            if _usable(per_unit):
                sizes[axis] = (1.0 / per_unit, unit)
        if _usable(metadata.get("spacing")):
            sizes["Z"] = (float(metadata["spacing"]), unit)
    if _usable(metadata.get("finterval")):
        sizes["T"] = (float(metadata["finterval"]), "second")
    return sizes


def _from_lsm(metadata: dict[str, Any]) -> PixelSizes:
    """A Zeiss LSM's voxel size, which it gives in metres (its resolution tags say nothing)."""
    sizes = {
        axis: (float(metadata[f"VoxelSize{axis}"]) * 1e6, "micrometer")
        for axis in "XYZ" if _usable(metadata.get(f"VoxelSize{axis}"))
    }
    if _usable(metadata.get("TimeIntervall")):  # so spelt by Zeiss
        sizes["T"] = (float(metadata["TimeIntervall"]), "second")
    return sizes


def _from_svs(description: str) -> PixelSizes:
    """An Aperio slide's micrometres per pixel, from the ``|MPP = 0.4990|`` of its description."""
    for entry in description.split("|"):
        key, _, value = entry.partition("=")
        if key.strip() == "MPP":
            try:
                mpp = float(value)
            except ValueError:
                return {}
            return {axis: (mpp, "micrometer") for axis in "XY"} if _usable(mpp) else {}
    return {}


def _from_resolution(page: Any) -> PixelSizes:
    unit = {2: "inch", 3: "centimeter"}.get(int(page.resolutionunit))
    if unit is None:
        return {}
    return {axis: (1.0 / per_unit, unit) for axis, per_unit in zip("XY", page.resolution) if _usable(per_unit)}


def tiff_resolution(sizes: PixelSizes) -> dict[str, Any]:
    """``tifffile.imwrite`` arguments for the X and Y resolution tags, ``{}`` where they cannot say it."""
    (x, x_unit), (y, y_unit) = sizes.get("X", (0.0, None)), sizes.get("Y", (0.0, None))
    if not (_usable(x) and _usable(y)) or x_unit != y_unit:
        return {}
    if x_unit == "inch":
        return {"resolution": (1.0 / x, 1.0 / y), "resolutionunit": "INCH"}
    if x_unit in _CENTIMETERS:
        per = _CENTIMETERS[x_unit]
        return {"resolution": (1.0 / (x * per), 1.0 / (y * per)), "resolutionunit": "CENTIMETER"}
    return {}


def imagej_calibration(sizes: PixelSizes) -> dict[str, Any]:
    """``tifffile.imwrite`` arguments for an ImageJ hyperstack's calibration: X and Y as resolution
    tags in the ``unit`` of its description, Z as its ``spacing``, T as its ``finterval``. ImageJ has
    one length unit: X and Y must share theirs, and Z is left out where its unit differs."""
    metadata: dict[str, Any] = {}
    if _usable(sizes.get("T", (0.0,))[0]) and sizes["T"][1] == "second":
        metadata["finterval"] = sizes["T"][0]
    (x, unit), (y, y_unit) = sizes.get("X", (0.0, None)), sizes.get("Y", (0.0, None))
    if not (_usable(x) and _usable(y)) or unit != y_unit or unit not in _IMAGEJ_UNITS:
        return {"metadata": metadata}
    metadata["unit"] = _IMAGEJ_UNITS[unit]
    z, z_unit = sizes.get("Z", (0.0, None))
    if _usable(z) and z_unit == unit:
        metadata["spacing"] = z
    return {"metadata": metadata, "resolution": (1.0 / x, 1.0 / y)}


def ome_tiff_metadata(sizes: PixelSizes) -> dict[str, Any]:
    """``tifffile`` OME metadata for the sizes whose unit OME-XML can name (it reads a size without
    a unit as micrometres or seconds, so those are left out)."""
    metadata: dict[str, Any] = {}
    for axis, (size, unit) in sizes.items():
        symbol = _OME_SYMBOLS.get(unit or "")
        if symbol is None:
            continue
        key = "TimeIncrement" if axis == "T" else f"PhysicalSize{axis}" if axis in "XYZ" else None
        if key is not None and (axis == "T") == (unit in ("second", "millisecond", "minute", "hour")):
            metadata[key], metadata[f"{key}Unit"] = size, symbol
    return metadata
