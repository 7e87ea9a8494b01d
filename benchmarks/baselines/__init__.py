"""Baseline restoration networks for the speed benchmark, written from their papers' descriptions.

They live beside the benchmarks, not in the package: nothing here is trained or shipped. Each
builder takes the image channel count and returns a network in eval mode.
"""

from .dncnn import DnCNN
from .nafnet import NAFNet
from .unet import PlainUNet

BASELINES = {
    "nafnet_32": lambda channels=3: NAFNet(channels, width=32).eval(),
    "nafnet_64": lambda channels=3: NAFNet(channels, width=64).eval(),
    "plain_unet": lambda channels=3: PlainUNet(channels).eval(),
    "dncnn": lambda channels=3: DnCNN(channels).eval(),
}

__all__ = ["BASELINES", "DnCNN", "NAFNet", "PlainUNet"]
