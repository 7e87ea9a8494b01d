import errno
import os
import re
import shutil
import threading
import warnings

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from napari_gama_ir.engine.io import (
    OUTPUT_COMPRESSOR,
    Cancelled,
    ImageIOError,
    check_output_path,
    open_image,
    write_image,
    write_image_steps,
)


def test_zarr_round_trip_keeps_chunks_axes_and_attributes(tmp_path):
    data = np.arange(4 * 30 * 20, dtype=np.uint16).reshape(4, 30, 20)
    write_image(da.from_array(data, chunks=(1, 30, 20)), tmp_path / "out.zarr", "ZYX", attrs={"model": "m"})
    source = open_image(tmp_path / "out.zarr")
    assert source.axes == "ZYX" and source.metadata["model"] == "m"
    assert source.array.chunks == ((1, 1, 1, 1), (30,), (20,))
    assert np.array_equal(source.array.compute(), data)


def test_zarr_output_is_blosc_lz4_compressed_and_lossless(tmp_path):
    # Smooth values plus noise, as a restored plane: the compressor must shrink them, losing nothing.
    rng = np.random.default_rng(0)
    data = (np.linspace(0, 1000, 4 * 64 * 64).reshape(4, 64, 64) + rng.normal(0, 3, (4, 64, 64))).astype(np.float32)
    write_image(da.from_array(data, chunks=(1, 64, 64)), tmp_path / "out.zarr", "ZYX")
    written = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")
    assert written.compressors == (OUTPUT_COMPRESSOR,)
    assert OUTPUT_COMPRESSOR.get_config() == {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1, "blocksize": 0}
    assert np.array_equal(written[:], data)
    chunk_bytes = sum(f.stat().st_size for f in (tmp_path / "out.zarr").glob("[0-9]*"))
    assert chunk_bytes < 0.9 * data.nbytes


def test_ome_zarr_group_reads_its_full_resolution_and_axes(tmp_path):
    group = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w", zarr_format=2)
    data = np.random.default_rng(0).integers(0, 255, (2, 3, 16, 24), dtype=np.uint8)
    group.create_array("0", shape=data.shape, dtype=data.dtype, chunks=(1, 3, 16, 24))[:] = data
    group.create_array("1", shape=(2, 3, 8, 12), dtype=data.dtype)
    group.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
                 {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
        "datasets": [{"path": "0"}, {"path": "1"}],
    }]
    source = open_image(tmp_path / "img.ome.zarr")
    assert source.axes == "TCYX"
    assert np.array_equal(source.array.compute(), data)


