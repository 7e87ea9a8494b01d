import json

import numpy as np
import pytest
import tifffile
import torch
import zarr

from napari_gama_ir import save_checkpoint
from napari_gama_ir.cli import main
from napari_gama_ir.engine.io import open_image, write_image

from .conftest import make_tiny_model, recorded_passes


@pytest.fixture
def grey_checkpoint(tmp_path):
    return str(save_checkpoint(make_tiny_model(1), tmp_path / "models" / "tiny"))


@pytest.fixture
def stack_zarr(tmp_path):
    data = (np.random.default_rng(0).random((3, 40, 56)) * 60000).astype(np.uint16)
    array = zarr.open_array(str(tmp_path / "stack.zarr"), mode="w", shape=data.shape, chunks=(1, 40, 56), dtype=data.dtype)
    array[:] = data
    array.attrs["axes"] = "ZYX"
    return tmp_path / "stack.zarr", data


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_restore_zarr_to_zarr_matches_the_library(capsys, tmp_path, grey_checkpoint, stack_zarr):
    from napari_gama_ir import create_model, restore

    path, data = stack_zarr
    code, out, err = run_cli(capsys, "restore", path, "-o", tmp_path / "out.zarr", "--model", grey_checkpoint,
                             "--tile", 32, "--overlap", 8, "--output-dtype", "input", "-q")
    assert code == 0, err
    result = open_image(tmp_path / "out.zarr")
    assert result.array.dtype == np.uint16 and result.axes == "ZYX"
    assert result.metadata["model"] == grey_checkpoint and len(result.metadata["checkpoint_sha256"]) == 64
    assert result.metadata["cuda_graphs"] == "auto"  # the default: graphs on CUDA only
    expected = restore(data, create_model(grey_checkpoint), "ZYX", tile=32, overlap=8, output_dtype="input")
    assert np.array_equal(result.array.compute(), expected)


def test_restore_in_blocks_writes_block_chunks_and_tiles_equal_to_whole_planes(capsys, tmp_path, grey_checkpoint):
    # A gigapixel plane is restored, and its TIFF written, a block at a time; here, blocks of 64.
    data = (np.random.default_rng(1).random((2, 150, 130)) * 60000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "in.tif", data, metadata={"axes": "ZYX"}, tile=(32, 32))
    common = ["--model", grey_checkpoint, "--tile", 32, "--overlap", 8, "--output-dtype", "input", "-q"]
    for name, block in (("whole.zarr", []), ("blocks.zarr", ["--block", 64]), ("blocks.tif", ["--block", 64])):
        code, _, err = run_cli(capsys, "restore", tmp_path / "in.tif", "-o", tmp_path / name, *common, *block)
        assert code == 0, err
    whole = zarr.open_array(str(tmp_path / "whole.zarr"))
    blocks = zarr.open_array(str(tmp_path / "blocks.zarr"))
    assert whole.chunks == (1, 150, 130) and blocks.chunks == (1, 64, 64)
    assert whole.attrs["block"] is None and blocks.attrs["block"] == 64  # recorded with the provenance
    assert np.array_equal(blocks[:], whole[:]) and np.array_equal(tifffile.imread(tmp_path / "blocks.tif"), whole[:])
    with tifffile.TiffFile(tmp_path / "blocks.tif") as tif:
        assert tif.pages[0].is_tiled and (tif.pages[0].tilelength, tif.pages[0].tilewidth) == (64, 64)
    code, _, err = run_cli(capsys, "restore", tmp_path / "in.tif", "-o", tmp_path / "bad.zarr", *common, "--block", 16)
    assert code == 2 and err.count("\n") == 1 and "block must be at least the tile side (32)" in err


def test_restore_tiff_with_progress_bar(capsys, tmp_path, grey_checkpoint):
    tifffile.imwrite(tmp_path / "in.tif", np.zeros((2, 24, 24), np.uint8), metadata={"axes": "ZYX"})
    code, out, err = run_cli(capsys, "restore", tmp_path / "in.tif", "-o", tmp_path / "out.tif", "--model", grey_checkpoint)
    assert code == 0, err
    assert "planes 2/2" in err and "1.2/1.2 kpx" in err
    assert open_image(tmp_path / "out.tif").array.shape == (2, 24, 24)
    # A one-channel network restores each of two channels as a plane: six planes, restored as one chunk.
    tifffile.imwrite(tmp_path / "two.tif", np.zeros((3, 2, 24, 24), np.uint8), metadata={"axes": "ZCYX"})
    code, out, err = run_cli(capsys, "restore", tmp_path / "two.tif", "-o", tmp_path / "two.zarr", "--model", grey_checkpoint)
    assert code == 0, err
    assert "planes 6/6" in err and "planes 1/6" not in err


def test_restore_compile_runs_the_compiled_network_and_says_it_is_compiling(capsys, tmp_path, grey_checkpoint, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: compiled.append(model) or model)
    tifffile.imwrite(tmp_path / "in.tif", np.zeros((2, 24, 24), np.uint8), metadata={"axes": "ZYX"})
    code, _, err = run_cli(capsys, "restore", tmp_path / "in.tif", "-o", tmp_path / "c.zarr", "--model", grey_checkpoint,
                           "--compile")
    assert code == 0, err
    assert len(compiled) == 1 and "compiling the network first" in err and "planes 2/2" in err
    code, _, err = run_cli(capsys, "restore", tmp_path / "in.tif", "-o", tmp_path / "e.zarr", "--model", grey_checkpoint)
    assert code == 0 and "compiling" not in err and len(compiled) == 1
    assert zarr.open_array(str(tmp_path / "c.zarr")).attrs["compiled"] is True
    assert np.allclose(zarr.open_array(str(tmp_path / "c.zarr"))[:], zarr.open_array(str(tmp_path / "e.zarr"))[:], atol=1e-5)


@pytest.mark.parametrize(("planes", "plane_pixels", "shown"), [
    (3, 2048 * 2048, "12.6/12.6 Mpx"), (1, 64 * 64, "4.1/4.1 kpx"), (1, 5 * 7, "35.0/35.0 px")])
def test_the_progress_bar_counts_in_a_unit_the_job_fills(capsys, planes, plane_pixels, shown):
    from napari_gama_ir.cli import _Progress

    progress = _Progress(planes, plane_pixels, quiet=False, first_note="compiling")
    progress.start()
    for _ in range(planes):
        progress.update_pixels(plane_pixels)
    progress.close()
    err = capsys.readouterr().err
    assert f"{shown} " in err and f"{shown} " not in err.split("compiling]")[0]  # the note, then the count
    assert err.rstrip().endswith(f"planes {planes}/{planes}]")


