"""Crop preprocessing shared by serving and training, so both see identical pixels.

Numpy and Pillow only. A crop of any size (H, W, 3) uint8 RGB is resized to the model's
input size with Pillow's antialiased bilinear filter, then normalised with the card's mean/std.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from services.common.errors import InputError

__all__ = ["normalize", "resize_crop", "resize_crops"]


def resize_crop(crop: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resize one (H, W, 3) uint8 RGB crop to ``hw`` -> (h, w, 3) uint8."""
    if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
        raise InputError(f"crop: expected (H, W, 3) uint8 RGB, got {crop.shape} {crop.dtype}")
    if crop.shape[0] < 1 or crop.shape[1] < 1:
        raise InputError(f"crop: expected at least 1x1 pixels, got {crop.shape[1]}x{crop.shape[0]}")
    h, w = hw
    if crop.shape[:2] == (h, w):
        return crop
    img = Image.fromarray(np.ascontiguousarray(crop), mode="RGB")
    return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR))


def resize_crops(crops: Sequence[np.ndarray], hw: tuple[int, int]) -> np.ndarray:
    """Resize every crop to ``hw`` -> (B, h, w, 3) uint8."""
    out = np.empty((len(crops), hw[0], hw[1], 3), np.uint8)
    for i, crop in enumerate(crops):
        out[i] = resize_crop(crop, hw)
    return out


def normalize(batch: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(B, h, w, 3) uint8 -> (B, 3, h, w) float32, ``(x / 255 - mean) / std``.

    A 256-entry lookup table per channel replaces the float arithmetic: one gather per pixel, about 2x faster
    than converting and scaling the whole batch (measured at 64 crops of 64x64).
    """
    levels = np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0)
    lut = ((levels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).T  # (3, 256)
    out = np.empty((batch.shape[0], 3, batch.shape[1], batch.shape[2]), np.float32)
    for c in range(3):
        out[:, c] = lut[c][batch[..., c]]
    return out