def test_pixel_sizes_are_read_from_ome_zarr_ome_tiff_imagej_and_resolution_tags(tmp_path):
    micrometres = {"X": (0.2, "micrometer"), "Y": (0.2, "micrometer"), "Z": (0.5, "micrometer")}
    stack = np.zeros((3, 16, 20), np.uint16)
    group = zarr.open_group(str(tmp_path / "cells.ome.zarr"), mode="w")
    group.create_array("0", shape=stack.shape, dtype=stack.dtype)
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": "z", "type": "space", "unit": "micrometer"}, {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [0.25, 0.1, 0.1]}]}],
        "coordinateTransformations": [{"type": "scale", "scale": [2.0, 2.0, 2.0]}],  # applies on top
    }]}
    tifffile.imwrite(tmp_path / "imagej.tif", stack, imagej=True, resolution=(5, 5),
                     metadata={"spacing": 0.5, "unit": "micron", "axes": "ZYX", "finterval": 2})  # no T axis: no T size
    tifffile.imwrite(tmp_path / "cells.ome.tif", stack, photometric="minisblack", metadata={
        "axes": "ZYX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.2, "PhysicalSizeZ": 0.5, "PhysicalSizeXUnit": "µm"})
    tifffile.imwrite(tmp_path / "scan.tif", stack, resolution=(100, 100), resolutionunit="CENTIMETER",
                     photometric="minisblack", metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "plain.tif", stack, photometric="minisblack", metadata={"axes": "ZYX"})
    found = {name: open_image(tmp_path / name).pixel_size
             for name in ("cells.ome.zarr", "imagej.tif", "cells.ome.tif", "scan.tif", "plain.tif")}
    assert found["cells.ome.zarr"] == micrometres
    assert found["imagej.tif"] == found["cells.ome.tif"] == micrometres
    assert found["scan.tif"] == {"X": (0.01, "centimeter"), "Y": (0.01, "centimeter")}
    assert found["plain.tif"] == {}


def test_outputs_keep_the_pixel_sizes_given_in_their_attributes(tmp_path):
    sizes = {"Z": [0.5, "micrometer"], "Y": [0.2, "micrometer"], "X": [0.2, "micrometer"]}
    # float64 is no ImageJ type: that TIFF is a plain one.
    for name, dtype in (("out.zarr", np.float32), ("imagej.tif", np.float32), ("out.tif", np.float64)):
        write_image(np.zeros((2, 8, 10), dtype), tmp_path / name, "ZYX", attrs={"pixel_size": sizes})
        assert open_image(tmp_path / name).pixel_size == {axis: tuple(entry) for axis, entry in sizes.items()}
    with tifffile.TiffFile(tmp_path / "imagej.tif") as tif:  # what Fiji reads: ImageJ's calibration
        assert tif.is_imagej and tif.imagej_metadata["unit"] == "micron" and tif.imagej_metadata["spacing"] == 0.5
        assert tif.pages[0].resolution == pytest.approx((5, 5))
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:  # what other readers see: pixels per cm
        assert not tif.is_imagej and tif.pages[0].resolutionunit == tifffile.RESUNIT.CENTIMETER
        assert tif.pages[0].resolution == pytest.approx((50000, 50000), rel=1e-5)  # a rational: 50000.2 in older tifffile


def test_ome_zarr_output_says_its_axes_and_pixel_sizes(tmp_path):
    data = np.random.default_rng(0).random((2, 3, 8, 10), dtype=np.float32)
    sizes = {"T": [2.0, "second"], "Y": [0.2, "micrometer"], "X": [0.2, "micrometer"]}
    write_image(da.from_array(data, chunks=(1, 3, 8, 10)), tmp_path / "out.ome.zarr", "TCYX",
                attrs={"pixel_size": sizes, "model": "m"})
    group = zarr.open_group(str(tmp_path / "out.ome.zarr"), mode="r")
    [multiscale] = group.attrs["multiscales"]
    assert multiscale["version"] == "0.4" and multiscale["axes"] == [
        {"name": "t", "type": "time", "unit": "second"}, {"name": "c", "type": "channel"},
        {"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}]
    assert multiscale["datasets"] == [{"path": "0", "coordinateTransformations": [
        {"type": "scale", "scale": [2.0, 1.0, 0.2, 0.2]}]}]
    assert group["0"].chunks == (1, 3, 8, 10) and group.attrs["model"] == "m"
    source = open_image(tmp_path / "out.ome.zarr")
    assert source.axes == "TCYX" and np.array_equal(source.array.compute(), data)
    assert source.pixel_size == {axis: tuple(entry) for axis, entry in sizes.items()}
    # Other orders are written in OME-Zarr's (a photo's YXC was refused, and so was an ImageJ stack's TZCYX).
    write_image(data.transpose(2, 0, 3, 1), tmp_path / "yxtc.ome.zarr", "YTXC", attrs={"pixel_size": sizes})
    source = open_image(tmp_path / "yxtc.ome.zarr")
    assert source.axes == "TCYX" and np.array_equal(source.array.compute(), data)
    assert source.pixel_size == {axis: tuple(entry) for axis, entry in sizes.items()}
    with pytest.raises(ImageIOError, match=r"the axes T, C, Z, Y and X only, not 'S' \(of 'SCYX'\); write .zarr"):
        write_image(data, tmp_path / "s.ome.zarr", "SCYX")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ome.zarr", "yxtc.ome.zarr"]


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_an_ome_zarr_output_of_large_planes_has_lower_resolutions(tmp_path, monkeypatch, dtype):
    """napari shows the level of an OME-Zarr that fits the screen: a restored slide scan, of one
    level, was read whole to be shown. Levels halve Y and X until a side is at most PYRAMID_SIDE."""
    from napari_gama_ir.engine import io

    monkeypatch.setattr(io, "PYRAMID_SIDE", 16)
    data = (np.random.default_rng(0).random((2, 71, 50)) * 4000).astype(dtype)
    sizes = {"Z": [2.0, "micrometer"], "Y": [0.5, "micrometer"], "X": [0.5, "micrometer"]}
    write_image(da.from_array(data, chunks=(1, 32, 32)), tmp_path / "slide.ome.zarr", "ZYX",
                attrs={"pixel_size": sizes})
    group = zarr.open_group(str(tmp_path / "slide.ome.zarr"), mode="r")
    assert [group[str(n)].shape for n in range(4)] == [(2, 71, 50), (2, 35, 25), (2, 17, 12), (2, 8, 6)]
    assert "4" not in group and all(group[str(n)].chunks == (1, 32, 32) for n in range(4))
    mean = data[:, :70, :50].reshape(2, 35, 2, 25, 2).astype(np.float32).mean(axis=(2, 4))
    expected = np.rint(mean).astype(dtype) if dtype == np.uint16 else mean  # the last, odd row left out
    assert np.allclose(group["1"][:], expected, atol=1e-4)
    datasets = group.attrs["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["0", "1", "2", "3"]
    assert datasets[2]["coordinateTransformations"] == [  # a pixel of 4 x 4, whose centre lies 1.5 pixels in
        {"type": "scale", "scale": [2.0, 2.0, 2.0]}, {"type": "translation", "translation": [0.0, 0.75, 0.75]}]
    source = open_image(tmp_path / "slide.ome.zarr")
    assert np.array_equal(source.array.compute(), data) and len(source.levels) == 3
    assert np.array_equal(source.levels[0].compute(), group["1"][:])
    # A line scan is halved until a single row is left (a level of none failed the whole write).
    write_image(np.ones((5, 200), dtype), tmp_path / "line.ome.zarr", "YX")
    assert [level.shape for level in open_image(tmp_path / "line.ome.zarr").levels] == [(2, 100), (1, 50)]


def _halved_levels(data: np.ndarray, count: int, rgb: bool) -> list[np.ndarray]:
    """``count`` levels below ``data``, each the rounded 2 x 2 means of the one before."""
    levels = [data]
    for _ in range(count):
        last = levels[-1] if rgb else levels[-1][..., None]  # Y and X are the 3rd and 2nd last axes
        rows, cols = last.shape[-3] // 2, last.shape[-2] // 2
        blocks = last[..., : 2 * rows, : 2 * cols, :].reshape(*last.shape[:-3], rows, 2, cols, 2, last.shape[-1])
        mean = np.rint(blocks.astype(np.float32).mean(axis=(-4, -2))).astype(data.dtype)
        levels.append(mean if rgb else mean[..., 0])
    return levels[1:]


@pytest.mark.parametrize("rgb", [False, True])
def test_an_ome_tiff_output_of_large_planes_has_lower_resolutions(tmp_path, monkeypatch, rgb):
    """QuPath shows a slide from its lower resolutions, and read a restored slide of one level
    whole: an OME-TIFF gets the levels an OME-Zarr gets, as tiled SubIFDs of each page."""
    from napari_gama_ir.engine import io

    monkeypatch.setattr(io, "PYRAMID_SIDE", 16)
    monkeypatch.setattr(io, "PYRAMID_TILE", 16)
    rng = np.random.default_rng(0)
    if rgb:  # whole pages
        data, axes = rng.integers(0, 256, (71, 50, 3), dtype=np.uint8), "YXC"
        array = da.from_array(data, chunks=data.shape)
    else:  # a stack restored in blocks, written a tile a block
        data, axes = (rng.random((2, 71, 50)) * 4000).astype(np.uint16), "ZYX"
        array = da.from_array(data, chunks=(1, 32, 32))
    write_image(array, tmp_path / "slide.ome.tif", axes, attrs={"pixel_size": {"Y": [0.5, "micrometer"],
                                                                             "X": [0.5, "micrometer"]}})
    assert [p.name for p in tmp_path.iterdir()] == ["slide.ome.tif"]  # no scratch levels left
    with tifffile.TiffFile(tmp_path / "slide.ome.tif") as tif:
        series = tif.series[0]
        assert tif.is_ome and len(tif.series) == 1 and len(series.levels) == 4
        assert [level.shape[-3 if rgb else -2:][:2] for level in series.levels] == [(71, 50), (35, 25), (17, 12), (8, 6)]
        # Tiled as its blocks, or whole pages as the levels: a viewer reads regions of each level.
        assert series.levels[0].keyframe.tilewidth == (16 if rgb else 32)
        for level, expected in zip(series.levels[1:], _halved_levels(data, 3, rgb)):
            assert level.keyframe.tilewidth == 16 and np.array_equal(level.asarray(), expected)
        resolutions = [level.keyframe.get_resolution() for level in series.levels[:2]]
        assert resolutions[1] == pytest.approx(tuple(r / 2 for r in resolutions[0]))
    source = open_image(tmp_path / "slide.ome.tif")
    assert np.array_equal(source.array.compute(), data) and source.pixel_size["X"] == (0.5, "micrometer")
    # A failure while the levels are written leaves nothing behind, their scratch neither.
    monkeypatch.setattr(io, "_halved", lambda part: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_image(array, tmp_path / "failed.ome.tif", axes)
    assert [p.name for p in tmp_path.iterdir()] == ["slide.ome.tif"]


def test_ome_tiff_output_holds_the_pixel_sizes_and_attributes_in_its_ome_xml(tmp_path):
    import json

    data = np.random.default_rng(0).random((2, 3, 8, 10), dtype=np.float32)
    sizes = {"T": [2.0, "second"], "Y": [0.2, "micrometer"], "X": [0.2, "micrometer"]}
    write_image(data, tmp_path / "out.ome.tif", "TCYX", attrs={"pixel_size": sizes, "model": "m"})
    with tifffile.TiffFile(tmp_path / "out.ome.tif") as tif:
        image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
        assert tif.is_ome and tif.series[0].axes == "TCYX"
    assert json.loads(image["Description"])["model"] == "m"
    assert {key: image["Pixels"][key] for key in ("PhysicalSizeX", "PhysicalSizeXUnit", "TimeIncrement",
                                                  "TimeIncrementUnit")} == {
        "PhysicalSizeX": 0.2, "PhysicalSizeXUnit": "µm", "TimeIncrement": 2.0, "TimeIncrementUnit": "s"}
    source = open_image(tmp_path / "out.ome.tif")
    assert source.axes == "TCYX" and np.array_equal(source.array.compute(), data)
    assert source.pixel_size == {axis: tuple(entry) for axis, entry in sizes.items()}
    with pytest.raises(ImageIOError, match="OME-TIFF axes are T, C, Z, Y and X, not 'QYX'"):
        write_image(data[0], tmp_path / "q.ome.tif", "QYX")


def test_tiff_is_read_through_a_zarr_store(tmp_path):
    data = np.random.default_rng(0).integers(0, 60000, (5, 32, 40), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", data, metadata={"axes": "ZYX"})
    source = open_image(tmp_path / "stack.tif")
    assert source.axes == "ZYX" and isinstance(source.array, da.Array)
    assert np.array_equal(source.array[3].compute(), data[3])


def test_a_palette_tiff_opens_as_its_colours_and_an_imagej_lut_as_intensities(tmp_path):
    """A palette picture's pixels are indices into its colours, and were restored as intensities.
    ImageJ writes an 8-bit image with a colour LUT as a palette TIFF too: there the indices are the
    data, and stay so."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).convert("P", palette=Image.ADAPTIVE)
    colours.save(tmp_path / "indexed.tif")
    source = open_image(tmp_path / "indexed.tif")
    assert (source.axes, source.colour) == ("YXC", True)
    assert np.array_equal(source.array.compute(), np.asarray(colours.convert("RGB")))
    intensities = rng.integers(0, 256, (2, 20, 30), dtype=np.uint8)
    fire = (np.stack([np.arange(256), np.arange(256)[::-1], np.zeros(256)]) * 257).astype(np.uint16)
    tifffile.imwrite(tmp_path / "lut.tif", intensities, imagej=True, colormap=fire, metadata={"axes": "ZYX"})
    source = open_image(tmp_path / "lut.tif")
    assert source.axes == "ZYX" and np.array_equal(source.array.compute(), intensities)


def test_lzw_and_jpeg_compressed_tiffs_are_read(tmp_path):
    """Scanners, Photoshop and many microscopes' exports compress TIFFs with LZW or JPEG, which
    tifffile decodes only through imagecodecs; they failed with "requires the 'imagecodecs' package".
    Pillow writes them here and is the reference."""
    from PIL import Image

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 60000, (32, 40), dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "lzw.tif", compression="tiff_lzw")
    Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(tmp_path / "jpeg.tif", compression="jpeg")
    assert np.array_equal(open_image(tmp_path / "lzw.tif").array.compute(), grey)
    with Image.open(tmp_path / "jpeg.tif") as saved:
        shown = np.asarray(saved.convert("RGB"), np.int16)
    source = open_image(tmp_path / "jpeg.tif")
    assert source.axes == "YXC"
    assert np.abs(source.array.compute().astype(np.int16) - shown).max() <= 2  # two JPEG decoders


def test_a_tiff_of_several_series_reads_the_first_and_says_so(tmp_path):
    first = np.arange(12, dtype=np.float32).reshape(3, 4)
    with tifffile.TiffWriter(tmp_path / "two.tif") as tif:
        tif.write(first)
        tif.write(np.zeros((2, 5, 6), np.float32))
    with pytest.warns(UserWarning, match=r"two\.tif holds 2 image series; reading only the first \(3 x 4, axes YX\)"):
        source = open_image(tmp_path / "two.tif")
    assert source.axes == "YX" and np.array_equal(source.array.compute(), first)


def test_a_thumbnail_is_not_another_image_series(tmp_path):
    """Every Zeiss LSM holds its thumbnails as pages marked reduced: each file was said to hold two
    image series, "reading only the first"."""
    first = np.arange(2 * 30 * 40, dtype=np.uint16).reshape(2, 30, 40)
    with tifffile.TiffWriter(tmp_path / "cells.tif") as tif:
        tif.write(first, photometric="minisblack", metadata={"axes": "ZYX"})
        tif.write(first[0, ::4, ::4], subfiletype=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        source = open_image(tmp_path / "cells.tif")
    assert source.axes == "ZYX" and np.array_equal(source.array.compute(), first)


@pytest.mark.parametrize("suffix", [".lsm", ".stk", ".btf"])
def test_tiffs_under_their_makers_suffixes_open(tmp_path, suffix):
    """A confocal's .lsm or a MetaMorph .stk was "an unknown image format"."""
    stack = np.random.default_rng(0).integers(0, 4000, (3, 20, 30), dtype=np.uint16)
    tifffile.imwrite(tmp_path / f"cells{suffix}", stack, photometric="minisblack", metadata={"axes": "ZYX"},
                     bigtiff=suffix == ".btf")
    source = open_image(tmp_path / f"cells{suffix}")
    assert source.axes == "ZYX" and np.array_equal(source.array.compute(), stack)


def test_an_aperio_slide_opens_at_full_resolution_with_its_micrometres_per_pixel(tmp_path):
    rng = np.random.default_rng(0)
    baseline = rng.integers(0, 256, (512, 768, 3), dtype=np.uint8)
    scanner = "Aperio Image Library v12.0.15 \n"
    with tifffile.TiffWriter(tmp_path / "slide.svs") as tif:  # as Aperio's scanners lay out a slide
        pages = {"photometric": "rgb", "metadata": None}
        tif.write(baseline, tile=(256, 256), description=scanner + "768x512 (256x256) JPEG/RGB|AppMag = 20|MPP = 0.4990",
                  **pages)
        tif.write(baseline[::8, ::8].copy(), description=scanner + "thumbnail", **pages)
        tif.write(baseline[::2, ::2].copy(), tile=(256, 256), description=scanner + "level 1", **pages)
        tif.write(baseline[::8, ::8].copy(), description=scanner + "label", subfiletype=1, **pages)
        tif.write(baseline[::8, ::8].copy(), description=scanner + "macro", subfiletype=9, **pages)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its thumbnail, label and macro are no other images
        source = open_image(tmp_path / "slide.svs")
    assert (source.axes, source.colour) == ("YXC", True)
    assert np.array_equal(source.array.compute(), baseline)
    assert source.pixel_size == {"X": (0.499, "micrometer"), "Y": (0.499, "micrometer")}


def test_a_zeiss_lsm_gives_its_voxel_size_in_micrometres():
    """tifffile cannot write an LSM: a stand-in for its TiffFile, with the metadata keys tifffile reads."""
    from types import SimpleNamespace

    from napari_gama_ir.engine.calibration import from_tiff

    lsm = SimpleNamespace(
        is_shaped=False, is_ome=False, is_imagej=False, is_lsm=True, is_svs=False,
        lsm_metadata={"VoxelSizeX": 1.2e-7, "VoxelSizeY": 1.2e-7, "VoxelSizeZ": 5e-7, "TimeIntervall": 0.0},
    )
    assert from_tiff(lsm, "ZYX") == {
        "X": (pytest.approx(0.12), "micrometer"), "Y": (pytest.approx(0.12), "micrometer"), "Z": (0.5, "micrometer"),
    }  # a time interval of 0 says none was set


@pytest.mark.parametrize(("name", "advice"), [
    ("DSC_0001.NEF", "a camera raw file is not read; develop it"),
    ("cells.czi", "this microscope format is not read; convert it to OME-TIFF"),
    ("cells.nd2", "this microscope format is not read"),
    ("logo.gif", "a GIF (256 colours) is not read"),
])
def test_formats_not_read_say_what_to_do(tmp_path, name, advice):
    """They were "an unknown image format", with a list of suffixes."""
    (tmp_path / name).write_bytes(b"\x00" * 16)
    with pytest.raises(ImageIOError, match=f"^{re.escape(str(tmp_path / name))}: {re.escape(advice)}"):
        open_image(tmp_path / name)


def test_heif_and_avif_photos_open_upright_with_their_exif(tmp_path, monkeypatch):
    """An iPhone's HEIC photos, and AVIF ones, were refused: "export it as PNG, JPEG or TIFF"."""
    import pillow_heif
    from PIL import Image

    from napari_gama_ir.engine import io

    pillow_heif.register_heif_opener()  # to write one here
    y, x = np.mgrid[:40, :60]
    stored = np.stack([4 * x, 6 * y, 2 * (x + y)], axis=-1).astype(np.uint8)  # smooth: little lost to compression
    exif = Image.Exif()
    exif[0x0112], exif[0x0110] = 6, "iPhone 15"  # stored sideways, as a portrait photo
    exif.get_ifd(0x8769).update({0xA002: 60, 0xA003: 40})  # its pixel width and height as stored
    Image.fromarray(stored).save(tmp_path / "IMG_0001.HEIC", exif=exif.tobytes(), quality=95)
    source = open_image(tmp_path / "IMG_0001.HEIC")
    upright = np.rot90(stored, -1)  # orientation 6: a quarter turn clockwise
    assert source.axes == "YXC" and source.colour and source.array.shape == (60, 40, 3)
    assert np.abs(source.array.compute().astype(int) - upright).mean() < 3
    tags = Image.Exif()
    tags.load(source.exif)
    assert tags[0x0112] == 1 and tags[0x0110] == "iPhone 15"
    assert (tags.get_ifd(0x8769)[0xA002], tags.get_ifd(0x8769)[0xA003]) == (40, 60)
    Image.fromarray(stored).save(tmp_path / "photo.avif", quality=95)
    assert np.abs(open_image(tmp_path / "photo.avif").array.compute().astype(int) - stored).mean() < 3
    # Without pillow-heif (an extra: its wheels hold the GPL's x265), one line says what to do.
    monkeypatch.setattr(io, "missing_decoders", lambda: {".heic": "a HEIF photo needs pillow-heif"})
    with pytest.raises(ImageIOError, match="IMG_0001.HEIC: a HEIF photo needs pillow-heif$"):
        open_image(tmp_path / "IMG_0001.HEIC")
    assert io.folder_images(tmp_path) == {"photo.avif": tmp_path / "photo.avif"}


def test_colours_kept_at_half_resolution_are_told_from_the_header(tmp_path):
    """A camera's JPEG, an iPhone's HEIC and lossy WebP and AVIF keep colours at half resolution,
    which smears noise into colour blotches: the model for them gained 3.1 to 7.4 dB over the
    white-noise one there, and lost up to 1.0 dB at 4:4:4 (docs/models/gama_ir_xs-denoise-rgb-jpeg.md).
    Only the suffix was looked at: every JPEG, and no HEIC, got the model for JPEGs."""
    import pillow_heif
    from PIL import Image

    from napari_gama_ir.engine.io import colours_subsampled

    pillow_heif.register_heif_opener()  # to write HEIC here
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    saved = {
        "camera.jpg": ({"subsampling": "4:2:0"}, True),
        "camera.JPEG": ({"subsampling": "4:2:2"}, True),
        "finest.jpg": ({"subsampling": "4:4:4"}, False),
        "IMG_0001.HEIC": ({}, True),
        "finest.heic": ({"chroma": 444}, False),
        "photo.avif": ({}, True),
        "finest.avif": ({"subsampling": "4:4:4"}, False),
        "photo.webp": ({}, True),
        "lossless.webp": ({"lossless": True}, False),
        "photo.png": ({}, False),
    }
    for name, (options, expected) in saved.items():
        rgb.save(tmp_path / name, **options)
        assert colours_subsampled(tmp_path / name) is expected, name
    # An extended WebP (here with alpha) holds its pixels after a header and other chunks, an
    # animation in its frames.
    Image.fromarray(rng.integers(0, 256, (48, 64, 4), dtype=np.uint8)).save(tmp_path / "alpha.webp")
    for lossless in (False, True):
        rgb.save(tmp_path / "animation.webp", save_all=True, append_images=[rgb.rotate(180)], lossless=lossless)
        assert colours_subsampled(tmp_path / "animation.webp") is not lossless
    assert colours_subsampled(tmp_path / "alpha.webp")
    # 4:1:1 and 4:4:0, which Pillow does not write (nor name): the frame header of a 4:4:4 JPEG
    # given their brightness factors (columns x rows), all this check reads.
    for name, luma_factors in (("4-1-1.jpg", 0x41), ("4-4-0.jpg", 0x12)):
        header = bytearray((tmp_path / "finest.jpg").read_bytes())
        frame = header.index(b"\xff\xc0")
        assert header[frame + 10 : frame + 12] == b"\x01\x11"  # the brightness component, 1 x 1
        header[frame + 11] = luma_factors
        (tmp_path / name).write_bytes(header)
        assert colours_subsampled(tmp_path / name), name
    rgb.convert("L").save(tmp_path / "grey.jpg")  # no colours apart
    (tmp_path / "broken.jpg").write_bytes(b"not a JPEG")
    for path in (tmp_path / "grey.jpg", tmp_path / "broken.jpg", tmp_path / "missing.heic", None):
        assert not colours_subsampled(path)


def test_the_missing_decoders_say_how_to_install_them(monkeypatch):
    import importlib.util

    from napari_gama_ir.engine import io

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "pillow_heif" else real(name))
    io.missing_codecs.cache_clear()
    try:
        missing = io.missing_decoders()
    finally:
        io.missing_codecs.cache_clear()
    assert missing[".heic"] == missing[".heif"] == (
        "a HEIF photo needs pillow-heif: pip install 'napari-gama-ir[heic]', or export it as PNG, JPEG or TIFF, "
        "then restore that")
    assert ".avif" not in missing  # Pillow 11.3 and later read AVIF


def test_tiff_and_png_writers_round_trip(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (2, 20, 30, 3), dtype=np.uint8)
    write_image(rgb, tmp_path / "rgb.tif", "ZYXC")
    source = open_image(tmp_path / "rgb.tif")
    assert source.axes == "ZYXC" and np.array_equal(source.array.compute(), rgb)
    write_image(rgb[0], tmp_path / "one.png", "YXC")
    assert np.array_equal(open_image(tmp_path / "one.png").array.compute(), rgb[0])


@pytest.mark.parametrize("axes, shape, chunks", [("TYX", (10, 16, 16), (4, 16, 16)),
                                                  ("TZYX", (2, 5, 16, 16), (1, 3, 16, 16))])
def test_a_tiff_computes_each_chunk_of_several_pages_once(tmp_path, axes, shape, chunks):
    # Pages were computed one by one: a chunk of several small planes (restore groups them) was
    # restored again for each of its pages.
    computed = []

    def mark(block, block_info=None):
        computed.append(tuple(block_info[0]["chunk-location"]))
        return block

    data = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
    watched = da.from_array(data, chunks=chunks).map_blocks(mark, dtype=data.dtype)
    write_image(watched, tmp_path / "out.tif", axes)
    assert sorted(computed) == sorted(set(computed)) and len(computed) == watched.npartitions
    assert np.array_equal(open_image(tmp_path / "out.tif").array.compute(), data)


def test_pictures_open_with_their_axes_and_broken_ones_in_one_line(tmp_path):
    import imageio.v3 as iio

    iio.imwrite(tmp_path / "grey_alpha.png", np.zeros((20, 30, 2), np.uint8))
    iio.imwrite(tmp_path / "grey.png", np.zeros((20, 30), np.uint8))
    # (20, 30, 2) was guessed as 20 planes of 30 x 2 pixels.
    assert open_image(tmp_path / "grey_alpha.png").axes == "YXC" and open_image(tmp_path / "grey.png").axes == "YX"
    (tmp_path / "broken.png").write_bytes(b"\x89PNG, then nothing")
    with pytest.raises(ImageIOError, match="broken.png: not a readable picture") as error:
        open_image(tmp_path / "broken.png")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_photo_opens_upright_as_its_exif_orientation_says(tmp_path, orientation):
    """A phone's portrait photo is stored sideways with an EXIF orientation tag; it was restored
    sideways. Pillow's own turn is the reference."""
    from PIL import Image, ImageOps

    stored = np.random.default_rng(orientation).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    photo = Image.fromarray(stored)
    exif = photo.getexif()
    exif[0x0112] = orientation
    photo.save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=95)
    with Image.open(tmp_path / "photo.jpg") as saved:
        upright = np.asarray(ImageOps.exif_transpose(saved))
    assert upright.shape == ((40, 60, 3) if orientation < 5 else (60, 40, 3))
    assert np.array_equal(open_image(tmp_path / "photo.jpg").array.compute(), upright)


def test_pictures_above_pillows_size_limit_open(tmp_path, monkeypatch):
    """A stitched scan of 182 million pixels would not open: Pillow refuses pictures above twice its
    MAX_IMAGE_PIXELS as possible decompression bombs. The limit is lowered here to stand for it."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    picture = np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "scan.png")
    assert np.array_equal(open_image(tmp_path / "scan.png").array.compute(), picture)
    assert Image.MAX_IMAGE_PIXELS == 100  # lifted for the user's own file only, not for napari's others


def test_webp_pictures_open_with_their_opacity(tmp_path):
    """WebP, the web's and many phones' format, was an unknown image format."""
    from PIL import Image

    rgba = np.random.default_rng(0).integers(0, 256, (40, 60, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "web.webp", lossless=True, exact=True)
    source = open_image(tmp_path / "web.webp")
    assert (source.axes, source.alpha) == ("YXC", True)
    assert np.array_equal(source.array.compute(), rgba)


def test_cmyk_and_1_bit_pictures_open_as_the_colours_and_greys_they_show(tmp_path):
    """A CMYK JPEG (print workflows) was read as RGB plus alpha: colours inverted, black ink as
    opacity. A 1-bit scan was refused as a bool image. Pillow's conversions are the reference."""
    from PIL import Image

    colours = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    colours.convert("CMYK").save(tmp_path / "print.jpg", quality=95)
    colours.convert("1").save(tmp_path / "scan.png")
    with Image.open(tmp_path / "print.jpg") as saved:
        shown = np.asarray(saved.convert("RGB"))
    source = open_image(tmp_path / "print.jpg")
    assert (source.axes, source.alpha) == ("YXC", False)
    assert np.array_equal(source.array.compute(), shown)
    scan = open_image(tmp_path / "scan.png")
    assert scan.axes == "YX" and scan.array.dtype == np.uint8
    assert np.array_equal(scan.array.compute(), np.asarray(Image.open(tmp_path / "scan.png")).astype(np.uint8) * 255)


def test_alpha_channels_are_recognised(tmp_path):
    import imageio.v3 as iio

    pixels = np.zeros((20, 30, 4), np.uint8)
    iio.imwrite(tmp_path / "rgba.png", pixels)
    iio.imwrite(tmp_path / "grey_alpha.png", pixels[..., :2])
    iio.imwrite(tmp_path / "rgb.png", pixels[..., :3])
    tifffile.imwrite(tmp_path / "rgba.tif", pixels)  # tifffile marks a fourth sample as alpha
    tifffile.imwrite(tmp_path / "rgbx.tif", pixels, photometric="rgb", extrasamples=["unspecified"])
    found = {name: open_image(tmp_path / name).alpha for name in
             ("rgba.png", "grey_alpha.png", "rgb.png", "rgba.tif", "rgbx.tif")}
    assert found == {"rgba.png": True, "grey_alpha.png": True, "rgb.png": False, "rgba.tif": True, "rgbx.tif": False}


def test_png_takes_one_8_or_16_bit_picture(tmp_path):
    grey = np.random.default_rng(0).integers(0, 60000, (1, 20, 30, 1), dtype=np.uint16)
    write_image(grey, tmp_path / "grey.png", "ZYXC")  # axes of length 1 are dropped
    assert np.array_equal(open_image(tmp_path / "grey.png").array.compute(), grey[0, ..., 0])


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_16_bit_colour_pngs_keep_their_16_bits(tmp_path, channels):
    """Pillow reads and writes 16-bit colour PNGs as 8-bit ones: a 16-bit RGB PNG was restored at
    8 bits without a word. Pillow still reads the colour profile and EXIF written with them."""
    from PIL import Image, ImageCms

    deep = np.random.default_rng(channels).integers(0, 65536, (20, 30, channels), dtype=np.uint16)
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x0110] = "Camera"
    write_image(deep, tmp_path / "deep.png", "YXC", icc_profile=profile, exif=exif.tobytes())
    source = open_image(tmp_path / "deep.png")
    assert source.array.dtype == np.uint16 and np.array_equal(source.array.compute(), deep)
    assert source.alpha == (channels in (2, 4)) and source.icc_profile == profile
    with Image.open(tmp_path / "deep.png") as picture:
        assert picture.info["icc_profile"] == profile and picture.getexif()[0x0110] == "Camera"


@pytest.mark.parametrize("name, data, axes, message", [
    ("x.png", np.zeros((2, 20, 30), np.uint8), "ZYX", r"a PNG holds one picture .* not axes ZYX of shape \(2, 20, 30\)"),
    ("x.png", np.zeros((3, 20, 30), np.uint8), "CYX", "not axes CYX"),
    ("x.png", np.zeros((20, 30), np.float32), "YX", "a PNG holds 8- or 16-bit integers, not float32"),
    ("x.png", np.zeros((20, 30, 3), np.int16), "YXC", "not int16"),
    ("x.tif", np.zeros((20, 30, 2), np.uint8), "YXZ", "TIFF output needs axes ending in YX or YXC"),
])
def test_formats_refuse_what_they_cannot_hold_before_computing(tmp_path, name, data, axes, message):
    lazy = da.from_array(data).map_blocks(lambda block: 1 / 0, dtype=data.dtype)  # computing it would fail
    with pytest.raises(ImageIOError, match=message):
        write_image(lazy, tmp_path / name, axes)
    assert list(tmp_path.iterdir()) == []


def _disk_with_free_space(monkeypatch, free: int) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free))


@pytest.mark.parametrize("name", ["x.tif", "x.ome.tif", "x.npy"])
def test_an_uncompressed_output_its_disk_has_no_room_for_is_refused_before_computing(tmp_path, monkeypatch, name):
    """Found out at the end, a TIFF failed with "262144 requested and 261964 written", and a .npy
    had the process killed (SIGBUS), after all the work."""
    _disk_with_free_space(monkeypatch, 1_900_000)
    data = np.zeros((4, 250, 500), np.float32)  # 2.0 MB: just over the room
    lazy = da.from_array(data).map_blocks(lambda block: 1 / 0, dtype=data.dtype)
    with pytest.raises(ImageIOError, match=r"x\..* the result takes 2\.0 MB, and the disk of .* has 1\.9 MB free"):
        write_image(lazy, tmp_path / name, "ZYX")
    assert list(tmp_path.iterdir()) == []
    write_image(data[:3], tmp_path / name, "ZYX")  # 1.5 MB fits
    write_image(data, tmp_path / "x.zarr", "ZYX")  # compressed: its size is not known before


@pytest.mark.parametrize("fills_the_disk", [True, False])
def test_a_tiff_whose_disk_fills_while_it_is_written_says_so(tmp_path, monkeypatch, fills_the_disk):
    def failing_write(writer, **options):
        if fills_the_disk:
            _disk_with_free_space(monkeypatch, 100)  # another writer took the rest after the check
        raise OSError("262144 requested and 261964 written")  # tifffile's words for it

    monkeypatch.setattr(tifffile.TiffWriter, "write", failing_write)
    expected = (ImageIOError, "its disk ran out of space while the TIFF was written") if fills_the_disk else (
        OSError, "^262144 requested")  # any other failure as it came
    with pytest.raises(expected[0], match=expected[1]):
        write_image(np.ones((2, 64, 64), np.float32), tmp_path / "out.tif", "ZYX")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="macOS and Windows have no posix_fallocate")
def test_a_npy_output_takes_its_disk_space_before_it_is_written(tmp_path, monkeypatch):
    """numpy leaves a memory-mapped file sparse: a disk that fills up meanwhile (another writer)
    killed the process with SIGBUS at the first page without room, instead of raising."""
    allocated = []
    real = os.posix_fallocate
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, offset, size: (allocated.append(size), real(fd, offset, size)))
    write_image(np.ones((3, 64, 64), np.float32), tmp_path / "a.npy", "ZYX")
    assert allocated == [(tmp_path / "a.npy").stat().st_size] and allocated[0] > 3 * 64 * 64 * 4

    def full_disk(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full_disk)
    with pytest.raises(ImageIOError, match=r"b\.npy: its disk has no room left for the result"):
        write_image(np.ones((3, 64, 64), np.float32), tmp_path / "b.npy", "ZYX")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]


