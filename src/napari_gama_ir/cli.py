"""Command line: ``napari-gama-ir restore|train|evaluate|benchmark|models|demo``. A thin shell over the library."""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import math
import os
import shlex
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .engine import TileTooLargeError, restore
from .engine.axes import guess_axes, parse_axes
from .engine.calibration import ATTRIBUTE as PIXEL_SIZE_ATTRIBUTE
from .engine.calibration import to_attribute
from .engine.device import is_out_of_memory, resolve_device
from .engine.io import (
    CHANNELS_ATTRIBUTE,
    PICTURE_OUTPUTS,
    TIFF_BASED_SUFFIXES,
    WRITABLE,
    check_output_format,
    check_output_path,
    colours_subsampled,
    folder_images,
    folder_not_read,
    image_folders,
    image_suffix,
    is_zarr_store,
    no_images_message,
    not_read_advice,
    open_image,
    write_image,
)
from .engine.normalize import NORMALIZATION_CHOICES
from .engine.restore import DEFAULT_MEAN_MODE, MEAN_MODES, chunks_at_once, plan_restore
from .model import (
    CheckpointError,
    GamaIR,
    check_user_model_name,
    create_model,
    default_model_name,
    get_spec,
    list_models,
    save_user_model,
    user_models_dir,
)
from .model.checkpoint import read_checkpoint_record
from .model.global_blocks import GLOBAL_BLOCKS
from .model.registry import DEFAULT_MODELS, SUBSAMPLED_COLOURS_MODEL

UNTRAINED_ARCHITECTURE = "gama_ir_s"  # what --untrained builds when no --model is named
PROG = "napari-gama-ir"


class UsageError(ValueError):
    """A problem with what the user asked for; reported as one line."""


