"""Restoring on a dask.distributed LocalCluster: equality, one load per worker, resume, lost workers."""

import os
import signal

import numpy as np
import pytest
import zarr

from napari_gama_ir import restore, save_checkpoint
from napari_gama_ir.cli import main
from napari_gama_ir.engine.distributed import RunMismatchError, restore_distributed, start_local_cluster, worker_device
from napari_gama_ir.engine.io import OUTPUT_COMPRESSOR, ImageIOError, open_image, write_image

from .conftest import assert_alike, make_tiny_model

pytest.importorskip("distributed")

SETTINGS = {"tile": 32, "overlap": 8}


@pytest.fixture
def stack(tmp_path):
    data = (np.random.default_rng(0).random((8, 40, 56)) * 60000).astype(np.uint16)
    array = zarr.open_array(str(tmp_path / "stack.zarr"), mode="w", shape=data.shape, chunks=(2, 40, 56),
                            dtype=data.dtype)
    array[:] = data
    return array, data


def _loads(client):
    from napari_gama_ir.engine import distributed

    return client.run(lambda: distributed.model_loads)


def test_two_worker_processes_match_the_single_process_engine(client, stack, tmp_path):
    array, data = stack
    model = make_tiny_model(1)
    before = _loads(client)
    output = restore_distributed(array, model, tmp_path / "out.zarr", "ZYX", client=client, device="cpu", **SETTINGS)
    result = zarr.open_array(str(output), mode="r")
    assert result.chunks == (1, 40, 56) and result.attrs["axes"] == "ZYX"
    assert result.compressors == (OUTPUT_COMPRESSOR,)
    assert_alike(result[:], restore(data, model, "ZYX", device="cpu", **SETTINGS))
    assert np.array_equal(array[:], data)  # the input is untouched
    assert not (tmp_path / ".out.zarr.run").exists()
    # Eight chunks, two worker processes: each loaded the network once at most.
    added = [_loads(client)[w] - before[w] for w in before]
    assert sorted(added) in ([1, 1], [0, 1])


@pytest.mark.parametrize("scope", ["image", "stack"])
def test_planes_spread_over_the_workers_in_blocks_match_the_single_process_engine(client, tmp_path, scope):
    # One huge plane was one task: one worker restored it while the others waited, if it fitted at all.
    data = np.random.default_rng(2).random((2, 3, 90, 100), dtype=np.float32) * 60000
    data[1, 2, 10:30, :20] = np.nan  # no data, as the padding of a registered stack
    model = make_tiny_model(1)
    settings = dict(SETTINGS, normalization={"method": "percentile", "scope": scope})
    output = restore_distributed(data, model, tmp_path / "out.zarr", "ZCYX", client=client, device="cpu", block=48,
                                 **settings)
    result = zarr.open_array(str(output), mode="r")
    assert result.chunks == (1, 1, 48, 48)  # a one-channel network: each channel is a plane
    assert np.isnan(result[:]).sum() == 20 * 20
    assert_alike(result[:], restore(data, model, "ZCYX", device="cpu", **settings))  # NaN where NaN


def test_small_planes_go_to_the_workers_a_chunk_of_several_at_a_time(client, tmp_path):
    # As in the single-process engine: up to 64 planes of 64 x 64 (one CPU pass) make a chunk, a task.
    data = (np.random.default_rng(5).random((130, 64, 64)) * 60000).astype(np.uint16)
    model = make_tiny_model(1)
    output = restore_distributed(data, model, tmp_path / "out.zarr", "ZYX", client=client, device="cpu")
    result = zarr.open_array(str(output), mode="r")
    assert result.chunks == (44, 64, 64)  # 130 planes in three chunks: 44, 44 and 42
    assert_alike(result[:], restore(data, model, "ZYX", device="cpu"))
    # The workers know a full chunk's count: a compiled network runs the 42 padded to 44, one shape.
    assert 44 in {count for counts in client.run(_full_chunk_counts).values() for count in counts}
    # Two channels restored one at a time: both channels of 20 time points a chunk.
    channels = data[:80].reshape(40, 2, 64, 64)
    output = restore_distributed(channels, model, tmp_path / "channels.zarr", "TCYX", client=client, device="cpu")
    result = zarr.open_array(str(output), mode="r")
    assert result.chunks == (20, 2, 64, 64)
    assert_alike(result[:], restore(channels, model, "TCYX", device="cpu"))