def test_npy_round_trip_and_memory_map(tmp_path):
    data = np.random.default_rng(0).random((3, 10, 12), dtype=np.float32)
    write_image(data, tmp_path / "a.npy", "ZYX")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]
    source = open_image(tmp_path / "a.npy")
    assert source.array.chunks[0] == (1, 1, 1)
    assert np.array_equal(source.array.compute(), data)


def test_unreadable_inputs_give_clear_errors(tmp_path):
    with pytest.raises(ImageIOError, match="no such file"):
        open_image(tmp_path / "missing.tif")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageIOError, match="unknown image format"):
        open_image(tmp_path / "notes.txt")
    (tmp_path / "broken.tif").write_bytes(b"not a tiff")
    with pytest.raises(ImageIOError, match="not a readable TIFF"):
        open_image(tmp_path / "broken.tif")


def test_output_checks(tmp_path):
    (tmp_path / "in.tif").write_bytes(b"x")
    with pytest.raises(ImageIOError, match="must not be the input"):
        check_output_path(tmp_path / "in.tif", [tmp_path / "in.tif"], overwrite=True)
    with pytest.raises(ImageIOError, match="already exists"):
        check_output_path(tmp_path / "in.tif", [], overwrite=False)
    with pytest.raises(ImageIOError, match="does not exist"):
        check_output_path(tmp_path / "nowhere" / "out.zarr", [], overwrite=False)
    with pytest.raises(ImageIOError, match="cannot write this format"):
        check_output_path(tmp_path / "out.txt", [], overwrite=False)


