"""A plain UNet: 3x3 convs, InstanceNorm and ReLU (the GAMA-IR paper's ablation baseline, section 5).

The paper does not give its exact layout; this one is the classic UNet (Ronneberger et al. 2015)
with four down-sampling steps, width 32, max-pooling down, transposed-conv up, concatenated skips,
and a global residual so that it restores like the other networks.
"""

from __future__ import annotations

import torch
from torch import nn

from napari_gama_ir.model.layers import pad_to_multiple


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    layers = []
    for channels in (in_channels, out_channels):
        layers += [nn.Conv2d(channels, out_channels, 3, padding=1), nn.InstanceNorm2d(out_channels, affine=True),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class PlainUNet(nn.Module):
    def __init__(self, channels: int = 3, width: int = 32, levels: int = 4) -> None:
        super().__init__()
        widths = [width * 2**level for level in range(levels + 1)]
        self.encoders = nn.ModuleList(
            _double_conv(channels if level == 0 else widths[level - 1], widths[level]) for level in range(levels)
        )
        self.pool = nn.MaxPool2d(2)
        self.middle = _double_conv(widths[-2], widths[-1])
        self.ups = nn.ModuleList(nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2)
                                 for level in reversed(range(levels)))
        self.decoders = nn.ModuleList(_double_conv(2 * widths[level], widths[level])
                                      for level in reversed(range(levels)))
        self.ending = nn.Conv2d(width, channels, 1)
        self.size_multiple = 2**levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        x = pad_to_multiple(x, self.size_multiple)
        features, skips = x, []
        for encoder in self.encoders:
            features = encoder(features)
            skips.append(features)
            features = self.pool(features)
        features = self.middle(features)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips)):
            features = decoder(torch.cat([up(features), skip], dim=1))
        return (self.ending(features) + x)[..., :height, :width]
