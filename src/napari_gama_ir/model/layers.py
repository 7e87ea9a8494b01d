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
        if x.device.type != "cpu" and x.shape[1] % 4:
            return layer_norm_by_passes(x, self.weight, self.bias, self.eps)
        return layer_norm_fused(x, self.weight, self.bias, self.eps)


def layer_norm_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """:class:`LayerNorm2d` as one fused layer_norm call on the NHWC view.

    Viewed as NHWC, each pixel's channels are the last axis: one kernel (on a view, no copy, when
    ``x`` is channels_last) instead of eight elementwise passes.
    """
    nhwc = x.permute(0, 2, 3, 1)
    return F.layer_norm(nhwc, (x.shape[1],), weight, bias, eps).permute(0, 3, 1, 2)


def layer_norm_by_passes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """:class:`LayerNorm2d` as separate reductions and elementwise passes over dim 1, in float32.

    For GPUs when the channel count is not a multiple of 4: torch's fused layer_norm kernel then
    leaves its vectorised path and gives each pixel a thread block of its own, which took 1.43 ms
    for 42 x 512 x 512 on an H100 against 0.24 ms for these passes (GAMA-IR-S is 42 channels wide
    at full resolution; docs/performance.md, "GPU"). float32, as autocast runs layer_norm.
    """
    x = x.float()
    centred = x - x.mean(1, keepdim=True)
    scale = torch.rsqrt(centred.square().mean(1, keepdim=True) + eps)
    return torch.addcmul(bias[:, None, None], centred * scale, weight[:, None, None])


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
