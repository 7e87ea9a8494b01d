"""The GAMA-IR encoder-decoder (paper section 4, figure 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import GamaIRConfig
from .gama import KERNEL_SIZE
from .global_blocks import make_global_block, supports_local_means
from .layers import LayerNorm2d, SimpleGate, pad_to_multiple


class GamaIRBlock(nn.Module):
    """One building block (paper section 4): a spatial part and a feed-forward part.

    Spatial part: LayerNorm, 1x1 conv (C -> eC), 3x3 depthwise conv, SimpleGate (eC -> eC/2),
    GAMA block, 1x1 conv, residual. Feed-forward part: LayerNorm, 1x1 conv (C -> eC), SimpleGate,
    1x1 conv, residual. As in NAFNet both residual branches are scaled by learned per-channel
    factors that start at zero, so a freshly built network starts close to the identity.
    ``global_block`` swaps GAMA for an ablation variant (section 5); whatever it is, it sits in
    the attribute ``gama`` so that checkpoints keep their parameter names.
    """

    def __init__(self, channels: int, expansion: int = 2, global_block: str = "gama") -> None:
        super().__init__()
        hidden = channels * expansion
        self.norm1 = LayerNorm2d(channels)
        self.expand = nn.Conv2d(channels, hidden, 1)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.gate = SimpleGate()
        self.gama = make_global_block(global_block, hidden // 2)
        self.project = nn.Conv2d(hidden // 2, channels, 1)
        self.norm2 = LayerNorm2d(channels)
        self.ffn_expand = nn.Conv2d(channels, hidden, 1)
        self.ffn_project = nn.Conv2d(hidden // 2, channels, 1)
        self.spatial_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.ffn_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # addcmul scales and adds in one pass over memory (7% faster on CPU than `x + y * scale`).
        y = self.gama(self.gate(self.depthwise(self.expand(self.norm1(x)))))
        x = torch.addcmul(x, self.project(y), self.spatial_scale)
        y = self.ffn_project(self.gate(self.ffn_expand(self.norm2(x))))
        return torch.addcmul(x, y, self.ffn_scale)


class Downsample(nn.Sequential):
    """1x1 conv C -> C/2, then pixel-unshuffle to 2C channels at half resolution (section 4)."""

    def __init__(self, channels: int) -> None:
        super().__init__(nn.Conv2d(channels, channels // 2, 1, bias=False), nn.PixelUnshuffle(2))


class Upsample(nn.Sequential):
    """1x1 conv C -> 2C, then pixel-shuffle to C/2 channels at double resolution (section 4).

    On the CPU the two steps run as one transposed convolution (2x2 kernel, stride 2) with the 1x1
    conv's weights rearranged: the same sums, but the convolution library writes the upsampled
    features out in full. Under torch.compile a separate pixel shuffle is not written out: inductor
    recomputes it, gathering element by element, in every kernel that reads those features, which
    made compiled GAMA-IR-S passes up to 1.3x slower on a CPU; eager passes take about as long
    either way (docs/performance.md). Other devices keep the two steps, with which their figures
    were measured.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(nn.Conv2d(channels, channels * 2, 1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transposed(x) if x.device.type == "cpu" else super().forward(x)

    def transposed(self, x: torch.Tensor) -> torch.Tensor:
        """Both steps as one transposed convolution, on any device (`latency.py --upsample` forces it off the CPU)."""
        weight = self[0].weight  # (2C, C, 1, 1); pixel shuffle sends channel 4c + 2i + j to channel c, offset (i, j)
        channels = weight.shape[1]
        transposed = weight.view(channels // 2, 2, 2, channels).permute(3, 0, 1, 2)  # (C, C/2, 2, 2)
        return F.conv_transpose2d(x, transposed, stride=2)


def encode_decode(net: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The UNet pass of ``net``'s ``encoders``/``downs``, ``middle`` and ``ups``/``decoders``, each
    decoder level getting the encoder features of equal resolution added (additive skips)."""
    skips = []
    for encoder, down in zip(net.encoders, net.downs):
        features = encoder(features)
        skips.append(features)
        features = down(features)
    features = net.middle(features)
    for up, decoder, skip in zip(net.ups, net.decoders, reversed(skips)):
        features = decoder(up(features) + skip)
    return features


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
            *(GamaIRBlock(channels, self.config.expansion, self.config.global_block) for _ in range(count))
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
        windowed = [(level, block.gama) for level, stage in self._blocks_by_level() for block in stage
                    if supports_local_means(block.gama)]
        if mode == "local" and len(windowed) < self.config.depth:
            raise ValueError(f"local means are implemented for the GAMA blocks only, not {self.config.global_block!r}")
        patch = patch_size or self.config.train_patch_size
        for level, gama in windowed:
            gama.local_window = None if mode == "global" else max(patch >> level, 1)

    @property
    def mean_mode(self) -> str:
        for _, stage in self._blocks_by_level():
            for block in stage:
                if supports_local_means(block.gama):
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
        x_in = pad_to_multiple(x, self.config.size_multiple)
        out = self.ending(encode_decode(self, self.intro(x_in)))
        if self.config.in_channels == self.config.out_channels:
            out = out + x_in
        return out[..., :height, :width]
