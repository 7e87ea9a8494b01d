"""Data-parallel training on a dask.distributed LocalCluster: same result as one process, stop, lost replicas."""

import os
import signal

import numpy as np
import pytest
import tifffile
import torch

from napari_gama_ir import create_model
from napari_gama_ir.engine.device import available_memory
from napari_gama_ir.engine.distributed import start_local_cluster
from napari_gama_ir.engine.heap import on_the_network_thread
from napari_gama_ir.train import (
    DistributedTrainer,
    ReplicaLostError,
    TrainingMemoryError,
    TrainSettings,
    data_from_arrays,
    resume_point,
    train,
    train_distributed,
)
from napari_gama_ir.train.distributed import _free_port

from .conftest import make_tiny_model
from .test_cli import run_cli

pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    clean = rng.random((4, 48, 48)).astype(np.float32)
    noisy = clean + 0.1 * rng.standard_normal(clean.shape).astype(np.float32)
    return data_from_arrays(noisy, clean, axes="ZYX")


def _settings(**changes):
    return TrainSettings(**{"steps": 6, "batch": 4, "patch": 16, "validation_fraction": 0, "device": "cpu", **changes})


def _largest_difference(first, second) -> float:
    a, b = create_model(str(first)).state_dict(), create_model(str(second)).state_dict()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


@pytest.mark.parametrize("objective", ["supervised", "neighbor2neighbor"])
def test_two_replicas_train_like_one_process_on_the_whole_batch(client, data, tmp_path, objective):
    settings = _settings(objective=objective)
    single = train(make_tiny_model(1), data, settings, tmp_path / "single")
    events = []
    shared = train_distributed(make_tiny_model(1), data, settings, tmp_path / "shared", client=client,
                               on_event=events.append)
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6] and shared.steps_done == 6 and not shared.stopped_early
    # The replicas report the whole batch's loss, as the single process does.
    assert [e.loss for e in events] == pytest.approx([h["train_loss"] for h in single.history], rel=1e-5)
    # Only the order of floating-point sums differs (measured: 1.5e-6) ...
    assert _largest_difference(single.model_path, shared.model_path) < 1e-4
    # ... while training on one replica's share alone moves the weights far more (measured: 6.6e-3).
    half = train(make_tiny_model(1), data, _settings(objective=objective, batch=2), tmp_path / "half")
    assert _largest_difference(single.model_path, half.model_path) > 1e-3
    assert not (tmp_path / "shared" / "checkpoint").joinpath("optimiser.safetensors.tmp").exists()


def test_a_stopped_run_resumes_to_the_uninterrupted_result(client, data, tmp_path):
    settings = _settings(steps=200, checkpoint_every=1000)
    whole = train_distributed(make_tiny_model(1), data, settings, tmp_path / "whole", client=client)
    trainer = DistributedTrainer(make_tiny_model(1), data, settings, tmp_path / "parts", client=client)
    for event in trainer.run():
        if event.step == 2:
            trainer.stop()  # every replica stops at the same step, replica 0 writes a checkpoint
    stopped = trainer.result()
    assert stopped.stopped_early and 2 <= stopped.steps_done < 200
    model, resumed_settings = resume_point(tmp_path / "parts")
    again = DistributedTrainer(model, data, resumed_settings, tmp_path / "parts", client=client, resume=True)
    assert again.step == stopped.steps_done  # a progress bar starts where the checkpoint is
    assert [event.step for event in again.run()] == list(range(stopped.steps_done + 1, 201))
    resumed = again.result()
    assert resumed.steps_done == 200 and not resumed.stopped_early
    assert _largest_difference(whole.model_path, resumed.model_path) == 0.0  # bit for bit


def test_a_lost_replica_is_reported_and_the_run_resumes(data, tmp_path):
    client = start_local_cluster(workers=2, threads_per_worker=1)
    try:
        settings = _settings(steps=200, checkpoint_every=10)
        pids = client.run(os.getpid)
        replica_one = sorted(pids)[1]
        trainer = DistributedTrainer(make_tiny_model(1), data, settings, tmp_path / "run", client=client, timeout=10)
        with pytest.raises(ReplicaLostError, match="left the cluster .* run again with resume"):
            for event in trainer.run():
                if event.step == 20:
                    os.kill(pids[replica_one], signal.SIGKILL)  # the nanny starts a new worker in its place
        client.wait_for_workers(2)
        model, resumed_settings = resume_point(tmp_path / "run")
        checkpointed = model.config.metadata["training"]["step"]
        assert checkpointed >= 20 and checkpointed % 10 == 0
        # Replica 0's worker is free again once its collective times out; then the run completes.
        result = train_distributed(model, data, resumed_settings, tmp_path / "run", client=client, resume=True,
                                   timeout=10)
        assert result.steps_done == 200
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()