def test_restore_keeps_the_input_calibration(capsys, tmp_path, grey_checkpoint):
    # Outputs had no pixel size: a restored stack opened at 1 x 1 x 1 beside its calibrated input.
    tifffile.imwrite(tmp_path / "in.tif", np.zeros((2, 24, 24), np.uint16), imagej=True, resolution=(10, 10),
                     metadata={"spacing": 0.3, "unit": "um", "axes": "ZYX"})
    expected = {"Z": (0.3, "micrometer"), "Y": (0.1, "micrometer"), "X": (0.1, "micrometer")}
    for name in ("out.zarr", "out.tif", "out.ome.tif", "out.ome.zarr"):
        code, _, err = run_cli(capsys, "restore", tmp_path / "in.tif", "-o", tmp_path / name, "--model", grey_checkpoint, "-q")
        assert code == 0, err
        assert open_image(tmp_path / name).pixel_size == expected


def test_a_restored_imagej_hyperstack_is_written_as_one(capsys, tmp_path, grey_checkpoint):
    """Fiji took a TZCYX stack written as a plain BigTIFF for one long stack of 2 x 3 x 2 planes,
    without its Z spacing or frame interval."""
    import json

    from napari_gama_ir import create_model, restore

    stack = np.random.default_rng(0).integers(0, 4000, (2, 3, 2, 24, 32), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "in.tif", stack, imagej=True, resolution=(4, 4),
                     metadata={"axes": "TZCYX", "spacing": 0.5, "unit": "um", "finterval": 30.0})
    code, _, err = run_cli(capsys, "restore", tmp_path / "in.tif", "-o", tmp_path / "out.tif",
                           "--model", grey_checkpoint, "--output-dtype", "input", "-q")
    assert code == 0, err
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:
        assert tif.is_imagej and tif.series[0].axes == "TZCYX" and tif.series[0].shape == stack.shape
        calibration = tif.imagej_metadata
        assert (calibration["unit"], calibration["spacing"], calibration["finterval"]) == ("micron", 0.5, 30.0)
        assert tif.pages[0].resolution == pytest.approx((4, 4))
        assert json.loads(calibration["Info"])["model"] == str(grey_checkpoint)  # the provenance, in Image > Show Info
        written = tif.asarray()
    expected = restore(stack, create_model(str(grey_checkpoint)), "TZCYX", output_dtype="input")
    assert np.array_equal(written, expected)
    photo = np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "photo.tif", photo, photometric="rgb")
    rgb = save_checkpoint(make_tiny_model(3), tmp_path / "rgb")
    code, _, err = run_cli(capsys, "restore", tmp_path / "photo.tif", "-o", tmp_path / "photo-out.tif",
                           "--model", rgb, "--output-dtype", "input", "-q")
    assert code == 0, err
    with tifffile.TiffFile(tmp_path / "photo-out.tif") as tif:
        assert tif.is_imagej and tif.series[0].axes == "YXS" and tif.pages[0].photometric == tifffile.PHOTOMETRIC.RGB


def test_a_restored_imagej_composite_keeps_its_channel_colours(capsys, tmp_path, grey_checkpoint):
    """Fiji opened a restored two-colour stack grey, channel after channel: its LUTs, composite
    mode and display ranges were left behind."""
    ramp = np.arange(256, dtype=np.uint8)
    red, green = np.zeros((3, 256), np.uint8), np.zeros((3, 256), np.uint8)
    red[0], green[1] = ramp, ramp
    stack = np.random.default_rng(0).integers(0, 4000, (3, 2, 24, 32), dtype=np.uint16)
    display = {"LUTs": [red, green], "mode": "composite", "Ranges": (0.0, 1000.0, 100.0, 3000.0)}
    tifffile.imwrite(tmp_path / "cells.tif", stack, imagej=True, metadata={"axes": "ZCYX", **display})
    tifffile.imwrite(tmp_path / "one.tif", stack[:, 0], imagej=True, metadata={"axes": "ZYX", **display})
    for name in ("cells.tif", "one.tif"):
        code, _, err = run_cli(capsys, "restore", tmp_path / name, "-o", tmp_path / f"out-{name}", "--model",
                               grey_checkpoint, "-q")
        assert code == 0, err
    with tifffile.TiffFile(tmp_path / "out-cells.tif") as tif:
        shown = tif.imagej_metadata
    assert shown["mode"] == "composite" and shown["Ranges"] == display["Ranges"]
    assert [lut.tolist() for lut in shown["LUTs"]] == [red.tolist(), green.tolist()]
    with tifffile.TiffFile(tmp_path / "out-one.tif") as tif:  # one channel: two LUTs and ranges do not fit it
        assert "LUTs" not in tif.imagej_metadata and "Ranges" not in tif.imagej_metadata


def test_restored_channels_keep_their_names(capsys, tmp_path, grey_checkpoint):
    """An OME-TIFF's channels named DAPI and GFP came out unnamed, in OME-TIFF and OME-Zarr alike."""
    stack = np.random.default_rng(0).integers(0, 4000, (2, 3, 24, 32), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "cells.ome.tif", stack, ome=True,
                     metadata={"axes": "CZYX", "Channel": {"Name": ["DAPI", "GFP"]}})
    assert open_image(tmp_path / "cells.ome.tif").channel_names == ["DAPI", "GFP"]
    for name in ("out.ome.tif", "out.ome.zarr", "out.zarr"):
        code, _, err = run_cli(capsys, "restore", tmp_path / "cells.ome.tif", "-o", tmp_path / name, "--model",
                               grey_checkpoint, "-q")
        assert code == 0, err
        assert open_image(tmp_path / name).channel_names == ["DAPI", "GFP"], name
    with tifffile.TiffFile(tmp_path / "out.ome.tif") as tif:
        channels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]["Channel"]
    assert [channel["Name"] for channel in channels] == ["DAPI", "GFP"]
    omero = zarr.open_group(str(tmp_path / "out.ome.zarr"), mode="r").attrs["omero"]
    assert omero == {"channels": [{"label": "DAPI"}, {"label": "GFP"}]}  # what napari-ome-zarr names layers by
    code, _, err = run_cli(capsys, "restore", tmp_path / "out.ome.zarr", "-o", tmp_path / "again.ome.tif", "--model",
                           grey_checkpoint, "-q")
    assert code == 0, err
    assert open_image(tmp_path / "again.ome.tif").channel_names == ["DAPI", "GFP"]  # read from OME-Zarr's omero too


