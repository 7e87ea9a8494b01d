"""Restore on a dask.distributed cluster, resumably, straight into a zarr store.

The client sends each worker the network once, as checkpoint bytes (JSON record and safetensors
weights, never a pickled module); a worker builds its :class:`~.restore.PlaneRestorer` on first
use and keeps it for every later chunk (one per process, keyed by the weights' SHA-256 and the
settings). Each task restores one chunk (a plane, a few small planes, or a block of a huge plane)
and writes it into its own chunk of the output zarr, then writes a marker file; the client only
sees a pixel count. The output is written into a run folder beside the output (``.NAME.run``) and
moved into place when every chunk has its marker. A run that stops (Ctrl-C, a lost cluster) leaves
the run folder behind; ``resume=True`` skips the chunks that have markers and writes the others, so
the result is bit-identical to an uninterrupted run on workers of as many threads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
import torch
import zarr

from ..model import GamaIR, load_checkpoint, save_checkpoint
from .axes import from_canonical, to_canonical
from .heap import reuse_freed_heap
from .io import (
    ImageIOError,
    block_regions,
    check_ome_axes,
    check_output_path,
    create_ome_zarr_output,
    create_zarr_output,
    is_ome_zarr_output,
    ome_order,
    set_output_attrs,
    write_ome_levels,
)
from .normalize import Affine, percentile_affine
from .restore import (
    DEFAULT_MEAN_MODE,
    PlaneRestorer,
    RestorePlan,
    StackAffine,
    Window,
    make_tiling,
    percentile_sample,
    plan_restore,
)
from .runner import ModelRunner


@dataclass(frozen=True)
class CheckpointBytes:
    """A checkpoint in memory: its JSON record and safetensors weights, as saved by ``save_checkpoint``."""

    record: bytes
    weights: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.record + self.weights).hexdigest()

    @classmethod
    def from_model(cls, model: GamaIR) -> CheckpointBytes:
        with tempfile.TemporaryDirectory() as folder:
            stem = Path(folder) / "model"
            save_checkpoint(model, stem)
            return cls(stem.with_suffix(".json").read_bytes(), stem.with_suffix(".safetensors").read_bytes())

    def load(self) -> GamaIR:
        """The network, through the same checked loader as files (hash verified, nothing unpickled)."""
        with tempfile.TemporaryDirectory() as folder:
            stem = Path(folder) / "model"
            stem.with_suffix(".json").write_bytes(self.record)
            stem.with_suffix(".safetensors").write_bytes(self.weights)
            return load_checkpoint(stem.with_suffix(".json"))


# -- on the workers -----------------------------------------------------------------------------
_restorers: dict[tuple[str, str], PlaneRestorer] = {}
_restorers_lock = threading.Lock()
model_loads = 0  # networks this process has loaded (tests count them)


def current_worker():
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):  # not running in a dask worker
        return None


def worker_device(device: str, worker=None) -> str:
    """Spread a local cluster's workers over the GPUs: worker number i takes ``cuda:(i mod GPUs)``.

    Only for ``"auto"`` or ``"cuda"`` on a machine with several GPUs and workers named by number
    (as LocalCluster names them); any other device, or a worker named otherwise (one per SLURM job,
    where the scheduler already hands each job its GPU), keeps ``device``.
    """
    worker = worker or current_worker()
    name = getattr(worker, "name", None)
    if device not in ("auto", "cuda") or not isinstance(name, int) or not torch.cuda.is_available():
        return device
    count = torch.cuda.device_count()
    return f"cuda:{name % count}" if count > 1 else device


def worker_restorer(checkpoint: CheckpointBytes, settings: dict[str, Any]) -> PlaneRestorer:
    """This process's restorer for ``checkpoint`` and ``settings``, built on first use and kept."""
    global model_loads
    key = (checkpoint.sha256, json.dumps(settings, sort_keys=True))
    with _restorers_lock:
        if key not in _restorers:
            reuse_freed_heap()
            model = checkpoint.load()
            model_loads += 1
            # A worker's torch threads are its dask threads: N worker processes of T threads use
            # N x T cores, as the cluster was sized, without oversubscription.
            worker = current_worker()
            runner = ModelRunner(
                model, device=worker_device(settings["device"], worker), precision=settings["precision"],
                batch=settings["batch"], threads=worker.state.nthreads if worker else None,
                mean_mode=settings["mean_mode"], compile=settings["compile"], cuda_graphs=settings["cuda_graphs"],
            )
            tiling = make_tiling(model, settings["tile"], settings["overlap"], settings["mean_mode"])
            stack = settings["stack_affine"]
            _restorers[key] = PlaneRestorer(
                runner, tiling, settings["normalization"], np.dtype(settings["input_dtype"]),
                np.dtype(settings["output_dtype"]), (lambda: Affine(*stack)) if stack else None,
                settings["planes_per_chunk"],
            )
        return _restorers[key]


