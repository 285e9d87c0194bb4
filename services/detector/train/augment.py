"""Training crops for the detector: scale, crop, copy-paste of real sign crops, flip and photometric jitter (torch).

Each training sample is a fixed-size crop of a scene, rescaled so that signs appear at the size they have in the
letterboxed network input, times a random factor. Most crops are placed around a labelled sign, the rest anywhere.
Copy-paste adds real GTSRB sign crops where signs actually stand (positions and sizes drawn from the labelled
boxes), brightness-matched to their new surroundings and feathered into the scene over the GTSRB margin, so that
the detector sees many more signs than GTSDB's 852 without learning paste edges. Geometry is decided with a numpy
generator and is cheap; pixel work is done with torch ops on whole crops, then photometric jitter runs batched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from services.detector.train.data import SceneSet, SignPatches, letterbox_scale

__all__ = ["AugmentSettings", "CropBatch", "CropSampler", "photometric"]


@dataclass(frozen=True, slots=True)
class AugmentSettings:
    """Strength of each augmentation; probabilities are per crop."""

    scale: tuple[float, float] = (0.6, 1.5)  # zoom relative to the letterbox scale of the scene
    p_around_sign: float = 0.7  # crop placed so that a labelled sign is inside it
    p_paste: float = 0.6
    max_pastes: int = 4
    paste_size_jitter: tuple[float, float] = (0.8, 1.25)
    p_paste_where_signs_are: float = 0.8  # else anywhere in the crop
    paste_match_strength: tuple[float, float] = (0.3, 0.8)  # exponent of the local/patch brightness ratio
    p_paste_blur: float = 0.3
    min_box_px: float = 8.0  # boxes with a shorter side below this (crop pixels) are ignored, not targets
    min_visible: float = 0.6  # boxes cut by the crop edge keep this share of their area, else are ignored
    p_flip: float = 0.5
    brightness: tuple[float, float] = (0.6, 1.5)
    contrast: tuple[float, float] = (0.7, 1.4)
    saturation: tuple[float, float] = (0.6, 1.4)
    gamma: tuple[float, float] = (0.75, 1.35)
    channel_gain: float = 0.06
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    noise_std: float = 0.02


@dataclass(frozen=True, slots=True)
class CropBatch:
    """A batch of training crops.

    Attributes:
        images: (B, 3, H, W) float32 RGB in [0, 1].
        boxes: per crop, (N, 4) float32 ``xyxy`` crop pixels of the signs to detect.
        ignore: per crop, (M, 4) float32 ``xyxy`` of signs too small or too cut off to count either way.
        pasted: number of pasted signs in the batch.
    """

    images: torch.Tensor
    boxes: list[np.ndarray]
    ignore: list[np.ndarray]
    pasted: int


def _overlaps(box: np.ndarray, others: Sequence[np.ndarray], grow: float = 1.3) -> bool:
    """Whether ``box`` grown by ``grow`` (about its center) touches any of ``others`` ((N, 4) arrays)."""
    c = (box[:2] + box[2:]) / 2
    half = (box[2:] - box[:2]) * grow / 2
    lo, hi = c - half, c + half
    every = np.concatenate([np.zeros((0, 4), np.float32), *others])
    return bool(np.any((lo[0] < every[:, 2]) & (hi[0] > every[:, 0]) & (lo[1] < every[:, 3]) & (hi[1] > every[:, 1])))


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of (N, C, H, W) with its own sigma (N,), separable 7-tap kernel, edges replicated."""
    n, c, h, w = x.shape
    radius = 3
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    k = k / k.sum(dim=1, keepdim=True)
    kx = k.repeat_interleave(c, dim=0)[:, None, None, :]
    ky = k.repeat_interleave(c, dim=0)[:, None, :, None]
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), kx, groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), ky, groups=n * c)
    return y.reshape(n, c, h, w)


