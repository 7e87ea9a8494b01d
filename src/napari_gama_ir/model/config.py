"""Architecture configuration of GAMA-IR (Mansour & Heckel, section 4)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .global_blocks import GLOBAL_BLOCKS

NORMALIZATIONS = ("range", "percentile")


@dataclass(frozen=True)
class GamaIRConfig:
    """Everything needed to rebuild a GAMA-IR network, and how to feed it.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels the network reads and writes (1 for grey or microscopy, 3 for RGB, any N).
    width : int
        Channels after the intro convolution (C in the paper); level ``l`` has ``width * 2**l``.
    encoder_blocks, decoder_blocks : tuple of int
        Building blocks per resolution level, from full resolution down (encoder) and back up
        (decoder). Both have one entry per down-sampling step.
    middle_blocks : int
        Building blocks at the lowest resolution.
    global_block : str
        Global-context module inside each building block: ``"gama"`` (the paper's block, the
        default) or an ablation variant, ``"identity"``, ``"squeeze_excite"``, ``"gama_1d"`` or
        ``"gama_multiplicative"`` (see :mod:`.global_blocks`).
    expansion : int
        Channel expansion of the 1x1 convolutions before each SimpleGate (2 in the paper).
    train_patch_size : int
        Side of the square patches the network was trained on. Local mode turns every global mean
        into a mean over a window of this size (measured at full resolution).
    channel_meaning : str
        Human-readable meaning of the channels, e.g. ``"grey"``, ``"rgb"`` or ``"fluorescence"``.
    normalization : dict
        How raw intensities map to network input: ``{"method": "range"}`` divides by the dtype's
        maximum (uint8 -> 255, uint16 -> 65535, floats taken as already in [0, 1]);
        ``{"method": "percentile", "low": 1.0, "high": 99.8, "scope": "image"}`` maps the given
        percentiles of each plane (``"image"``) or of the whole stack (``"stack"``) to 0 and 1.
    metadata : dict
        Free-form provenance (training data, noise model, steps, ...). Not used by the network.
    """

    in_channels: int = 3
    out_channels: int = 3
    width: int = 42
    encoder_blocks: tuple[int, ...] = (2, 2, 2)
    middle_blocks: int = 6
    decoder_blocks: tuple[int, ...] = (2, 2, 2)
    global_block: str = "gama"
    expansion: int = 2
    train_patch_size: int = 256
    channel_meaning: str = "rgb"
    normalization: dict[str, Any] = field(default_factory=lambda: {"method": "range"})
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise JSON lists to tuples without tripping the freeze.
        object.__setattr__(self, "encoder_blocks", tuple(int(n) for n in self.encoder_blocks))
        object.__setattr__(self, "decoder_blocks", tuple(int(n) for n in self.decoder_blocks))
        problems = []
        if self.in_channels < 1 or self.out_channels < 1:
            problems.append("in_channels and out_channels must be at least 1")
        if self.width < 2 or self.width % 2:
            problems.append(f"width must be an even number >= 2, got {self.width}")
        if len(self.encoder_blocks) != len(self.decoder_blocks):
            problems.append("encoder_blocks and decoder_blocks need one entry per level each")
        if any(n < 0 for n in (*self.encoder_blocks, *self.decoder_blocks, self.middle_blocks)):
            problems.append("block counts cannot be negative")
        if self.global_block not in GLOBAL_BLOCKS:
            problems.append(f"global_block must be one of {GLOBAL_BLOCKS}, got {self.global_block!r}")
        if self.train_patch_size < self.size_multiple:
            problems.append(f"train_patch_size must be at least {self.size_multiple}")
        if self.normalization.get("method") not in NORMALIZATIONS:
            problems.append(f"normalization method must be one of {NORMALIZATIONS}")
        if problems:
            raise ValueError("invalid GAMA-IR config: " + "; ".join(problems))

    @property
    def levels(self) -> int:
        """Number of down-sampling steps."""
        return len(self.encoder_blocks)

    @property
    def size_multiple(self) -> int:
        """Height and width are padded internally to a multiple of this (2**levels)."""
        return 2**self.levels

    @property
    def depth(self) -> int:
        """Total number of building blocks, the paper's 'depth'."""
        return sum(self.encoder_blocks) + self.middle_blocks + sum(self.decoder_blocks)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["encoder_blocks"] = list(self.encoder_blocks)
        data["decoder_blocks"] = list(self.decoder_blocks)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GamaIRConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"invalid GAMA-IR config: unknown fields {unknown}")
        return cls(**data)

    def replace(self, **changes: Any) -> GamaIRConfig:
        return dataclasses.replace(self, **changes)
