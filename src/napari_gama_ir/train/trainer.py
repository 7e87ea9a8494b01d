"""The training loop: the paper's optimiser, validation, checkpoints and exact resume.

Optimisation follows the paper (section 5): AdamW with learning rate 1e-3 and betas (0.9, 0.9),
cosine annealing to 1e-7 over the run, gradient clipping. The batch of every step, with its noise
and masks, is drawn from a generator seeded by ``(seed, step)``, and the learning rate is a
function of the step, so a run resumed from a checkpoint continues exactly as an uninterrupted one
would have.

An output folder holds ``model.json`` + ``model.safetensors`` (the best network by validation, or
the last one without validation; this is the model to use) and ``checkpoint/`` with the latest
network, optimiser state and history, for ``resume``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..engine.device import HostMemoryError, check_precision, is_out_of_memory, resolve_device, usable_cores
from ..engine.heap import on_the_network_thread
from ..engine.memory import memory_for_pass, training_step_peak_bytes
from ..engine.normalize import NORMALIZATION_CHOICES
from ..model import GamaIR, load_checkpoint, save_checkpoint
from .data import Normalizer, PatchSampler, TrainingData, make_planes, split_validation, validation_crops
from .metrics import psnr, ssim
from .objectives import OBJECTIVES, NoiseModel, Objective, check_codecs

MODEL_STEM = "model"
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "training.json"
OPTIMISER_FILE = "optimiser.safetensors"
MODEL_FILES = (f"{MODEL_STEM}.json", f"{MODEL_STEM}.safetensors")


def holds_run(output: str | os.PathLike) -> bool:
    """Whether ``output`` holds a training run's model or checkpoint.

    Raises
    ------
    ValueError
        A file of the user's has the name of the run's checkpoint folder; a run could neither be
        written there nor replaced (it failed with "[Errno 20] Not a directory").
    """
    output = Path(output)
    checkpoint = output / CHECKPOINT_DIR
    if checkpoint.exists() and not checkpoint.is_dir():
        raise ValueError(f"{checkpoint}: a file, where a training run keeps its checkpoint folder; choose another folder")
    return checkpoint.exists() or (output / f"{MODEL_STEM}.json").exists()


def remove_run(output: str | os.PathLike) -> None:
    """Remove what a training run wrote into ``output`` -- its model and its checkpoint -- and
    nothing else: ``output`` may be a folder of the user's own (the training images, say)."""
    output = Path(output)
    checkpoint = output / CHECKPOINT_DIR
    for folder, names in ((output, MODEL_FILES), (checkpoint, (*MODEL_FILES, STATE_FILE, OPTIMISER_FILE))):
        for name in names:
            for path in (folder / name, folder / f"{name}.tmp"):  # .tmp: a write cut short
                path.unlink(missing_ok=True)
    if checkpoint.is_dir() and not any(checkpoint.iterdir()):
        checkpoint.rmdir()


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed with the settings and data given."""


class TrainingMemoryError(ValueError):
    """A training step does not fit in the device's memory."""