def _resize(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) float -> (C, H, W), bilinear, antialiased when shrinking (as Pillow's bilinear filter)."""
    if tuple(x.shape[-2:]) == hw:
        return x
    shrink = hw[0] < x.shape[-2] or hw[1] < x.shape[-1]
    return F.interpolate(x[None], size=hw, mode="bilinear", antialias=shrink, align_corners=False)[0]


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def photometric(x: torch.Tensor, s: AugmentSettings, g: torch.Generator) -> torch.Tensor:
    """Batched gamma, brightness, contrast, saturation, white balance, blur and noise on (B, 3, H, W) in [0, 1]."""
    n = x.shape[0]
    gamma = torch.exp(_uniform(n, math.log(s.gamma[0]), math.log(s.gamma[1]), g))
    x = x.clamp(1e-4, 1) ** gamma[:, None, None, None]
    bright = torch.exp(_uniform(n, math.log(s.brightness[0]), math.log(s.brightness[1]), g))
    x = x * bright[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * _uniform(n, *s.contrast, g)[:, None, None, None] + mean
    gray = x.mean(dim=1, keepdim=True)
    x = (x - gray) * _uniform(n, *s.saturation, g)[:, None, None, None] + gray
    x = x * (1 + (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1) * s.channel_gain)
    blur = torch.rand(n, generator=g) < s.p_blur
    if blur.any():
        x[blur] = _gaussian_blur(x[blur], _uniform(int(blur.sum()), *s.blur_sigma, g))
    x = x + torch.randn(x.shape, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) * s.noise_std)
    return x.clamp_(0, 1)


class CropSampler:
    """Draws augmented training crops from in-memory scenes (CPU tensors).

    Args:
        scenes: training scenes (never the validation ones).
        patches: sign crops to paste, or None for no copy-paste.
        input_hw: the network's inference input (H, W): sets each scene's base (letterbox) scale.
        crop_hw: training crop (H, W), multiples of 32.
        fill: RGB in [0, 1] for pixels outside the scene (the normalisation mean: 0 after normalising).
        settings: augmentation strengths.
        seed: seeds both generators.
    """

    def __init__(
        self,
        scenes: SceneSet,
        patches: SignPatches | None,
        *,
        input_hw: tuple[int, int],
        crop_hw: tuple[int, int],
        fill: Sequence[float],
        settings: AugmentSettings,
        seed: int,
    ) -> None:
        self.scenes = scenes
        self.images = [torch.from_numpy(im) for im in scenes.images]
        self.patches = patches
        self.crop_hw = crop_hw
        self.fill = torch.tensor(list(fill), dtype=torch.float32)[:, None, None]
        self.s = settings
        self.rng = np.random.default_rng(seed)
        self.g = torch.Generator().manual_seed(seed)
        self.base_scale = np.array([letterbox_scale(im.shape[:2], input_hw) for im in scenes.images])
        # Where signs stand and how big they are: (cx / W, cy / H, w, h) in scene pixels, for copy-paste.
        rows = []
        for im, xyxy in zip(scenes.images, scenes.boxes, strict=True):
            h, w = im.shape[:2]
            for x1, y1, x2, y2 in xyxy:
                rows.append(((x1 + x2) / 2 / w, (y1 + y2) / 2 / h, x2 - x1, y2 - y1))
        self.sign_stats = np.asarray(rows, np.float64).reshape(-1, 4)

    def sample(self, indices: Sequence[int]) -> CropBatch:
        """One augmented crop of each scene in ``indices``."""
        images, boxes, ignores = [], [], []
        pasted = 0
        for i in indices:
            image, xyxy, ignore, n = self._crop(int(i))
            images.append(image)
            boxes.append(xyxy)
            ignores.append(ignore)
            pasted += n
        x = photometric(torch.stack(images), self.s, self.g)
        return CropBatch(x, boxes, ignores, pasted)

    def _crop(self, i: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray, int]:
        s, rng = self.s, self.rng
        image = self.images[i]
        img_h, img_w = image.shape[:2]
        crop_h, crop_w = self.crop_hw
        scale = self.base_scale[i] * math.exp(rng.uniform(math.log(s.scale[0]), math.log(s.scale[1])))
        win_w, win_h = crop_w / scale, crop_h / scale
        gt = self.scenes.boxes[i]
        if len(gt) and rng.random() < s.p_around_sign:
            b = gt[rng.integers(len(gt))]
            x0 = self._window_start(float(b[2]) - win_w, float(b[0]), img_w, win_w)
            y0 = self._window_start(float(b[3]) - win_h, float(b[1]), img_h, win_h)
        else:
            x0 = self._window_start(0, img_w - win_w, img_w, win_w)
            y0 = self._window_start(0, img_h - win_h, img_h, win_h)

        canvas = self.fill.expand(3, crop_h, crop_w).clone()
        # The integer pixel region the window covers, resized onto the part of the canvas it maps to.
        rx0, ry0 = max(0, math.ceil(x0)), max(0, math.ceil(y0))
        rx1, ry1 = min(img_w, max(rx0 + 1, math.floor(x0 + win_w))), min(img_h, max(ry0 + 1, math.floor(y0 + win_h)))
        ox, oy = min(crop_w - 1, round((rx0 - x0) * scale)), min(crop_h - 1, round((ry0 - y0) * scale))
        out_w = max(1, min(crop_w - ox, round((rx1 - rx0) * scale)))
        out_h = max(1, min(crop_h - oy, round((ry1 - ry0) * scale)))
        # uint8 HWC viewed as channels-last NCHW: torch's fast uint8 (antialiased) bilinear path, then one float pass.
        region = image[ry0:ry1, rx0:rx1].permute(2, 0, 1)[None]
        if (out_h, out_w) != (ry1 - ry0, rx1 - rx0):
            shrink = out_h < ry1 - ry0 or out_w < rx1 - rx0
            region = F.interpolate(region, size=(out_h, out_w), mode="bilinear", antialias=shrink, align_corners=False)
        canvas[:, oy : oy + out_h, ox : ox + out_w] = region[0].float().div_(255)
        sx, sy = out_w / (rx1 - rx0), out_h / (ry1 - ry0)

        mapped = np.stack(
            [
                (gt[:, 0] - rx0) * sx + ox,
                (gt[:, 1] - ry0) * sy + oy,
                (gt[:, 2] - rx0) * sx + ox,
                (gt[:, 3] - ry0) * sy + oy,
            ],
            axis=1,
        ).astype(np.float32)
        clipped = mapped.copy()
        clipped[:, 0::2] = clipped[:, 0::2].clip(0, crop_w)
        clipped[:, 1::2] = clipped[:, 1::2].clip(0, crop_h)
        area = np.prod(mapped[:, 2:] - mapped[:, :2], axis=1)
        visible = np.prod(np.clip(clipped[:, 2:] - clipped[:, :2], 0, None), axis=1)
        short = np.min(clipped[:, 2:] - clipped[:, :2], axis=1)
        keep = (visible >= s.min_visible * np.maximum(area, 1e-6)) & (short >= s.min_box_px)
        boxes = clipped[keep]
        ignore = clipped[~keep & (visible > 0)]

        n_pasted = 0
        if self.patches is not None and len(self.sign_stats) and rng.random() < s.p_paste:
            pasted: list[np.ndarray] = []
            for _ in range(int(rng.integers(1, s.max_pastes + 1))):
                box = self._paste(self.patches, canvas, scale, (x0, y0), (img_w, img_h), [boxes, ignore, *pasted])
                if box is not None:
                    pasted.append(box[None])
            if pasted:
                boxes = np.concatenate([boxes, *pasted]).astype(np.float32)
                n_pasted = len(pasted)

        if rng.random() < s.p_flip:
            canvas = canvas.flip(-1)
            boxes = np.stack([crop_w - boxes[:, 2], boxes[:, 1], crop_w - boxes[:, 0], boxes[:, 3]], axis=1)
            ignore = np.stack([crop_w - ignore[:, 2], ignore[:, 1], crop_w - ignore[:, 0], ignore[:, 3]], axis=1)
        return canvas, boxes.astype(np.float32).reshape(-1, 4), ignore.astype(np.float32).reshape(-1, 4), n_pasted

    def _window_start(self, lo: float, hi: float, size: float, window: float) -> float:
        """A window start drawn in [lo, hi], kept inside the scene when the scene is larger than the window."""
        if window <= size:
            lo, hi = max(0.0, lo), min(size - window, hi)
            if hi < lo:  # a sign larger than the window: keep the window inside the scene
                lo = hi = min(lo, size - window)
        else:  # a scene smaller than the window lies anywhere inside it
            lo, hi = size - window, 0.0
        return float(self.rng.uniform(lo, hi)) if hi > lo else lo

    def _paste(
        self,
        patches: SignPatches,
        canvas: torch.Tensor,
        scale: float,
        origin: tuple[float, float],
        scene_wh: tuple[int, int],
        avoid: list[np.ndarray],
    ) -> np.ndarray | None:
        """Paste one sign crop into ``canvas`` (3, H, W) in place; return its box, or None if no place was found."""
        s, rng = self.s, self.rng
        crop_h, crop_w = canvas.shape[1:]
        k = int(rng.integers(len(patches)))
        patch, roi = patches.crops[k], patches.roi[k]
        roi_w, roi_h = float(roi[2] - roi[0]), float(roi[3] - roi[1])
        for _ in range(10):
            cx_n, cy_n, gw, gh = self.sign_stats[rng.integers(len(self.sign_stats))]
            size = max(gw, gh) * scale * rng.uniform(*s.paste_size_jitter)
            fx = size / max(roi_w, roi_h) * rng.uniform(0.92, 1.08)
            fy = size / max(roi_w, roi_h) * rng.uniform(0.92, 1.08)
            bw, bh = roi_w * fx, roi_h * fy
            if rng.random() < s.p_paste_where_signs_are:
                cx = (cx_n * scene_wh[0] + rng.normal(0, 0.05 * scene_wh[0]) - origin[0]) * scale
                cy = (cy_n * scene_wh[1] + rng.normal(0, 0.03 * scene_wh[1]) - origin[1]) * scale
            else:
                cx, cy = rng.uniform(0, crop_w), rng.uniform(0, crop_h)
            box = np.array([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], np.float32)
            if box[0] < 0 or box[1] < 0 or box[2] > crop_w or box[3] > crop_h or min(bw, bh) < s.min_box_px:
                continue
            if _overlaps(box, avoid):
                continue
            break
        else:
            return None

        ph, pw = patch.shape[:2]
        # Alpha: 1 over the sign, falling linearly to 0 at the crop edge across GTSRB's margin (real surroundings).
        ax = torch.ones(pw)
        ay = torch.ones(ph)
        xs, ys = torch.arange(pw) + 0.5, torch.arange(ph) + 0.5
        if roi[0] > 0:
            ax = torch.minimum(ax, xs / float(roi[0]))
        if roi[2] < pw:
            ax = torch.minimum(ax, (pw - xs) / float(pw - roi[2]))
        if roi[1] > 0:
            ay = torch.minimum(ay, ys / float(roi[1]))
        if roi[3] < ph:
            ay = torch.minimum(ay, (ph - ys) / float(ph - roi[3]))
        rgba = torch.cat(
            [torch.from_numpy(patch).permute(2, 0, 1).float().div_(255), (ay[:, None] * ax[None, :])[None]]
        )
        out_h, out_w = max(1, round(ph * fy)), max(1, round(pw * fx))
        rgba = _resize(rgba, (out_h, out_w))
        if rng.random() < s.p_paste_blur:
            rgba[:3] = _gaussian_blur(rgba[None, :3], torch.tensor([rng.uniform(0.4, 1.0)], dtype=torch.float32))[0]
        px0, py0 = round(float(box[0]) - roi[0] * fx), round(float(box[1]) - roi[1] * fy)
        cx0, cy0 = max(0, px0), max(0, py0)
        cx1, cy1 = min(crop_w, px0 + out_w), min(crop_h, py0 + out_h)
        if cx1 <= cx0 or cy1 <= cy0:
            return None
        piece = rgba[:, cy0 - py0 : cy1 - py0, cx0 - px0 : cx1 - px0]
        target = canvas[:, cy0:cy1, cx0:cx1]
        # Match the sign's brightness part of the way to its new surroundings (a box twice its size).
        gx0, gy0 = max(0, int(box[0] - bw / 2)), max(0, int(box[1] - bh / 2))
        gx1, gy1 = min(crop_w, int(box[2] + bw / 2) + 1), min(crop_h, int(box[3] + bh / 2) + 1)
        local = float(canvas[:, gy0:gy1, gx0:gx1].mean())
        own = float(piece[:3].mean()) + 1e-3
        gain = min(2.0, max(0.5, ((local + 1e-3) / own) ** rng.uniform(*s.paste_match_strength)))
        alpha = piece[3:4]
        canvas[:, cy0:cy1, cx0:cx1] = alpha * (piece[:3] * gain).clamp(0, 1) + (1 - alpha) * target
        return box
