"""The training loop: AdamW and cosine annealing as in the paper (section 5), L1 loss."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..model import GamaIR
from .data import PatchSampler


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings; the defaults are the paper's (AdamW, betas 0.9/0.9, cosine to 1e-7)."""

    steps: int = 1000
    batch: int = 8
    learning_rate: float = 1e-3
    min_learning_rate: float = 1e-7
    betas: tuple[float, float] = (0.9, 0.9)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    time_limit: float | None = None  # seconds; stop early (and say so) when reached


def train_denoiser(
    model: GamaIR,
    sampler: PatchSampler,
    degrade: Callable[[np.ndarray], np.ndarray],
    settings: TrainSettings,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Train ``model`` to undo ``degrade`` on patches from ``sampler``; return a short history.

    The cosine schedule spans ``settings.steps``; with a ``time_limit`` the run may stop sooner,
    and the returned ``steps_done`` says how many steps ran.
    """
    torch.manual_seed(settings.seed)
    model.train()
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, betas=settings.betas, weight_decay=settings.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, settings.steps, eta_min=settings.min_learning_rate)
    losses: list[float] = []
    started = time.monotonic()
    step = 0
    for step in range(1, settings.steps + 1):
        clean = sampler.batch(settings.batch)
        noisy = torch.from_numpy(degrade(clean))
        loss = torch.nn.functional.l1_loss(model(noisy), torch.from_numpy(clean))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
        if settings.time_limit is not None and time.monotonic() - started > settings.time_limit:
            break
    model.eval()
    return {"steps_done": step, "seconds": time.monotonic() - started, "losses": losses}