def _check_minimum(args: argparse.Namespace, minimum: float, *options: str, exclusive: bool = False) -> None:
    """Raise :class:`UsageError` for the first of ``options`` given below ``minimum`` (or at it, if
    ``exclusive``); options not given (None) pass, and a list option is checked value by value."""
    for option in options:
        values = getattr(args, option, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and (value <= minimum if exclusive else value < minimum):
                bound = f"more than {minimum}" if exclusive else f"at least {minimum}"
                raise UsageError(f"--{option.replace('_', '-')} must be {bound}, got {value}")


def _check_reports(*paths: str | None, inputs: tuple[str | None, ...] = ()) -> None:
    """Fail before minutes of work, not after, when a report's folder is missing, and refuse a
    report that would be written over an input (a mistyped ``--json clean.tif`` replaced the image)."""
    for path in paths:
        if not path:
            continue
        if not Path(path).resolve().parent.is_dir():
            raise UsageError(f"the folder of {path} does not exist")
        for source in filter(None, inputs):
            if Path(path).resolve().is_relative_to(Path(source).resolve()):
                raise UsageError(f"{path}: a report must not be written over or into the input {source}")


def load_model(name: str, untrained: bool = False, in_channels: int | None = None) -> GamaIR:
    """A registry name (shipped weights), a user model name, or a checkpoint path.

    ``untrained`` builds the named architecture with random weights and ``in_channels`` channels,
    for trying the pipeline before weights exist.
    """
    if untrained:
        channels = in_channels or get_spec(name).config.in_channels
        with torch.random.fork_rng():  # seeded, so untrained runs are reproducible too
            torch.manual_seed(0)
            return create_model(name, in_channels=channels, out_channels=channels)
    return create_model(name, pretrained=True)


def _untrained_banner() -> str:
    line = "!" * 78
    return (
        f"{line}\n!! WARNING: --untrained runs a RANDOMLY INITIALISED network, not the shipped weights:\n"
        f"!! the output is NOT a restoration, only a test of the pipeline.\n{line}"
    )


def run_restore(args: argparse.Namespace) -> Path:
    """Everything ``restore`` does, shared with ``demo``: open, check, restore lazily, write.

    A folder of images (not a zarr store), or several images, are restored image by image into
    the ``--output`` folder; an image into an existing folder, or a new one named with a final
    slash, goes there under its own name, as ``cp`` would put it.
    """
    _check_minimum(args, 1, "workers", "threads_per_worker")
    if args.untrained:
        print(_untrained_banner(), file=sys.stderr)
    inputs = [Path(i) for i in args.input]
    if len(inputs) > 1:  # as the shell expands `restore *.jpg -o restored/`
        return _restore_files(args, inputs)
    image = inputs[0]
    if image.is_dir() and not is_zarr_store(image):
        return _restore_folder(args, image)
    source = open_image(image)
    output = Path(args.output)
    # `-o restored/`, as for several images; `-o out.zarr/` (a store is a folder) names a store.
    named_folder = args.output.endswith(("/", os.sep)) and image_suffix(output) not in WRITABLE
    if named_folder and not output.exists():
        if not output.resolve().parent.is_dir():
            raise UsageError(f"{output}: folder {output.resolve().parent} does not exist")
        output.mkdir()
    if output.is_dir() and not is_zarr_store(output):  # it said "outdir: cannot write this format"
        output = output / _output_name(source.path)
    elif not output.suffix and not output.exists():
        raise UsageError(f"{output}: no such folder, and no image format in the name; name a file ending in one of "
                         f"{', '.join(WRITABLE)}, or end the name with / to restore into a new folder")
    output = check_output_path(output, [image], args.overwrite)
    return _restore_image(args, source, output)


def _restore_image(
    args: argparse.Namespace, source, output: Path, label: str = "restoring", load: Callable = load_model
) -> Path:
    """Restore the opened image ``source`` into ``output`` (checked already), as ``args`` say;
    ``load`` gives the network (:func:`load_model`, or a cache of it for many images)."""
    # A photo's restored colours keep its 8 or 16 bits: as float32, a JPEG's 0-255 (or a 16-bit
    # TIFF's 0-65535) opened blown out to white in photo editors, which take floats for 0-1. A PNG
    # or JPEG holds integers only. Other images get float32, which neither rounds nor clips.
    photo = source.colour is True
    output_dtype = args.output_dtype or ("input" if photo or image_suffix(output) in PICTURE_OUTPUTS else "float32")
    axes = parse_axes(args.axes, source.array.ndim) if args.axes else source.axes or guess_axes(source.array.shape)
    alpha = source.alpha and axes.endswith("C")  # opacity is passed through, not restored
    channels = source.array.shape[axes.index("C")] - alpha if "C" in axes else 1
    model_name = args.model or (
        UNTRAINED_ARCHITECTURE if args.untrained
        else default_model_name(
            channels, resolve_device(args.device).type, source.colour, colours_subsampled(source.path))
    )
    model = load(model_name, args.untrained, channels)
    provenance = {
        "napari_gama_ir_version": __version__,
        "model": str(model_name),
        "untrained": bool(args.untrained),
        "checkpoint_sha256": getattr(model, "checkpoint_sha256", None),
        "tile": args.tile,
        "overlap": args.overlap,
        "mean_mode": args.mean_mode,
        "compiled": bool(args.compile),
        "cuda_graphs": "auto" if args.cuda_graphs is None else args.cuda_graphs,
        "source": str(source.path),
    }
    pixel_size = {axis: entry for axis, entry in source.pixel_size.items() if axis in axes}
    if pixel_size:  # the output keeps the input's calibration
        provenance[PIXEL_SIZE_ATTRIBUTE] = to_attribute(pixel_size)
    if source.channel_names:  # and its channels' names
        provenance[CHANNELS_ATTRIBUTE] = source.channel_names
    if args.scheduler or args.workers or args.resume:
        if alpha:
            raise UsageError(f"{source.path} has an alpha channel, which restoring on a cluster does not handle")
        return _restore_on_cluster(args, source, model, output, axes, provenance, output_dtype)
    # Checks the settings and chooses blocks where a plane does not fit; computes nothing.
    plan = plan_restore(source.array, model, axes, args.tile or None, args.overlap, args.mean_mode, None,
                        output_dtype, alpha, args.block)
    shape = dict(zip(axes, source.array.shape))
    # Compiling holds the bar at 0% for tens of seconds: say why until the first plane is done.
    first_note = "compiling the network first (tens of seconds)" if args.compile else ""
    # The bar names the network, which the image itself chose where no --model was given.
    shown_label = f"{label} with {Path(str(model_name)).name}"
    progress = _Progress(plan.planes, shape["Y"] * shape["X"], args.quiet, shown_label, first_note)
    # Set by the writer on Ctrl-C or an error, so that the chunks in flight stop at their next
    # forward pass rather than run to their end before the process can exit.
    stop = threading.Event()
    restored = restore(  # lazy, in the plan's blocks (0: whole planes), whatever the memory says by now
        source.array, model, axes, tile=args.tile or None, overlap=args.overlap, mean_mode=args.mean_mode,
        device=args.device, precision=args.precision, batch=args.batch, output_dtype=output_dtype,
        on_plane=progress.update_pixels, compile=args.compile, cuda_graphs=args.cuda_graphs, alpha=alpha,
        block=plan.block or 0, cancel=stop,
    )
    check_output_format(output, restored.shape, axes, restored.dtype)  # before the progress bar shows
    provenance["block"] = plan.block
    # As many chunks at once as the host's threads, or as fit in memory where planes are huge.
    workers = chunks_at_once(plan, model.config.out_channels, args.device)
    progress.start()
    try:
        write_image(restored, output, axes, overwrite=args.overwrite, attrs=provenance, workers=workers, cancel=stop,
                    icc_profile=source.icc_profile, exif=source.exif, imagej_display=source.imagej_display)
    finally:
        progress.close()
    return output


def _restore_folder(args: argparse.Namespace, folder: Path) -> Path:
    """Every image of ``folder``, and with ``--recursive`` of the folders in it, at any depth, into
    the folder ``args.output``, each image of a folder in it into its counterpart there
    (:func:`_restore_into_folder`)."""
    inner = image_folders(folder)[1:]
    folders = [folder, *inner] if args.recursive else [folder]
    paths = [path for each in folders for path in folder_images(each).values()]
    with_images = [] if args.recursive else [each for each in inner if folder_images(each)]
    if not paths:
        if with_images:  # a microscope's export of a folder a well, or a phone's of a folder a day
            raise UsageError(f"{folder}: no images in it, but {len(with_images)} folder(s) of images inside it "
                             f"(such as {with_images[0].relative_to(folder)}); add --recursive to restore them")
        raise UsageError(no_images_message(folder))
    left_out = collections.Counter()
    for each in folders:
        left_out.update(folder_not_read(each))
    for suffix, count in sorted(left_out.items()):
        print(f"left out {count} {suffix} file(s): {not_read_advice(suffix)}", file=sys.stderr)
    if with_images:
        print(f"left out {len(with_images)} folder(s) of images inside {folder} (such as "
              f"{with_images[0].relative_to(folder)}); add --recursive to restore them too", file=sys.stderr)
    output = Path(args.output).resolve()
    if output == folder.resolve():
        raise UsageError(f"{args.output}: the output folder must not be the input folder")
    if args.recursive and folder.resolve() in output.parents:  # its next run would restore the restored
        raise UsageError(f"{args.output}: with --recursive, the output folder must not lie inside the input folder")
    return _restore_into_folder(args, paths, "a folder is restored", base=folder)


def _restore_files(args: argparse.Namespace, paths: list[Path]) -> Path:
    """The images (or stores) ``paths`` into the folder ``args.output``, each under its own name,
    as ``cp`` copies files into a folder: a shell's ``*.jpg`` was "unrecognized arguments"."""
    for path in paths:
        if path.is_dir() and not is_zarr_store(path):
            raise UsageError(f"{path}: a folder; give one folder, or images")
    if image_suffix(Path(args.output)) in WRITABLE and not Path(args.output).is_dir():
        raise UsageError(f"{args.output}: several images are restored into a folder, not into one image")
    return _restore_into_folder(args, paths, "several images are restored")


def _restore_into_folder(args: argparse.Namespace, paths: list[Path], what: str, base: Path | None = None) -> Path:
    """``paths`` into the folder ``args.output`` (made if missing), each under its own name, in the
    folder there that matches its own inside ``base`` if given; ``what`` says in errors what is
    restored ("a folder is restored").

    Outputs keep the input's format where it can be written; other pictures (BMP, WebP) become
    PNG. Every input is opened, and every output checked, before the first image is restored; an
    error stops the run there, with the images before it complete. ``--resume`` then skips those:
    an output is written under a temporary name and renamed when complete, so one that exists is.
    """
    if args.scheduler or args.workers:
        raise UsageError(f"{what} on this machine; --scheduler and --workers take one image")
    if args.resume and args.overwrite:
        raise UsageError("give --resume (skip the images restored already) or --overwrite (restore them again), not both")
    target = Path(args.output)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target}: not a folder ({what} into a folder)")
    if not target.resolve().parent.is_dir():
        raise UsageError(f"{target}: folder {target.resolve().parent} does not exist")
    sources = [open_image(path) for path in paths]
    outputs = [target / path.parent.relative_to(base) / _output_name(path) if base else target / _output_name(path)
               for path in paths]
    first_with: dict[Path, Path] = {}
    for output, path in zip(outputs, paths):
        if output in first_with:
            first = first_with[output]
            names = (first, path) if first.name == path.name else (first.name, path.name)
            raise UsageError(f"{names[0]} and {names[1]} would both be restored into {output.name}")
        first_with[output] = path
        if output.resolve() == path.resolve():
            raise UsageError(f"{output}: the output must not be the input")
        if output.exists() and not (args.overwrite or args.resume):
            raise UsageError(f"{output}: already exists (pass --overwrite to replace it, or --resume to skip it)")
    pending = [(source, output) for source, output in zip(sources, outputs) if not (args.resume and output.exists())]
    if len(pending) < len(sources):
        print(f"resuming: {len(sources) - len(pending)} of {len(sources)} images restored already", file=sys.stderr)
    target.mkdir(exist_ok=True)
    load = functools.cache(load_model)  # read and checked (SHA-256) once per model, not once per image
    each = argparse.Namespace(**{**vars(args), "resume": False})  # an image's --resume is a cluster run's
    for done, (source, output) in enumerate(pending):
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            check_output_path(output, [source.path], args.overwrite)
            _restore_image(each, source, output, label=f"{done + 1}/{len(pending)} {source.path.name}", load=load)
        except (ValueError, OSError) as error:
            raise UsageError(f"{error} ({done} of {len(pending)} images restored before it)") from None
    print(f"restored {len(pending)} images into {target}", file=sys.stderr)
    return target