def _restore_chunk(block: np.ndarray, region: tuple[slice, ...], window: Window | None, affine: Affine | None,
                   layout, checkpoint, settings: dict[str, Any], store: str, marker: str,
                   order: tuple[int, ...]) -> int:
    """Restore one input block (a plane in the input's axes or a few small ones, or with ``window``
    a block of one with the tiles around it), write it to ``region`` of ``store``, whose axes are
    the input's transposed by ``order``, and mark it done."""
    restorer = worker_restorer(checkpoint, settings)
    canonical = to_canonical(block, layout)
    planes = canonical.reshape((-1,) + canonical.shape[-3:])
    restored = restorer.restore_planes(planes) if window is None else restorer(planes[0], window, affine)
    restored = restored.reshape(canonical.shape[:-2] + restored.shape[-2:])
    target = tuple(region[i] for i in order)
    zarr.open_array(store, mode="r+")[target] = from_canonical(restored, layout).transpose(order)
    Path(marker).touch()  # after the chunk: a marker always means a complete chunk
    return int(restored.size)


# -- on the client ------------------------------------------------------------------------------
class RunMismatchError(ValueError):
    """``resume`` found a run folder made with other settings or another input."""


def _run_folder(output: Path) -> Path:
    return output.with_name(f".{output.name}.run")


