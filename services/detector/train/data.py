"""Training data for the sign detector: GTSDB road scenes with their boxes, GTSRB sign crops for copy-paste.

Everything is decoded once and kept in memory as uint8 arrays (600 GTSDB scenes are ~2 GB). Boxes are float32
``xyxy`` in pixels with exclusive far corners: GTSDB's inclusive ``x2`` becomes ``x2 + 1``. The letterbox
preprocessing the network is fed with also lives here, so that validation sees the pixels serving sees. No torch.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from services.common.errors import InputError
from services.common.images import load_image

__all__ = [
    "SceneSet",
    "SignPatches",
    "data_sha256",
    "gtsdb_folder",
    "letterbox",
    "letterbox_scale",
    "load_gtsrb_patches",
    "load_scenes",
    "pad_colour",
    "read_gtsdb",
    "split_scenes",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

_SCENE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm")
_GT_FORMAT = "'name;x1;y1;x2;y2;class' (inclusive pixel corners)"


@dataclass(frozen=True, slots=True)
class SceneSet:
    """Road scenes and their sign boxes. Row i of each list is the same scene.

    Attributes:
        names: file names, e.g. ``"00012.jpg"``.
        images: (H, W, 3) uint8 RGB scenes.
        boxes: (N, 4) float32 ``xyxy`` sign boxes in scene pixels, exclusive far corners; N may be 0.
    """

    names: tuple[str, ...]
    images: tuple[np.ndarray, ...]
    boxes: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, names: Iterable[str]) -> SceneSet:
        """The scenes named, in the order given."""
        index = {n: i for i, n in enumerate(self.names)}
        rows = [index[n] for n in names]
        return SceneSet(
            tuple(self.names[i] for i in rows), tuple(self.images[i] for i in rows), tuple(self.boxes[i] for i in rows)
        )

    @property
    def num_boxes(self) -> int:
        """Total number of sign boxes."""
        return sum(len(b) for b in self.boxes)


@dataclass(frozen=True, slots=True)
class SignPatches:
    """Sign crops for copy-paste: each crop with the sign's box (ROI) inside it.

    Attributes:
        crops: (h, w, 3) uint8 RGB crops; the sign plus a margin of its real surroundings.
        roi: (N, 4) int32 ``xyxy`` of the sign inside each crop, exclusive far corners.
    """

    crops: tuple[np.ndarray, ...]
    roi: np.ndarray

    def __len__(self) -> int:
        return len(self.crops)


def gtsdb_folder(data: Path) -> Path:
    """The GTSDB folder (``gt.txt`` beside the scenes) that ``--data`` names: the folder itself, or inside a
    ``roadlabel dataset build`` folder its ``detection/images/``."""
    built = data / "detection" / "images"
    return built if (built / "gt.txt").is_file() else data


def read_gtsdb(root: Path) -> tuple[list[Path], dict[str, np.ndarray]]:
    """Scene files of a GTSDB folder and their boxes from ``gt.txt``.

    Args:
        root: folder with ``gt.txt`` and the scene images it names.

    Returns:
        Scene paths sorted by name (scenes without a sign included), and name -> (N, 4) float32 ``xyxy`` with
        exclusive far corners, for the scenes that have boxes.

    Raises:
        InputError: no folder, no ``gt.txt``, a malformed line, an empty box, or a line naming a missing scene.
    """
    if not root.is_dir():
        raise InputError(f"GTSDB data: expected a folder with gt.txt and scene images, got {root} (not a folder)")
    gt = root / "gt.txt"
    if not gt.is_file():
        raise InputError(f"GTSDB data: expected {gt} with lines {_GT_FORMAT}, found no such file")
    scenes = sorted(p for p in root.iterdir() if p.suffix.lower() in _SCENE_SUFFIXES and p.is_file())
    if not scenes:
        raise InputError(f"GTSDB data: expected scene images ({'/'.join(_SCENE_SUFFIXES)}) in {root}, found none")
    names = {p.name for p in scenes}
    boxes: dict[str, list[list[float]]] = {}
    for line_no, line in enumerate(gt.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(";")
        try:
            if len(parts) != 6:
                raise ValueError
            x1, y1, x2, y2 = (float(v) for v in parts[1:5])
            int(parts[5])
        except ValueError:
            raise InputError(f"{gt}:{line_no}: expected {_GT_FORMAT}, got {line!r}") from None
        if not (0 <= x1 <= x2 and 0 <= y1 <= y2):
            raise InputError(f"{gt}:{line_no}: expected 0 <= x1 <= x2 and 0 <= y1 <= y2, got {line!r}")
        if parts[0] not in names:
            raise InputError(f"{gt}:{line_no}: expected scene {parts[0]!r} in {root}, found no such image")
        boxes.setdefault(parts[0], []).append([x1, y1, x2 + 1, y2 + 1])
    return scenes, {k: np.asarray(v, np.float32).reshape(-1, 4) for k, v in boxes.items()}


def load_scenes(
    root: Path, *, threads: int = 2, on_progress: Callable[[str, int, int], None] | None = None
) -> SceneSet:
    """Decode every scene of a GTSDB folder into memory, with its boxes.

    Raises:
        InputError: as :func:`read_gtsdb`, an unreadable scene, or a box outside its scene.
    """
    paths, boxes = read_gtsdb(root)
    with ThreadPoolExecutor(threads) as pool:
        images = list(_progress(pool.map(_load_writable, paths), "scenes", len(paths), on_progress))
    scene_boxes = []
    for path, image in zip(paths, images, strict=True):
        xyxy = boxes.get(path.name, np.zeros((0, 4), np.float32))
        h, w = image.shape[:2]
        outside = (xyxy[:, 2] > w) | (xyxy[:, 3] > h)
        if outside.any():
            raise InputError(
                f"{root / 'gt.txt'}: expected boxes inside {path.name} ({w}x{h}), got xyxy "
                f"{xyxy[outside][0].tolist()} (exclusive corners)"
            )
        scene_boxes.append(xyxy)
    scenes = SceneSet(tuple(p.name for p in paths), tuple(images), tuple(scene_boxes))
    log.info("loaded %d scenes with %d boxes from %s", len(scenes), scenes.num_boxes, root)
    return scenes


def split_scenes(scenes: SceneSet, val_count: int, seed: int) -> tuple[list[str], list[str]]:
    """Split scene names into (train, val), whole images, seeded.

    Scenes with and without signs are drawn in proportion, so the validation split has sign-free scenes too.
    Both lists are sorted.

    Raises:
        InputError: ``val_count`` leaves no training scene.
    """
    if not 0 < val_count < len(scenes):
        raise InputError(f"validation split: expected 0 < val images < {len(scenes)} scenes, got {val_count}")
    rng = np.random.default_rng(seed)
    with_signs = sorted(n for n, b in zip(scenes.names, scenes.boxes, strict=True) if len(b))
    without = sorted(n for n, b in zip(scenes.names, scenes.boxes, strict=True) if not len(b))
    n_without = round(val_count * len(without) / len(scenes))
    val = list(rng.permutation(without)[:n_without]) + list(rng.permutation(with_signs)[: val_count - n_without])
    val_set = {str(n) for n in val}
    return sorted(n for n in scenes.names if n not in val_set), sorted(val_set)


def load_gtsrb_patches(
    root: Path,
    *,
    min_roi_px: int = 20,
    threads: int = 2,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> SignPatches:
    """Decode GTSRB crops (``root/000NN/GT-000NN.csv``) with their sign ROI, for copy-paste.

    Args:
        root: GTSRB training folder.
        min_roi_px: crops whose sign is smaller than this (shorter side) are skipped: they are too blurry to be
            scaled up into a scene and would teach the detector upscaling artefacts.
        threads: decoding threads.
        on_progress: ``(stage, done, total)`` callback.

    Raises:
        InputError: no folder, no CSV files, a malformed row, or an ROI outside its crop.
    """
    if not root.is_dir():
        raise InputError(f"GTSRB data: expected a folder with 000NN/GT-000NN.csv, got {root} (not a folder)")
    rows: list[tuple[Path, tuple[int, int, int, int]]] = []
    seen = 0
    for csv_path in sorted(root.glob("*/GT-*.csv")):
        with csv_path.open(newline="", encoding="utf-8") as fh:
            for line_no, row in enumerate(csv.DictReader(fh, delimiter=";"), 2):
                try:
                    roi = [int(row[k]) for k in ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2")]
                    size = (int(row["Width"]), int(row["Height"]))
                    name = row["Filename"]
                except (KeyError, TypeError, ValueError):
                    raise InputError(
                        f"{csv_path}:{line_no}: expected Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId, "
                        f"got {row}"
                    ) from None
                x1, y1, x2, y2 = roi
                if not (0 <= x1 < x2 < size[0] + 1 and 0 <= y1 < y2 < size[1] + 1):
                    raise InputError(f"{csv_path}:{line_no}: expected an ROI inside the {size} crop, got {roi}")
                seen += 1
                if min(x2 - x1, y2 - y1) + 1 >= min_roi_px:
                    rows.append((csv_path.parent / name, (x1, y1, x2 + 1, y2 + 1)))
    if not seen:
        raise InputError(f"GTSRB data: expected 000NN/GT-000NN.csv files naming crops under {root}, found none")
    if not rows:
        raise InputError(f"GTSRB data: expected crops with signs of at least {min_roi_px} px, found none of {seen}")
    with ThreadPoolExecutor(threads) as pool:
        crops = list(_progress(pool.map(_load_writable, [p for p, _ in rows]), "patches", len(rows), on_progress))
    roi_xyxy = np.asarray([r for _, r in rows], np.int32)
    h = np.asarray([c.shape[0] for c in crops])
    w = np.asarray([c.shape[1] for c in crops])
    roi_xyxy[:, 2] = np.minimum(roi_xyxy[:, 2], w)
    roi_xyxy[:, 3] = np.minimum(roi_xyxy[:, 3], h)
    log.info("loaded %d sign patches from %s", len(crops), root)
    return SignPatches(tuple(crops), roi_xyxy)


def pad_colour(mean: Sequence[float]) -> tuple[int, int, int]:
    """The uint8 RGB colour that normalises to (about) zero: ``round(mean * 255)``."""
    r, g, b = (round(float(m) * 255) for m in mean)
    return r, g, b


def letterbox_scale(image_hw: tuple[int, int], input_hw: tuple[int, int]) -> float:
    """Scale from image pixels to network-input pixels: ``min(H / h, W / w)``."""
    return min(input_hw[0] / image_hw[0], input_hw[1] / image_hw[1])


def letterbox(image: np.ndarray, input_hw: tuple[int, int], fill: tuple[int, int, int]) -> tuple[np.ndarray, float]:
    """Resize ``image`` into the network input: scaled to fit, at the top-left corner, the rest ``fill``.

    Args:
        image: (h, w, 3) uint8 RGB.
        input_hw: network input (H, W).
        fill: uint8 RGB of the padding (:func:`pad_colour` of the card's mean).

    Returns:
        (H, W, 3) uint8 canvas and the scale (input pixels per image pixel). Resizing is Pillow's bilinear filter,
        which is antialiased when shrinking.
    """
    scale = letterbox_scale(image.shape[:2], input_hw)
    h = min(input_hw[0], round(image.shape[0] * scale))
    w = min(input_hw[1], round(image.shape[1] * scale))
    canvas = np.empty((*input_hw, 3), np.uint8)
    canvas[...] = np.asarray(fill, np.uint8)
    if (h, w) == image.shape[:2]:
        canvas[:h, :w] = image
    else:
        canvas[:h, :w] = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    return canvas, scale


def data_sha256(roots: Iterable[Path | None]) -> str:
    """sha256 over every file (relative path and bytes) under the given data folders, in sorted order."""
    digest = hashlib.sha256()
    for root in roots:
        if root is None:
            continue
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(root)).encode())
            with path.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()


def _load_writable(path: Path) -> np.ndarray:
    """:func:`load_image`, as a writable array (torch wraps only writable arrays without a warning)."""
    image = load_image(path)
    return image if image.flags.writeable else image.copy()


def _progress(
    items: Iterable[_T], stage: str, total: int, on_progress: Callable[[str, int, int], None] | None
) -> Iterator[_T]:
    for done, item in enumerate(items, 1):
        if on_progress is not None:
            on_progress(stage, done, total)
        yield item