def _memory_seen_by_a_task() -> tuple[int, int]:
    return available_memory(), on_the_network_thread(available_memory)


def test_a_replica_refuses_a_step_beyond_its_workers_memory_limit_and_the_worker_lives_on(tmp_path):
    """A step that the machine has room for, but that would take a worker past the limit its nanny
    restarts it at, stops the run with one sentence; before, the worker was lost (two replicas of
    a 24 GB machine each found room for a 17 GB step)."""
    from distributed import Client, LocalCluster

    if (available_memory() or 0) < 8e9:
        pytest.skip("needs a machine with room for the step, to tell its limit from the worker's")
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit="1.5 GB",
                           dashboard_address=":0", silence_logs=40)
    client = Client(cluster)
    try:
        address = next(iter(client.nthreads()))
        # What the worker's tasks see, on their own thread and on the network's: its limit (times the
        # 0.95 its nanny terminates it at), less what it holds already, not the machine's memory.
        for room in client.submit(_memory_seen_by_a_task, pure=False).result():
            assert 0 < room < 0.95 * 1.5e9
        rng = np.random.default_rng(0)
        clean = rng.random((1, 640, 640)).astype(np.float32)
        data = data_from_arrays(clean + 0.1 * rng.standard_normal(clean.shape).astype(np.float32), clean, axes="ZYX")
        model = make_tiny_model(1)
        before = {name: value.clone() for name, value in model.state_dict().items()}
        refused = r"a training step on 4 patches of 512x512 pixels takes about 2\.2 GB of memory, and [01]\.\d GB"
        with pytest.raises(TrainingMemoryError, match=refused + " is available; use a smaller batch"):
            train_distributed(model, data, _settings(batch=4, patch=512, steps=2), tmp_path / "run", client=client)
        assert list(client.nthreads()) == [address]  # the same worker: never restarted
        assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    finally:
        client.close()
        cluster.close()


def test_a_step_refused_by_one_worker_alone_stops_every_replica_at_once(tmp_path):
    """On workers with different memory limits, the one with less refuses a step the other takes:
    both stop there. Before, the other waited for it in the step's collective until the timeout,
    its worker busy (124 s with a 120 s timeout)."""
    from distributed import Client, Nanny, Scheduler, SpecCluster

    if (available_memory() or 0) < 8e9:
        pytest.skip("needs a machine with room for the step on the worker with the higher limit")
    # Replicas take the workers in address order: the one that refuses is replica 1, so that the
    # error reported is its own and not replica 0's ReplicaFailedError.
    ports = sorted(_free_port() for _ in range(2))
    workers = {
        name: {"cls": Nanny, "options": {"nthreads": 1, "memory_limit": limit, "worker_port": port}}
        for name, limit, port in [("large", "8 GB", ports[0]), ("small", "1.5 GB", ports[1])]
    }
    cluster = SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}},
                          silence_logs=40)
    client = Client(cluster)
    try:
        client.wait_for_workers(2)
        assert len({len(str(port)) for port in ports}) == 1  # address order is port order
        rng = np.random.default_rng(0)
        clean = rng.random((1, 640, 640)).astype(np.float32)
        data = data_from_arrays(clean + 0.1 * rng.standard_normal(clean.shape).astype(np.float32), clean, axes="ZYX")
        refused = r"a training step on 2 patches of 512x512 pixels takes about 1\.1 GB of memory, and [01]\.\d GB"
        with pytest.raises(TrainingMemoryError, match=refused + " is available; use a smaller batch"):
            train_distributed(make_tiny_model(1), data, _settings(batch=4, patch=512, steps=2), tmp_path / "run",
                              client=client, timeout=300)
        # Each worker's one thread is free for the next task, long before the collective's timeout.
        for address in client.nthreads():
            assert client.submit(os.getpid, workers=[address], pure=False).result(timeout=60) > 0
        assert not (tmp_path / "run").exists()
    finally:
        client.close()
        cluster.close()


