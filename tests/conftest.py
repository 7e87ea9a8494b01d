import numpy as np
import pytest
import torch

from napari_gama_ir.model import GamaIR, GamaIRConfig


def assert_alike(actual, expected, scale: float = 65535) -> None:
    """Equal but for float32 rounding, 1.5e-6 of ``scale`` (the input's range). A forward pass of
    several tiles or planes rounds otherwise under another torch thread count (oneDNN's 1x1
    convolutions), as a cluster's one-thread workers do against this process's two threads."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1.5e-6 * scale)


def tiny_config(channels: int = 1, **changes) -> GamaIRConfig:
    settings = dict(
        in_channels=channels, out_channels=channels, width=8, encoder_blocks=(1, 1), middle_blocks=1,
        decoder_blocks=(1, 1), train_patch_size=16, channel_meaning="grey" if channels == 1 else "rgb",
    )
    settings.update(changes)
    return GamaIRConfig(**settings)


def make_tiny_model(channels: int = 1, seed: int = 0, **changes) -> GamaIR:
    """A small network whose residual branches are switched on (they start at zero)."""
    torch.manual_seed(seed)
    model = GamaIR(tiny_config(channels, **changes))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("_scale"):
                parameter.normal_(0, 0.5)
    return model.eval()


def recorded_passes(monkeypatch, pause: float = 0.0, interrupt_at: int | None = None) -> list[int]:
    """Every forward pass of every runner appends its tile count to the list returned and takes
    ``pause`` seconds longer (time to cancel or move on during one plane); the pass numbered
    ``interrupt_at`` (from 1) first sends SIGINT to the main thread, as Ctrl-C does."""
    import signal
    import threading
    import time

    from napari_gama_ir.engine import ModelRunner

    passes = []
    forward = ModelRunner._forward

    def recorded(self, tiles, outputs):
        passes.append(len(tiles))
        if len(passes) == interrupt_at:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        time.sleep(pause)
        forward(self, tiles, outputs)

    monkeypatch.setattr(ModelRunner, "_forward", recorded)
    return passes


@pytest.fixture(autouse=True)
def no_kept_runner():
    """Each test starts without the runner a test before it left for the next restore (a runner
    keeps, for one, the tile size that ran out of memory there)."""
    from napari_gama_ir.engine.runner import forget_kept_runner

    forget_kept_runner()
    yield
    forget_kept_runner()


@pytest.fixture
def grey_model():
    return make_tiny_model(1)


@pytest.fixture
def rgb_model():
    return make_tiny_model(3)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="module")
def client():
    """A dask.distributed LocalCluster of 2 single-thread worker processes, shared by a test module."""
    pytest.importorskip("distributed")
    from napari_gama_ir.engine.distributed import start_local_cluster

    client = start_local_cluster(workers=2, threads_per_worker=1)
    yield client
    cluster = client.cluster
    client.close()
    cluster.close()