def _full_chunk_counts() -> list[int]:
    from napari_gama_ir.engine import distributed

    return [restorer.planes_per_chunk for restorer in distributed._restorers.values()]


@pytest.mark.parametrize("name", ["stack.tif", "stack.npy"])
def test_tiff_and_npy_inputs_travel_to_the_workers_as_their_paths(client, stack, tmp_path, name):
    # A TIFF store could not be pickled (it holds a lock): every cluster run from a TIFF failed.
    # A .npy memory map travelled as all of its bytes.
    import pickle

    import tifffile

    _, data = stack
    if name.endswith(".tif"):
        tifffile.imwrite(tmp_path / name, data, metadata={"axes": "ZYX"})
    else:
        np.save(tmp_path / name, data)
    source = open_image(tmp_path / name)
    assert len(pickle.dumps(source.array)) < data.nbytes / 10
    model = make_tiny_model(1)
    output = restore_distributed(source.array, model, tmp_path / "out.zarr", "ZYX", client=client, device="cpu",
                                 **SETTINGS)
    assert_alike(zarr.open_array(str(output), mode="r")[:], restore(data, model, "ZYX", device="cpu", **SETTINGS))


def test_ome_zarr_output_on_a_cluster(client, stack, tmp_path, monkeypatch):
    from napari_gama_ir.engine import io

    array, data = stack
    model = make_tiny_model(1)
    sizes = {"Z": [0.5, "micrometer"]}
    monkeypatch.setattr(io, "PYRAMID_SIDE", max(data.shape[1:]) - 1)  # one lower level, as a local write
    output = restore_distributed(array, model, tmp_path / "out.ome.zarr", "ZYX", client=client, device="cpu",
                                 attrs={"pixel_size": sizes}, **SETTINGS)
    result = open_image(output)
    assert result.axes == "ZYX" and result.pixel_size == {"Z": (0.5, "micrometer")}
    assert [d["path"] for d in zarr.open_group(str(output), mode="r").attrs["multiscales"][0]["datasets"]] == ["0", "1"]
    local = write_image(result.array, tmp_path / "local.ome.zarr", "ZYX")
    assert np.array_equal(result.levels[0].compute(), open_image(local).levels[0].compute())
    assert_alike(result.array.compute(), restore(data, model, "ZYX", device="cpu", **SETTINGS))
    # Written in OME-Zarr's order by the workers, a chunk at a time.
    output = restore_distributed(data.transpose(1, 2, 0), model, tmp_path / "yxz.ome.zarr", "YXZ", client=client,
                                 device="cpu", **SETTINGS)
    assert open_image(output).axes == "ZYX"
    assert np.array_equal(open_image(output).array.compute(), result.array.compute())
    with pytest.raises(ImageIOError, match="OME-Zarr images have the axes T, C, Z, Y and X only, not 'S'"):
        restore_distributed(array, model, tmp_path / "bad.ome.zarr", "SYX", client=client)