@pytest.mark.filterwarnings("ignore:The legacy `DICOM` plugin:DeprecationWarning")  # imageio, trying broken.png
def test_restore_a_folder_of_images(capsys, tmp_path):
    import imageio.v3 as iio

    from napari_gama_ir import create_model, restore

    rng = np.random.default_rng(0)
    grey, rgb = rng.integers(0, 256, (32, 40), dtype=np.uint8), rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    cells = rng.random((2, 32, 40), dtype=np.float32)
    photos = tmp_path / "photos"
    photos.mkdir()
    iio.imwrite(photos / "grey.png", grey)
    iio.imwrite(photos / "rgb.bmp", rgb)
    np.save(photos / "cells.npy", cells)
    (photos / "notes.txt").write_text("not an image")
    (photos / "._grey.png").write_bytes(b"\x00\x05\x16\x07")  # macOS's companion on a FAT drive: hidden, left out
    code, out, err = run_cli(capsys, "restore", photos, "-o", tmp_path / "restored", "-q")
    assert code == 0, err
    assert err.strip() == f"restored 3 images into {tmp_path / 'restored'}"
    assert sorted(p.name for p in (tmp_path / "restored").iterdir()) == ["cells.npy", "grey.png", "rgb.png"]
    # Each with the shipped model for its channels, as one image given alone.
    colour = create_model("gama_ir_xs-denoise-rgb", pretrained=True)
    assert np.array_equal(iio.imread(tmp_path / "restored" / "rgb.png"), restore(rgb, colour, "YXC", output_dtype="input"))
    grey_model = create_model("gama_ir_xs-denoise-grey", pretrained=True)
    assert np.array_equal(np.load(tmp_path / "restored" / "cells.npy"), restore(cells, grey_model, "ZYX"))

    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "restored").iterdir()}
    iio.imwrite(photos / "rgb.png", rgb)  # would land on rgb.bmp's output
    (photos / "broken.png").write_bytes(b"not a picture")
    for argv, message in [
        ([], "broken.png: not a readable picture"),
        (["--overwrite"], "broken.png: not a readable picture"),
        (["-o", photos], "the output folder must not be the input folder"),
        (["--workers", "2"], "a folder is restored on this machine"),
    ]:
        code, out, err = run_cli(capsys, "restore", photos, "-o", tmp_path / "restored", "-q", *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    (photos / "broken.png").unlink()
    code, out, err = run_cli(capsys, "restore", photos, "-o", tmp_path / "restored", "-q", "--overwrite")
    assert code == 2 and "rgb.bmp and rgb.png would both be restored into rgb.png" in err
    code, out, err = run_cli(capsys, "restore", photos, "-o", tmp_path / "restored", "-q")
    assert code == 2 and "cells.npy: already exists" in err
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "restored").iterdir()} == before  # nothing written


def test_a_folder_names_the_photos_it_leaves_out_and_keeps_a_confocal_stack_a_tiff(
    capsys, tmp_path, grey_checkpoint, monkeypatch,
):
    """A folder of an iPhone's HEIC photos was "no images found", and HEIC photos beside JPEGs were
    left out without a word (here, where pillow-heif is not installed); a .lsm stack (read as the
    TIFF it is) must not become a PNG."""
    import imageio.v3 as iio

    from napari_gama_ir.engine import io

    monkeypatch.setattr(io, "missing_decoders", lambda: {".heic": "a HEIF photo needs pillow-heif: pip install"})
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("IMG_0001.HEIC", "IMG_0002.HEIC"):
        (photos / name).write_bytes(b"\x00" * 16)
    code, _, err = run_cli(capsys, "restore", photos, "-o", tmp_path / "restored", "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no images found" in err and "2 .heic file(s): a HEIF photo needs pillow-heif: pip install" in err
    iio.imwrite(photos / "IMG_0003.JPG", np.random.default_rng(0).integers(0, 256, (24, 32), dtype=np.uint8))
    tifffile.imwrite(photos / "cells.lsm", np.zeros((2, 24, 32), np.uint16), photometric="minisblack",
                     metadata={"axes": "ZYX"})
    code, _, err = run_cli(capsys, "restore", photos, "-o", tmp_path / "restored", "--model", grey_checkpoint, "-q")
    assert code == 0, err
    assert err.strip().splitlines() == [
        "left out 2 .heic file(s): a HEIF photo needs pillow-heif: pip install",
        f"restored 2 images into {tmp_path / 'restored'}",
    ]
    assert sorted(p.name for p in (tmp_path / "restored").iterdir()) == ["IMG_0003.JPG", "cells.tif"]
    assert open_image(tmp_path / "restored" / "cells.tif").axes == "ZYX"


def test_a_folder_of_folders_is_restored_with_recursive_and_resumed(capsys, tmp_path, grey_checkpoint):
    """A plate's export (a folder a well) or a phone's (a folder a day) restored only the top
    folder's images, without a word; a folder run stopped by a bad image had to start again from
    the first image with --overwrite."""
    import imageio.v3 as iio

    rng = np.random.default_rng(0)
    plate = tmp_path / "plate"
    names = ["overview.png", "A01/a.png", "A02/site1/a.png", "A02/site1/b.png", ".thumbs/a.png"]
    for name in names:
        (plate / name).parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(plate / name, rng.integers(0, 256, (24, 32), dtype=np.uint8))
    zarr.open_array(str(plate / "A01" / "cells.zarr"), mode="w", shape=(2, 24, 32), dtype=np.float32)[:] = 1
    (plate / "A01" / "IMG_1.CR2").write_bytes(b"\x00" * 16)
    model = ["--model", grey_checkpoint, "-q"]
    code, _, err = run_cli(capsys, "restore", plate / "A02", "-o", tmp_path / "top", *model)
    assert code == 2 and err.strip().endswith(
        "no images in it, but 1 folder(s) of images inside it (such as site1); add --recursive to restore them")
    code, _, err = run_cli(capsys, "restore", plate, "-o", tmp_path / "top", *model)
    assert code == 0 and err.strip().splitlines()[0] == (
        f"left out 2 folder(s) of images inside {plate} (such as A01); add --recursive to restore them too")
    assert [p.name for p in (tmp_path / "top").iterdir()] == ["overview.png"]

    (plate / "A02" / "site1" / "b.png").write_bytes(b"broken")
    code, _, err = run_cli(capsys, "restore", plate, "-o", tmp_path / "all", "-r", *model)
    assert code == 2 and "b.png: not a readable picture" in err
    assert not (tmp_path / "all").exists()  # every image is opened before the first is restored
    iio.imwrite(plate / "A02" / "site1" / "b.png", rng.integers(0, 256, (24, 32), dtype=np.uint8))
    code, _, err = run_cli(capsys, "restore", plate, "-o", tmp_path / "all", "-r", *model)
    assert code == 0, err
    restored = sorted(str(p.relative_to(tmp_path / "all")) for p in (tmp_path / "all").rglob("*.*") if p.is_file()
                      and ".zarr" not in str(p))
    assert restored == ["A01/a.png", "A02/site1/a.png", "A02/site1/b.png", "overview.png"]
    assert open_image(tmp_path / "all" / "A01" / "cells.zarr").array.shape == (2, 24, 32)
    assert err.strip().splitlines() == [
        ("left out 1 .cr2 file(s): a camera raw file is not read; develop it, and export a 16-bit TIFF from the "
         "raw converter"),
        f"restored 5 images into {tmp_path / 'all'}",
    ]
    alone = tmp_path / "alone.png"
    run_cli(capsys, "restore", plate / "A02" / "site1" / "a.png", "-o", alone, *model)
    assert np.array_equal(iio.imread(tmp_path / "all" / "A02" / "site1" / "a.png"), iio.imread(alone))

    # Stopped by an image, then resumed: the images restored already are skipped, not redone.
    (tmp_path / "all" / "A02" / "site1" / "b.png").unlink()
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "all").rglob("*.png")}
    code, _, err = run_cli(capsys, "restore", plate, "-o", tmp_path / "all", "-r", *model)
    assert code == 2 and "overview.png: already exists (pass --overwrite to replace it, or --resume to skip it)" in err
    code, _, err = run_cli(capsys, "restore", plate, "-o", tmp_path / "all", "-r", "--resume", *model)
    assert code == 0, err
    assert err.strip().splitlines()[1:] == ["resuming: 4 of 5 images restored already",
                                            f"restored 1 images into {tmp_path / 'all'}"]
    assert {p: p.stat().st_mtime_ns for p in before} == before and (tmp_path / "all" / "A02" / "site1" / "b.png").is_file()
    for argv, message in [
        (["-o", tmp_path / "all", "--resume", "--overwrite"], "give --resume (skip the images restored already) or "),
        (["-o", plate / "restored"], "with --recursive, the output folder must not lie inside the input folder"),
    ]:
        code, _, err = run_cli(capsys, "restore", plate, "-r", *argv, *model)
        assert code == 2 and message in err and len(err.strip().splitlines()) <= 2, err