def restore_distributed(
    image: Any,
    model: GamaIR,
    output: str | os.PathLike,
    axes: str | None = None,
    *,
    client,
    resume: bool = False,
    overwrite: bool = False,
    tile: int | None = 512,
    overlap: int = 64,
    mean_mode: str = DEFAULT_MEAN_MODE,
    device: str = "auto",
    precision: str = "fp32",
    batch: int | None = None,
    normalization: dict[str, Any] | None = None,
    output_dtype: str | np.dtype = "float32",
    compile: bool = False,
    cuda_graphs: bool | None = None,
    block: int | None = None,
    attrs: dict[str, Any] | None = None,
    source: str | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
) -> Path:
    """Restore ``image`` on the workers of ``client`` into the zarr store ``output``.

    Parameters
    ----------
    image : dask array, zarr array or array-like
        The input; the workers read it (a zarr or TIFF store must be on storage they share).
    model : GamaIR
        The network; it reaches the workers as checkpoint bytes, sent once.
    output : path
        A ``.zarr`` folder, written chunk by chunk by the workers (a chunk per plane, per few small
        planes, or per block).
    client : distributed.Client
        The cluster to run on.
    resume : bool
        Continue an interrupted run into the same ``output``: chunks already written are skipped.
        The settings and input must be the ones of that run.
    overwrite : bool
        Replace an existing output, and discard an interrupted run instead of resuming it.
    source : str, optional
        Where the input came from (a path), recorded with the run so that ``resume`` can tell.
    on_chunk : callable, optional
        Called with ``(chunks done, chunks in all)`` as chunks finish, and once at the start.
    block : int, optional
        As for :func:`~napari_gama_ir.restore`: each task restores a block of a plane, so that one
        huge plane spreads over the workers. By default, blocks where a plane does not fit in the
        memory of the machine that calls this, or on ``resume`` those of the interrupted run.
    Other parameters are those of :func:`~napari_gama_ir.restore`.

    Returns
    -------
    Path
        The output, complete. On an error or interruption the run folder stays for ``resume``.
    """
    from distributed import as_completed

    output = Path(output)
    if output.suffix != ".zarr":
        raise ImageIOError(f"{output}: distributed restoration writes zarr stores only (a .zarr output)")
    run = _run_folder(output)
    if block is None and resume and (run / "run.json").exists():
        # The blocks the interrupted run chose (0: whole planes), though the memory now may say otherwise.
        block = json.loads((run / "run.json").read_text())["record"].get("block") or 0
    plan: RestorePlan = plan_restore(image, model, axes, tile, overlap, mean_mode, normalization, output_dtype,
                                     block=block)
    ome = is_ome_zarr_output(output)
    if ome:
        check_ome_axes(output, plan.axes)
    # The written axes: an OME-Zarr's in its fixed order, else the input's.
    order = ome_order(plan.axes) if ome else tuple(range(len(plan.axes)))
    written_axes = "".join(plan.axes[i] for i in order)
    check_output_path(output, [source] if source else [], overwrite)
    array = plan.array.rechunk(_output_chunks(plan))
    checkpoint = CheckpointBytes.from_model(model)
    settings = {
        "device": device, "precision": precision, "batch": batch, "mean_mode": mean_mode, "compile": compile,
        "cuda_graphs": cuda_graphs, "tile": plan.tiling.tile, "overlap": overlap, "normalization": plan.normalization,
        "input_dtype": str(plan.array.dtype), "output_dtype": str(plan.output_dtype), "stack_affine": None,
        "planes_per_chunk": plan.planes_per_chunk,
    }
    # What must not change between a run and its resumption (device, batch and the optimised path may;
    # planes_per_chunk follows from plane_chunks).
    record = json.loads(json.dumps({
        "checkpoint_sha256": checkpoint.sha256, "source": source, "shape": list(array.shape), "axes": plan.axes,
        "dtype": str(plan.array.dtype), "block": plan.block, "plane_chunks": plan.plane_chunks,
        "settings": {k: v for k, v in settings.items()
                     if k not in ("device", "batch", "compile", "cuda_graphs", "planes_per_chunk")},
    }))
    store, done = run / "data.zarr", run / "done"
    pixels = store / "0" if ome else store  # the array the workers write into
    if run.exists() and (overwrite or not resume):
        if not overwrite:
            raise ImageIOError(f"{output}: an interrupted run exists ({run}); resume it or overwrite it")
        shutil.rmtree(run)
    if run.exists():
        previous = json.loads((run / "run.json").read_text())
        if previous["record"] != record:
            raise RunMismatchError(f"{run}: made with other settings, model or input; cannot resume it")
        settings["stack_affine"] = previous["stack_affine"]
    else:
        done.mkdir(parents=True)
        if plan.normalization["method"] == "percentile" and plan.normalization["scope"] == "stack":
            affine = client.submit(_stack_affine, plan, pure=False).result()
            settings["stack_affine"] = [affine.offset, affine.scale]
        shape, chunks = tuple(array.shape[i] for i in order), tuple(array.chunks[i][0] for i in order)
        if ome:
            create_ome_zarr_output(store, shape, chunks, plan.output_dtype, written_axes)
        else:
            create_zarr_output(store, shape, chunks, plan.output_dtype)
        (run / "run.json").write_text(json.dumps({"record": record, "stack_affine": settings["stack_affine"]}))

    regions = block_regions(array)
    flat = {index: number for number, (index, _) in enumerate(regions)}
    missing = [(index, region) for index, region in regions if not (done / str(flat[index])).exists()]
    finished = len(regions) - len(missing)
    if on_chunk is not None:
        on_chunk(finished, len(regions))
    if missing:
        shared_checkpoint = client.scatter(checkpoint, broadcast=True, hash=False)
        restore_chunk = dask.delayed(_restore_chunk, pure=False)
        affines = _plane_affines(plan) if plan.block is not None else None
        work = []
        for index, region in missing:  # each task reads its input on the worker, as a dependency
            reads, window = _chunk_input(plan, array, index, region)
            affine = affines(region) if affines else None
            work.append(restore_chunk(reads, region, window, affine, plan.layout, shared_checkpoint, settings,
                                      str(pixels), str(done / str(flat[index])), order))
        tasks = client.compute(work)
        try:
            for future in as_completed(tasks):
                future.result()  # raises the worker's error here
                finished += 1
                if on_chunk is not None:
                    on_chunk(finished, len(regions))
        except BaseException:
            client.cancel(tasks)
            raise
    if ome:  # its lower resolutions, read back from the full one here, as a local write does
        write_ome_levels(store, written_axes)
    set_output_attrs(store, written_axes, attrs or {}, ome)
    if output.exists():  # check_output_path allowed it: overwrite
        shutil.rmtree(output)
    os.replace(store, output)
    shutil.rmtree(run)
    return output