def _output_name(path: Path) -> str:
    """``path``'s name with a suffix that can be written: its own (an iPhone's HEIC stays a HEIC),
    else TIFF (LSM, SVS and other TIFF-based formats) or PNG (BMP and WebP pictures)."""
    suffix = image_suffix(path)
    if suffix in WRITABLE:
        return path.name
    kept = ".tif" if suffix in TIFF_BASED_SUFFIXES else ".png"
    return path.name[: len(path.name) - len(suffix)] + kept


@contextlib.contextmanager
def _cluster(args: argparse.Namespace, options: str):
    """A client to ``--scheduler``, or to a local cluster of ``--workers`` processes, closed on exit."""
    try:
        from distributed import Client
    except ImportError:
        raise UsageError(f"{options} need dask.distributed: pip install 'napari-gama-ir[distributed]'") from None
    from .engine.distributed import start_local_cluster

    if args.scheduler and args.workers:
        raise UsageError("give --scheduler (an existing cluster) or --workers (a local one), not both")
    client = Client(args.scheduler, timeout="10s") if args.scheduler else start_local_cluster(
        args.workers or 1, args.threads_per_worker)
    try:
        workers = len(client.nthreads())  # scheduler_info() is a cache that may lack the workers
        print(f"dask: {workers} worker(s); dashboard {client.dashboard_link}", file=sys.stderr)
        yield client
    finally:
        cluster = None if args.scheduler else client.cluster
        client.close()
        if cluster is not None:
            cluster.close()


def _restore_on_cluster(
    args, source, model: GamaIR, output: Path, axes: str, provenance: dict, output_dtype: str
) -> Path:
    """``restore`` on dask.distributed: an existing scheduler, or a local cluster of worker processes."""
    from tqdm import tqdm

    from .engine.distributed import restore_distributed

    if output.suffix != ".zarr":
        raise UsageError("restoring on a cluster, or resumably, writes zarr: give a .zarr output")
    bar = None

    def on_chunk(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, initial=done, unit="chunk", desc="restoring", disable=args.quiet)
        bar.update(done - bar.n)

    try:
        with _cluster(args, "--scheduler, --workers and --resume") as client:
            restore_distributed(
                source.array, model, output, axes, client=client, resume=args.resume, overwrite=args.overwrite,
                tile=args.tile or None, overlap=args.overlap, mean_mode=args.mean_mode, device=args.device,
                precision=args.precision, batch=args.batch, output_dtype=output_dtype, compile=args.compile,
                cuda_graphs=args.cuda_graphs, block=args.block, attrs=provenance, source=str(source.path.resolve()),
                on_chunk=on_chunk,
            )
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the chunks written so far are kept: run again with --resume", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if bar is not None:
            bar.close()
    return output


# Units of the progress bar, the first one the whole job reaches taken: a 64 x 64 image counts
# 4.1 kpx, not 0.0 Mpx.
PIXEL_UNITS = ((1e6, "Mpx"), (1e3, "kpx"), (1.0, "px"))


class _Progress:
    """A tqdm bar in megapixels (so it shows Mpx/s and an ETA), or kilopixels or pixels for small
    jobs, with a planes-done counter.

    The bar appears on :meth:`start`, once the inputs are checked, so an error is never preceded
    by an empty bar.
    """

    def __init__(self, planes: int, plane_pixels: int, quiet: bool, label: str = "restoring", first_note: str = "") -> None:
        self._planes, self._plane_pixels, self._quiet, self._label = planes, plane_pixels, quiet, label
        self._first_note = first_note  # shown until the first pixels are counted
        self._pixels, self._lock, self._bar = 0, threading.Lock(), None

    def start(self) -> None:
        from tqdm import tqdm

        total = self._planes * self._plane_pixels
        self._scale, unit = next((scale, unit) for scale, unit in PIXEL_UNITS if total >= scale or unit == "px")
        self._bar = tqdm(
            total=total / self._scale, unit=unit, disable=self._quiet, desc=self._label,
            bar_format=f"{{l_bar}}{{bar}}| {{n:.1f}}/{{total:.1f}} {unit} [{{elapsed}}<{{remaining}}, {{rate_fmt}}{{postfix}}]",
        )
        if self._first_note:
            self._bar.set_postfix_str(self._first_note)

    def update_pixels(self, pixels: int) -> None:
        """Count ``pixels`` (per channel) restored: a pass's share of a plane or block, or a chunk's."""
        with self._lock:
            self._pixels += pixels
            self._bar.set_postfix_str(f"planes {self._pixels // self._plane_pixels}/{self._planes}", refresh=False)
            # Set, not added: a pass's share at a time, the sum of the floats went past the total.
            self._bar.n = self._pixels / self._scale
            self._bar.update(0)  # shown once tqdm's interval has passed

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# -- train and evaluate -----------------------------------------------------------------------
# Training options default to None so that --resume can tell which ones were given.
TRAIN_OPTIONS = {
    "steps": "steps", "batch": "batch", "patch": "patch", "lr": "learning_rate", "loss": "loss",
    "seed": "seed", "val_fraction": "validation_fraction", "val_every": "validate_every",
    "checkpoint_every": "checkpoint_every", "precision": "precision", "noise": "noise",
}


