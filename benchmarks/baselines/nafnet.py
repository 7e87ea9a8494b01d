"""NAFNet (Chen et al., "Simple Baselines for Image Restoration", ECCV 2022), section 3 and figure 3c.

The SIDD configuration: blocks (2, 2, 4, 8) in the encoder, 12 in the middle and (2, 2, 2, 2) in the
decoder; width 32 has about 29.2 M parameters and 16 GMACs at 256 x 256.
"""

from __future__ import annotations

import torch
from torch import nn

from napari_gama_ir.model.layers import LayerNorm2d, SimpleGate, pad_to_multiple
from napari_gama_ir.model.network import Upsample, encode_decode


class NAFBlock(nn.Module):
    """Spatial part with simplified channel attention (SCA) and a gated feed-forward part."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = 2 * channels
        self.norm1 = LayerNorm2d(channels)
        self.expand = nn.Conv2d(channels, hidden, 1)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.gate = SimpleGate()
        # SCA: global average pooling, then a 1x1 conv; the result rescales every channel.
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, 1))
        self.project = nn.Conv2d(channels, channels, 1)
        self.norm2 = LayerNorm2d(channels)
        self.ffn_expand = nn.Conv2d(channels, hidden, 1)
        self.ffn_project = nn.Conv2d(channels, channels, 1)
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gate(self.depthwise(self.expand(self.norm1(x))))
        x = x + self.project(y * self.attention(y)) * self.beta
        y = self.ffn_project(self.gate(self.ffn_expand(self.norm2(x))))
        return x + y * self.gamma


class NAFNet(nn.Module):
    """UNet of NAFBlocks: 2x2 stride-2 conv down-sampling, 1x1 conv + pixel-shuffle up-sampling,
    additive skips and a global residual. The up-sampling is GAMA-IR's (same layers), so that both
    networks run it the same way, as they share LayerNorm2d and SimpleGate."""

    def __init__(self, channels: int = 3, width: int = 32, encoder_blocks=(2, 2, 4, 8), middle_blocks: int = 12,
                 decoder_blocks=(2, 2, 2, 2)) -> None:
        super().__init__()
        self.intro = nn.Conv2d(channels, width, 3, padding=1)
        self.encoders, self.downs, self.ups, self.decoders = (nn.ModuleList() for _ in range(4))
        chan = width
        for count in encoder_blocks:
            self.encoders.append(nn.Sequential(*(NAFBlock(chan) for _ in range(count))))
            self.downs.append(nn.Conv2d(chan, 2 * chan, 2, stride=2))
            chan *= 2
        self.middle = nn.Sequential(*(NAFBlock(chan) for _ in range(middle_blocks)))
        for count in decoder_blocks:
            self.ups.append(Upsample(chan))
            chan //= 2
            self.decoders.append(nn.Sequential(*(NAFBlock(chan) for _ in range(count))))
        self.ending = nn.Conv2d(width, channels, 3, padding=1)
        self.size_multiple = 2 ** len(encoder_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        x = pad_to_multiple(x, self.size_multiple)
        return (self.ending(encode_decode(self, self.intro(x))) + x)[..., :height, :width]
