"""The global-context module of a building block, and the paper's ablation variants (section 5).

``GamaIRConfig.global_block`` picks one per network:

- ``"gama"``: the GAMA block (section 4.2), the default;
- ``"identity"``: no global module, the ablation baseline;
- ``"squeeze_excite"``: NAFNet's simplified channel attention, a global average per channel fed
  through a 1x1 conv that rescales the channels (C * C + C parameters);
- ``"gama_1d"``: the "1D vectors" ablation: averages over two dimensions at once, giving one
  vector over C, one over H and one over W, each through a small MLP, broadcast and added;
- ``"gama_multiplicative"``: the GAMA block with its sum replaced by a product.
"""

from __future__ import annotations

import torch
from torch import nn

from .gama import KERNEL_SIZE, GamaBlock, global_mean

GLOBAL_BLOCKS = ("gama", "identity", "squeeze_excite", "gama_1d", "gama_multiplicative")


class MultiplicativeGamaBlock(GamaBlock):
    """GAMA with the three processed maps multiplied into the input instead of added: x * a * b * c."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        over_channels, over_height, over_width = self.processed_means(x)
        return x * over_channels * over_height * over_width


class SqueezeExcite(nn.Module):
    """NAFNet's simplified channel attention: ``x * conv1x1(mean over H and W of x)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv(global_mean(x, (2, 3)))


def _vector_mlp(hidden: int) -> nn.Sequential:
    # Applied along the vector as 1-D convolutions, so that one MLP serves any H or W.
    return nn.Sequential(
        nn.Conv1d(1, hidden, KERNEL_SIZE, padding=KERNEL_SIZE // 2),
        nn.GELU(),
        nn.Conv1d(hidden, 1, KERNEL_SIZE, padding=KERNEL_SIZE // 2),
    )


class Gama1dBlock(nn.Module):
    """The paper's "1D vectors" ablation of GAMA.

    The feature map is averaged over (H, W), (C, W) and (C, H), giving vectors of length C, H and
    W. Each goes through its own two-layer MLP (1 -> ``hidden`` -> 1 channels, kernel 7, GELU),
    and the three results are broadcast and added to the input. Unlike GAMA's 2-D maps, a vector
    keeps no interaction between two dimensions (e.g. which channel is bright in which row).
    """

    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.mlp_channel = _vector_mlp(hidden)
        self.mlp_height = _vector_mlp(hidden)
        self.mlp_width = _vector_mlp(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        over_channel = self.mlp_channel(global_mean(x, (2, 3)).reshape(batch, 1, channels)).view(batch, channels, 1, 1)
        over_height = self.mlp_height(global_mean(x, (1, 3)).reshape(batch, 1, height)).view(batch, 1, height, 1)
        over_width = self.mlp_width(global_mean(x, (1, 2)).reshape(batch, 1, width)).view(batch, 1, 1, width)
        return x + over_channel + over_height + over_width


def make_global_block(kind: str, channels: int) -> nn.Module:
    """The global-context module ``kind`` for a feature map of ``channels`` channels."""
    if kind not in GLOBAL_BLOCKS:
        raise ValueError(f"global_block must be one of {GLOBAL_BLOCKS}, got {kind!r}")
    if kind == "gama":
        return GamaBlock()
    if kind == "gama_multiplicative":
        return MultiplicativeGamaBlock()
    if kind == "identity":
        return nn.Identity()
    if kind == "squeeze_excite":
        return SqueezeExcite(channels)
    return Gama1dBlock()


def supports_local_means(block: nn.Module) -> bool:
    """Whether ``block`` can average over sliding windows (``GamaIR.set_mean_mode("local")``)."""
    return isinstance(block, GamaBlock)
