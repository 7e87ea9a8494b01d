"""DnCNN (Zhang et al., "Beyond a Gaussian Denoiser", TIP 2017), section III-A.

17 layers of 3x3 convs with 64 channels: conv + ReLU, 15 x (conv + BatchNorm + ReLU), conv. It
predicts the noise (residual learning), which is subtracted from the input.
"""

from __future__ import annotations

import torch
from torch import nn


class DnCNN(nn.Module):
    def __init__(self, channels: int = 3, features: int = 64, depth: int = 17) -> None:
        super().__init__()
        layers = [nn.Conv2d(channels, features, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(features, features, 3, padding=1, bias=False), nn.BatchNorm2d(features),
                       nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(features, channels, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.body(x)
