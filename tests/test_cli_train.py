"""The ``train`` and ``evaluate`` commands."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_gama_ir import create_model, load_checkpoint, save_checkpoint
from napari_gama_ir.samples import noisy_fluorescence_stack

from .conftest import make_tiny_model
from .test_cli import run_cli

FAST = ["--steps", 6, "--batch", 2, "--patch", 32, "-q"]


@pytest.fixture
def fluorescence(tmp_path, monkeypatch):
    """A noisy uint16 stack and its clean float32 counterpart as TIFF files; a private models folder."""
    monkeypatch.setenv("NAPARI_GAMA_IR_HOME", str(tmp_path / "home"))
    noisy, clean = noisy_fluorescence_stack(planes=6, size=64)
    tifffile.imwrite(tmp_path / "noisy.tif", noisy, metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "clean.tif", clean, metadata={"axes": "ZYX"})
    return tmp_path / "noisy.tif", tmp_path / "clean.tif"


def test_train_register_and_evaluate(capsys, tmp_path, fluorescence):
    noisy, clean = fluorescence
    code, out, err = run_cli(capsys, "train", "--noisy", noisy, "--clean", clean, "-o", tmp_path / "run",
                             "--register", "my-fluo", "--val-every", 3, *FAST)
    assert code == 0, err
    assert "training: supervised, 6 plane(s) (1 validation crop(s)), 6 steps of 2x32px" in err
    assert (tmp_path / "run" / "model.json").is_file() and "registered as 'my-fluo'" in out
    # The best validation in words, as the step lines, not a Python dict.
    assert re.search(r"model: .*model\.json, best validation at step [36]: train_loss [\d.]+, psnr [\d.]+, ssim", out)
    model = create_model("my-fluo")
    assert model.config.normalization["method"] == "percentile"  # uint16 input: auto picks percentiles
    record = model.config.metadata["training"]
    assert record["data"]["sources"] == {"noisy": str(noisy), "clean": str(clean)} and record["data"]["has_clean"]
    assert record["settings"]["steps"] == 6 and len(record["history"]) == 2

    code, out, err = run_cli(capsys, "evaluate", "--model", "my-fluo", "--noisy", noisy, "--clean", clean,
                             "--tile", 0, "--json", tmp_path / "scores.json")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["image", "PSNR", "noisy"] and lines[-1].startswith("mean")
    assert len(lines) == 1 + 6 + 1  # header, one row per plane, mean
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert len(scores["images"]) == 6
    assert scores["mean"]["psnr"] == pytest.approx(float(lines[-1].split()[2]), abs=0.01)


def test_a_network_trained_on_a_microscopes_three_channels_is_no_colour_network(capsys, tmp_path):
    noisy, clean = noisy_fluorescence_stack(planes=6, size=48)
    for name, stack in (("noisy", noisy), ("clean", clean.astype(np.float32))):
        tifffile.imwrite(tmp_path / f"{name}.tif", stack.reshape(2, 3, 48, 48), imagej=True, metadata={"axes": "ZCYX"})
    code, _, err = run_cli(capsys, "train", "--noisy", tmp_path / "noisy.tif", "--clean", tmp_path / "clean.tif",
                           "-o", tmp_path / "run", *FAST)
    assert code == 0, err
    config = load_checkpoint(tmp_path / "run" / "model.json").config
    assert (config.in_channels, config.channel_meaning) == (3, "3 channels")


def test_evaluate_checks_the_report_folder_before_restoring(capsys, tmp_path, fluorescence):
    noisy, clean = fluorescence
    code, out, err = run_cli(capsys, "evaluate", "--model", save_checkpoint(make_tiny_model(1), tmp_path / "tiny"), "--noisy", noisy,
                             "--clean", clean, "--json", tmp_path / "missing" / "scores.json")
    assert code == 2 and out == ""  # no table: nothing was restored
    assert err.strip() == f"napari-gama-ir: error: the folder of {tmp_path / 'missing' / 'scores.json'} does not exist"


def test_evaluate_never_writes_its_report_over_an_input(capsys, tmp_path, fluorescence):
    noisy, clean = fluorescence
    image = clean.read_bytes()
    code, out, err = run_cli(capsys, "evaluate", "--model", save_checkpoint(make_tiny_model(1), tmp_path / "tiny"),
                             "--noisy", noisy, "--clean", clean, "-q", "--json", clean)
    assert code == 2 and out == ""  # refused before restoring anything
    assert err.strip() == f"napari-gama-ir: error: {clean}: a report must not be written over or into the input {clean}"
    assert clean.read_bytes() == image


def test_evaluate_takes_a_folder_of_grey_and_colour_pictures_with_grey(capsys, tmp_path):
    """It refused them with the advice "(--grey)", an option only train had."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for version in ("noisy", "clean"):
        (tmp_path / version).mkdir()
    for name, mode in (("a.png", "RGB"), ("b.png", "L")):
        clean = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        noisy = np.clip(clean + rng.normal(0, 20, clean.shape), 0, 255).astype(np.uint8)
        Image.fromarray(clean).convert(mode).save(tmp_path / "clean" / name)
        Image.fromarray(noisy).convert(mode).save(tmp_path / "noisy" / name)
    arguments = ["evaluate", "--model", save_checkpoint(make_tiny_model(1), tmp_path / "tiny"),
                 "--noisy", tmp_path / "noisy", "--clean", tmp_path / "clean"]
    code, _, err = run_cli(capsys, *arguments)
    assert code == 2 and "the images have different channel counts: 1 (b.png), 3 (a.png); convert colour images to grey (--grey)" in err
    code, out, err = run_cli(capsys, *arguments, "--grey")
    assert code == 0, err
    assert [line.split()[0] for line in out.strip().splitlines()] == ["image", "a.png", "b.png", "mean"]