class ReplicaFailedError(RuntimeError):
    """Another replica of a data-parallel run failed; this one stops with it (:meth:`Replica.together`)."""


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides a training run; stored in every checkpoint.

    The defaults are the paper's optimiser (AdamW, lr 1e-3, betas 0.9/0.9, cosine to 1e-7).

    Parameters
    ----------
    steps : int
        Optimiser steps; the cosine schedule spans them.
    batch, patch : int
        Patches per step and their side in pixels.
    objective : {"supervised", "noise2void", "neighbor2neighbor"}
        See :mod:`napari_gama_ir.train.objectives`.
    loss : {"l1", "psnr"}
        Pixel loss of supervised training.
    noise : str, optional
        Synthetic noise for supervised training on clean images only, e.g. ``"gaussian:0-55"``,
        then compression as a camera's or a phone's, e.g. ``"gaussian:0-55+jpeg:60-95"`` (:class:`NoiseModel`).
    validation_fraction : float
        Share of planes (or of one plane's rows) held out; 0 for none.
    validate_every : int, optional
        Steps between validations; default one epoch (as many patch pixels as training pixels) or a
        tenth of the run, whichever is shorter.
    checkpoint_every : int
        Steps between checkpoints (one is also written at the end and when stopped).
    device, precision
        As for restoration; fp16 and bf16 autocast on a GPU (fp16 with gradient scaling).
    time_limit : float, optional
        Seconds after which the run stops early, with a checkpoint to resume from.
    """

    steps: int = 2000
    batch: int = 8
    patch: int = 64
    objective: str = "supervised"
    loss: str = "l1"
    noise: str | None = None
    learning_rate: float = 1e-3
    min_learning_rate: float = 1e-7
    betas: tuple[float, float] = (0.9, 0.9)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    validation_fraction: float = 0.1
    validate_every: int | None = None
    checkpoint_every: int = 500
    device: str = "auto"
    precision: str = "fp32"
    time_limit: float | None = None

    # Settings that may differ when a run is resumed: they do not change its result.
    RESUMABLE_CHANGES = ("device", "time_limit", "checkpoint_every")

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        problems = []
        for name in ("steps", "batch", "checkpoint_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.patch < 16:
            problems.append("patch must be at least 16 pixels")
        if self.objective not in OBJECTIVES:
            problems.append(f"objective must be one of {', '.join(OBJECTIVES)}")
        if self.objective == "neighbor2neighbor" and self.patch % 4:
            problems.append("neighbor2neighbor needs a patch that is a multiple of 4")
        if self.noise is not None and self.objective != "supervised":
            problems.append("synthetic noise is for supervised training only")
        if not 0 < self.min_learning_rate <= self.learning_rate:
            problems.append("learning rates must satisfy 0 < min_learning_rate <= learning_rate")
        if self.validate_every is not None and self.validate_every < 1:
            problems.append("validate_every must be at least 1")
        if problems:
            raise ValueError("invalid training settings: " + "; ".join(problems))
        if self.noise is not None:
            NoiseModel.parse(self.noise)  # raises with its own message

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSettings:
        return cls(**data)


def learning_rate_at(step: int, settings: TrainSettings) -> float:
    """Cosine annealing from ``learning_rate`` (step 0) to ``min_learning_rate`` (last step)."""
    progress = min(step / settings.steps, 1.0)
    span = settings.learning_rate - settings.min_learning_rate
    return settings.min_learning_rate + 0.5 * span * (1 + math.cos(math.pi * progress))


@dataclass
class TrainEvent:
    """What the loop reports after each step (and after each validation)."""

    step: int
    steps: int
    loss: float
    learning_rate: float
    seconds: float
    validation: dict[str, float] | None = None
    checkpoint: bool = False


def check_batch_split(batch: int, replicas: int) -> None:
    """Refuse a batch that data-parallel replicas cannot share equally."""
    if batch % replicas:
        raise ValueError(
            f"a batch of {batch} cannot be shared equally by {replicas} replicas; "
            "use a batch that is a multiple of the replica count"
        )


@dataclass(frozen=True)
class Replica:
    """This process's place in data-parallel training: replica ``rank`` of ``world``.

    Every replica draws the same global batch from the step's generator and trains on its own
    equal share; torch.distributed averages the gradients, so the replicas stay identical and a
    step equals a single-process step on the whole batch. Replica 0 validates and writes the
    checkpoints and the model. The process group must be initialised before the trainer is built,
    and destroyed while the replica is still referenced (see :meth:`_exchange`).
    """

    rank: int = 0
    world: int = 1
    # The tensors this replica's own collectives run on, one per device (see _exchange).
    _exchanged: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextmanager
    def together(self) -> Iterator[None]:
        """Run work that can fail on one replica alone, at a point every replica reaches: where it
        failed on any, all of them raise (the one that failed with its own error).

        Without this, the others would wait for the failed one in their next collective until the
        timeout (10 minutes by default), holding their workers: seen with a step refused on the
        worker with the lower memory limit of two.
        """
        try:
            yield
        except Exception:
            self._exchange(1.0)
            raise
        failures = int(self._exchange(0.0))
        if failures:
            raise ReplicaFailedError(f"{failures} other replica(s) of this data-parallel run failed; this one stopped too")

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any replica."""
        return bool(self._exchange(float(flag)))

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a one-element ``value`` over the replicas."""
        return self._exchange(value.detach()) / self.world

    def _exchange(self, value: float | torch.Tensor) -> float:
        """The sum of ``value`` over the replicas (no collective for a run of one replica).

        It runs on a tensor this replica keeps, not a fresh one: torch's gloo thread may drop its
        reference to a collective's tensor after the collective has returned, and where that is the
        last reference it takes the GIL to free the Python object. torch 2.3 destroys a gloo process
        group holding the GIL while it waits for that thread, so the two deadlocked: the worker
        stopped answering until dask restarted it, 10 minutes on (once in CI; in 2 of 2 stress runs
        under load, benchmarks/replica_teardown.py; torch 2.13 did not hang). Kept here, the
        tensors outlive the process group (the replica's task destroys the group first).
        """
        if self.world == 1:
            return float(value)
        # NCCL takes tensors on this process's GPU only; gloo takes host tensors.
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        exchanged = self._exchanged.setdefault(device, torch.zeros(1, dtype=torch.float64, device=device))
        if isinstance(value, float):
            exchanged.fill_(value)
        else:
            exchanged.copy_(value.reshape(1))
        torch.distributed.all_reduce(exchanged)
        return float(exchanged.item())


@dataclass
class TrainResult:
    """How a run ended: where the model is, how many steps ran, and the metrics history."""

    model_path: Path
    steps_done: int
    stopped_early: bool
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None


def _optimiser_tensors(optimiser: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {}
    for index, state in optimiser.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
    return tensors


def _load_optimiser_tensors(optimiser: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimiser.load_state_dict({"state": state, "param_groups": optimiser.state_dict()["param_groups"]})


class BatchPrefetcher:
    """Prepares the next steps' batches in background threads while the device trains.

    Cutting patches, adding noise and copying to page-locked memory take tens of milliseconds a
    step on the host; done in line, a GPU waits for them every step. Each batch is a function of
    its step alone, so batches drawn in parallel are the ones the loop would have drawn itself.
    """

    def __init__(self, make_batch, steps: int, workers: int = 1) -> None:
        self.make_batch, self.steps = make_batch, steps
        self.ahead = 2 * workers
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batch-prefetch")
        self.pending: dict[int, Future] = {}

    def take(self, step: int) -> dict[str, torch.Tensor]:
        """Step ``step``'s batch; queues the following ones."""
        for upcoming in range(step, min(step + self.ahead + 1, self.steps)):
            if upcoming not in self.pending:
                self.pending[upcoming] = self.pool.submit(self.make_batch, upcoming)
        return self.pending.pop(step).result()

    def close(self) -> None:
        """Drop the queued batches and stop the threads."""
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True)


class Trainer:
    """Trains a network on :class:`TrainingData`; :meth:`run` is a generator of :class:`TrainEvent`.

    Parameters
    ----------
    model : GamaIR
        The network to train (fine-tuned in place; pass a fresh one to train from scratch).
    data : TrainingData
        Noisy and/or clean images; must hold what the objective needs.
    settings : TrainSettings
    output : path-like
        Folder for the model and the checkpoint.
    start : dict, optional
        Where the network came from (recorded in the checkpoint).
    resume : bool
        Continue from the checkpoint in ``output``; the settings and data must be those of the
        checkpoint (only device, time limit and checkpoint interval may change).
    replica : Replica, optional
        Train as one replica of a data-parallel run (see :mod:`napari_gama_ir.train.distributed`);
        the caller then also sets the torch thread count.
    """

    def __init__(
        self,
        model: GamaIR,
        data: TrainingData,
        settings: TrainSettings,
        output: str | os.PathLike,
        start: dict[str, Any] | None = None,
        resume: bool = False,
        replica: Replica | None = None,
    ) -> None:
        self.settings, self.output = settings, Path(output)
        self.standalone = replica is None
        self.replica = replica or Replica()
        check_batch_split(settings.batch, self.replica.world)
        # Reading the data or the checkpoint can fail on one worker alone (storage not shared).
        with self.replica.together():
            noise = NoiseModel.parse(settings.noise) if settings.noise else None
            self.objective = Objective(settings.objective, settings.loss, noise)
            if self.objective.needs_clean and not data.has_clean:
                raise ValueError("supervised training needs clean images; without them use a self-supervised objective")
            if self.objective.needs_clean and not data.has_noisy and noise is None:
                raise ValueError("clean images alone need a synthetic noise model (e.g. gaussian:0-55) or noisy images")
            if data.has_noisy and noise is not None:
                raise ValueError("a synthetic noise model is for clean images alone; the noisy images are given")
            if noise is not None and noise.quality:
                check_codecs(noise.codecs, model.config.in_channels)
            if not self.objective.needs_clean and not data.has_noisy:
                raise ValueError(f"{settings.objective} trains on noisy images; none were given")
            self.device = resolve_device(settings.device)
            self.autocast_dtype = check_precision(settings.precision, self.device)
            self.model = model.to(self.device)
            self.model.set_mean_mode("global")
            self.normalizer = Normalizer(model.config.normalization)
            self.planes = make_planes(data, model.config.in_channels, normalizer=self.normalizer)
            train_regions, validation_regions = split_validation(
                self.planes, settings.validation_fraction, settings.patch, settings.seed
            )
            self.sampler = PatchSampler(self.planes, train_regions, settings.patch, self.normalizer)
            self.validation = validation_crops(self.planes, validation_regions, self.normalizer)
            train_pixels = sum(r.rows * self.planes[r.plane].width for r in train_regions)
            self.epoch_steps = max(1, math.ceil(train_pixels / (settings.batch * settings.patch**2)))
            held_out = sorted({(self.planes[r.plane].source, self.planes[r.plane].index) for r in validation_regions})
            self.data_record = {
                **data.describe(),
                "planes": len(self.planes),
                "validation_planes": [list(plane) for plane in held_out],
                "validation_crops": len(self.validation),
            }
            self.start_record = start or {"from": "given network"}
            self.optimiser = torch.optim.AdamW(
                self.model.parameters(), lr=settings.learning_rate, betas=settings.betas, weight_decay=settings.weight_decay
            )
            self.scaler = torch.amp.GradScaler(self.device.type) if settings.precision == "fp16" else None
            self.step = 0
            self.history: list[dict[str, Any]] = []
            self.pending_losses: list[float] = []  # training losses since the last validation
            self.best: dict[str, Any] | None = None
            self.seconds = 0.0
            self.step_peak_bytes: int | None = None  # of a CPU step's tensors (_memory_checked_step)
            self._stop = threading.Event()
            if resume:
                self._resume()
        # The replicas' gradients are averaged in backward; the network itself stays self.model.
        self.network: torch.nn.Module = self.model
        if self.replica.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.network = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    # -- control -------------------------------------------------------------------------------
    @property
    def validate_every(self) -> int:
        """``settings.validate_every``, by default one epoch or a tenth of the run if that is shorter."""
        return self.settings.validate_every or min(self.epoch_steps, max(self.settings.steps // 10, 1))

    def stop(self) -> None:
        """Ask the loop to stop after the current step (thread-safe); it writes a checkpoint."""
        self._stop.set()

    def _record(self) -> dict[str, Any]:
        return {
            "napari_gama_ir_version": __version__,
            "settings": self.settings.to_dict(),
            "objective": self.objective.describe(),
            "data": self.data_record,
            "start": self.start_record,
            "step": self.step,
            "seconds": round(self.seconds, 3),
            "history": self.history,
            "pending_losses": self.pending_losses,
            "best": self.best,
        }

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write the network, optimiser state and history to ``output/checkpoint``."""
        folder = self.output / CHECKPOINT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        record = self._record()
        save_checkpoint(self.model, folder / MODEL_STEM, metadata={"training": {"step": self.step}})
        tmp = folder / (OPTIMISER_FILE + ".tmp")
        save_file(_optimiser_tensors(self.optimiser), str(tmp))
        os.replace(tmp, folder / OPTIMISER_FILE)
        if self.scaler is not None:
            record["grad_scaler"] = dict(self.scaler.state_dict())
        tmp = folder / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, folder / STATE_FILE)  # last: a checkpoint counts only once this is written
        return folder

    def _save_model(self) -> Path:
        return save_checkpoint(self.model, self.output / MODEL_STEM, metadata={"training": self._record()})

    def _resume(self) -> None:
        folder = self.output / CHECKPOINT_DIR
        state_path = folder / STATE_FILE
        if not state_path.is_file():
            raise ResumeError(f"{self.output}: no checkpoint to resume from")
        record = json.loads(state_path.read_text())
        saved = TrainSettings.from_dict(record["settings"]).to_dict()
        current = self.settings.to_dict()
        changed = sorted(k for k in saved if saved[k] != current[k] and k not in TrainSettings.RESUMABLE_CHANGES)
        if changed:
            details = ", ".join(f"{k}: {saved[k]} -> {current[k]}" for k in changed[:3])
            raise ResumeError(f"the checkpoint was made with other settings ({details}); resume with the same ones")
        if record["data"] != json.loads(json.dumps(self.data_record)):
            raise ResumeError("the checkpoint was made with other training data; resume with the same images")
        network = load_checkpoint(folder / MODEL_STEM)
        if network.config.to_dict() | {"metadata": {}} != self.model.config.to_dict() | {"metadata": {}}:
            raise ResumeError("the checkpoint's network has another architecture than the one given")
        self.model.load_state_dict(network.state_dict())
        _load_optimiser_tensors(self.optimiser, load_file(str(folder / OPTIMISER_FILE), device=str(self.device)))
        if self.scaler is not None and "grad_scaler" in record:
            self.scaler.load_state_dict(record["grad_scaler"])
        self.step, self.history, self.best = record["step"], record["history"], record["best"]
        self.pending_losses, self.seconds, self.start_record = record["pending_losses"], record["seconds"], record["start"]

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """PSNR and SSIM (data range 1) of the network on the held-out crops, or the objective's loss.

        With clean images the network restores each noisy crop (synthetic noise drawn from a
        generator fixed by the seed) and is scored against the clean crop, where it holds data;
        without them the self-supervised loss on the crops, with fixed masks, is reported instead
        (with any no data as filled).
        """
        self.model.eval()
        scores: dict[str, list[float]] = {}
        with torch.inference_mode():
            for index, crop in enumerate(self.validation):
                rng = np.random.default_rng([self.settings.seed, 1 << 40, index])
                data = crop.get("data")  # where the crop holds data; None: everywhere
                arrays = self.objective.inputs({k: v[None] for k, v in crop.items() if k != "data"}, rng)
                tensors = {k: torch.from_numpy(v).to(self.device) for k, v in arrays.items()}
                if "target" in arrays and self.objective.needs_clean:
                    restored = self.model(tensors["input"])[0].float().cpu().numpy()
                    scores.setdefault("psnr", []).append(psnr(crop["clean"], restored, where=data))
                    scores.setdefault("ssim", []).append(ssim(crop["clean"], restored, where=data))
                    scores.setdefault("psnr_input", []).append(psnr(crop["clean"], arrays["input"][0], where=data))
                else:
                    scores.setdefault("loss", []).append(float(self.objective(self.model, tensors)))
        self.model.train()
        return {name: float(np.mean(values)) for name, values in scores.items()}

    def _is_better(self, metrics: dict[str, float]) -> bool:
        if self.best is None:
            return True
        if "psnr" in metrics:
            return metrics["psnr"] > self.best["psnr"]
        return metrics["loss"] < self.best["loss"]

    # -- the loop ------------------------------------------------------------------------------
    def _batch(self, step: int) -> dict[str, torch.Tensor]:
        """This replica's share of step ``step``'s batch, on the host: a function of (seed, step) alone."""
        rng = np.random.default_rng([self.settings.seed, step])
        arrays = self.objective.inputs(self.sampler.batch(self.settings.batch, rng), rng)
        share = self.settings.batch // self.replica.world
        first = self.replica.rank * share
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v[first : first + share])) for k, v in arrays.items()}
        if self.device.type == "cuda":  # page-locked, so the copy to the GPU runs asynchronously
            tensors = {k: t.pin_memory() for k, t in tensors.items()}
        return tensors

    def _take(self, prefetcher: BatchPrefetcher) -> dict[str, torch.Tensor]:
        """This step's tensors (patches, and noise, masks or cells), on the device."""
        return {k: t.to(self.device, non_blocking=True) for k, t in prefetcher.take(self.step).items()}

    def _loss(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The step's forward pass: the objective's loss on this replica's share of the batch."""
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        )
        with autocast:
            return self.objective(self.network, tensors)

    def _update(self, loss: torch.Tensor) -> float:
        """The step's backward pass and optimiser update; the whole batch's loss."""
        for group in self.optimiser.param_groups:
            group["lr"] = learning_rate_at(self.step, self.settings)
        self.optimiser.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimiser)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
            self.scaler.step(self.optimiser)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
            self.optimiser.step()
        self.step += 1
        return self.replica.mean(loss)  # the whole batch's loss, as one process would report

    def _run_step(self, prefetcher: BatchPrefetcher) -> float:
        """One step. On a CPU it runs on the network thread, whichever thread trains (napari's
        fine-tuning runs in a worker thread), and reuses the heap memory the step before freed:
        GAMA-IR-S 1.15x for the heap, and 1.2x more for a worker thread's step
        (:func:`~napari_gama_ir.engine.heap.on_the_network_thread`)."""
        if self.device.type != "cpu":
            # Reading the batch, and the forward pass (a GPU out of memory), can fail on one replica
            # alone; the others would then wait in the backward pass's gradient all-reduce.
            with self.replica.together():
                loss = self._loss(self._take(prefetcher))
            return self._update(loss)
        return on_the_network_thread(self._memory_checked_step, prefetcher)

    def _memory_checked_step(self, prefetcher: BatchPrefetcher) -> float:
        """:meth:`_step` inside :func:`~napari_gama_ir.engine.memory.memory_for_pass`: on a CPU a
        step too large for the memory available fails before it runs instead of having the process
        killed (GAMA-IR-S takes about 21 kB a pixel of the batch: 16 patches of 1024 x 1024 had the
        command killed after 65 s on a 24 GB machine)."""
        share, patch = self.settings.batch // self.replica.world, self.settings.patch
        with ExitStack() as room:
            # Workers with less memory than others refuse a step the others take; the forward pass
            # can fail on one replica alone too (see _run_step).
            with self.replica.together():
                tensors = self._take(prefetcher)
                if self.step_peak_bytes is None:  # the same shapes every step: worked out once
                    self.step_peak_bytes = self._step_peak_bytes(tensors)
                room.enter_context(memory_for_pass(
                    self.step_peak_bytes, f"a training step on {share} patches of {patch}x{patch} pixels"
                ))
                loss = self._loss(tensors)
            return self._update(loss)

    def _step_peak_bytes(self, tensors: dict[str, torch.Tensor]) -> int:
        """The most bytes a step on ``tensors`` holds at once, with the objective's own loss:
        Neighbor2Neighbor's trains on sub-images of a quarter of the pixels. Noise2Void's picks its
        pixels with a boolean mask, which the meta device cannot size; a loss on the whole output,
        which its step also computes, stands in for it."""
        others = {name: torch.empty_like(tensor, device="meta") for name, tensor in tensors.items() if name != "input"}

        def loss(network: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
            return self.objective(network, {**others, "input": images})

        shape = tuple(tensors["input"].shape)
        try:
            return training_step_peak_bytes(self.model, shape, loss)
        except NotImplementedError:
            return training_step_peak_bytes(self.model, shape)

    def _should_stop(self, session_seconds: float, session_steps: int) -> bool:
        """Stop asked for, or time limit reached, on any replica: all of them stop at the same step.

        The time limit counts only once this session has made a step, so that every session makes
        progress however short its limit (and however long the start took).
        """
        limit = self.settings.time_limit
        out_of_time = limit is not None and session_steps > 0 and session_seconds > limit
        return self.replica.any(self._stop.is_set() or out_of_time)

    def run(self) -> Iterator[TrainEvent]:
        """Train until ``settings.steps`` (or a stop, or the time limit), yielding after every step.

        Validates every :attr:`validate_every` steps and at the end, keeps the best network as
        ``output/model``, and writes a checkpoint every ``checkpoint_every`` steps and on exit.
        """
        settings = self.settings
        main = self.replica.is_main
        made_output = main and not self.output.exists()
        if main:  # now, so that an output that cannot be written fails before the first step
            self.output.mkdir(parents=True, exist_ok=True)
        if self.standalone and self.device.type == "cpu" and torch.get_num_threads() != usable_cores():
            torch.set_num_threads(usable_cores())
        self.model.train()
        session_started = time.monotonic()
        seconds_before = self.seconds
        steps_before = self.step
        # On a CPU the network's torch threads take every core; beside a GPU the host has cores to spare.
        workers = 1 if self.device.type == "cpu" else max(1, min(4, usable_cores() - 1))
        prefetcher = BatchPrefetcher(self._batch, settings.steps, workers=workers)
        closed_by_caller = False
        try:
            while self.step < settings.steps and not self._should_stop(
                time.monotonic() - session_started, self.step - steps_before
            ):
                try:
                    loss = self._run_step(prefetcher)
                except RuntimeError as error:
                    if not is_out_of_memory(error):
                        raise
                    # Shrinking the batch by itself would change the run; say what to change instead.
                    problem = str(error) if isinstance(error, HostMemoryError) else (
                        f"a batch of {settings.batch} patches of {settings.patch} pixels does not fit in "
                        f"{self.device} memory"
                    )
                    raise TrainingMemoryError(f"{problem}; use a smaller batch or patch") from None
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"the loss became {loss} at step {self.step}; try a lower learning rate or fp32"
                    )
                self.pending_losses.append(loss)
                session_seconds = time.monotonic() - session_started
                self.seconds = seconds_before + session_seconds
                event = TrainEvent(self.step, settings.steps, loss, learning_rate_at(self.step - 1, settings), self.seconds)
                validating = self.step % self.validate_every == 0 or self.step == settings.steps
                checkpointing = self.step % settings.checkpoint_every == 0 or self.step == settings.steps
                if validating or checkpointing:
                    with self.replica.together():  # replica 0's writes can fail (a full disk)
                        if main and validating:
                            event.validation = self._validate_and_keep()
                        if main and checkpointing:
                            self.save_checkpoint()
                            event.checkpoint = True
                yield event
        except GeneratorExit:
            closed_by_caller = True
            raise
        except BaseException:
            if made_output and not any(self.output.iterdir()):
                self.output.rmdir()  # a run that failed before writing anything (a step refused) leaves nothing
            raise
        finally:
            prefetcher.close()
            self.model.eval()
            if closed_by_caller and main and self.step < settings.steps:
                # The caller closed the run after a step (or dropped it, and it was collected):
                # keep that step, as a stop would.
                self.save_checkpoint()
        with self.replica.together():  # the last collective: every replica learns whether these writes failed
            if main:
                self._save_at_end()

    def _save_at_end(self) -> None:
        if self.step < self.settings.steps:  # stopped early: keep everything needed to resume
            self.save_checkpoint()
        model_path = self.output / f"{MODEL_STEM}.json"
        if self.validation and model_path.is_file():
            # The best network's weights, with the record of the whole run so far.
            save_checkpoint(load_checkpoint(model_path), model_path, metadata={"training": self._record()})
        else:
            self._save_model()

    def _validate_and_keep(self) -> dict[str, float]:
        metrics = {"train_loss": float(np.mean(self.pending_losses))} if self.pending_losses else {}
        self.pending_losses = []
        if self.validation:
            metrics.update(self.validate())
        self.history.append({"step": self.step, "learning_rate": learning_rate_at(self.step - 1, self.settings), **metrics})
        if self.validation and self._is_better(metrics):
            self.best = {"step": self.step, **metrics}
            self._save_model()
        return metrics

    def result(self) -> TrainResult:
        return TrainResult(
            self.output / f"{MODEL_STEM}.json", self.step, self.step < self.settings.steps, self.seconds,
            self.history, self.best,
        )


def train(
    model: GamaIR,
    data: TrainingData,
    settings: TrainSettings,
    output: str | os.PathLike,
    *,
    resume: bool = False,
    start: dict[str, Any] | None = None,
    on_event=None,
) -> TrainResult:
    """Train or fine-tune ``model`` on ``data`` and write it to ``output``.

    Parameters
    ----------
    model : GamaIR
        The starting network (see :func:`starting_model`); trained in place.
    data : TrainingData
        From :func:`~napari_gama_ir.train.data_from_arrays` or :func:`~napari_gama_ir.train.data_from_paths`.
    settings : TrainSettings
    output : path-like
        Folder for ``model.json``/``model.safetensors`` and the resumable ``checkpoint/``.
    resume : bool
        Continue the run whose checkpoint is in ``output``.
    start : dict, optional
        Where the network came from, for the record.
    on_event : callable, optional
        Called with every :class:`TrainEvent`.

    Returns
    -------
    TrainResult
    """
    trainer = Trainer(model, data, settings, output, start=start, resume=resume)
    for event in trainer.run():
        if on_event is not None:
            on_event(event)
    return trainer.result()


def default_normalization(dtype: np.dtype, choice: str = "auto") -> dict[str, Any]:
    """The normalisation of a new network for training data of ``dtype``.

    ``choice`` is one of :data:`NORMALIZATION_CHOICES`. ``"auto"`` gives range normalisation for
    uint8 and float data and per-plane percentiles for other integers: microscopy counts (uint16,
    int32...) rarely span their dtype's range, so a range-normalised network would see nearly black
    input, while percentiles map each plane's own spread to [0, 1].
    """
    if choice not in NORMALIZATION_CHOICES:
        raise ValueError(f"normalization must be one of {', '.join(NORMALIZATION_CHOICES)}, got {choice!r}")
    if choice.startswith("percentile-"):
        return {"method": "percentile", "low": 1.0, "high": 99.8, "scope": choice.removeprefix("percentile-")}
    dtype = np.dtype(dtype)
    if choice == "range" or dtype == np.uint8 or not np.issubdtype(dtype, np.integer):
        return {"method": "range"}
    return {"method": "percentile", "low": 1.0, "high": 99.8, "scope": "image"}


def starting_model(
    channels: int,
    *,
    source: str | os.PathLike | None = None,
    architecture: str = "gama_ir_xs",
    patch: int = 64,
    normalization: dict[str, Any] | None = None,
    seed: int = 0,
    colour: bool | None = None,
) -> tuple[GamaIR, dict[str, Any]]:
    """The network to train: fine-tuned from ``source`` or a new ``architecture``.

    Parameters
    ----------
    channels : int
        Channels of the training images.
    source : str or path-like, optional
        A registry name with shipped weights, a user model name or a checkpoint path. Its channels
        must equal ``channels``, or be 1 (a grey network trains on each channel alone), or be 3
        when ``channels`` is 1: a colour network becomes a grey one (:func:`grey_from_colour`).
    architecture : str
        Registry name of the architecture to build with random weights when ``source`` is None.
    patch, normalization, seed
        Recorded in the new network's config (training patch size, intensity normalisation) and
        used to seed its initial weights. A fine-tuned network keeps its own, except that a colour
        network made grey takes ``normalization`` (when given).
    colour : bool or None
        False where the channels are a microscope's, not a picture's colours
        (:attr:`TrainingData.colour`): three of them then make a new network of "3 channels", not
        an RGB one, which a later fine-tuning on grey images would make grey by averaging its
        channels' outputs (DAPI's, GFP's and RFP's).

    Returns
    -------
    (GamaIR, dict)
        The network and a record of where it came from.
    """
    from ..model import create_model, get_spec

    if source is not None:
        model = create_model(source, pretrained=True)
        start = {"from": str(source), "checkpoint_sha256": getattr(model, "checkpoint_sha256", None)}
        if channels == 1 and model.config.channel_meaning == "rgb":
            return grey_from_colour(model, normalization), {**start, "converted": "rgb to grey"}
        if model.config.in_channels not in (channels, 1):
            raise ValueError(
                f"the starting model takes {model.config.in_channels} channel(s) but the training images have {channels}"
            )
        return model, start
    config = get_spec(architecture).config.replace(
        in_channels=channels, out_channels=channels, train_patch_size=patch,
        channel_meaning={1: "grey", 3: "rgb" if colour is not False else None}.get(channels) or f"{channels} channels",
        normalization=normalization or {"method": "range"},
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GamaIR(config)
    return model, {"from": "scratch", "architecture": architecture, "seed": seed}


def grey_from_colour(model: GamaIR, normalization: dict[str, Any] | None = None) -> GamaIR:
    """A one-channel copy of the colour network ``model``, as a starting point for grey training.

    On a grey image the copy gives the mean of the colour network's three outputs for that image
    repeated in three channels: the intro conv's three input kernels are summed (three equal
    channels meet them all) and the ending conv's three output kernels and biases are averaged (the
    global residual then adds the mean of the colour residuals). Everything between is shared.

    Parameters
    ----------
    model : GamaIR
        A network whose config says ``channel_meaning="rgb"``; it is not modified.
    normalization : dict, optional
        The grey network's intensity normalisation (default: the colour network's).
    """
    if model.config.channel_meaning != "rgb" or model.config.in_channels != 3 or model.config.out_channels != 3:
        raise ValueError(f"only an RGB network can be made grey, not one of {model.config.channel_meaning!r}")
    config = model.config.replace(
        in_channels=1, out_channels=1, channel_meaning="grey", normalization=normalization or model.config.normalization,
    )
    grey = GamaIR(config)
    state = model.state_dict()
    state["intro.weight"] = state["intro.weight"].sum(dim=1, keepdim=True)
    state["ending.weight"] = state["ending.weight"].mean(dim=0, keepdim=True)
    state["ending.bias"] = state["ending.bias"].mean(dim=0, keepdim=True)
    grey.load_state_dict(state)
    return grey.to(next(model.parameters()).dtype)


def resume_point(output: str | os.PathLike, **changes: Any) -> tuple[GamaIR, TrainSettings]:
    """The network and settings of the run checkpointed in ``output``, to build its resuming trainer.

    ``changes`` may set only the settings that do not alter the result (device, time limit,
    checkpoint interval).
    """
    folder = Path(output) / CHECKPOINT_DIR
    if not (folder / STATE_FILE).is_file():
        raise ResumeError(f"{output}: no checkpoint to resume from")
    record = json.loads((folder / STATE_FILE).read_text())
    refused = sorted(set(changes) - set(TrainSettings.RESUMABLE_CHANGES))
    if refused:
        raise ResumeError(f"{', '.join(refused)} cannot change when resuming (the result would differ)")
    return load_checkpoint(folder / MODEL_STEM), TrainSettings.from_dict({**record["settings"], **changes})


def resume_trainer(output: str | os.PathLike, data: TrainingData, **changes: Any) -> Trainer:
    """A :class:`Trainer` that continues the run checkpointed in ``output`` (see :func:`resume_point`)."""
    model, settings = resume_point(output, **changes)
    return Trainer(model, data, settings, output, resume=True)
