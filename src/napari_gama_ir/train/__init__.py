"""Training and fine-tuning GAMA-IR networks on the user's own images.

Typical use::

    from napari_gama_ir.train import TrainSettings, data_from_arrays, starting_model, train

    data = data_from_arrays(noisy_stack, clean_stack, axes="ZYX")
    model, start = starting_model(data.channels, architecture="gama_ir_xs", patch=64)
    result = train(model, data, TrainSettings(steps=2000), "my_model", start=start)

and data parallel on a dask.distributed cluster, one replica per worker::

    result = train_distributed(model, data, TrainSettings(steps=2000, batch=16), "my_model", client=client)
"""

from .data import TrainingData, TrainingDataError, data_from_arrays, data_from_paths
from .distributed import DistributedTrainer, ReplicaLostError, train_distributed
from .metrics import psnr, ssim
from .objectives import NoiseModel, Objective
from .trainer import (
    Replica,
    ResumeError,
    Trainer,
    TrainEvent,
    TrainingMemoryError,
    TrainResult,
    TrainSettings,
    default_normalization,
    grey_from_colour,
    holds_run,
    learning_rate_at,
    remove_run,
    resume_point,
    resume_trainer,
    starting_model,
    train,
)

__all__ = [
    "DistributedTrainer",
    "NoiseModel",
    "Objective",
    "Replica",
    "ReplicaLostError",
    "ResumeError",
    "TrainEvent",
    "TrainResult",
    "TrainSettings",
    "Trainer",
    "TrainingData",
    "TrainingDataError",
    "TrainingMemoryError",
    "data_from_arrays",
    "data_from_paths",
    "default_normalization",
    "grey_from_colour",
    "holds_run",
    "learning_rate_at",
    "psnr",
    "remove_run",
    "resume_point",
    "resume_trainer",
    "ssim",
    "starting_model",
    "train",
    "train_distributed",
]