def _training_data(args: argparse.Namespace):
    from .train import data_from_paths

    if args.noisy is None and args.clean is None:
        raise UsageError("give --noisy (and --clean for supervised training)")
    if args.noisy and args.clean and Path(args.noisy).resolve() == Path(args.clean).resolve():
        # As napari's Fine-tune widget: a network trained to give back its input learns nothing.
        raise UsageError(f"--noisy and --clean are the same ({args.clean}); give the clean images of the noisy ones")
    return data_from_paths(args.noisy, args.clean, axes=args.axes, grey=args.grey)


def _train_settings(args: argparse.Namespace):
    from .train import TrainSettings

    given = {field: getattr(args, option) for option, field in TRAIN_OPTIONS.items() if getattr(args, option) is not None}
    if args.self_supervised:
        given["objective"] = args.self_supervised
    return TrainSettings(device=args.device, time_limit=args.minutes * 60 if args.minutes else None, **given)


def run_train(args: argparse.Namespace) -> None:
    """Train or fine-tune a network on the user's images; Ctrl-C stops with a resumable checkpoint."""
    from .train import Trainer, default_normalization, holds_run, remove_run, resume_point, starting_model

    _check_minimum(args, 1, "workers", "threads_per_worker")
    _check_minimum(args, 0, "minutes", exclusive=True)
    if args.register:
        check_user_model_name(args.register)  # before hours of training, not after
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output}: not a folder (a training run writes its model and checkpoint into a folder)")
    data = _training_data(args)
    if args.resume:
        fixed = [f"--{o.replace('_', '-')}" for o in (*TRAIN_OPTIONS, "self_supervised", "from_", "arch") if getattr(args, o)]
        if fixed:
            raise UsageError(f"{', '.join(fixed)} cannot be given with --resume: the checkpoint's settings are used")
        changes = {"device": args.device, "time_limit": args.minutes * 60 if args.minutes else None}
        if args.checkpoint_every:
            changes["checkpoint_every"] = args.checkpoint_every
        model, settings = resume_point(output, **changes)
        start = None
    else:
        if holds_run(output):
            if not args.overwrite:
                raise UsageError(f"{output} holds a training run already; use --resume to continue it or --overwrite")
            remove_run(output)  # the run's files only: --output may be the folder of the training images
        settings = _train_settings(args)
        model, start = starting_model(
            data.channels, source=args.from_, architecture=args.arch or "gama_ir_xs", patch=settings.patch,
            normalization=default_normalization(data.dtype, args.normalization), seed=settings.seed,
            colour=data.colour,
        )
    if args.scheduler or args.workers:
        from .train.distributed import DistributedTrainer

        with _cluster(args, "--scheduler and --workers") as client:
            trainer = DistributedTrainer(model, data, settings, output, client=client, resume=args.resume, start=start)
            share = settings.batch // trainer.replicas
            print(f"training: {settings.objective}, {settings.steps} steps of {settings.batch}x{settings.patch}px on "
                  f"{trainer.replicas} replica(s) of {share} patch(es), device {settings.device}", file=sys.stderr)
            result = _follow_training(trainer, args)
    else:
        trainer = Trainer(model, data, settings, output, start=start, resume=args.resume)
        print(
            f"training: {settings.objective}, {trainer.data_record['planes']} plane(s) "
            f"({len(trainer.validation)} validation crop(s)), {settings.steps} steps of {settings.batch}x"
            f"{settings.patch}px on {trainer.device}, validation every {trainer.validate_every} steps",
            file=sys.stderr,
        )
        result = _follow_training(trainer, args)
    if result.stopped_early:
        print(f"stopped at step {result.steps_done}/{settings.steps}; continue with: {_resume_command(args)}",
              file=sys.stderr)
    best = ""
    if result.best:
        metrics = {name: value for name, value in result.best.items() if name != "step"}
        best = f", best validation at step {result.best['step']}: {_metrics_text(metrics)}"
    print(f"model: {result.model_path}{best}")
    if args.register and not result.stopped_early:
        path = save_user_model(create_model(str(result.model_path)), args.register)
        print(f"registered as {args.register!r}: {path}")


def _resume_command(args: argparse.Namespace) -> str:
    """The command that continues a stopped run: the same data, device and cluster, and the
    registration still to do (a stopped run registers nothing)."""
    words = ["napari-gama-ir", "train"]
    for option in ("noisy", "clean", "axes", "scheduler", "workers"):
        if getattr(args, option):
            words += [f"--{option}", getattr(args, option)]
    if args.workers and args.threads_per_worker != 1:
        words += ["--threads-per-worker", args.threads_per_worker]
    if args.device != "auto":
        words += ["--device", args.device]
    words += ["--grey"] * args.grey + ["--resume", "-o", args.output]
    if args.register:
        words += ["--register", args.register]
    return shlex.join(map(str, words))


def _metrics_text(metrics: dict[str, float]) -> str:
    """``psnr 28.31, ssim 0.8123``: metrics as the training lines show them."""
    return ", ".join(f"{name} {value:.4g}" for name, value in metrics.items())