def _failing_plane(block, block_info=None):
    if block_info[0]["chunk-location"][0] == 3:
        raise RuntimeError("boom")
    return block


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    data = da.zeros((6, 16, 16), chunks=(1, 16, 16), dtype=np.float32).map_blocks(_failing_plane, dtype=np.float32)
    with pytest.raises(RuntimeError, match="boom"):
        write_image(data, tmp_path / "out.zarr", "ZYX")
    assert list(tmp_path.iterdir()) == []


def test_partial_outputs_of_killed_runs_are_removed_by_the_next_write(tmp_path):
    # A killed run cannot clean up: its hidden partial store stayed, perhaps most of a stack's size.
    import subprocess
    import sys

    from napari_gama_ir.engine import io

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "killed": f".out.zarr.partial-{io._HOST}-{ended.stdout.strip()}",
            "running": f".out.zarr.partial-{io._HOST}-{running.pid}",
            "other host": ".out.zarr.partial-elsewhere-1",
            "other output": f".other.zarr.partial-{io._HOST}-{ended.stdout.strip()}",
        }
        for name in names.values():
            (tmp_path / name).mkdir()
        with pytest.warns(UserWarning, match=r"removing \.out\.zarr\.partial-.*, left by a run that ended"):
            write_image(np.zeros((2, 8, 8), np.float32), tmp_path / "out.zarr", "ZYX")
    finally:
        running.kill()
        running.wait()
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"out.zarr", names["running"], names["other host"], names["other output"]}