def _output_chunks(plan: RestorePlan) -> tuple[int, ...]:
    """Chunks of the input and output, in the input's axes, holding what a chunk of the canonical
    view holds: a plane, a few small planes (:attr:`RestorePlan.plane_chunks`), or a block of a plane."""
    planar = set("YX") | ({"C"} if plan.layout.feed_channels else set())
    chunks = {a: n if a in planar else 1 for a, n in zip(plan.axes, plan.array.shape)}
    if plan.block:
        chunks.update(Y=plan.block, X=plan.block)
    chunks.update(zip(plan.layout.iterated, plan.plane_chunks or ()))
    return tuple(chunks[a] for a in plan.axes)


def _chunk_input(plan: RestorePlan, array, index: tuple[int, ...], region: tuple[slice, ...]):
    """What the task of the chunk at ``index`` (covering ``region``) reads, lazily, and its window:
    the chunk itself where planes are whole; a block's core and the tiles around it otherwise."""
    if plan.block is None:
        return array.blocks[index], None
    window, (rows, cols) = plan.block_window(tuple(region[plan.axes.index(a)] for a in "YX"))
    around = tuple({"Y": rows, "X": cols}.get(axis, span) for axis, span in zip(plan.axes, region))
    return array[around], window


def _plane_affines(plan: RestorePlan) -> Callable[[tuple[slice, ...]], Any] | None:
    """Where planes are restored in blocks with their own percentiles: for a block's region, the
    normalisation of its plane, as a delayed value computed once per plane on the cluster."""
    if plan.normalization["method"] != "percentile" or plan.normalization["scope"] != "image":
        return None
    kept: dict[tuple[int, ...], Any] = {}
    planar = set("CYX") if plan.layout.feed_channels else set("YX")

    def plane_affine(region: tuple[slice, ...]):
        plane = tuple(slice(None) if a in planar else span for a, span in zip(plan.axes, region))
        key = tuple(span.start for a, span in zip(plan.axes, region) if a not in planar)
        if key not in kept:
            canonical = to_canonical(plan.array[plane], plan.layout)
            sample = percentile_sample(canonical.reshape((1,) + canonical.shape[-3:]))
            kept[key] = dask.delayed(percentile_affine)(sample, plan.normalization["low"], plan.normalization["high"])
        return kept[key]

    return plane_affine


def _stack_affine(plan: RestorePlan) -> Affine:
    return StackAffine(plan.canonical_planes(), plan.normalization["low"], plan.normalization["high"]).get()


def start_local_cluster(workers: int, threads_per_worker: int = 1):
    """A LocalCluster of ``workers`` processes and a client to it, quiet, for one big machine.

    dask starts worker processes with ``OMP_NUM_THREADS=1`` (and MKL's and OpenBLAS's): the workers
    here get their own thread count instead, so that BLAS and OpenMP libraries other than torch's
    intra-op pool (which ``ModelRunner`` sets) agree with it.
    """
    from distributed import Client, LocalCluster

    threads = {f"distributed.nanny.pre-spawn-environ.{name}": threads_per_worker
               for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    with dask.config.set(threads):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                               dashboard_address=":0", silence_logs=logging.ERROR)
    return Client(cluster)
