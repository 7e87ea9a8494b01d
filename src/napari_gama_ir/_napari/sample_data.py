"""Sample data for File > Open Sample > GAMA-IR: bundled images with synthetic noise, no download."""

from __future__ import annotations

from ..samples import noisy_fluorescence_stack, noisy_rgb_photos


def noisy_photos():
    noisy, clean = noisy_rgb_photos(sigma=25.0, seed=0)
    return [
        (clean, {"name": "clean photos", "rgb": True, "visible": False}, "image"),
        (noisy, {"name": "noisy photos (sigma 25)", "rgb": True}, "image"),
    ]


def noisy_fluorescence():
    noisy, clean = noisy_fluorescence_stack(seed=0)
    limits = [float(clean.min()), float(clean.max())]
    return [
        (clean, {"name": "clean fluorescence", "colormap": "green", "contrast_limits": limits, "visible": False}, "image"),
        (noisy, {"name": "noisy fluorescence", "colormap": "green", "contrast_limits": limits}, "image"),
    ]