def test_overwrite_replaces_only_after_success(tmp_path):
    target = tmp_path / "out.zarr"
    write_image(np.ones((2, 8, 8), np.float32), target, "ZYX")
    bad = da.zeros((6, 16, 16), chunks=(1, 16, 16), dtype=np.float32).map_blocks(_failing_plane, dtype=np.float32)
    with pytest.raises(RuntimeError):
        write_image(bad, target, "ZYX", overwrite=True)
    assert np.array_equal(open_image(target).array.compute(), np.ones((2, 8, 8), np.float32))
    write_image(np.zeros((3, 4, 4), np.float32), target, "ZYX", overwrite=True)
    assert open_image(target).array.shape == (3, 4, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]


def test_cancel_stops_the_write_and_removes_the_partial_output(tmp_path):
    cancel = threading.Event()

    def slow(block):
        cancel.set()  # the first plane asks to stop
        return block

    data = da.zeros((20, 16, 16), chunks=(1, 16, 16), dtype=np.float32).map_blocks(slow, dtype=np.float32)
    with pytest.raises(Cancelled):
        write_image(data, tmp_path / "out.zarr", "ZYX", cancel=cancel, workers=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind, keep, message", [
    ("contiguous", 0.6, r"it ends at byte [\d,]+, and its pixels run to byte [\d,]+"),
    ("imagej", 0.9, r"it ends at byte [\d,]+, and its page 2 would start at byte"),  # opened as its first plane
    ("pages", 0.6, r"it ends at byte [\d,]+, and its page 2 would start at byte"),
    ("compressed", 0.6, r"its pages hold an image of shape \(40, 52\) of the \(5, 2, 40, 52\) written"),
])
def test_a_tiff_cut_short_is_refused_when_opened(tmp_path, kind, keep, message):
    """A TIFF whose copy was interrupted opened as its first plane or planes (or failed only at
    its first missing plane, after restoring the ones before it)."""
    data = (np.random.default_rng(0).random((5, 2, 40, 52)) * 1000).astype(np.uint16)
    if kind == "contiguous":
        data = np.tile(data, (1, 1, 10, 10))  # larger than the IFDs, so that the cut falls in the pixels
    options = {
        "contiguous": {}, "imagej": {"imagej": True, "metadata": {"axes": "ZCYX"}},
        "pages": {"metadata": None}, "compressed": {"compression": "zlib"},
    }[kind]
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, data.reshape(10, *data.shape[2:]) if kind == "pages" else data, **options)
    assert open_image(whole).array.size == data.size
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * keep)])
    with pytest.raises(ImageIOError, match=r"cut\.tif: the file is cut short: " + message):
        open_image(cut)


