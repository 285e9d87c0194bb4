"""Building the classifier's frozen manifest, and training crops that leave every frozen file out.

:func:`build_classifier_manifest` reproduces the validation split a model was trained with (same split function,
fraction and seed as its card's training settings): the GTSRB validation tracks and the GTSDB scenes whose
not-a-sign boxes were its validation background, with the exact boxes sampled. So the committed model was never
trained on its frozen set.

:func:`load_training_crops` reads any number of training sources (GTSRB-layout folders, ``roadlabel dataset
build`` output folders with ``classification/``, background folders) into one :class:`CropSet`, leaving out
every frozen file (by path in a folder of the frozen source, and by sha256 anywhere) together with the rest of its
track. Group ids are prefixed by source, so reviewed tracks never collide with GTSRB track ids. No torch here.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from services.classifier.frozen import FrozenManifest, save_manifest
from services.classifier.preprocess import resize_crop
from services.classifier.train.data import (
    BACKGROUND_CLASS,
    CropSet,
    read_gtsdb_boxes,
    sample_background_boxes,
    scan_gtsrb,
    split_tracks,
)
from services.common.errors import InputError

__all__ = ["Excluded", "TrainingSources", "build_classifier_manifest", "load_training_crops", "resolve_sources"]

log = logging.getLogger(__name__)
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".ppm")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _scene_boxes(gtsdb_root: Path, per_scene: int, seed: int) -> Iterator[tuple[Path, np.ndarray, np.ndarray]]:
    """(scene, image, boxes): the not-a-sign boxes ``data.iter_scene_background`` samples, scene by scene."""
    scenes, boxes = read_gtsdb_boxes(gtsdb_root)
    scene_seeds = np.random.default_rng(seed).integers(0, 2**31, len(scenes))
    for i, scene in enumerate(scenes):
        image = _load_rgb(scene)
        xyxy = sample_background_boxes(
            image, boxes.get(scene.name, np.zeros((0, 4), np.float32)), per_scene, np.random.default_rng(scene_seeds[i])
        )
        yield scene, image, xyxy


def build_classifier_manifest(
    out: Path,
    gtsrb_root: Path,
    gtsdb_root: Path,
    *,
    val_fraction: float,
    seed: int,
    background_per_scene: int,
    model_version: str | None = None,
) -> FrozenManifest:
    """Write the frozen manifest of the validation split trained with these settings (see the module doc)."""
    samples = scan_gtsrb(gtsrb_root)
    _, val_tracks = split_tracks(samples, val_fraction, seed)
    tracks: dict[str, dict[str, object]] = {}
    for s in samples:
        if s.track in val_tracks:
            entry = tracks.setdefault(s.track, {"track": s.track, "class_id": s.class_id, "files": []})
            files = entry["files"]
            assert isinstance(files, list)
            files.append([s.path.relative_to(gtsrb_root).as_posix(), _sha(s.path)])
    # As build_crop_sets: groups are the scenes that gave at least one box, val drawn over their sorted names.
    per_scene = [(p, b) for p, _, b in _scene_boxes(gtsdb_root, background_per_scene, seed) if len(b)]
    groups = np.array([f"scene_{p.stem}" for p, _ in per_scene])
    unique = np.unique(groups)
    val_groups = set(unique[np.random.default_rng(seed).random(len(unique)) < val_fraction].tolist())
    scenes = [
        {"file": p.relative_to(gtsdb_root).as_posix(), "sha256": _sha(p), "boxes": b.tolist()}
        for p, b in per_scene
        if f"scene_{p.stem}" in val_groups
    ]
    body = {
        "task": "classifier",
        "description": "GTSRB validation tracks and GTSDB not-a-sign validation boxes of the committed classifier's "
        "own split; never train on these",
        "gtsrb_dir": gtsrb_root.name,
        "gtsdb_dir": gtsdb_root.name,
        "split": {
            "function": "services.classifier.train.data.split_tracks / build_crop_sets",
            "val_fraction": val_fraction,
            "seed": seed,
            "background_per_scene": background_per_scene,
            "model_version": model_version,
        },
        "tracks": sorted(tracks.values(), key=lambda t: str(t["track"])),
        "scenes": scenes,
    }
    return save_manifest(out, body)


@dataclass(frozen=True, slots=True)
class TrainingSources:
    """Where the training crops come from: GTSRB-layout sign folders and background folders."""

    signs: tuple[Path, ...]
    background: tuple[Path, ...]


def resolve_sources(data: Sequence[Path], background: Sequence[Path]) -> TrainingSources:
    """``--data`` folders -> sign and background folders.

    A folder with ``classification/`` (the output of ``roadlabel dataset build``) gives its ``classification``
    folder as a sign source and ``classification/background`` as a background source; any other folder must be
    in the GTSRB layout (``000NN/GT-000NN.csv``).
    """
    signs: list[Path] = []
    bg: list[Path] = list(background)
    for root in data:
        if not root.is_dir():
            raise InputError(f"--data: expected a folder (GTSRB layout, or a dataset with classification/), got {root}")
        cls = root / "classification"
        if cls.is_dir():
            signs.append(cls)
            if (cls / "background").is_dir():
                bg.append(cls / "background")
        elif any(root.glob("*/GT-*.csv")):
            signs.append(root)
        else:
            raise InputError(
                f"--data {root}: expected 000NN/GT-000NN.csv files (GTSRB layout) or a classification/ folder, "
                "found neither"
            )
    return TrainingSources(tuple(signs), tuple(bg))


@dataclass(frozen=True, slots=True)
class Excluded:
    """What was left out of training because of the frozen set."""

    sign_crops: int
    tracks: int
    background_crops: int


def load_training_crops(
    sources: TrainingSources,
    frozen: FrozenManifest,
    *,
    hw: tuple[int, int],
    background_per_scene: int,
    seed: int,
    threads: int = 4,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> tuple[CropSet, Excluded]:
    """All training crops of ``sources`` except the frozen ones (see the module doc) -> (crops, what was excluded)."""
    frozen_sha = frozen.file_hashes()
    frozen_paths = frozen.gtsrb_paths()
    frozen_scenes = frozen.scene_names()
    gtsrb_name = str(frozen.body["gtsrb_dir"])
    gtsdb_name = str(frozen.body["gtsdb_dir"])
    parts: list[CropSet] = []
    excluded_crops = excluded_bg = 0
    excluded_tracks: set[str] = set()
    for n, root in enumerate(sources.signs):
        samples = scan_gtsrb(root)
        prefix = root.name if root.name == gtsrb_name else f"{root.parent.name}/{root.name}#{n}"
        with ThreadPoolExecutor(threads) as pool:
            hashes = list(pool.map(lambda s: _sha(s.path), samples))
        bad_tracks = {
            s.track
            for s, h in zip(samples, hashes, strict=True)
            if h in frozen_sha or (root.name == gtsrb_name and s.path.relative_to(root).as_posix() in frozen_paths)
        }
        keep = [s for s in samples if s.track not in bad_tracks]
        excluded_crops += len(samples) - len(keep)
        excluded_tracks |= {f"{prefix}:{t}" for t in bad_tracks}
        if not keep:
            continue
        with ThreadPoolExecutor(threads) as pool:
            images = list(pool.map(lambda s: resize_crop(_load_rgb(s.path), hw), keep))
        for i in range(len(keep)):
            if on_progress is not None:
                on_progress(f"signs {root.name}", i + 1, len(keep))
        parts.append(
            CropSet(
                np.stack(images),
                np.array([s.class_id for s in keep], np.int64),
                np.array([f"{prefix}:{s.track}" for s in keep]),
            )
        )
    for root in sources.background:
        crops: list[tuple[str, np.ndarray]] = []
        if (root / "gt.txt").is_file():
            for i, (scene, image, boxes) in enumerate(_scene_boxes(root, background_per_scene, seed)):
                if on_progress is not None:
                    on_progress(f"background {root.name}", i + 1, 0)
                rel = scene.relative_to(root).as_posix()
                if _sha(scene) in frozen_sha or (root.name == gtsdb_name and rel in frozen_scenes):
                    excluded_bg += len(boxes)
                    continue
                crops += [(f"{root.name}:scene_{scene.stem}", image[y1:y2, x1:x2]) for x1, y1, x2, y2 in boxes]
        else:
            files = sorted(p for p in root.rglob("*") if p.suffix.lower() in _IMAGE_EXT)
            for path in files:
                if _sha(path) in frozen_sha:
                    excluded_bg += 1
                    continue
                crops.append((f"{root.name}:{path.parent.name}/{path.stem.rsplit('_', 1)[0]}", _load_rgb(path)))
        if crops:
            parts.append(
                CropSet(
                    np.stack([resize_crop(c, hw) for _, c in crops]),
                    np.full(len(crops), BACKGROUND_CLASS, np.int64),
                    np.array([g for g, _ in crops]),
                )
            )
    if not parts:
        raise InputError("training data: expected crops outside the frozen set, found none")
    crop_set = CropSet.concat(parts)
    excluded = Excluded(excluded_crops, len(excluded_tracks), excluded_bg)
    log.info("training crops: %d, excluded as frozen: %s", len(crop_set), excluded)
    return crop_set, excluded
