"""Command line: ``napari-gama-ir restore|models|demo``. A thin shell over the library."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .engine import restore
from .engine.axes import guess_axes, parse_axes
from .engine.io import check_output_path, open_image, write_image
from .engine.restore import DEFAULT_MEAN_MODE, MEAN_MODES
from .model import CheckpointError, GamaIR, create_model, get_spec, list_models, user_models_dir
from .model.checkpoint import read_checkpoint_record

DEFAULT_MODEL = "gama_ir_s"
PROG = "napari-gama-ir"


class UsageError(ValueError):
    """A problem with what the user asked for; reported as one line."""


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
        f"{line}\n!! WARNING: no trained weights are shipped yet. This runs a RANDOMLY INITIALISED\n"
        f"!! network: the output is NOT a restoration, only a test of the pipeline.\n{line}"
    )


def run_restore(args: argparse.Namespace) -> Path:
    """Everything ``restore`` does, shared with ``demo``: open, check, restore lazily, write."""
    source = open_image(args.input)
    output = check_output_path(args.output, [args.input], args.overwrite)
    axes = parse_axes(args.axes, source.array.ndim) if args.axes else source.axes or guess_axes(source.array.shape)
    channels = source.array.shape[axes.index("C")] if "C" in axes else 1
    if args.untrained:
        print(_untrained_banner(), file=sys.stderr)
    model = load_model(args.model, args.untrained, channels)
    planes = int(np.prod([n for a, n in zip(axes, source.array.shape) if a not in "CYX"], dtype=np.int64))
    height, width = source.array.shape[axes.index("Y")], source.array.shape[axes.index("X")]
    progress = _Progress(planes, height * width, args.quiet)
    restored = restore(  # lazy: checks the settings, computes nothing yet
        source.array, model, axes, tile=args.tile or None, overlap=args.overlap, mean_mode=args.mean_mode,
        device=args.device, precision=args.precision, batch=args.batch,
        output_dtype="input" if args.output_dtype == "input" else args.output_dtype,
        on_plane=progress.update_pixels,
    )
    provenance = {
        "napari_gama_ir_version": __version__,
        "model": str(args.model),
        "untrained": bool(args.untrained),
        "checkpoint_sha256": getattr(model, "checkpoint_sha256", None),
        "tile": args.tile,
        "overlap": args.overlap,
        "mean_mode": args.mean_mode,
        "source": str(args.input),
    }
    progress.start()
    try:
        write_image(restored, output, axes, overwrite=args.overwrite, attrs=provenance)
    finally:
        progress.close()
    return output


class _Progress:
    """A tqdm bar in megapixels (so it shows Mpx/s and an ETA) with a planes-done counter.

    The bar appears on :meth:`start`, once the inputs are checked, so an error is never preceded
    by an empty bar.
    """

    def __init__(self, planes: int, plane_pixels: int, quiet: bool) -> None:
        self._planes, self._plane_pixels, self._quiet = planes, plane_pixels, quiet
        self._done, self._lock, self._bar = 0, threading.Lock(), None

    def start(self) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=self._planes * self._plane_pixels / 1e6, unit="Mpx", disable=self._quiet, desc="restoring",
            bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} Mpx [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
        )

    def update_pixels(self, pixels: int) -> None:
        with self._lock:
            self._done += 1
            self._bar.set_postfix_str(f"planes {self._done}/{self._planes}", refresh=False)
            self._bar.update(pixels / 1e6)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run_models(args: argparse.Namespace) -> None:
    print("Registered architectures (name, shipped weights, description):")
    for spec in list_models():
        weights = "yes" if spec.weights else "no"
        print(f"  {spec.name:<24} {weights:<4} {spec.description}")
    folder = user_models_dir()
    checkpoints = sorted(folder.glob("*.json")) if folder.is_dir() else []
    print(f"Local checkpoints in {folder}:" + ("" if checkpoints else " none"))
    for path in checkpoints:
        try:
            record, _ = read_checkpoint_record(path)
            config = record["config"]
            print(f"  {path.stem:<24} {config['in_channels']} channel(s), width {config['width']}")
        except CheckpointError as error:
            print(f"  {path.stem:<24} unreadable: {error}")


def run_demo(args: argparse.Namespace) -> None:
    """Make a noisy sample stack, restore it through ``run_restore`` and report PSNR."""
    from skimage.metrics import peak_signal_noise_ratio

    from .samples import noisy_rgb_photos

    folder = Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)
    sigma = 25.0
    noisy, clean = noisy_rgb_photos(sigma=sigma, seed=0)
    noisy_path, restored_path = folder / "noisy.tif", folder / "restored.tif"
    write_image(noisy, noisy_path, "ZYXC", overwrite=True)
    weights_shipped = get_spec(DEFAULT_MODEL).weights is not None
    restore_args = argparse.Namespace(
        input=str(noisy_path), output=str(restored_path), overwrite=True, model=DEFAULT_MODEL,
        untrained=not weights_shipped, axes="ZYXC", tile=args.tile, overlap=args.overlap,
        mean_mode=DEFAULT_MEAN_MODE, device=args.device, precision="fp32", batch=None,
        output_dtype="input", quiet=args.quiet,
    )
    run_restore(restore_args)
    restored = open_image(restored_path).array.compute()
    before = peak_signal_noise_ratio(clean, noisy, data_range=255)
    after = peak_signal_noise_ratio(clean, restored, data_range=255)
    print(f"demo: 3 RGB images 256x256, Gaussian noise sigma {sigma:g} (seed 0), model {DEFAULT_MODEL}")
    print(f"demo: wrote {noisy_path} and {restored_path}")
    print(f"demo: PSNR noisy {before:.2f} dB -> restored {after:.2f} dB ({after - before:+.2f} dB)")
    if not weights_shipped:
        print(_untrained_banner())


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
    restore_cmd.add_argument("input", help="input image: .zarr (OME-Zarr too), .tif, .png, .jpg or .npy")
    restore_cmd.add_argument("-o", "--output", required=True, help="output: .zarr, .tif, .png or .npy")
    restore_cmd.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name, local model name or checkpoint path (default {DEFAULT_MODEL})")
    restore_cmd.add_argument("--untrained", action="store_true", help="use the architecture with random weights (pipeline tests only)")
    restore_cmd.add_argument("--axes", help="axes of the input, e.g. YX, YXC, ZYX, TCZYX (default: from the file, else guessed)")
    restore_cmd.add_argument("--mean-mode", choices=MEAN_MODES, default=DEFAULT_MEAN_MODE, help=f"GAMA averaging (default {DEFAULT_MEAN_MODE})")
    restore_cmd.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    restore_cmd.add_argument("--batch", type=int, help="tiles per forward pass (default 1 on CPU, 4 on GPU)")
    restore_cmd.add_argument("--output-dtype", default="float32", help="float32 (default), input, or a numpy dtype")
    restore_cmd.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_engine_options(restore_cmd)

    commands.add_parser("models", help="list registered architectures and local checkpoints")

    demo_cmd = commands.add_parser("demo", help="restore a noisy sample stack and print the PSNR gain")
    demo_cmd.add_argument("-o", "--output", default="gama-ir-demo", help="folder for the demo files")
    add_engine_options(demo_cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"restore": run_restore, "models": run_models, "demo": run_demo}
    try:
        handlers[args.command](args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no output was written", file=sys.stderr)
        return 130
    except (ValueError, KeyError, OSError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