def test_pyramidal_tiff_opens_at_full_resolution(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (64, 96), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "pyramid.ome.tif") as tif:
        tif.write(data, subifds=1, tile=(32, 32), metadata={"axes": "YX"})
        tif.write(data[::2, ::2], subfiletype=1, tile=(32, 32))
    source = open_image(tmp_path / "pyramid.ome.tif")
    assert source.axes == "YX" and np.array_equal(source.array.compute(), data)


@pytest.mark.parametrize("suffix", [".zarr", ".npy"])
def test_write_steps_report_progress_and_closing_early_leaves_nothing(tmp_path, suffix):
    # .npy was computed whole, in memory, before a byte was written.
    data = da.arange(10 * 8 * 8, dtype=np.float32, chunks=64).reshape(10, 8, 8)
    steps = list(write_image_steps(data, tmp_path / f"out{suffix}", "ZYX", workers=2))
    done = [d for d, _ in steps]
    assert done == sorted(set(done)) and done[-1] == 10 and {t for _, t in steps} == {10}
    assert np.array_equal(open_image(tmp_path / f"out{suffix}").array.compute(), data.compute())
    partial = write_image_steps(data, tmp_path / f"other{suffix}", "ZYX", workers=2)
    next(partial)
    partial.close()  # e.g. a cancelled GUI worker
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out{suffix}"]