def test_an_interrupted_run_resumes_to_the_identical_result(client, stack, tmp_path):
    array, data = stack
    model = make_tiny_model(1)
    reference = restore(data, model, "ZYX", device="cpu", **SETTINGS)
    output = tmp_path / "out.zarr"

    def stop_after_three(done, total):
        if done >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        restore_distributed(array, model, output, "ZYX", client=client, device="cpu", on_chunk=stop_after_three,
                            **SETTINGS)
    run = tmp_path / ".out.zarr.run"
    assert not output.exists() and run.is_dir()
    marked = len(os.listdir(run / "done"))
    assert 3 <= marked < 8
    # Without resume the half-done run is neither reused nor silently discarded.
    with pytest.raises(ImageIOError, match="interrupted run exists"):
        restore_distributed(array, model, output, "ZYX", client=client, device="cpu", **SETTINGS)
    # With other settings it cannot be resumed.
    with pytest.raises(RunMismatchError):
        restore_distributed(array, model, output, "ZYX", client=client, device="cpu", resume=True, tile=48, overlap=8)
    progress = []
    restore_distributed(array, model, output, "ZYX", client=client, device="cpu", resume=True,
                        on_chunk=lambda done, total: progress.append(done), **SETTINGS)
    assert progress[0] >= marked and progress[-1] == 8  # finished chunks were skipped
    assert_alike(zarr.open_array(str(output), mode="r")[:], reference)
    assert not run.exists()
    # A run in blocks resumes in its blocks, whatever the memory would choose now; others are refused.
    with pytest.raises(KeyboardInterrupt):
        restore_distributed(array, model, tmp_path / "blocks.zarr", "ZYX", client=client, device="cpu", block=32,
                            on_chunk=stop_after_three, **SETTINGS)
    with pytest.raises(RunMismatchError):
        restore_distributed(array, model, tmp_path / "blocks.zarr", "ZYX", client=client, device="cpu", resume=True,
                            block=0, **SETTINGS)
    restore_distributed(array, model, tmp_path / "blocks.zarr", "ZYX", client=client, device="cpu", resume=True,
                        **SETTINGS)
    blocks = zarr.open_array(str(tmp_path / "blocks.zarr"), mode="r")
    assert blocks.chunks == (1, 32, 32)
    assert_alike(blocks[:], reference)


def test_a_killed_worker_does_not_stop_the_run(stack, tmp_path):
    array, data = stack
    model = make_tiny_model(1)
    client = start_local_cluster(workers=2, threads_per_worker=1)
    try:
        pids = client.run(os.getpid)
        killed = []

        def kill_one_worker(done, total):
            if done >= 1 and not killed:
                victim = next(iter(pids.values()))
                os.kill(victim, signal.SIGKILL)  # the nanny restarts it; its tasks run again
                killed.append(victim)

        output = restore_distributed(array, model, tmp_path / "out.zarr", "ZYX", client=client, device="cpu",
                                     on_chunk=kill_one_worker, **SETTINGS)
        assert killed
        assert_alike(zarr.open_array(str(output), mode="r")[:], restore(data, model, "ZYX", device="cpu", **SETTINGS))
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()


def test_cli_restores_on_a_local_cluster(capsys, tmp_path, stack):
    _, data = stack
    checkpoint = save_checkpoint(make_tiny_model(1), tmp_path / "tiny")
    code = main(["restore", str(tmp_path / "stack.zarr"), "-o", str(tmp_path / "out.zarr"), "--model", str(checkpoint),
                 "--workers", "2", "--tile", "32", "--overlap", "8", "--device", "cpu", "--axes", "ZYX"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "2 worker(s); dashboard http" in err and "8/8" in err
    result = open_image(tmp_path / "out.zarr")
    assert result.axes == "ZYX" and result.metadata["model"] == str(checkpoint)
    from napari_gama_ir import create_model

    assert_alike(result.array.compute(), restore(data, create_model(str(checkpoint)), "ZYX", device="cpu", **SETTINGS))


@pytest.mark.parametrize("argv, message", [
    (["-o", "{tmp}/out.tif", "--workers", "2"], "give a .zarr output"),
    (["-o", "{tmp}/out.zarr", "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "not both"),
])
def test_cli_cluster_bad_input_gets_one_line(capsys, tmp_path, stack, argv, message):
    checkpoint = save_checkpoint(make_tiny_model(1), tmp_path / "tiny")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = main(["restore", str(tmp_path / "stack.zarr"), "--model", str(checkpoint), "--axes", "ZYX", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.zarr").exists() and not (tmp_path / "out.tif").exists()


class _Worker:
    def __init__(self, name):
        self.name = name


def test_local_workers_spread_over_the_gpus(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert [worker_device("cuda", _Worker(i)) for i in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    assert worker_device("auto", _Worker(4)) == "cuda:1"
    assert worker_device("cpu", _Worker(1)) == "cpu"  # an explicit device is kept
    assert worker_device("cuda:2", _Worker(1)) == "cuda:2"
    assert worker_device("cuda", _Worker("slurm-job-17")) == "cuda"  # the scheduler placed it already
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert worker_device("cuda", _Worker(5)) == "cuda"