def test_evaluate_writes_strict_json_when_a_psnr_is_infinite(capsys, tmp_path, fluorescence):
    _, clean = fluorescence
    code, out, err = run_cli(capsys, "evaluate", "--model", save_checkpoint(make_tiny_model(1), tmp_path / "tiny"),
                             "--noisy", clean, "--clean", clean, "-q", "--json", tmp_path / "scores.json")
    assert code == 0, err
    assert out.splitlines()[-1].split()[1] == "inf"  # the table says it
    text = (tmp_path / "scores.json").read_text()
    scores = json.loads(text, parse_constant=lambda name: pytest.fail(f"not JSON: {name}"))
    assert scores["mean"]["psnr_noisy"] is None and all(row["psnr_noisy"] is None for row in scores["images"])
    assert scores["mean"]["ssim_noisy"] == 1.0 and isinstance(scores["mean"]["psnr"], float)


def test_evaluate_scores_only_the_pixels_that_hold_data(capsys, tmp_path, fluorescence):
    # NaN padding (a registered pair's) made every figure nan.
    noisy, clean = (tifffile.imread(path).astype(np.float32) for path in fluorescence)
    noisy[:, :, :16] = np.nan
    tifffile.imwrite(tmp_path / "padded.tif", noisy, metadata={"axes": "ZYX"})
    model = save_checkpoint(make_tiny_model(1), tmp_path / "tiny")
    code, _, err = run_cli(capsys, "evaluate", "--model", model, "--noisy", tmp_path / "padded.tif",
                             "--clean", fluorescence[1], "-q", "--json", tmp_path / "scores.json")
    assert code == 0, err
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert len(scores["images"]) == 6 and all(np.isfinite(value) for value in scores["mean"].values())
    # The same pixels cut out: the same PSNR (SSIM differs only by the windows at the cut).
    tifffile.imwrite(tmp_path / "cut_noisy.tif", noisy[:, :, 16:], metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "cut_clean.tif", clean[:, :, 16:], metadata={"axes": "ZYX"})
    run_cli(capsys, "evaluate", "--model", model, "--noisy", tmp_path / "cut_noisy.tif",
            "--clean", tmp_path / "cut_clean.tif", "-q", "--json", tmp_path / "cut.json")
    cut = json.loads((tmp_path / "cut.json").read_text())
    assert scores["mean"]["psnr_noisy"] == pytest.approx(cut["mean"]["psnr_noisy"], abs=1e-9)


