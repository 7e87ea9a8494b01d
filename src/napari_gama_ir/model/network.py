"""The GAMA-IR encoder-decoder (paper section 4, figure 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import GamaIRConfig
from .gama import KERNEL_SIZE, GamaBlock
from .layers import LayerNorm2d, SimpleGate


class GamaIRBlock(nn.Module):
    """One building block (paper section 4): a spatial part and a feed-forward part.

    Spatial part: LayerNorm, 1x1 conv (C -> eC), 3x3 depthwise conv, SimpleGate (eC -> eC/2),
    GAMA block, 1x1 conv, residual. Feed-forward part: LayerNorm, 1x1 conv (C -> eC), SimpleGate,
    1x1 conv, residual. As in NAFNet both residual branches are scaled by learned per-channel
    factors that start at zero, so a freshly built network starts close to the identity.
    """

    def __init__(self, channels: int, expansion: int = 2, local_window: int | None = None) -> None:
        super().__init__()
        hidden = channels * expansion
        self.norm1 = LayerNorm2d(channels)
        self.expand = nn.Conv2d(channels, hidden, 1)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.gate = SimpleGate()
        self.gama = GamaBlock(local_window)
        self.project = nn.Conv2d(hidden // 2, channels, 1)
        self.norm2 = LayerNorm2d(channels)
        self.ffn_expand = nn.Conv2d(channels, hidden, 1)
        self.ffn_project = nn.Conv2d(hidden // 2, channels, 1)
        self.spatial_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.ffn_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gama(self.gate(self.depthwise(self.expand(self.norm1(x)))))
        x = x + self.project(y) * self.spatial_scale
        y = self.ffn_project(self.gate(self.ffn_expand(self.norm2(x))))
        return x + y * self.ffn_scale


class Downsample(nn.Sequential):
    """1x1 conv C -> C/2, then pixel-unshuffle to 2C channels at half resolution (section 4)."""

    def __init__(self, channels: int) -> None:
        super().__init__(nn.Conv2d(channels, channels // 2, 1, bias=False), nn.PixelUnshuffle(2))


class Upsample(nn.Sequential):
    """1x1 conv C -> 2C, then pixel-shuffle to C/2 channels at double resolution (section 4)."""

    def __init__(self, channels: int) -> None:
        super().__init__(nn.Conv2d(channels, channels * 2, 1, bias=False), nn.PixelShuffle(2))


class GamaIR(nn.Module):
    """GAMA-IR: a shallow UNet-like restoration network with GAMA blocks (paper section 4).

    A 3x3 intro conv lifts the image to ``width`` channels; each encoder level runs its blocks and
    down-samples; the middle blocks run at the lowest resolution; each decoder level up-samples,
    adds the encoder features of equal resolution (additive skip) and runs its blocks; a 3x3
    ending conv maps back to image channels, and the input is added (global residual) when the
    channel counts agree. Inputs of any height and width are padded internally to a multiple of
    ``2**levels`` and cropped back.
    """

    def __init__(self, config: GamaIRConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.intro = nn.Conv2d(config.in_channels, width, 3, padding=1)
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        channels = width
        for count in config.encoder_blocks:
            self.encoders.append(self._stage(channels, count))
            self.downs.append(Downsample(channels))
            channels *= 2
        self.middle = self._stage(channels, config.middle_blocks)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for count in reversed(config.decoder_blocks):
            self.ups.append(Upsample(channels))
            channels //= 2
            self.decoders.append(self._stage(channels, count))
        self.ending = nn.Conv2d(width, config.out_channels, 3, padding=1)

    def _stage(self, channels: int, count: int) -> nn.Sequential:
        return nn.Sequential(
            *(GamaIRBlock(channels, self.config.expansion) for _ in range(count))
        )

    # -- global versus local averaging -------------------------------------------------------
    def _blocks_by_level(self):
        levels = self.config.levels
        for level, stage in enumerate(self.encoders):
            yield level, stage
        yield levels, self.middle
        for index, stage in enumerate(self.decoders):
            yield levels - 1 - index, stage

    def set_mean_mode(self, mode: str, patch_size: int | None = None) -> None:
        """Choose how the GAMA blocks average: ``"global"`` (the paper) or ``"local"``.

        In local mode every mean runs over a sliding window the size of the training patch
        (``patch_size``, default ``config.train_patch_size``) measured at full resolution, i.e.
        ``patch_size / 2**level`` pixels at level ``level``. The network's output then depends on a
        bounded neighbourhood (:meth:`receptive_radius`), which makes tiling exact.
        """
        if mode not in ("global", "local"):
            raise ValueError(f"mean mode must be 'global' or 'local', got {mode!r}")
        patch = patch_size or self.config.train_patch_size
        for level, stage in self._blocks_by_level():
            for block in stage:
                block.gama.local_window = None if mode == "global" else max(patch >> level, 1)

    @property
    def mean_mode(self) -> str:
        for _, stage in self._blocks_by_level():
            for block in stage:
                return "global" if block.gama.local_window is None else "local"
        return "global"

    def receptive_radius(self, patch_size: int | None = None) -> int:
        """Upper bound, in full-resolution pixels, of how far an output pixel looks in local mode.

        (In global mode every pixel sees the whole image.) The bound adds up the reach of every
        layer along the longest path (intro, encoder, middle, decoder, ending) for local windows of
        ``patch_size`` (default ``config.train_patch_size``); the skip paths are shorter.
        """
        patch = patch_size or self.config.train_patch_size
        radius = 2  # intro and ending 3x3 convs
        for level, stage in self._blocks_by_level():
            scale = 2**level
            window = max(patch >> level, 1)
            # 3x3 depthwise conv, then the longer of the window's half and the 7x7 conv's reach.
            radius += len(stage) * scale * (1 + max(window // 2, KERNEL_SIZE // 2))
        # Every down- and up-sampling step regroups pixels in pairs at the finer level.
        radius += 2 * sum(2 ** (level + 1) for level in range(self.config.levels))
        return radius

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        multiple = self.config.size_multiple
        pad_h, pad_w = -height % multiple, -width % multiple
        if pad_h or pad_w:
            # Reflection keeps image statistics at the border; it needs the pad below the size.
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            x_in = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        else:
            x_in = x
        features = self.intro(x_in)
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            features = encoder(features)
            skips.append(features)
            features = down(features)
        features = self.middle(features)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips)):
            features = decoder(up(features) + skip)
        out = self.ending(features)
        if self.config.in_channels == self.config.out_channels:
            out = out + x_in
        return out[..., :height, :width]
