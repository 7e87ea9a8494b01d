"""Small layers shared by the building blocks (paper section 4, after NAFNet)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """Layer normalisation over the channels of each pixel of an NCHW tensor.

    The paper's building block starts with a LayerNorm; like NAFNet it normalises each pixel's
    channel vector, so the operation stays local and works for any height and width.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Viewed as NHWC, each pixel's channels are the last axis: one fused layer_norm call
        # (a view, no copy, when x is channels_last) instead of eight elementwise passes.
        nhwc = x.permute(0, 2, 3, 1)
        return F.layer_norm(nhwc, (x.shape[1],), self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class SimpleGate(nn.Module):
    """Split the channels in two halves and multiply them (NAFNet's SimpleGate, paper section 4)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = x.chunk(2, dim=1)
        return first * second


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the bottom and right of ``x`` (..., H, W) so that H and W are multiples of ``multiple``.

    Reflection keeps image statistics at the border; it needs a pad below the size, so very small
    inputs are padded by replication instead. Crop the result with ``[..., :H, :W]``.
    """
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if not (pad_h or pad_w):
        return x
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
