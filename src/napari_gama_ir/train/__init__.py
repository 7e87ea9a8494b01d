"""Training GAMA-IR networks: patch sampling on the fly and the paper's optimisation recipe."""

from .data import GaussianNoise, PatchSampler, load_image_folder
from .loop import TrainSettings, train_denoiser

__all__ = ["GaussianNoise", "PatchSampler", "TrainSettings", "load_image_folder", "train_denoiser"]