def _follow_training(trainer, args: argparse.Namespace):
    """Run ``trainer`` (local or distributed) with a progress bar; the first Ctrl-C stops it cleanly."""
    from tqdm import tqdm

    settings = trainer.settings
    bar = tqdm(total=settings.steps, initial=trainer.step, unit="step", desc="training", disable=args.quiet)
    interrupted = []

    def on_interrupt(signum, frame):  # the first Ctrl-C stops cleanly after the step, a second one at once
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)
        trainer.stop()

    # SIGTERM too: what a batch system sends at the wall-time limit, some 30 s before SIGKILL (SLURM).
    previous = _handle_signals((signal.SIGINT, signal.SIGTERM), on_interrupt)
    validation: dict[str, float] = {}
    try:
        for event in trainer.run():
            validation = event.validation or validation
            postfix = {"loss": f"{event.loss:.4g}", "lr": f"{event.learning_rate:.2g}"}
            if "psnr" in validation:
                postfix["val_psnr"] = f"{validation['psnr']:.2f}"
            elif "loss" in validation:
                postfix["val_loss"] = f"{validation['loss']:.4g}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(event.step - bar.n)
            if event.validation and not args.quiet:
                bar.write(f"step {event.step}: {_metrics_text(event.validation)}")
    finally:
        bar.close()
        _restore_signal_handlers(previous)
    return trainer.result()