def test_a_folder_of_heic_and_avif_photos_is_restored_into_their_own_formats_with_their_exif(capsys, tmp_path):
    """They were restored into JPEGs: neither format could be written."""
    import pillow_heif
    from PIL import Image, ImageCms

    pillow_heif.register_heif_opener()
    (tmp_path / "iphone").mkdir()
    exif = Image.Exif()
    exif[0x0110] = "iPhone 15"
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    photo = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    for name in ("IMG_0001.HEIC", "IMG_0002.avif"):
        Image.fromarray(photo).save(tmp_path / "iphone" / name, exif=exif.tobytes(), icc_profile=profile)
    code, _, err = run_cli(capsys, "restore", tmp_path / "iphone", "-o", tmp_path / "restored", "-q")
    assert code == 0, err
    for name, form in (("IMG_0001.HEIC", "HEIF"), ("IMG_0002.avif", "AVIF")):
        with Image.open(tmp_path / "restored" / name) as restored:
            assert restored.format == form and restored.size == (64, 48) and restored.mode == "RGB"
            assert restored.getexif()[0x0110] == "iPhone 15" and restored.info["icc_profile"] == profile


def test_a_picture_is_restored_into_heic_and_avif_alpha_included(capsys, tmp_path, grey_checkpoint, monkeypatch):
    import imageio.v3 as iio
    import pillow_heif
    from PIL import Image

    from napari_gama_ir.engine import io

    pillow_heif.register_heif_opener()
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (40, 56, 4), dtype=np.uint8)
    iio.imwrite(tmp_path / "logo.png", rgba)
    iio.imwrite(tmp_path / "grey.png", rgba[..., 0])
    for output in ("logo.heic", "logo.avif"):
        code, _, err = run_cli(capsys, "restore", tmp_path / "logo.png", "-o", tmp_path / output, "-q")
        assert code == 0, err
        with Image.open(tmp_path / output) as restored:  # the opacity passed through, all but lossless
            assert restored.mode == "RGBA" and np.abs(np.asarray(restored)[..., 3].astype(int) - rgba[..., 3]).mean() < 8
    code, _, err = run_cli(capsys, "restore", tmp_path / "grey.png", "-o", tmp_path / "grey.heic", "--model",
                           grey_checkpoint, "-q")
    assert code == 0 and Image.open(tmp_path / "grey.heic").size == (56, 40), err
    np.save(tmp_path / "stack.npy", rng.random((2, 24, 32), dtype=np.float32))
    code, _, err = run_cli(capsys, "restore", tmp_path / "stack.npy", "-o", tmp_path / "stack.avif", "--model",
                           grey_checkpoint, "-q")
    assert code == 2 and "stack.avif: an AVIF holds one picture (axes YX, or YXC with 3-4 channels)" in err, err
    assert not (tmp_path / "stack.avif").exists()
    monkeypatch.setattr(io, "missing_codecs", lambda: {"heif": "pillow-heif: pip install 'napari-gama-ir[heic]'"})
    code, _, err = run_cli(capsys, "restore", tmp_path / "logo.png", "-o", tmp_path / "again.heic", "-q")
    assert code == 2 and err.strip().endswith("again.heic: writing HEIF needs pillow-heif: pip install "
                                              "'napari-gama-ir[heic]'"), err


def test_several_images_are_restored_into_a_folder_as_cp_copies_files(capsys, tmp_path, grey_checkpoint):
    """The shell's expansion of `restore *.png -o restored/` was "unrecognized arguments"."""
    import imageio.v3 as iio

    rng = np.random.default_rng(0)
    (tmp_path / "day2").mkdir()
    pictures = {name: rng.integers(0, 256, (24, 32), dtype=np.uint8) for name in ("a.png", "b.png", "day2/a.png")}
    for name, picture in pictures.items():
        iio.imwrite(tmp_path / name, picture)
    np.save(tmp_path / "cells.npy", rng.random((2, 24, 32), dtype=np.float32))
    images = [tmp_path / name for name in ("a.png", "b.png", "cells.npy")]
    code, _, err = run_cli(capsys, "restore", *images, "-o", tmp_path / "restored", "--model", grey_checkpoint, "-q")
    assert code == 0 and err.strip() == f"restored 3 images into {tmp_path / 'restored'}", err
    assert sorted(p.name for p in (tmp_path / "restored").iterdir()) == ["a.png", "b.png", "cells.npy"]
    code, _, err = run_cli(capsys, "restore", tmp_path / "b.png", "-o", tmp_path / "b_alone.png", "--model",
                           grey_checkpoint, "-q")
    assert code == 0, err
    assert np.array_equal(iio.imread(tmp_path / "restored" / "b.png"), iio.imread(tmp_path / "b_alone.png"))
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "restored").iterdir()}
    for inputs, output, message in [
        (["a.png", "day2/a.png"], "again",
         f"{tmp_path / 'a.png'} and {tmp_path / 'day2' / 'a.png'} would both be restored into a.png"),
        (["a.png", "b.png"], "one.png", "one.png: several images are restored into a folder, not into one image"),
        (["a.png", "day2"], "again", "day2: a folder; give one folder, or images"),
        (["a.png", "b.png"], ".", "a.png: the output must not be the input"),
        (["a.png", "b.png"], "restored", "restored/a.png: already exists (pass --overwrite to replace it, or --resume"),
    ]:
        overwrite = ["--overwrite"] if output == "." else []  # else "already exists" would come first
        code, _, err = run_cli(capsys, "restore", *[tmp_path / i for i in inputs], "-o", tmp_path / output,
                               "--model", grey_checkpoint, *overwrite, "-q")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "again").exists()
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "restored").iterdir()} == before