def test_a_checkpoint_replica_zero_cannot_write_stops_every_replica_at_once(client, data, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint").write_text("a file where the checkpoint folder goes")
    with pytest.raises(FileExistsError):  # the cause, not the other replica's ReplicaFailedError
        train_distributed(make_tiny_model(1), data, _settings(checkpoint_every=2), tmp_path / "run", client=client,
                          timeout=300)
    for address in client.nthreads():  # replica 1 did not stay in the next step's collective
        assert client.submit(os.getpid, workers=[address], pure=False).result(timeout=60) > 0


def _fail_forward_passes(fail: bool) -> None:
    """In a worker process: make (or stop making) every training forward pass there raise, as a GPU
    out of memory on that worker alone would."""
    from napari_gama_ir.train.trainer import Trainer

    if fail:
        Trainer._real_loss = Trainer._loss

        def out_of_memory(self, tensors):
            raise RuntimeError("forward pass failed on this worker")

        Trainer._loss = out_of_memory
    elif hasattr(Trainer, "_real_loss"):
        Trainer._loss = Trainer._real_loss
        del Trainer._real_loss


def test_a_forward_pass_failing_on_one_replica_stops_every_replica_at_once(client, data, tmp_path):
    """Before, the others waited for it in the backward pass's gradient all-reduce until the
    timeout, their workers busy."""
    second = sorted(client.nthreads())[1]  # replica 1: replicas take the workers in address order
    client.run(_fail_forward_passes, True, workers=[second])
    try:
        with pytest.raises(RuntimeError, match="forward pass failed on this worker"):
            train_distributed(make_tiny_model(1), data, _settings(), tmp_path / "run", client=client, timeout=300)
        for address in client.nthreads():  # replica 0 did not stay in the step's collective
            assert client.submit(os.getpid, workers=[address], pure=False).result(timeout=60) > 0
    finally:
        client.run(_fail_forward_passes, False, workers=[second])


def test_batch_must_split_equally_over_the_replicas(client, data, tmp_path):
    with pytest.raises(ValueError, match="a batch of 3 cannot be shared equally by 2 replicas"):
        DistributedTrainer(make_tiny_model(1), data, _settings(batch=3), tmp_path / "run", client=client)
    with pytest.raises(ValueError, match="3 replicas asked for, but the cluster has 2"):
        DistributedTrainer(make_tiny_model(1), data, _settings(), tmp_path / "run", client=client, workers=3)
    assert not (tmp_path / "run").exists()


def test_cli_trains_on_a_local_cluster(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_GAMA_IR_HOME", str(tmp_path / "home"))
    rng = np.random.default_rng(1)
    clean = (rng.random((4, 48, 48)) * 1000).astype(np.uint16)
    noisy = (clean + rng.poisson(50, clean.shape)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "noisy.tif", noisy, photometric="minisblack", metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "clean.tif", clean, photometric="minisblack", metadata={"axes": "ZYX"})
    code, out, err = run_cli(capsys, "train", "--noisy", tmp_path / "noisy.tif", "--clean", tmp_path / "clean.tif",
                             "-o", tmp_path / "run", "--workers", 2, "--steps", 4, "--batch", 4, "--patch", 16,
                             "--val-every", 2, "--device", "cpu")
    assert code == 0, err
    assert "dask: 2 worker(s); dashboard http" in err
    assert "training: supervised, 4 steps of 4x16px on 2 replica(s) of 2 patch(es), device cpu" in err
    assert "step 2: train_loss" in out and "step 4: train_loss" in out  # replica 0's validations reach the terminal
    record = create_model(str(tmp_path / "run" / "model.json")).config.metadata["training"]
    assert record["step"] == 4 and [h["step"] for h in record["history"]] == [2, 4]
    code, out, err = run_cli(capsys, "train", "--noisy", tmp_path / "noisy.tif", "--clean", tmp_path / "clean.tif",
                             "-o", tmp_path / "odd", "--workers", 2, "--batch", 3, "--device", "cpu")
    assert code == 2 and err.strip().splitlines()[-1].endswith("use a batch that is a multiple of the replica count")