def test_self_supervised_stop_and_resume(capsys, tmp_path, fluorescence):
    noisy, _ = fluorescence
    run = tmp_path / "n2v"
    code, out, err = run_cli(capsys, "train", "--noisy", noisy, "--self-supervised", "-o", run,
                             "--minutes", 1e-6, "--checkpoint-every", 100, "--register", "n2v", *FAST)
    assert code == 0, err
    assert "training: noise2void" in err and "registered" not in out  # a stopped run registers nothing
    # The command printed continues the run with its data and registers it (it said "--resume -o" alone).
    resume = re.search(r"stopped at step 1/6; continue with: (.*)", err).group(1)
    assert shlex.split(resume) == ["napari-gama-ir", "train", "--noisy", str(noisy), "--resume", "-o", str(run),
                                   "--register", "n2v"]
    code, out, err = run_cli(capsys, "train", "--noisy", noisy, "-o", run, "--resume", "--steps", 9)
    assert code == 2 and err.strip() == (
        "napari-gama-ir: error: --steps cannot be given with --resume: the checkpoint's settings are used"
    )
    code, out, err = run_cli(capsys, *shlex.split(resume)[1:], "-q")
    assert code == 0, err
    assert "registered as 'n2v'" in out
    state = json.loads((run / "checkpoint" / "training.json").read_text())
    assert state["step"] == 6 and state["settings"]["objective"] == "noise2void"


def test_a_models_folder_that_cannot_be_written_is_named_before_training(capsys, tmp_path, fluorescence, monkeypatch):
    """--register failed after the training, with "[Errno 20] Not a directory"."""
    noisy, clean = fluorescence
    monkeypatch.setenv("NAPARI_GAMA_IR_HOME", str(noisy / "home"))  # under a file
    code, _, err = run_cli(capsys, "train", "--noisy", noisy, "--clean", clean, "-o", tmp_path / "run",
                           "--register", "mine", *FAST)
    assert code == 2 and not (tmp_path / "run").exists()
    assert err.strip() == (f"napari-gama-ir: error: your models folder {noisy / 'home' / 'models'} cannot be made or "
                           "written; set NAPARI_GAMA_IR_HOME to a folder that can")


def test_the_command_that_continues_a_run_keeps_its_cluster_and_device():
    from napari_gama_ir.cli import _resume_command, build_parser

    args = build_parser().parse_args(["train", "--noisy", "my noisy", "--clean", "c.tif", "--axes", "ZYX", "-o", "run",
                                      "--workers", "3", "--threads-per-worker", "2", "--device", "cpu", "--grey",
                                      "--steps", "10", "--lr", "1e-4"])
    assert shlex.split(_resume_command(args)) == [
        "napari-gama-ir", "train", "--noisy", "my noisy", "--clean", "c.tif", "--axes", "ZYX", "--workers", "3",
        "--threads-per-worker", "2", "--device", "cpu", "--grey", "--resume", "-o", "run",
    ]  # and none of the settings, which --resume refuses