@pytest.mark.parametrize("kind", ["lzw", "zlib", "zarr"])
def test_an_image_with_corrupt_compressed_pixels_gets_one_line_and_no_output(capsys, tmp_path, grey_checkpoint, kind):
    """It stopped the run with a traceback from imagecodecs or numcodecs (a damaged copy, say)."""
    plane = np.random.default_rng(0).integers(0, 4000, (256, 256), dtype=np.uint16)
    if kind == "zarr":
        image = tmp_path / "plane.zarr"
        zarr.open_array(str(image), mode="w", shape=plane.shape, chunks=(128, 128), dtype=plane.dtype,
                        zarr_format=2)[:] = plane
        damaged, start = image / "1.1", 20  # in the compressed frame's header
    else:
        image = damaged = tmp_path / "plane.tif"
        tifffile.imwrite(image, plane, compression=kind)
        start = image.stat().st_size // 2  # the middle of the file: pixels
    data = bytearray(damaged.read_bytes())
    data[start:start + 100] = b"\xff" * 100
    damaged.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "restore", image, "-o", tmp_path / "out.zarr", "--model", grey_checkpoint, "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{image}: its pixels cannot be read" in err and not (tmp_path / "out.zarr").exists()


def test_an_image_restored_into_an_existing_folder_goes_there_under_its_name(capsys, tmp_path, grey_checkpoint):
    """As cp puts a file into a folder; it said "out: cannot write this format"."""
    import imageio.v3 as iio

    iio.imwrite(tmp_path / "scan.jpg", np.random.default_rng(0).integers(0, 256, (24, 32), dtype=np.uint8))
    tifffile.imwrite(tmp_path / "cells.tif", np.zeros((2, 24, 32), np.uint16), metadata={"axes": "ZYX"})
    (tmp_path / "out").mkdir()
    for name in ("scan.jpg", "cells.tif"):
        code, _, err = run_cli(capsys, "restore", tmp_path / name, "-o", tmp_path / "out", "--model", grey_checkpoint,
                               "-q")
        assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cells.tif", "scan.jpg"]
    code, _, err = run_cli(capsys, "restore", tmp_path / "cells.tif", "-o", tmp_path, "--model", grey_checkpoint)
    assert code == 2 and "cells.tif: the output must not be the input" in err
    # A new folder, named so with its slash, as several images are restored into one.
    code, _, err = run_cli(capsys, "restore", tmp_path / "scan.jpg", "-o", f"{tmp_path / 'new'}/", "--model",
                           grey_checkpoint, "-q")
    assert code == 0, err
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["scan.jpg"]
    code, _, err = run_cli(capsys, "restore", tmp_path / "scan.jpg", "-o", f"{tmp_path / 'scan.zarr'}/", "--model",
                           grey_checkpoint, "-q")
    assert code == 0 and open_image(tmp_path / "scan.zarr").array.shape == (24, 32)  # a store, not a folder
    # Without the slash, a name with no format was "cannot write this format".
    code, _, err = run_cli(capsys, "restore", tmp_path / "scan.jpg", "-o", tmp_path / "other", "--model",
                           grey_checkpoint)
    assert code == 2 and err.strip().endswith("or end the name with / to restore into a new folder")
    assert not (tmp_path / "other").exists()


def test_restore_png_to_png_keeps_8_bits(capsys, tmp_path, grey_checkpoint):
    # The default float32 output cannot go into a PNG: it failed after the restoration, with a traceback for RGB.
    import imageio.v3 as iio

    rgb = save_checkpoint(make_tiny_model(3), tmp_path / "models" / "rgb")
    pictures = {"grey": (np.zeros((24, 32), np.uint8), grey_checkpoint), "rgb": (np.zeros((24, 32, 3), np.uint8), rgb)}
    for name, (picture, checkpoint) in pictures.items():
        iio.imwrite(tmp_path / f"{name}.png", picture + 100)
        code, out, err = run_cli(capsys, "restore", tmp_path / f"{name}.png", "-o", tmp_path / f"{name}-out.png",
                                 "--model", checkpoint, "-q")
        assert code == 0, err
        restored = iio.imread(tmp_path / f"{name}-out.png")
        assert restored.dtype == np.uint8 and restored.shape == picture.shape
    code, out, err = run_cli(capsys, "restore", tmp_path / "grey.png", "-o", tmp_path / "float.png",
                             "--model", grey_checkpoint, "--output-dtype", "float32")
    assert code == 2 and "a PNG holds 8- or 16-bit integers, not float32" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "float.png").exists()


