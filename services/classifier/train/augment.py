"""Batched, on-device augmentation for road sign crops (torch; CPU or GPU).

What a detector hands the classifier from a dashcam differs from a clean crop in scale and framing,
viewing angle, motion and focus blur, resolution (far signs are 16 px), lighting and colour, and
partial occlusion. Every op here is one batched tensor op, so augmentation costs little next to the
network on either device. Horizontal flips are used only where the meaning is known after the flip:
symmetric signs keep their class, mirrored pairs swap (left curve <-> right curve, keep left <-> keep
right...), and every other sign is never flipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.classifier.train.data import BACKGROUND_CLASS

__all__ = ["AugmentSettings", "augment_batch", "flip_table"]

# Signs whose mirror image is another class, and signs whose mirror image is themselves.
_MIRROR_PAIRS = ((19, 20), (33, 34), (36, 37), (38, 39))
_SYMMETRIC = (11, 12, 13, 15, 17, 18, 22, 26, 35)


@dataclass(frozen=True, slots=True)
class AugmentSettings:
    """Strength of each augmentation; probabilities are per crop."""

    scale: tuple[float, float] = (0.8, 1.2)  # zoom factor: >1 crops tighter than the source framing
    max_rotate_deg: float = 12.0
    max_shear: float = 0.12
    max_translate: float = 0.1  # fraction of the crop
    max_perspective: float = 0.12  # homography terms in normalised coordinates
    p_low_res: float = 0.25
    low_res_px: tuple[int, int] = (12, 40)
    p_blur: float = 0.25
    blur_sigma: tuple[float, float] = (0.3, 1.4)
    brightness: tuple[float, float] = (0.45, 1.6)
    contrast: tuple[float, float] = (0.6, 1.5)
    saturation: tuple[float, float] = (0.6, 1.5)
    channel_gain: float = 0.08
    gamma: tuple[float, float] = (0.7, 1.5)
    noise_std: float = 0.03
    p_occlude: float = 0.2
    occlude_area: tuple[float, float] = (0.04, 0.2)
    p_flip: float = 0.5


def flip_table(num_classes: int) -> torch.Tensor:
    """(K,) int64: class after a horizontal flip, or -1 where a flip would change the meaning."""
    table = torch.full((num_classes,), -1, dtype=torch.int64)
    for a, b in _MIRROR_PAIRS:
        table[a], table[b] = b, a
    for c in _SYMMETRIC:
        table[c] = c
    if num_classes > BACKGROUND_CLASS:
        table[BACKGROUND_CLASS] = BACKGROUND_CLASS
    return table


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def _homographies(n: int, s: AugmentSettings, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n, 3, 3) maps from output to input normalised coordinates ([-1, 1])."""
    zoom = torch.exp(_uniform(n, math.log(s.scale[0]), math.log(s.scale[1]), g, device))
    angle = _uniform(n, -s.max_rotate_deg, s.max_rotate_deg, g, device) * (math.pi / 180)
    shear = _uniform(n, -s.max_shear, s.max_shear, g, device)
    aspect = torch.exp(_uniform(n, -0.1, 0.1, g, device))
    tx = _uniform(n, -s.max_translate, s.max_translate, g, device) * 2
    ty = _uniform(n, -s.max_translate, s.max_translate, g, device) * 2
    px = _uniform(n, -s.max_perspective, s.max_perspective, g, device)
    py = _uniform(n, -s.max_perspective, s.max_perspective, g, device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    m = torch.zeros(n, 3, 3, device=device)
    sx, sy = aspect / zoom, 1 / (aspect * zoom)
    m[:, 0, 0] = cos * sx
    m[:, 0, 1] = (-sin + shear * cos) * sy
    m[:, 1, 0] = sin * sx
    m[:, 1, 1] = (cos + shear * sin) * sy
    m[:, 0, 2] = tx
    m[:, 1, 2] = ty
    m[:, 2, 0] = px
    m[:, 2, 1] = py
    m[:, 2, 2] = 1
    return m


def _warp(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=x.device)
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=x.device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    base = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).reshape(1, h * w, 3)
    pts = base @ m.transpose(1, 2)
    grid = (pts[..., :2] / pts[..., 2:].clamp(min=1e-3)).reshape(n, h, w, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    radius = 3
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    k = k / k.sum(dim=1, keepdim=True)  # (n, 2r+1)
    kx = k.repeat_interleave(c, dim=0)[:, None, None, :]  # (n*c, 1, 1, K)
    ky = k.repeat_interleave(c, dim=0)[:, None, :, None]
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), kx, groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), ky, groups=n * c)
    return y.reshape(n, c, h, w)


