"""Data-parallel training and fine-tuning on a dask.distributed cluster.

dask places one training replica on each chosen worker (one per GPU, or one per CPU socket or
machine); the replicas form a torch.distributed process group (NCCL on GPUs, gloo on CPUs) that
averages their gradients every step. Every replica draws the same global batch from the step's
seeded generator and trains on its own equal share of it, so a step of N replicas equals a
single-process step on the whole batch, and a resumed run continues exactly as an uninterrupted
one (see :mod:`~napari_gama_ir.train.trainer`).

The network reaches the workers as checkpoint bytes (never a pickled module); the training data as
:class:`~napari_gama_ir.train.TrainingData` (lazy arrays over files, or in-memory arrays), scattered
once. Replica 0 validates, writes the checkpoints and the model into ``output``, and reports every
step to the client, so ``output`` must be on storage that every worker shares (to resume, every
replica reads the checkpoint from it).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import queue
import socket
import time
import uuid
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from ..engine.device import resolve_device
from ..engine.distributed import CheckpointBytes, current_worker, worker_device
from ..engine.heap import reuse_freed_heap
from ..model import GamaIR
from .data import TrainingData
from .trainer import (
    Replica,
    ReplicaFailedError,
    Trainer,
    TrainEvent,
    TrainResult,
    TrainSettings,
    check_batch_split,
)

#: Seconds a replica waits in a collective before giving up (a lost peer, or a slow validation).
DEFAULT_TIMEOUT = 600.0


class ReplicaLostError(ConnectionError):
    """A worker that held a training replica left the cluster; the run can be resumed."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _run_replica(rank: int, world: int, rendezvous: str, checkpoint: CheckpointBytes, data: TrainingData,
                 settings: dict[str, Any], output: str, start: dict[str, Any] | None, resume: bool, run_id: str,
                 timeout: float) -> dict[str, Any] | None:
    """Train as replica ``rank`` of ``world`` on this worker; replica 0 returns the run's result."""
    from distributed import Event

    worker = current_worker()
    reuse_freed_heap()
    # The 1x1x7x7 GAMA kernels' gradients come out of the convolution with strides DDP's buckets
    # do not use; it copies them, which for 49 numbers costs nothing worth a warning.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    # A worker's torch threads are its dask threads, as in restoration.
    torch.set_num_threads(worker.state.nthreads)
    settings = {**settings, "device": worker_device(settings["device"], worker)}
    device = resolve_device(settings["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", init_method=rendezvous, rank=rank, world_size=world,
        timeout=timedelta(seconds=timeout),
    )
    # Referenced until the group is destroyed: its tensors must outlive it (Replica._exchange).
    replica, trainer = Replica(rank, world), None
    try:
        trainer = Trainer(checkpoint.load(), data, TrainSettings.from_dict(settings), output, start=start,
                          resume=resume, replica=replica)
        stop, asked = Event(f"{run_id}-stop") if rank == 0 else None, time.monotonic()
        for event in trainer.run():
            if stop is None:
                continue
            worker.log_event(run_id, dataclasses.asdict(event))
            if time.monotonic() - asked > 0.2:  # a round trip to the scheduler, so not every step
                asked = time.monotonic()
                if stop.is_set():
                    trainer.stop()
        result = dataclasses.asdict(trainer.result())
        return {**result, "model_path": str(result["model_path"])} if rank == 0 else None
    finally:
        # DDP's reducer holds the process group: release it first, or its destructor, run later,
        # waits forever on the threads of a group whose peers are gone (seen in the test suite).
        del trainer
        gc.collect()
        torch.distributed.destroy_process_group()
        del replica


class DistributedTrainer:
    """Trains one network with a replica on each of several dask workers; like :class:`Trainer`.

    :meth:`run` yields a :class:`TrainEvent` for every step (replica 0's, with the whole batch's
    loss), :meth:`stop` asks every replica to stop after its current step with a checkpoint, and
    :meth:`result` says how the run ended.

    Parameters
    ----------
    model : GamaIR
        The starting network (for ``resume``, the checkpoint's; see
        :func:`~napari_gama_ir.train.resume_point`).
    data : TrainingData
        The images; the workers read them (files must be on storage they share).
    settings : TrainSettings
        ``settings.batch`` is the global batch and must be a multiple of the replica count.
        ``device`` "auto" or "cuda" puts each local worker on its own GPU where there are several.
    output : path-like
        Folder for the model and the checkpoint, on storage every worker shares.
    client : distributed.Client
    workers : int, optional
        Replicas to run, one per worker (default: every worker of the cluster).
    resume : bool
        Continue the run checkpointed in ``output``.
    start : dict, optional
        Where the network came from, for the record.
    timeout : float
        Seconds a replica waits for the others in a collective before failing.
    """

    def __init__(self, model: GamaIR, data: TrainingData, settings: TrainSettings, output: str | os.PathLike, *,
                 client, workers: int | None = None, resume: bool = False, start: dict[str, Any] | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        # Asked of the scheduler each time: scheduler_info() is a cache that the client's periodic
        # refresh may leave without workers at any moment.
        available = sorted(client.nthreads())
        if workers is not None and not 1 <= workers <= len(available):
            raise ValueError(f"{workers} replicas asked for, but the cluster has {len(available)} worker(s)")
        self.addresses = available[:workers] if workers else available
        check_batch_split(settings.batch, len(self.addresses))  # here, before any replica starts
        self.model, self.data, self.settings, self.output = model, data, settings, Path(output)
        self.client, self.resume, self.start, self.timeout = client, resume, start, timeout
        # A resumed run starts where its checkpoint (the network given) left off.
        self.step = model.config.metadata.get("training", {}).get("step", 0) if resume else 0
        self.run_id = f"napari-gama-ir-train-{uuid.uuid4().hex}"
        self._stop_asked = False
        self._result: TrainResult | None = None

    @property
    def replicas(self) -> int:
        return len(self.addresses)

    def stop(self) -> None:
        """Ask every replica to stop after its current step (replica 0 writes a checkpoint)."""
        self._stop_asked = True

    def run(self) -> Iterator[TrainEvent]:
        """Start the replicas and yield replica 0's events until the run ends."""
        from distributed import Event

        client, world = self.client, self.replicas
        host = urlparse(self.addresses[0]).hostname
        port = client.submit(_free_port, workers=[self.addresses[0]], pure=False).result()
        received: queue.Queue = queue.Queue()
        client.subscribe_topic(self.run_id, lambda event: received.put(event[1]))
        self._await_subscription(received)
        stop_event = Event(f"{self.run_id}-stop", client=client)
        checkpoint = client.scatter(CheckpointBytes.from_model(self.model), broadcast=True, hash=False)
        data = client.scatter(self.data, broadcast=True, hash=False)
        futures = [
            client.submit(
                _run_replica, rank, world, f"tcp://{host}:{port}", checkpoint, data, self.settings.to_dict(),
                str(self.output), self.start, self.resume, self.run_id, self.timeout,
                workers=[address], allow_other_workers=False, pure=False, key=f"{self.run_id}-replica-{rank}",
            )
            for rank, address in enumerate(self.addresses)
        ]
        try:
            while not all(f.done() for f in futures):
                if self._stop_asked and not stop_event.is_set():
                    stop_event.set()
                try:
                    message = received.get(timeout=0.5)
                except queue.Empty:
                    self._check_replicas(futures)
                    continue
                if "step" in message:  # not one of the subscription checks
                    yield self._event(message)
            self._check_replicas(futures)
            result = futures[0].result()
            # Events travel apart from results: take those still on the way, up to the last step.
            while self.step < result["steps_done"]:
                try:
                    message = received.get(timeout=10)
                except queue.Empty:
                    break  # lost on the way; the result stands
                if "step" in message:
                    yield self._event(message)
        except BaseException:
            client.cancel(futures)
            raise
        finally:
            client.unsubscribe_topic(self.run_id)
            stop_event.clear()
        self._result = TrainResult(**{**result, "model_path": Path(result["model_path"])})

    def _await_subscription(self, received: queue.Queue, limit: float = 60.0) -> None:
        """Wait until the scheduler relays this run's events to us, so that replica 0's first ones are not lost.

        The subscription travels on the client's message stream, apart from the calls that publish;
        publishing a check until one comes back proves it is in place.
        """
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            self.client.log_event(self.run_id, {"subscribed": True})
            try:
                received.get(timeout=0.2)
                return
            except queue.Empty:
                continue
        raise TimeoutError(f"the dask scheduler relayed no event to this client in {limit:g} s")

    def _event(self, message: dict[str, Any]) -> TrainEvent:
        event = TrainEvent(**{f.name: message[f.name] for f in dataclasses.fields(TrainEvent)})
        self.step = event.step
        return event

    def _check_replicas(self, futures) -> None:
        """Raise a replica's error, or :class:`ReplicaLostError` when a replica's worker has gone."""
        alive = set(self.client.nthreads())
        lost = [address for address in self.addresses if address not in alive]
        if lost:
            raise ReplicaLostError(
                f"worker {lost[0]} left the cluster at about step {self.step}; the last checkpoint in "
                f"{self.output} is kept: run again with resume"
            )
        from distributed import wait

        if not any(future.status == "error" for future in futures):
            return
        # The others stop at once with a ReplicaFailedError (Replica.together): report the cause. After a
        # failure inside a step they wait in its collective instead, so not for long.
        try:
            wait(futures, timeout=10)
        except TimeoutError:
            pass
        failed = [future for future in futures if future.status == "error"]
        causes = [future for future in failed if not isinstance(future.exception(), ReplicaFailedError)]
        (causes or failed)[0].result()

    def result(self) -> TrainResult:
        if self._result is None:
            raise RuntimeError("the run has not finished")
        return self._result


def train_distributed(model: GamaIR, data: TrainingData, settings: TrainSettings, output: str | os.PathLike, *,
                      client, workers: int | None = None, resume: bool = False, start: dict[str, Any] | None = None,
                      on_event=None, timeout: float = DEFAULT_TIMEOUT) -> TrainResult:
    """Train or fine-tune ``model`` with one data-parallel replica per dask worker.

    The distributed counterpart of :func:`~napari_gama_ir.train.train`: the same settings give the
    same training (up to the order of floating-point sums), on ``workers`` replicas of ``client``.
    Parameters are those of :class:`DistributedTrainer`, and ``on_event``, called with every
    :class:`TrainEvent`.

    Returns
    -------
    TrainResult
    """
    trainer = DistributedTrainer(model, data, settings, output, client=client, workers=workers, resume=resume,
                                 start=start, timeout=timeout)
    for event in trainer.run():
        if on_event is not None:
            on_event(event)
    return trainer.result()