def test_a_slow_chunk_does_not_hold_up_the_others(tmp_path):
    """Chunks are written as threads free up, not in groups that wait for their slowest chunk."""
    later_chunk_started = threading.Event()

    def plane(block, block_id=None):
        if block_id[0] == 0:  # holds one thread until chunk 5 has started on the other
            assert later_chunk_started.wait(timeout=20), "chunk 5 waited for chunk 0"
        if block_id[0] == 5:
            later_chunk_started.set()
        return block + block_id[0]

    data = da.zeros((8, 4, 4), chunks=(1, 4, 4), dtype=np.float32).map_blocks(plane, dtype=np.float32)
    write_image(data, tmp_path / "out.zarr", "ZYX", workers=2)
    written = np.asarray(open_image(tmp_path / "out.zarr").array)
    assert np.array_equal(written[:, 0, 0], np.arange(8, dtype=np.float32))


@pytest.mark.parametrize("chunks", [(1, 32, 32), (1, 16, 16)])  # pages, or blocks written as TIFF tiles
def test_a_tiff_computes_the_next_chunks_while_one_is_waited_for(tmp_path, chunks):
    # A TIFF is written in order, and only the chunk about to be written was computed: the network
    # waited while the host read, blended and wrote.
    later_chunk_started = threading.Event()

    def plane(block, block_id=None):
        if block_id[:3] == (0, 0, 0):  # written first, so it is waited for: it holds until a later one starts
            assert later_chunk_started.wait(timeout=20), "no later chunk was computed meanwhile"
        else:
            later_chunk_started.set()
        return block + block_id[0]

    data = da.zeros((5, 32, 32), chunks=chunks, dtype=np.float32).map_blocks(plane, dtype=np.float32)
    write_image(data, tmp_path / "out.tif", "ZYX", workers=2)
    written = open_image(tmp_path / "out.tif").array.compute()
    assert np.array_equal(written, np.arange(5, dtype=np.float32)[:, None, None] + np.zeros((5, 32, 32), np.float32))