BAD_TRAINING = {
    "no clean, not self-supervised": (["--noisy", "{noisy}"], "supervised training needs clean images"),
    "clean only, no noise model": (["--clean", "{clean}"], "synthetic noise model"),
    "clean is noisy": (["--noisy", "{noisy}", "--clean", "{noisy}"], "--noisy and --clean are the same"),
    "shapes differ": (["--noisy", "{noisy}", "--clean", "{short}"], "differ in shape"),
    # An RGB model is made grey (test_train.py); three channels of another meaning are not.
    "3-channel model, grey data": (["--noisy", "{noisy}", "--clean", "{clean}", "--from", "{three}"], "takes 3 channel"),
    "bad noise": (["--clean", "{clean}", "--noise", "gaussian:x"], "LOW-HIGH"),
    "existing run": (["--noisy", "{noisy}", "--clean", "{clean}", "-o", "{tmp}/done"], "holds a training run already"),
    "existing model": (["--noisy", "{noisy}", "--clean", "{clean}", "-o", "{tmp}/model"], "holds a training run already"),
    # Before, training went on to its end and then failed with "[Errno 17] File exists".
    "output is a file": (["--noisy", "{noisy}", "--clean", "{clean}", "-o", "{clean}"], "clean.tif: not a folder"),
    # --overwrite failed with "[Errno 20] Not a directory".
    "checkpoint is a file": (["--noisy", "{noisy}", "--clean", "{clean}", "-o", "{tmp}/noted", "--overwrite"],
                             "noted/checkpoint: a file, where a training run keeps its checkpoint folder"),
    "bad model name": (["--noisy", "{noisy}", "--clean", "{clean}", "--register", "a/b"], "model name 'a/b' must be"),
    "no data": ([], "give --noisy"),
    # --minutes 0 once trained without a limit, and a negative one stopped after a step.
    "no minutes": (["--noisy", "{noisy}", "--clean", "{clean}", "--minutes", "0"], "--minutes must be more than 0, got 0.0"),
    "no workers": (["--noisy", "{noisy}", "--clean", "{clean}", "--workers", "0"], "--workers must be at least 1, got 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAINING))
def test_bad_training_input_gets_one_line(case, capsys, tmp_path, fluorescence):
    noisy, clean = fluorescence
    tifffile.imwrite(tmp_path / "short.tif", np.zeros((6, 64, 60), np.float32), metadata={"axes": "ZYX"})
    three = save_checkpoint(make_tiny_model(3, channel_meaning="3 channels"), tmp_path / "three")
    (tmp_path / "done" / "checkpoint").mkdir(parents=True)
    (tmp_path / "noted").mkdir()
    (tmp_path / "noted" / "checkpoint").write_text("notes of the user's")
    save_checkpoint(make_tiny_model(1), tmp_path / "model" / "model")
    paths = {"noisy": noisy, "clean": clean, "short": tmp_path / "short.tif", "three": three, "tmp": tmp_path}
    arguments, message = BAD_TRAINING[case]
    arguments = [a.format(**paths) for a in arguments]
    if "-o" not in arguments:
        arguments += ["-o", str(tmp_path / "out")]
    code, out, err = run_cli(capsys, "train", *arguments, *FAST)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out" / "model.json").exists()


def test_overwrite_replaces_the_run_and_keeps_the_users_files(capsys, tmp_path, fluorescence):
    """--overwrite in the folder of the training images: it once removed the whole folder, images too."""
    noisy, clean = fluorescence
    (tmp_path / "checkpoint" / "notes").mkdir(parents=True)  # a folder of the user's that shares a run's name
    (tmp_path / "checkpoint" / "notes" / "todo.txt").write_text("keep me")
    images = {path: path.read_bytes() for path in (noisy, clean)}
    arguments = ["train", "--noisy", noisy, "--clean", clean, "-o", tmp_path, *FAST]
    code, _, err = run_cli(capsys, *arguments, "--overwrite")
    assert code == 0, err
    first = (tmp_path / "model.safetensors").read_bytes()
    code, _, err = run_cli(capsys, *arguments, "--steps", 7)
    assert code == 2 and "holds a training run already" in err
    code, _, err = run_cli(capsys, *arguments, "--steps", 7, "--overwrite")
    assert code == 0, err
    assert all(path.read_bytes() == data for path, data in images.items())
    assert (tmp_path / "checkpoint" / "notes" / "todo.txt").read_text() == "keep me"
    state = json.loads((tmp_path / "checkpoint" / "training.json").read_text())
    assert state["step"] == 7 and state["settings"]["steps"] == 7  # a new run, not the old one resumed
    assert (tmp_path / "model.safetensors").read_bytes() != first


def test_sigterm_stops_training_after_its_step_with_a_checkpoint(tmp_path, fluorescence):
    """SIGTERM, which a batch system sends at the wall-time limit, stops training as a first Ctrl-C
    does; it used to end the process on the spot, losing the steps since the last checkpoint."""
    noisy, clean = fluorescence
    run = tmp_path / "run"
    command = [sys.executable, "-m", "napari_gama_ir.cli", "train", "--noisy", noisy, "--clean", clean, "-o", run,
               "--steps", 100000, "--batch", 2, "--patch", 32, "--val-every", 2, "--checkpoint-every", 100000]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen([str(part) for part in command], stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   env=env)
        for line in process.stdout:
            if line.startswith("step 2:"):  # the loop runs, its handlers in place
                break
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=300)
    err = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 0, err
    stopped = re.search(r"stopped at step (\d+)/100000; continue with: napari-gama-ir train .* --resume", err)
    assert stopped and "model: " in out
    state = json.loads((run / "checkpoint" / "training.json").read_text())
    assert state["step"] == int(stopped.group(1)) >= 2