def test_a_microscopes_three_channels_get_the_grey_model_and_a_photos_colours_the_colour_one(capsys, tmp_path):
    """Three fluorescence channels (an ImageJ or OME file's C axis) went to the colour model, trained
    on photos, which mixes them as red, green and blue."""
    import imageio.v3 as iio

    rng = np.random.default_rng(0)
    tifffile.imwrite(tmp_path / "cells.tif", rng.integers(0, 4000, (2, 3, 32, 32), dtype=np.uint16), imagej=True,
                     metadata={"axes": "ZCYX"})
    tifffile.imwrite(tmp_path / "cells.ome.tif", rng.integers(0, 4000, (3, 32, 32), dtype=np.uint16),
                     metadata={"axes": "CYX"})
    write_image(rng.integers(0, 4000, (3, 32, 32), dtype=np.uint16), tmp_path / "in.ome.zarr", "CYX")
    tifffile.imwrite(tmp_path / "photo.tif", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), photometric="rgb")
    iio.imwrite(tmp_path / "photo.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    models = {}
    for name in ("cells.tif", "cells.ome.tif", "in.ome.zarr", "photo.tif", "photo.png"):
        code, _, err = run_cli(capsys, "restore", tmp_path / name, "-o", tmp_path / f"{name}.zarr", "-q")
        assert code == 0, err
        models[name] = zarr.open_array(str(tmp_path / f"{name}.zarr"), mode="r").attrs["model"]
    assert models == {"cells.tif": "gama_ir_xs-denoise-grey", "cells.ome.tif": "gama_ir_xs-denoise-grey",
                      "in.ome.zarr": "gama_ir_xs-denoise-grey", "photo.tif": "gama_ir_xs-denoise-rgb",
                      "photo.png": "gama_ir_xs-denoise-rgb"}
    for name in ("cells.tif", "photo.png"):  # evaluate chooses as restore does
        code, _, err = run_cli(capsys, "evaluate", "--noisy", tmp_path / name, "--clean", tmp_path / name,
                               "--json", tmp_path / f"{name}.json")
        assert code == 0, err
        assert json.loads((tmp_path / f"{name}.json").read_text())["model"] == models[name]


def test_restore_rgba_png_keeps_its_opacity(capsys, tmp_path):
    import imageio.v3 as iio
    import zarr

    from napari_gama_ir import restore

    rgba = np.random.default_rng(0).integers(0, 256, (24, 32, 4), dtype=np.uint8)
    iio.imwrite(tmp_path / "cut-out.png", rgba)
    rgb = save_checkpoint(make_tiny_model(3), tmp_path / "rgb")
    code, out, err = run_cli(capsys, "restore", tmp_path / "cut-out.png", "-o", tmp_path / "out.png", "--model", rgb, "-q")
    assert code == 0, err
    restored = iio.imread(tmp_path / "out.png")
    assert np.array_equal(restored[..., 3], rgba[..., 3])
    assert np.array_equal(restored[..., :3], restore(rgba[..., :3], make_tiny_model(3), "YXC", output_dtype="input"))
    code, out, err = run_cli(capsys, "restore", tmp_path / "cut-out.png", "-o", tmp_path / "out.zarr", "-q")
    assert code == 0, err  # the default model is the colour one, not the grey one for four channels
    assert zarr.open(tmp_path / "out.zarr", mode="r").attrs["model"] == "gama_ir_xs-denoise-rgb"
    code, out, err = run_cli(capsys, "restore", tmp_path / "cut-out.png", "-o", tmp_path / "c.zarr", "--workers", 1)
    assert code == 2 and "has an alpha channel, which restoring on a cluster does not handle" in err


def test_a_restored_photo_keeps_its_colour_profile_and_exif(capsys, tmp_path):
    """A phone's photo is in Display P3, named by its ICC profile; without it viewers took the
    restored PNG for sRGB and showed other colours. Its camera and date were lost too."""
    from PIL import Image, ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    exif = photo.getexif()
    exif.update({0x0110: "Phone 15", 0x0132: "2026:11:28 12:00:00", 0x0112: 6})  # model, date, orientation
    exif.get_ifd(0x8769).update({0xA002: 32, 0xA003: 24})  # the stored pixels' width and height
    photo.save(tmp_path / "photo.jpg", icc_profile=profile, exif=exif.tobytes())
    rgb = save_checkpoint(make_tiny_model(3), tmp_path / "rgb")
    for name in ("out.png", "out.tif"):
        code, _, err = run_cli(capsys, "restore", tmp_path / "photo.jpg", "-o", tmp_path / name, "--model", rgb, "-q")
        assert code == 0, err
    with Image.open(tmp_path / "out.png") as restored:
        assert restored.size == (24, 32) and restored.info["icc_profile"] == profile
        kept = restored.getexif()
    # Upright as read, so the tag says so: a tag 6 kept would have the viewer turn it again.
    assert (kept[0x0110], kept[0x0132], kept[0x0112]) == ("Phone 15", "2026:11:28 12:00:00", 1)
    assert (kept.get_ifd(0x8769)[0xA002], kept.get_ifd(0x8769)[0xA003]) == (24, 32)  # turned as its pixels
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:
        assert tif.pages[0].iccprofile == profile
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).convert("CMYK").save(
        tmp_path / "print.jpg", icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes())
    code, _, err = run_cli(capsys, "restore", tmp_path / "print.jpg", "-o", tmp_path / "print.png", "--model", rgb, "-q")
    assert code == 0, err
    with Image.open(tmp_path / "print.png") as restored:  # converted to RGB: the profile no longer applies
        assert restored.mode == "RGB" and "icc_profile" not in restored.info