@pytest.mark.parametrize("name", ["out.tif", "out.ome.tif"])
def test_a_tiff_that_fails_or_is_cancelled_leaves_nothing_behind(tmp_path, name):
    data = da.zeros((6, 16, 16), chunks=(1, 16, 16), dtype=np.float32).map_blocks(_failing_plane, dtype=np.float32)
    with pytest.raises(RuntimeError, match="boom"):
        write_image(data, tmp_path / name, "ZYX", workers=2)
    cancel = threading.Event()

    def asks_to_stop(block):
        cancel.set()
        return block

    stopping = da.zeros((20, 16, 16), chunks=(1, 16, 16), dtype=np.float32).map_blocks(asks_to_stop, dtype=np.float32)
    with pytest.raises(Cancelled):
        write_image(stopping, tmp_path / name, "ZYX", cancel=cancel, workers=2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["out.zarr", "out.tif", "out.npy"])
def test_a_write_that_stops_early_sets_its_cancel_event_for_the_chunks_in_flight(tmp_path, name):
    # The writer's threads are waited for on its way out: a chunk in flight (a plane restore
    # stops at its next forward pass once the event is set) ran to its end before.
    cancel = threading.Event()
    waited = []

    def first_fails_second_runs_until_cancelled(block, block_info=None):
        if block_info[0]["chunk-location"][0] == 0:
            cancel_seen = cancel.wait(0.5)  # the second chunk is under way meanwhile
            raise RuntimeError(f"boom ({cancel_seen})")
        waited.append(cancel.wait(60))
        return block

    data = da.zeros((2, 16, 16), chunks=(1, 16, 16), dtype=np.float32).map_blocks(
        first_fails_second_runs_until_cancelled, dtype=np.float32)
    with pytest.raises(RuntimeError, match=r"boom \(False\)"):
        write_image(data, tmp_path / name, "ZYX", cancel=cancel, workers=2)
    assert waited == [True]  # woken by the event, not by the 60 s timeout
    assert list(tmp_path.iterdir()) == []
    # A generator closed early (napari's worker quit) sets it too.
    cancel.clear()
    steps = write_image_steps(da.zeros((4, 16, 16), chunks=(1, 16, 16), dtype=np.float32), tmp_path / name, "ZYX",
                              cancel=cancel, workers=1)
    next(steps)
    steps.close()
    assert cancel.is_set() and list(tmp_path.iterdir()) == []
