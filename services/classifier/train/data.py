"""Training data for the sign classifier: GTSRB crops (by track) and not-a-sign crops from road scenes.

Everything is decoded once, resized with the serving path's own preprocessing
(:func:`services.classifier.preprocess.resize_crop`) and kept in memory as uint8 arrays, so the
network sees during training exactly the pixels it sees in production. No torch in this module.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from services.classifier.preprocess import resize_crop
from services.common.classes import NUM_SIGN_CLASSES
from services.common.errors import InputError

__all__ = [
    "BACKGROUND_CLASS",
    "CropSet",
    "SignSample",
    "build_crop_sets",
    "export_background_crops",
    "iter_scene_background",
    "data_sha256",
    "read_gtsdb_boxes",
    "sample_background_boxes",
    "scan_gtsrb",
    "split_tracks",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

BACKGROUND_CLASS = NUM_SIGN_CLASSES
"""Index of the not-a-sign class: one past the 43 sign classes."""


@dataclass(frozen=True, slots=True)
class SignSample:
    """One GTSRB crop: its file, class and the physical-sign track it belongs to."""

    path: Path
    class_id: int
    track: str  # "CC_TTTTT": class folder + track prefix; ~10 crops of one sign share it


@dataclass(frozen=True, slots=True)
class CropSet:
    """Crops ready for training: ``images`` (N, H, W, 3) uint8, ``labels`` (N,) int64, ``groups`` (N,) str."""

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @staticmethod
    def concat(parts: Sequence[CropSet]) -> CropSet:
        """Concatenate crop sets row-wise."""
        return CropSet(
            np.concatenate([p.images for p in parts]),
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.groups for p in parts]),
        )


def scan_gtsrb(root: Path) -> list[SignSample]:
    """Read the ``GT-000NN.csv`` files of a GTSRB training folder (``root/000NN/*.png``)."""
    if not root.is_dir():
        raise InputError(f"GTSRB data: expected a folder with 000NN/GT-000NN.csv, got {root} (not a folder)")
    samples: list[SignSample] = []
    for csv_path in sorted(root.glob("*/GT-*.csv")):
        with csv_path.open(newline="") as fh:
            for row in csv.DictReader(fh, delimiter=";"):
                class_id = int(row["ClassId"])
                if not 0 <= class_id < NUM_SIGN_CLASSES:
                    raise InputError(f"{csv_path}: expected ClassId 0..{NUM_SIGN_CLASSES - 1}, got {class_id}")
                name = row["Filename"]
                samples.append(SignSample(csv_path.parent / name, class_id, f"{class_id:02d}_{name.split('_')[0]}"))
    if not samples:
        raise InputError(f"GTSRB data: expected 000NN/GT-000NN.csv files under {root}, found none")
    return samples


def split_tracks(samples: Sequence[SignSample], val_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """Split track ids into (train, val), stratified by class, so no physical sign is in both."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[str]] = {}
    for s in samples:
        tracks = by_class.setdefault(s.class_id, [])
        if not tracks or tracks[-1] != s.track:
            tracks.append(s.track)
    train: set[str] = set()
    val: set[str] = set()
    for class_id in sorted(by_class):
        tracks = sorted(set(by_class[class_id]))
        rng.shuffle(tracks)
        n_val = max(1, round(len(tracks) * val_fraction))
        val.update(tracks[:n_val])
        train.update(tracks[n_val:])
    return train, val


def read_gtsdb_boxes(root: Path) -> tuple[list[Path], dict[str, np.ndarray]]:
    """Scene files of a GTSDB folder and their sign boxes: name -> (N, 4) float32 xyxy (exclusive corners)."""
    gt = root / "gt.txt"
    if not gt.is_file():
        raise InputError(f"GTSDB data: expected {gt} (lines 'name;x1;y1;x2;y2;class'), found nothing")
    boxes: dict[str, list[list[float]]] = {}
    for line_no, line in enumerate(gt.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(";")
        if len(parts) != 6:
            raise InputError(f"{gt}:{line_no}: expected 'name;x1;y1;x2;y2;class', got {line!r}")
        x1, y1, x2, y2 = (float(v) for v in parts[1:5])
        boxes.setdefault(parts[0], []).append([x1, y1, x2 + 1, y2 + 1])
    scenes = sorted(p for p in root.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".ppm"))
    if not scenes:
        raise InputError(f"GTSDB data: expected road scene images in {root}, found none")
    return scenes, {k: np.asarray(v, np.float32) for k, v in boxes.items()}


def sample_background_boxes(
    image: np.ndarray, signs_xyxy: np.ndarray, n: int, rng: np.random.Generator, min_px: int = 16, max_px: int = 128
) -> np.ndarray:
    """Sample ``n`` sign-sized boxes that do not touch any sign (boxes grown by 25 %) -> (n', 4) int xyxy.

    Half are uniform over the frame; half are centred on strongly coloured pixels (red, blue, yellow: tail
    lights, blue info boards, poles with reflectors), the false positives a sign detector actually makes.
    """
    h, w = image.shape[:2]
    if signs_xyxy.size:
        c = (signs_xyxy[:, :2] + signs_xyxy[:, 2:]) / 2
        half = (signs_xyxy[:, 2:] - signs_xyxy[:, :2]) * 0.625
        grown = np.concatenate([c - half, c + half], axis=1)
    else:
        grown = np.zeros((0, 4), np.float32)
    small = image[::8, ::8].astype(np.int16)
    sat = small.max(axis=2) - small.min(axis=2)
    weights = (sat.astype(np.float64) + 1.0) ** 3
    weights /= weights.sum()
    out: list[list[int]] = []
    for attempt in range(n * 20):
        if len(out) >= n:
            break
        size = int(np.exp(rng.uniform(np.log(min_px), np.log(max_px))))
        bw = int(size * rng.uniform(0.8, 1.25))
        if attempt % 2 == 0:
            cell = rng.choice(weights.size, p=weights.ravel())
            cy, cx = (cell // sat.shape[1]) * 8 + 4, (cell % sat.shape[1]) * 8 + 4
            x1, y1 = (
                int(cx - bw / 2 + rng.uniform(-bw / 4, bw / 4)),
                int(cy - size / 2 + rng.uniform(-size / 4, size / 4)),
            )
        else:
            x1, y1 = int(rng.integers(0, max(1, w - bw))), int(rng.integers(0, max(1, h - size)))
        x1, y1 = min(max(x1, 0), w - bw), min(max(y1, 0), h - size)
        box = np.array([x1, y1, x1 + bw, y1 + size], np.float32)
        if grown.size and np.any(
            (box[0] < grown[:, 2]) & (box[2] > grown[:, 0]) & (box[1] < grown[:, 3]) & (box[3] > grown[:, 1])
        ):
            continue
        out.append([int(v) for v in box])
    return np.asarray(out, np.int64).reshape(-1, 4)


def _load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _load_sign(sample: SignSample, hw: tuple[int, int]) -> np.ndarray:
    return resize_crop(_load_rgb(sample.path), hw)


def build_crop_sets(
    gtsrb_root: Path,
    background_roots: Sequence[Path],
    *,
    hw: tuple[int, int],
    val_fraction: float,
    background_per_scene: int,
    seed: int,
    threads: int = 4,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> tuple[CropSet, CropSet]:
    """Decode and resize all crops -> (train, val); signs split by track, background crops by source scene.

    Each background root is either a GTSDB folder (``gt.txt`` + scenes: sign-free boxes are sampled from the
    scenes) or a folder of not-a-sign crop images named ``<source>_<n>.<ext>`` (grouped by ``<source>``).
    """
    samples = scan_gtsrb(gtsrb_root)
    train_tracks, _ = split_tracks(samples, val_fraction, seed)
    with ThreadPoolExecutor(threads) as pool:
        images = list(_progress(pool.map(lambda s: _load_sign(s, hw), samples), "signs", len(samples), on_progress))
    is_train = np.array([s.track in train_tracks for s in samples])
    signs = CropSet(
        np.stack(images),
        np.array([s.class_id for s in samples], np.int64),
        np.array([s.track for s in samples]),
    )
    parts_train = [_take(signs, is_train)]
    parts_val = [_take(signs, ~is_train)]
    for root in background_roots:
        if (root / "gt.txt").is_file():
            crops = list(iter_scene_background(root, background_per_scene, seed, threads, on_progress))
        else:
            crops = list(_iter_crop_folder(root, threads, on_progress))
        if not crops:
            raise InputError(f"background data: expected crops or a GTSDB folder at {root}, found no images")
        groups = np.array([g for g, _ in crops])
        images_bg = np.stack([resize_crop(c, hw) for _, c in crops])
        unique = np.unique(groups)
        val_groups = set(unique[np.random.default_rng(seed).random(len(unique)) < val_fraction])
        is_val = np.array([g in val_groups for g in groups])
        bg = CropSet(images_bg, np.full(len(groups), BACKGROUND_CLASS, np.int64), groups)
        parts_train.append(_take(bg, ~is_val))
        parts_val.append(_take(bg, is_val))
    train, val = CropSet.concat(parts_train), CropSet.concat(parts_val)
    log.info("crop sets: %d train, %d val (background class %d)", len(train), len(val), BACKGROUND_CLASS)
    return train, val


def iter_scene_background(
    gtsdb_root: Path,
    per_scene: int,
    seed: int,
    threads: int = 4,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> Iterable[tuple[str, np.ndarray]]:
    """Yield (scene group, crop (h, w, 3) uint8) for sign-free boxes sampled from every GTSDB scene."""
    scenes, boxes = read_gtsdb_boxes(gtsdb_root)
    scene_seeds = np.random.default_rng(seed).integers(0, 2**31, len(scenes))

    def crops_of(i: int) -> list[np.ndarray]:
        image = _load_rgb(scenes[i])
        xyxy = sample_background_boxes(
            image,
            boxes.get(scenes[i].name, np.zeros((0, 4), np.float32)),
            per_scene,
            np.random.default_rng(scene_seeds[i]),
        )
        return [image[y1:y2, x1:x2] for x1, y1, x2, y2 in xyxy]

    with ThreadPoolExecutor(threads) as pool:
        for i, crops in enumerate(
            _progress(pool.map(crops_of, range(len(scenes))), "background", len(scenes), on_progress)
        ):
            for crop in crops:
                yield f"scene_{scenes[i].stem}", crop


def export_background_crops(gtsdb_root: Path, out_dir: Path, per_scene: int, seed: int) -> int:
    """Write sampled sign-free crops as ``<scene>_<n>.png`` (lossless) into ``out_dir``; return the count."""
    out_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    for n, (group, crop) in enumerate(iter_scene_background(gtsdb_root, per_scene, seed)):
        Image.fromarray(crop).save(out_dir / f"{group}_{n:06d}.png")
        count += 1
    return count


def _iter_crop_folder(
    root: Path, threads: int, on_progress: Callable[[str, int, int], None] | None
) -> Iterable[tuple[str, np.ndarray]]:
    if not root.is_dir():
        raise InputError(f"background data: expected a folder, got {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".ppm"))
    with ThreadPoolExecutor(threads) as pool:
        for path, crop in zip(
            files, _progress(pool.map(_load_rgb, files), "background", len(files), on_progress), strict=True
        ):
            yield f"{path.parent.name}/{path.stem.rsplit('_', 1)[0]}", crop


def data_sha256(roots: Iterable[Path | None]) -> str:
    """sha256 over every file (relative path and bytes) under the given data folders, in sorted order."""
    digest = hashlib.sha256()
    for root in roots:
        if root is None:
            continue
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _take(crops: CropSet, mask: np.ndarray) -> CropSet:
    return CropSet(crops.images[mask], crops.labels[mask], crops.groups[mask])


def _progress(
    items: Iterable[_T], stage: str, total: int, on_progress: Callable[[str, int, int], None] | None
) -> Iterable[_T]:
    for done, item in enumerate(items, 1):
        if on_progress is not None:
            on_progress(stage, done, total)
        yield item
