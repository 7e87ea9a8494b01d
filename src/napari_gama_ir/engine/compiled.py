"""An optional ``torch.compile`` path for inference, checked against eager and never fatal."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .device import is_out_of_memory

# Largest difference to the eager network that a compiled network may show, relative to the size
# of the output: the 1e-3 for float32; autocast rounds each path its own way.
TOLERANCE = {None: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


class CompiledNetwork:
    """Runs a network through ``torch.compile`` (inductor, weights frozen), falling back to eager.

    Freezing lets inductor treat the weights as constants: it pre-packs convolution weights and
    fuses the elementwise work of LayerNorm, SimpleGate, GAMA and the scaled residuals into few
    passes over memory. How much that buys depends on the network and the machine
    (docs/performance.md has the figures measured on a CPU).
    Each new input shape is compiled once (tens of seconds on a CPU) and its first output is
    compared with the eager network's; a failure to compile, or a difference above
    :data:`TOLERANCE`, switches to the eager network for good with a warning. Out-of-memory errors
    propagate, so the engine can still shrink the batch or tile.

    Call it under ``torch.inference_mode()`` or ``torch.no_grad()``; it is for inference only.
    """

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.tolerance = TOLERANCE[autocast_dtype]
        self.active = True
        self._checked_shapes: set[tuple[int, ...]] = set()
        # dynamic=False: the engine's tiles share one shape, for which static code is fastest.
        self._compiled = torch.compile(model, dynamic=False)

    def _fall_back(self, reason: str) -> None:
        self.active = False
        warnings.warn(f"torch.compile is not used ({reason}); running the network eagerly", RuntimeWarning, stacklevel=3)

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return self.model(inputs)
        import torch._inductor.config as inductor_config

        try:
            with inductor_config.patch(freezing=True):
                outputs = self._compiled(inputs)
        except Exception as error:  # a missing C++ compiler, an unsupported operator, ...
            if is_out_of_memory(error):
                raise
            first_line = (str(error).strip().splitlines() or [""])[0]
            self._fall_back(f"{type(error).__name__}: {first_line}")
            return self.model(inputs)
        shape = tuple(inputs.shape)
        if shape not in self._checked_shapes:
            reference = self.model(inputs)
            scale = max(1.0, float(reference.float().abs().max()))
            difference = float((outputs.float() - reference.float()).abs().max())
            if not difference <= self.tolerance * scale:  # also catches NaN
                self._fall_back(f"its output differs from eager by {difference:.3g} for shape {shape}")
                return reference
            self._checked_shapes.add(shape)
        return outputs