def augment_batch(
    images: torch.Tensor, labels: torch.Tensor, s: AugmentSettings, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch.

    Args:
        images: (N, H, W, 3) uint8 RGB crops on the training device.
        labels: (N,) int64 class ids (background included).
        s: augmentation strengths.
        g: random generator on the same device, for reproducible runs.

    Returns:
        (N, 3, H, W) float32 in [0, 1] and the (N,) labels after flips.
    """
    device = images.device
    n, h, w, _ = images.shape
    x = images.permute(0, 3, 1, 2).float().div_(255)

    table = flip_table(int(max(BACKGROUND_CLASS + 1, int(labels.max()) + 1))).to(device)
    flippable = table[labels] >= 0
    flip = flippable & (torch.rand(n, generator=g, device=device) < s.p_flip)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    labels = torch.where(flip, table[labels], labels)

    x = _warp(x, _homographies(n, s, g, device))

    low = torch.rand(n, generator=g, device=device) < s.p_low_res
    if low.any():
        px = int(torch.randint(s.low_res_px[0], s.low_res_px[1] + 1, (1,), generator=g, device=device))
        small = F.interpolate(x[low], size=(px, px), mode="bilinear", antialias=True, align_corners=False)
        x[low] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)

    blur = torch.rand(n, generator=g, device=device) < s.p_blur
    if blur.any():
        sigma = _uniform(int(blur.sum()), *s.blur_sigma, g, device)
        x[blur] = _gaussian_blur(x[blur], sigma)

    # Photometric: gamma, brightness, contrast, saturation, per-channel gain (white balance), noise.
    gamma = torch.exp(_uniform(n, math.log(s.gamma[0]), math.log(s.gamma[1]), g, device))
    x = x.clamp(1e-4, 1) ** gamma[:, None, None, None]
    bright = torch.exp(_uniform(n, math.log(s.brightness[0]), math.log(s.brightness[1]), g, device))
    x = x * bright[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = _uniform(n, *s.contrast, g, device)[:, None, None, None]
    x = (x - mean) * contrast + mean
    gray = x.mean(dim=1, keepdim=True)
    sat = _uniform(n, *s.saturation, g, device)[:, None, None, None]
    x = (x - gray) * sat + gray
    gain = 1 + (torch.rand(n, 3, 1, 1, generator=g, device=device) * 2 - 1) * s.channel_gain
    x = x * gain
    x = x + torch.randn(x.shape, generator=g, device=device) * (
        torch.rand(n, 1, 1, 1, generator=g, device=device) * s.noise_std
    )

    occ = torch.rand(n, generator=g, device=device) < s.p_occlude
    if occ.any():
        area = _uniform(n, *s.occlude_area, g, device)
        ratio = torch.exp(_uniform(n, -1.0, 1.0, g, device))
        oh = (torch.sqrt(area * ratio) * h).clamp(1, h)
        ow = (torch.sqrt(area / ratio) * w).clamp(1, w)
        oy = torch.rand(n, generator=g, device=device) * (h - oh)
        ox = torch.rand(n, generator=g, device=device) * (w - ow)
        yy = torch.arange(h, device=device)[None, :, None]
        xx = torch.arange(w, device=device)[None, None, :]
        inside = (
            (yy >= oy[:, None, None])
            & (yy < (oy + oh)[:, None, None])
            & (xx >= ox[:, None, None])
            & (xx < (ox + ow)[:, None, None])
        ) & occ[:, None, None]
        fill = torch.rand(n, 3, 1, 1, generator=g, device=device).expand(-1, -1, h, w)
        x = torch.where(inside[:, None], fill, x)
    return x.clamp_(0, 1), labels