def _handle_signals(signals: tuple[signal.Signals, ...], handler) -> dict[signal.Signals, Any]:
    """Install ``handler`` for ``signals`` (only the main thread may); the handlers replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum in signals}


def _restore_signal_handlers(previous: dict[signal.Signals, Any]) -> None:
    for signum, handler in previous.items():
        if handler is not None:  # None: installed outside Python, and cannot be put back from it
            signal.signal(signum, handler)


def _terminate_as_interrupt(signum, frame):
    """SIGTERM (a batch system's wall-time limit, ``kill``) ends a command as Ctrl-C does: partial
    outputs removed, or kept for ``--resume`` where that is possible. By default it ended the
    process on the spot, with no clean-up and, for training, no checkpoint of the steps since the
    last one (up to 500)."""
    raise KeyboardInterrupt


def run_evaluate(args: argparse.Namespace) -> None:
    """PSNR and SSIM of a model's restorations against clean images, per image plane and mean.

    The data range is 255 for uint8 images (the photo literature's convention) and each clean
    plane's own max - min otherwise (microscopy counts rarely span their dtype). Pixels that hold
    no data (NaN or Inf) in the noisy or the clean image are left out of the scores.
    """
    from .engine.axes import plane_layout, to_canonical
    from .train import TrainingData, data_from_paths, psnr, ssim
    from .train.metrics import scored_pixels

    if args.noisy is None or args.clean is None:
        raise UsageError("evaluate needs --noisy and --clean")
    _check_reports(args.json, inputs=(args.noisy, args.clean))
    data = data_from_paths(args.noisy, args.clean, axes=args.axes, grey=args.grey)
    noisy = Path(args.noisy)
    noisy_files = [noisy / pair.name for pair in data.pairs] if noisy.is_dir() and not is_zarr_store(noisy) else [noisy]
    subsampled = all(map(colours_subsampled, noisy_files))  # as restore would choose for the noisy images
    device_type = resolve_device(args.device).type
    args.model = args.model or default_model_name(data.channels, device_type, data.colour, subsampled)
    model = load_model(args.model)
    print(f"evaluating {Path(str(args.model)).name} on {len(data.pairs)} image(s)", file=sys.stderr)
    rows = []
    for pair in data.pairs:
        restored = restore(
            pair.noisy, model, pair.axes, tile=args.tile or None, overlap=args.overlap, device=args.device,
            mean_mode=args.mean_mode,
        )
        layout = plane_layout(pair.axes, pair.shape, TrainingData.channels_of(pair))
        planes = [to_canonical(a, layout) for a in (pair.noisy, pair.clean, restored)]
        planes = [p.reshape((-1,) + p.shape[-3:]) for p in planes]
        for index in range(planes[0].shape[0]):
            noisy, clean, out = (np.asarray(p[index].compute(), np.float64) for p in planes)
            data = np.isfinite(noisy) & np.isfinite(clean)  # NaN and Inf are no data, scored nowhere
            where = None if data.all() else data
            if where is not None:
                if not scored_pixels(data).any():
                    continue  # not one SSIM window of data: nothing to score
                noisy, clean, out = (np.where(data, values, 0) for values in (noisy, clean, out))
            data_range = 255.0 if pair.clean.dtype == np.uint8 else float(np.ptp(clean if where is None else clean[data])) or 1.0
            name = pair.name if planes[0].shape[0] == 1 else f"{pair.name}[{index}]"
            rows.append({
                "image": name,
                "psnr_noisy": psnr(clean, noisy, data_range, where), "psnr": psnr(clean, out, data_range, where),
                "ssim_noisy": ssim(clean, noisy, data_range, where), "ssim": ssim(clean, out, data_range, where),
            })
    if not rows:
        raise UsageError("no plane of the images holds data (pixels that are not NaN or Inf) to score")
    width = max(len("mean"), *(len(r["image"]) for r in rows))
    print(f"{'image':<{width}}  PSNR noisy  PSNR restored  SSIM noisy  SSIM restored")
    means = {key: float(np.mean([r[key] for r in rows])) for key in ("psnr_noisy", "psnr", "ssim_noisy", "ssim")}
    for row in [*rows, {"image": "mean", **means}]:
        print(
            f"{row['image']:<{width}}  {row['psnr_noisy']:10.2f}  {row['psnr']:13.2f}  "
            f"{row['ssim_noisy']:10.4f}  {row['ssim']:13.4f}"
        )
    if args.json:
        # JSON has no infinity, the PSNR of identical images: those figures are written as null.
        figures = [{k: v if isinstance(v, str) or math.isfinite(v) else None for k, v in r.items()} for r in rows]
        mean = {k: v if math.isfinite(v) else None for k, v in means.items()}
        record = {"model": str(args.model), "noisy": str(args.noisy), "clean": str(args.clean), "images": figures,
                  "mean": mean}
        Path(args.json).write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")


def run_models(args: argparse.Namespace) -> None:
    specs = list_models()
    folder = user_models_dir()
    checkpoints = sorted(folder.glob("*.json")) if folder.is_dir() else []
    width = max(len(name) for name in [*(spec.name for spec in specs), *(path.stem for path in checkpoints)])
    print("Registered architectures (name, shipped weights, description):")
    for spec in specs:
        weights = "yes" if spec.weights else "no"
        print(f"  {spec.name:<{width}} {weights:<4} {spec.description}")
    print("Defaults when no --model is named:")
    defaults = {f"{channels}-channel images on {kind.upper()}": name for (kind, channels), name in DEFAULT_MODELS.items()}
    defaults["colour photos saved with colours at half resolution (camera JPEGs, HEIC, lossy WebP and AVIF)"] = (
        SUBSAMPLED_COLOURS_MODEL)
    for images, name in defaults.items():
        print(f"  {name:<{width}} {images}")
    print(f"Local checkpoints in {folder}:" + ("" if checkpoints else " none"))
    for path in checkpoints:
        try:
            record, _ = read_checkpoint_record(path)
            config = record["config"]
            print(f"  {path.stem:<{width}} {config['in_channels']} channel(s), width {config['width']}")
        except CheckpointError as error:
            print(f"  {path.stem:<{width}} unreadable: {error}")


DEMO_FILES = ("noisy.tif", "restored.tif", "fluorescence_noisy.tif", "fluorescence_restored.tif")
DEMO_FOLDER = "gama-ir-demo"
DEMO_MARK = ".napari-gama-ir-demo"  # in a folder the demo wrote into


def run_demo(args: argparse.Namespace) -> None:
    """Make noisy sample stacks (RGB photos, fluorescence), restore them through ``run_restore``, report PSNR."""
    from .samples import noisy_fluorescence_stack, noisy_rgb_photos

    folder = Path(args.output)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder}: not a folder")
    # The demo replaces its own files when run again, never files of the same names of the user's
    # (its default folder is its own: earlier versions left no mark in it).
    if folder.name != DEMO_FOLDER and not (folder / DEMO_MARK).exists():
        for name in DEMO_FILES:
            if (folder / name).exists():
                raise UsageError(f"{folder / name}: exists and was not written by the demo; choose another --output")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DEMO_MARK).touch()
    photos_noisy, photos_restored, fluorescence_noisy, fluorescence_restored = (folder / name for name in DEMO_FILES)
    sigma = 25.0
    noisy, clean = noisy_rgb_photos(sigma=sigma, seed=0)
    _demo_restore(args, noisy, clean, "ZYXC", photos_noisy, photos_restored, 255.0,
                  f"3 RGB images 256x256, Gaussian noise sigma {sigma:g} (seed 0)")
    noisy, clean = noisy_fluorescence_stack(planes=8, size=256, seed=0)
    _demo_restore(args, noisy, clean, "ZYX", fluorescence_noisy, fluorescence_restored,
                  float(clean.max() - clean.min()),
                  "fluorescence stack 8x256x256, Poisson noise (30 photons at the brightest) and read noise 3 (seed 0)")


def _demo_restore(args, noisy: np.ndarray, clean: np.ndarray, axes: str, noisy_path: Path, restored_path: Path,
                  data_range: float, description: str) -> None:
    from skimage.metrics import peak_signal_noise_ratio

    write_image(noisy, noisy_path, axes, overwrite=True)
    channels = noisy.shape[axes.index("C")] if "C" in axes else 1
    model = default_model_name(channels, resolve_device(args.device).type)
    restore_args = argparse.Namespace(
        input=[str(noisy_path)], output=str(restored_path), overwrite=True, model=model,
        untrained=False, axes=axes, tile=args.tile, overlap=args.overlap,
        mean_mode=DEFAULT_MEAN_MODE, device=args.device, precision="fp32", batch=None,
        output_dtype="input", quiet=args.quiet, compile=False, cuda_graphs=None, scheduler=None, workers=None,
        resume=False, block=None, recursive=False,
    )
    run_restore(restore_args)
    restored = open_image(restored_path).array.compute()
    before = peak_signal_noise_ratio(clean, noisy.astype(clean.dtype), data_range=data_range)
    after = peak_signal_noise_ratio(clean, restored.astype(clean.dtype), data_range=data_range)
    print(f"demo: {description}, model {model}")
    print(f"demo: wrote {noisy_path} and {restored_path}")
    print(f"demo: PSNR noisy {before:.2f} dB -> restored {after:.2f} dB ({after - before:+.2f} dB)")


BENCHMARK_MODELS = ("gama_ir_xs", "gama_ir_s", "gama_ir_l")


def _benchmark_networks(names: list[str], channels: int, global_blocks: list[str] | None) -> dict[str, GamaIR]:
    """Registered architectures with random weights (speed does not depend on them), or checkpoints;
    with ``global_blocks``, each architecture once per global-block variant, named ``name/variant``."""
    networks = {}
    for name in names:
        try:
            spec = get_spec(name)
        except KeyError:
            if global_blocks:
                raise UsageError(f"--global-blocks needs registered architectures, not {name!r}") from None
            networks[name] = create_model(name)
            continue
        for block in global_blocks or [spec.config.global_block]:
            torch.manual_seed(0)
            model = create_model(spec.name, in_channels=channels, out_channels=channels, global_block=block)
            networks[f"{name}/{block}" if global_blocks else name] = model
    return networks


def run_benchmark(args: argparse.Namespace) -> None:
    """Latency, memory and FLOPs of GAMA-IR networks by the paper's protocol; table, JSON and plot."""
    from .engine.benchmark import benchmark, format_table, write_report

    _check_minimum(args, 8, "sizes")
    _check_minimum(args, 1, "runs", "channels", "batch", "threads")
    _check_minimum(args, 0, "warmup")
    _check_minimum(args, 0, "budget", exclusive=True)
    _check_reports(args.json, args.plot)
    if args.plot:
        try:
            from matplotlib.backend_bases import FigureCanvasBase
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install matplotlib") from None
        # Checked now, not after minutes of timing; no suffix means matplotlib's default, PNG.
        suffix = Path(args.plot).suffix.lstrip(".").lower()
        if suffix and suffix not in FigureCanvasBase.get_supported_filetypes():
            raise UsageError(f"--plot cannot write .{suffix} files; name a .png (or .svg, .pdf) file")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    models = _benchmark_networks(args.models, args.channels, args.global_blocks)

    def report_progress(m) -> None:
        if not args.quiet:
            print(f"{m.model} {'x'.join(map(str, m.shape))}: median {m.latency_ms_median:.2f} ms over {m.runs} runs",
                  file=sys.stderr)

    report = benchmark(
        models, args.sizes, channels=args.channels, batch=args.batch, device=args.device,
        precision=args.precision, warmup=args.warmup, runs=args.runs, budget_s=args.budget,
        compile=args.compile, cuda_graphs=args.cuda_graphs, count_kernels=args.count_kernels,
        on_measurement=report_progress,
    )
    machine = report["machine"]
    print(f"{machine.get('gpu') or machine['processor']} ({machine['device']}, {machine['torch_threads']} torch threads), "
          f"torch {machine['torch']}, {args.precision}{', compiled' if args.compile else ''}"
          f"{', CUDA graphs' if args.cuda_graphs else ''}; "
          f"float32 matmul {report['matmul_gflops_fp32']:.0f} GFLOP/s, "
          f"as a 1x1 convolution {report['conv_gemm_gflops_fp32']:.0f} GFLOP/s")
    print(format_table(report))
    write_report(report, args.json, args.plot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Fast GAMA-IR image restoration.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_engine_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--tile", type=int, default=512, help="tile side in pixels, 0 for whole planes (default 512)")
        sub.add_argument("--overlap", type=int, default=64, help="tile overlap in pixels (default 64)")
        sub.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
        sub.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    restore_cmd = commands.add_parser("restore", help="restore an image or stack into a new file")
    restore_cmd.add_argument("input", nargs="+",
                             help="input image: .zarr (OME-Zarr too), .tif (and .lsm, .stk, .svs, .ndpi), .png, .jpg, "
                                  ".bmp, .webp, .heic, .avif or .npy; or several, or a folder of them, restored into the --output "
                                  "folder, each under its own name")
    restore_cmd.add_argument("-o", "--output", required=True, help="output: .zarr, .ome.zarr, .tif, .ome.tif, .png, .jpg, .heic, .avif or .npy")
    restore_cmd.add_argument("--model", help="shipped or local model name, or checkpoint path (default: the shipped model for the image's channels: the colour one for a photo's RGB, or the one for colours saved at half resolution (camera JPEGs, HEIC, lossy WebP and AVIF), the grey one, channel by channel, for a microscope's; 'napari-gama-ir models' lists them)")
    restore_cmd.add_argument("--untrained", action="store_true", help="use the architecture with random weights (pipeline tests only)")
    restore_cmd.add_argument("--axes", help="axes of the input, e.g. YX, YXC, ZYX, TCZYX (default: from the file, else guessed)")
    restore_cmd.add_argument("--mean-mode", choices=MEAN_MODES, default=DEFAULT_MEAN_MODE, help=f"GAMA averaging (default {DEFAULT_MEAN_MODE})")
    restore_cmd.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                             help="autocast precision; fp16 needs a GPU, bf16 pays on GPUs and on CPUs with AVX512-BF16")
    restore_cmd.add_argument("--batch", type=int, help="most tiles (or small planes) per forward pass (default: 512x512 pixels' worth on CPU, 4 times "
                             "that on GPU, there up to twice that where it gives batches of one size)")
    restore_cmd.add_argument("--block", type=int, help="restore each plane in square blocks of this side, so that memory "
                             "follows the block; 0 for whole planes (default: whole planes where one fits in memory, else the "
                             "largest blocks that do)")
    restore_cmd.add_argument("--output-dtype", help="float32 (the default; input for a photo, and for .png, .jpg, .heic or .avif output), input, or a numpy dtype")
    restore_cmd.add_argument("--overwrite", action="store_true", help="replace an existing output")
    restore_cmd.add_argument("-r", "--recursive", action="store_true",
                             help="restore the images of the input folder's folders too, at any depth, each into the "
                                  "same folder inside --output")
    cluster = restore_cmd.add_argument_group("cluster (dask.distributed; zarr output, written by the workers)")
    cluster.add_argument("--scheduler", metavar="ADDRESS", help="restore on an existing cluster, e.g. tcp://host:8786")
    cluster.add_argument("--workers", type=int, help="start a local cluster of this many worker processes")
    cluster.add_argument("--threads-per-worker", type=int, default=1, help="threads (and torch threads) per local worker (default 1)")
    cluster.add_argument("--resume", action="store_true", help="continue an interrupted run into the same output, skipping finished chunks (of a folder or several images: skipping the images restored already)")
    restore_cmd.add_argument("--compile", action="store_true",
                             help="run the network through torch.compile (faster once compiled; checked against eager, falls back on failure)")
    restore_cmd.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction,
                             help="replay the network as CUDA graphs, one launch per batch (default: on CUDA, unless "
                                  "--compile; checked against eager, falls back on failure)")
    add_engine_options(restore_cmd)

    train_cmd = commands.add_parser(
        "train", help="train or fine-tune a network on your images",
        description="Supervised with --noisy and --clean (or --clean and a synthetic --noise); "
        "self-supervised with --noisy and --self-supervised. Ctrl-C stops with a checkpoint; --resume continues.",
    )
    train_cmd.add_argument("--noisy", help="noisy images: a folder (matched to --clean by file name, in any format: IMG_1.jpg to IMG_1.png), or a stack/image file")
    train_cmd.add_argument("--clean", help="clean images, same layout and shapes as --noisy")
    train_cmd.add_argument("-o", "--output", required=True, help="folder for model.json and the resumable checkpoint")
    train_cmd.add_argument("--axes", help="axes of the images, e.g. ZYX or YXC (default: from the files, else guessed)")
    start = train_cmd.add_mutually_exclusive_group()
    start.add_argument("--from", dest="from_", metavar="MODEL", help="fine-tune this model: shipped name, your model's name or a checkpoint")
    start.add_argument("--arch", help="train a new network of this architecture (default gama_ir_xs; see 'models')")
    train_cmd.add_argument("--self-supervised", nargs="?", const="noise2void", choices=("noise2void", "neighbor2neighbor"),
                           help="train on noisy images alone (default method noise2void)")
    train_cmd.add_argument("--noise", help="synthetic noise on clean images: gaussian[:LOW-HIGH or :LEVEL sigma], poisson-gaussian[:LOW-HIGH or :LEVEL photons] or mixed, then optionally +CODEC:LOW-HIGH (qualities, as a camera or phone saves its photos; CODEC jpeg, webp, heif, avif or several, comma-separated, one drawn per patch), e.g. gaussian:0-55+jpeg:60-95")
    train_cmd.add_argument("--grey", action="store_true", help="convert RGB images to grey first")
    train_cmd.add_argument("--normalization", choices=NORMALIZATION_CHOICES, default="auto",
                           help="intensity normalisation of a new network or of a colour network made grey (default auto: range for uint8 and float, percentiles otherwise)")
    train_cmd.add_argument("--steps", type=int, help="optimiser steps (default 2000)")
    train_cmd.add_argument("--batch", type=int, help="patches per step (default 8)")
    train_cmd.add_argument("--patch", type=int, help="patch side in pixels (default 64)")
    train_cmd.add_argument("--lr", type=float, help="peak learning rate (default 1e-3, cosine to 1e-7)")
    train_cmd.add_argument("--loss", choices=("l1", "psnr"), help="supervised loss (default l1)")
    train_cmd.add_argument("--seed", type=int, help="seed of patches, noise and initial weights (default 0)")
    train_cmd.add_argument("--val-fraction", type=float, help="share of planes held out for validation (default 0.1)")
    train_cmd.add_argument("--val-every", type=int, help="steps between validations (default one epoch, or a tenth of the run if shorter)")
    train_cmd.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 500)")
    train_cmd.add_argument("--precision", choices=("fp32", "fp16", "bf16"), help="autocast on a GPU (default fp32)")
    train_cmd.add_argument("--minutes", type=float, help="stop after this many minutes with a checkpoint (resume later)")
    train_cmd.add_argument("--resume", action="store_true", help="continue the run in --output with its own settings")
    train_cmd.add_argument("--overwrite", action="store_true", help="start again, replacing a run in --output")
    train_cmd.add_argument("--register", metavar="NAME", help="when done, add the model to your models under NAME")
    train_cmd.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    train_cmd.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    cluster = train_cmd.add_argument_group(
        "cluster (data parallel on dask.distributed, a replica per worker; --output on storage they all share)")
    cluster.add_argument("--scheduler", metavar="ADDRESS", help="train on an existing cluster, e.g. tcp://host:8786")
    cluster.add_argument("--workers", type=int, help="start a local cluster of this many worker processes")
    cluster.add_argument("--threads-per-worker", type=int, default=1, help="threads (and torch threads) per local worker (default 1)")

    evaluate_cmd = commands.add_parser("evaluate", help="PSNR/SSIM of a model on noisy/clean pairs")
    evaluate_cmd.add_argument("--model", help="shipped or local model name, or checkpoint path (default: the shipped model for the images' channels)")
    evaluate_cmd.add_argument("--noisy", help="noisy images (folder or image/stack file)")
    evaluate_cmd.add_argument("--clean", help="clean images, same layout as --noisy")
    evaluate_cmd.add_argument("--axes", help="axes of the images (default: from the files, else guessed)")
    evaluate_cmd.add_argument("--grey", action="store_true", help="convert RGB images to grey first")
    evaluate_cmd.add_argument("--mean-mode", choices=MEAN_MODES, default=DEFAULT_MEAN_MODE)
    evaluate_cmd.add_argument("--json", help="also write the figures to this JSON file")
    add_engine_options(evaluate_cmd)

    commands.add_parser("models", help="list registered architectures and local checkpoints")

    bench_cmd = commands.add_parser(
        "benchmark", help="latency, peak memory and FLOPs by the paper's protocol",
        description="Times each network on a random N x C x S x S input: --warmup untimed runs, then "
        "--runs timed runs with the device synchronised (the paper: 10 and 100 at 1x3x256x256).",
    )
    bench_cmd.add_argument("--models", nargs="+", default=list(BENCHMARK_MODELS),
                           help="architectures (random weights), your models or checkpoints (default: %(default)s)")
    bench_cmd.add_argument("--sizes", nargs="+", type=int, default=[256], help="input sides in pixels (default 256)")
    bench_cmd.add_argument("--channels", type=int, default=3, help="image channels (default 3)")
    bench_cmd.add_argument("--batch", type=int, default=1, help="images per forward pass (default 1)")
    bench_cmd.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    bench_cmd.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    bench_cmd.add_argument("--warmup", type=int, default=10, help="untimed runs (default 10)")
    bench_cmd.add_argument("--runs", type=int, default=100, help="timed runs (default 100)")
    bench_cmd.add_argument("--budget", type=float, help="stop timing a model after this many seconds (at least 3 runs)")
    bench_cmd.add_argument("--global-blocks", nargs="+", choices=GLOBAL_BLOCKS, metavar="BLOCK",
                           help=f"time each architecture with these global blocks ({', '.join(GLOBAL_BLOCKS)})")
    bench_cmd.add_argument("--compile", action="store_true", help="run the networks through torch.compile")
    bench_cmd.add_argument("--cuda-graphs", action="store_true",
                           help="on CUDA, replay the networks as CUDA graphs (with --compile, the compiled ones)")
    bench_cmd.add_argument("--count-kernels", action="store_true",
                           help="on CUDA, also count the kernels of one pass with the profiler")
    bench_cmd.add_argument("--threads", type=int, help="torch CPU threads (default: every usable core)")
    bench_cmd.add_argument("--json", help="write the measurements to this JSON file")
    bench_cmd.add_argument("--plot", help="write a PNG plot of latency against size")
    bench_cmd.add_argument("-q", "--quiet", action="store_true", help="no progress lines")

    demo_cmd = commands.add_parser("demo", help="restore a noisy sample stack and print the PSNR gain")
    demo_cmd.add_argument("-o", "--output", default=DEMO_FOLDER, help="folder for the demo files")
    add_engine_options(demo_cmd)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line, like errors, written above any progress bar."""
    from tqdm import tqdm

    first_line = str(message).partition("\n")[0]
    tqdm.write(f"{PROG}: warning: {first_line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "restore": run_restore, "train": run_train, "evaluate": run_evaluate, "models": run_models, "demo": run_demo,
        "benchmark": run_benchmark,
    }
    previous = _handle_signals((signal.SIGTERM,), _terminate_as_interrupt)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            handlers[args.command](args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no output was written", file=sys.stderr)
        return 130
    except TileTooLargeError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        print(f"{PROG}: error: out of device memory; use smaller tiles, batch or patch", file=sys.stderr)
        return 2
    except (ValueError, KeyError, OSError, ArithmeticError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    finally:
        _restore_signal_handlers(previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