def test_a_photo_restores_to_a_jpeg_and_keeps_its_bits_in_a_tiff(capsys, tmp_path):
    """`-o out.jpg` was "cannot write this format"; a photo restored to .tif was float32, which
    photo editors take for 0-1 and showed blown out to white."""
    from PIL import Image, ImageCms, JpegImagePlugin

    from napari_gama_ir import restore

    rng = np.random.default_rng(0)
    pixels = np.clip(rng.normal(128, 20, (48, 64, 3)), 0, 255).astype(np.uint8)
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    photo = Image.fromarray(pixels)
    exif = photo.getexif()
    exif[0x0110] = "Camera X"
    photo.save(tmp_path / "photo.jpg", quality=98, icc_profile=profile, exif=exif.tobytes())
    model = make_tiny_model(3)
    rgb = save_checkpoint(model, tmp_path / "rgb")
    for name in ("out.jpg", "out.tif"):
        code, _, err = run_cli(capsys, "restore", tmp_path / "photo.jpg", "-o", tmp_path / name, "--model", rgb, "-q")
        assert code == 0, err
    expected = restore(open_image(tmp_path / "photo.jpg").array.compute(), model, "YXC", output_dtype="input")
    with Image.open(tmp_path / "out.jpg") as restored:
        assert restored.format == "JPEG" and restored.mode == "RGB" and restored.info["icc_profile"] == profile
        assert restored.getexif()[0x0110] == "Camera X"
        assert JpegImagePlugin.get_sampling(restored) == 0  # colours at full resolution (4:4:4)
        written = np.asarray(restored, np.float64)
    assert 10 * np.log10(255**2 / np.mean((written - expected) ** 2)) > 30  # these pixels are near noise
    assert np.array_equal(tifffile.imread(tmp_path / "out.tif"), expected)  # 8 bits, as the photo's
    deep = rng.integers(0, 65536, (48, 64, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "deep.tif", deep, photometric="rgb")
    code, _, err = run_cli(capsys, "restore", tmp_path / "deep.tif", "-o", tmp_path / "deep_out.tif", "--model", rgb,
                           "-q")
    assert code == 0, err
    assert tifffile.imread(tmp_path / "deep_out.tif").dtype == np.uint16
    Image.fromarray(np.dstack([pixels, np.full((48, 64), 200, np.uint8)])).save(tmp_path / "logo.png")
    for image, message in [
        ("deep.tif", "out.jpg: a JPEG holds 8-bit integers, not uint16; write .tif, .zarr or .npy"),
        ("logo.png", ("a JPEG holds one picture (axes YX, or YXC with 3 channels), not axes YXC of shape (48, 64, 4); "
                      "write .png for opacity, or .tif, .zarr or .npy")),
    ]:
        code, _, err = run_cli(capsys, "restore", tmp_path / image, "-o", tmp_path / "out.jpg", "--model", rgb,
                               "--overwrite", "-q")
        assert code == 2 and message in err, err


BAD_INPUTS = {
    "missing file": (["restore", "{tmp}/nope.tif", "-o", "{tmp}/o.zarr"], "no such file"),
    "unknown format": (["restore", "{tmp}/notes.txt", "-o", "{tmp}/o.zarr"], "unknown image format"),
    "axes mismatch": (["restore", "{stack}", "-o", "{tmp}/o.zarr", "--axes", "YX"], "name 2 dimensions"),
    "channel mismatch": (["restore", "{stack}", "-o", "{tmp}/o.zarr", "--model", "{rgb}"], "expects 3 channels"),
    "existing output": (["restore", "{stack}", "-o", "{tmp}/exists.zarr"], "already exists"),
    "output under a file": (["restore", "{stack}", "-o", "{tmp}/notes.txt/o.zarr"], "is not a folder"),
    "missing output folder": (["restore", "{stack}", "-o", "{tmp}/nowhere/o.zarr"], "does not exist"),
    "output is input": (["restore", "{stack}", "-o", "{stack}", "--overwrite"], "must not be the input"),
    "output in input": (["restore", "{stack}", "-o", "{stack}/restored.zarr"], "must not be inside the input"),
    "tile too small": (["restore", "{stack}", "-o", "{tmp}/o.zarr", "--tile", "8"], "smaller than this network's minimum"),
    "unknown model": (["restore", "{stack}", "-o", "{tmp}/o.zarr", "--model", "nope"], "unknown model 'nope'"),
    "no shipped weights": (["restore", "{stack}", "-o", "{tmp}/o.zarr", "--model", "gama_ir_s"],
                           "for the architecture 'gama_ir_s'; its trained models: gama_ir_s-denoise-rgb, gama_ir_s-denoise-grey"),
    "unknown output dtype": (["restore", "{stack}", "-o", "{tmp}/o.zarr", "--output-dtype", "int3"],
                             "unknown output dtype 'int3'"),
    "CUDA graphs off CUDA": (["restore", "{stack}", "-o", "{tmp}/o.zarr", "--device", "cpu", "--cuda-graphs"],
                             "CUDA graphs need a CUDA device"),
    # 0 read as "not given" once, and restored without a cluster.
    "no workers": (["restore", "{stack}", "-o", "{tmp}/o.zarr", "--workers", "0"], "--workers must be at least 1, got 0"),
    "no threads per worker": (["restore", "{stack}", "-o", "{tmp}/o.zarr", "--workers", "2", "--threads-per-worker", "-1"],
                              "--threads-per-worker must be at least 1, got -1"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_line_and_no_output(case, capsys, tmp_path, grey_checkpoint, stack_zarr):
    argv, message = BAD_INPUTS[case]
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "exists.zarr").mkdir()
    rgb = save_checkpoint(make_tiny_model(3), tmp_path / "models" / "rgb")
    argv = [a.format(tmp=tmp_path, stack=stack_zarr[0], rgb=rgb) for a in argv]
    if "--model" not in argv:
        argv += ["--model", grey_checkpoint]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("napari-gama-ir: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_output_that_holds_the_input_is_refused_even_with_overwrite(capsys, tmp_path, grey_checkpoint):
    """Replacing a zarr group with a restore of one of its own arrays once removed that array."""
    group = zarr.open_group(tmp_path / "experiment.zarr", mode="w")
    raw = group.create_array("raw", shape=(2, 40, 48), dtype="uint16")
    raw[:] = np.arange(2 * 40 * 48, dtype=np.uint16).reshape(2, 40, 48)
    code, _, err = run_cli(capsys, "restore", tmp_path / "experiment.zarr" / "raw", "-o", tmp_path / "experiment.zarr",
                             "--overwrite", "--axes", "ZYX", "--model", grey_checkpoint, "-q")
    assert code == 2 and err.strip().endswith(f"the output must not hold the input {tmp_path / 'experiment.zarr' / 'raw'}")
    kept = zarr.open_array(tmp_path / "experiment.zarr" / "raw", mode="r")
    assert np.array_equal(kept[:], raw[:])


def test_unwritable_output_folder_is_refused(capsys, tmp_path, grey_checkpoint, stack_zarr, monkeypatch):
    # Root may write anywhere, so the permission answer is simulated.
    import os

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if mode == os.W_OK else real_access(path, mode))
    code, out, err = run_cli(capsys, "restore", stack_zarr[0], "-o", tmp_path / "o.zarr", "--model", grey_checkpoint)
    assert code == 2 and "is not writable" in err and not (tmp_path / "o.zarr").exists()


def test_a_device_too_small_for_any_tile_is_one_line_and_leaves_no_output(capsys, tmp_path, grey_checkpoint,
                                                                          monkeypatch):
    import torch

    from napari_gama_ir.engine import ModelRunner

    def out_of_memory(self, tiles, outputs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(ModelRunner, "_forward", out_of_memory)
    np.save(tmp_path / "in.npy", np.zeros((2, 40, 40), np.float32))
    code, _, err = run_cli(capsys, "restore", tmp_path / "in.npy", "-o", tmp_path / "o.zarr", "--model", grey_checkpoint,
                           "--tile", 32, "--overlap", 8, "-q")
    assert code == 2 and err.splitlines()[-1] == (
        "napari-gama-ir: error: one 16x16 tile, the smallest this network takes, does not fit in cpu memory")
    assert "Traceback" not in err and not (tmp_path / "o.zarr").exists()


def test_no_data_in_the_input_stays_no_data_in_the_output(capsys, tmp_path, grey_checkpoint):
    # NaN and infinities were refused, which left a registered stack's padding to the user.
    data = np.random.default_rng(0).random((3, 16, 16), dtype=np.float32)
    data[1, :, :4] = np.nan
    data[1, 2, 8] = np.inf
    np.save(tmp_path / "in.npy", data)
    code, out, err = run_cli(capsys, "restore", tmp_path / "in.npy", "-o", tmp_path / "o.zarr", "--model", grey_checkpoint, "-q")
    assert code == 0, err
    result = zarr.open_array(str(tmp_path / "o.zarr"), mode="r")[:]
    assert np.isnan(result[1, :, :4]).all() and result[1, 2, 8] == np.inf
    assert np.isfinite(result).sum() == result.size - 16 * 4 - 1


def test_models_lists_registry_and_local_checkpoints(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_GAMA_IR_HOME", str(tmp_path))
    save_checkpoint(make_tiny_model(3), tmp_path / "models" / "my_scope")
    code, out, err = run_cli(capsys, "models")
    assert code == 0 and "gama_ir_s" in out and "gama_ir_l" in out
    assert "Defaults when no --model is named" in out and "3-channel images on CPU" in out
    assert "my_scope" in out and "3 channel(s), width 8" in out
    # The model for photos with colours at half resolution is named as a default too (it was not),
    # and every name fits its column (the longest ran into its description).
    defaults = out.split("Defaults when no --model is named:\n")[1].split("Local checkpoints")[0].splitlines()
    assert any(line.split()[0] == "gama_ir_xs-denoise-rgb-jpeg" and "JPEG" in line for line in defaults)
    listed = [line for line in out.splitlines() if line.startswith("  ")]
    assert len({line.index(line.split()[1], len(line.split()[0]) + 2) for line in listed}) == 1


def test_user_model_is_found_by_name(capsys, tmp_path, monkeypatch, stack_zarr):
    monkeypatch.setenv("NAPARI_GAMA_IR_HOME", str(tmp_path))
    save_checkpoint(make_tiny_model(1), tmp_path / "models" / "my_scope")
    code, out, err = run_cli(capsys, "restore", stack_zarr[0], "-o", tmp_path / "o.zarr", "--model", "my_scope", "-q")
    assert code == 0, err


def test_help_everywhere(capsys):
    for argv in (["--help"], ["restore", "--help"], ["train", "--help"], ["evaluate", "--help"], ["models", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    assert "--overlap" in capsys.readouterr().out


def test_demo_restores_and_reports_psnr(capsys, tmp_path):
    code, out, err = run_cli(capsys, "demo", "-o", tmp_path / "demo", "-q", "--tile", 128)
    assert code == 0, err
    assert (tmp_path / "demo" / "restored.tif").is_file() and (tmp_path / "demo" / "fluorescence_restored.tif").is_file()
    assert "RANDOMLY INITIALISED" not in out + err  # the shipped default models run
    assert "model gama_ir_xs-denoise-rgb" in out and "model gama_ir_xs-denoise-grey" in out
    gains = [float(part.split(" dB)")[0]) for part in out.split("dB (")[1:]]
    assert len(gains) == 2 and min(gains) > 5  # real restorations (the model cards give the measured figures)
    psnr_line = [line for line in out.splitlines() if "PSNR" in line]
    code, again, _ = run_cli(capsys, "demo", "-o", tmp_path / "demo", "-q", "--tile", 128)  # its own files replaced
    assert psnr_line == [line for line in again.splitlines() if "PSNR" in line]  # reproducible


def test_the_demo_never_writes_over_files_of_the_users(capsys, tmp_path):
    """``demo -o`` a folder of one's own replaced any noisy.tif or restored.tif in it."""
    (tmp_path / "restored.tif").write_bytes(b"my own work")
    code, _, err = run_cli(capsys, "demo", "-o", tmp_path, "-q")
    assert code == 2
    assert err.strip().endswith(f"{tmp_path / 'restored.tif'}: exists and was not written by the demo; choose another --output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["restored.tif"]
    assert (tmp_path / "restored.tif").read_bytes() == b"my own work"


def test_warnings_show_as_one_line(capsys, monkeypatch):
    import warnings

    from napari_gama_ir import cli

    def warn(args):
        warnings.warn("out of device memory; retrying with tiles of 256 pixels", RuntimeWarning, stacklevel=1)
        warnings.warn("first line\nsecond line", UserWarning, stacklevel=1)

    monkeypatch.setattr(cli, "run_models", warn)
    code, out, err = run_cli(capsys, "models")
    assert code == 0 and err.splitlines() == [
        "napari-gama-ir: warning: out of device memory; retrying with tiles of 256 pixels",
        "napari-gama-ir: warning: first line",
    ]


@pytest.mark.parametrize("name", ["out.tif", "out.zarr", "out.png"])
def test_ctrl_c_stops_a_large_plane_within_a_few_passes_and_writes_nothing(capsys, tmp_path, grey_checkpoint,
                                                                           monkeypatch, name):
    # The writer's threads were waited for: Ctrl-C on one large plane (one chunk) took as long as
    # the rest of the plane (19 s for a 24-megapixel photo on the project's CPU).
    import time

    picture = (np.random.default_rng(2).random((400, 400)) * 255).astype(np.uint8)
    np.save(tmp_path / "scan.npy", picture)
    passes = recorded_passes(monkeypatch, pause=0.05, interrupt_at=3)
    code, _, err = run_cli(capsys, "restore", tmp_path / "scan.npy", "-o", tmp_path / name, "--model", grey_checkpoint,
                           "--tile", 48, "--overlap", 16, "--batch", 1, "--output-dtype", "input", "-q")
    assert code == 130 and "interrupted; no output was written" in err
    time.sleep(0.5)  # dask's threads, which compute a PNG, are not waited for: they must stop too
    assert 3 <= len(passes) <= 6  # of the plane's 289 tiles
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "scan.npy"]


@pytest.mark.parametrize("name", ["out.tif", "out.zarr"])
def test_sigterm_stops_a_restore_and_writes_nothing(tmp_path, grey_checkpoint, name):
    """SIGTERM (a batch system's wall-time limit, ``kill``) ends a restore as Ctrl-C does; it used to
    end the process on the spot, leaving the partial output for the next run to remove."""
    import signal
    import subprocess
    import sys
    import time

    np.save(tmp_path / "stack.npy", np.random.default_rng(3).random((64, 256, 256), dtype=np.float32))
    command = [sys.executable, "-m", "napari_gama_ir.cli", "restore", tmp_path / "stack.npy", "-o", tmp_path / name,
               "--model", grey_checkpoint, "--tile", 64, "--overlap", 16, "-q"]
    process = subprocess.Popen([str(part) for part in command], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(f".{name}.partial") for p in tmp_path.iterdir()):  # writing: handlers set
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted; no output was written" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "stack.npy"]
