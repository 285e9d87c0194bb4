"""Synthetic GTSDB-like scenes and GTSRB-like sign crops, small enough for a training smoke test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCENE_HW = (120, 200)


def sign_crop(rng: np.random.Generator, size: int, margin: int) -> np.ndarray:
    """A red disc with a white middle on a random background: ``size`` px sign plus ``margin`` px around it."""
    full = size + 2 * margin
    img = np.empty((full, full, 3), np.uint8)
    img[...] = rng.integers(40, 200, 3)
    yy, xx = np.mgrid[:full, :full]
    r = np.hypot(yy - full / 2 + 0.5, xx - full / 2 + 0.5)
    img[r < size / 2] = (220, 30, 30)
    img[r < size / 3] = (240, 240, 240)
    return img


@pytest.fixture(scope="session")
def gtsdb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 noisy 200x120 scenes, 6 of them with 1-2 signs (16-30 px), and gt.txt with inclusive corners."""
    root = tmp_path_factory.mktemp("gtsdb")
    rng = np.random.default_rng(1)
    lines = []
    for i in range(8):
        scene = rng.integers(60, 140, (*SCENE_HW, 3), dtype=np.uint8)
        n_signs = 0 if i in (3, 6) else 1 + i % 2
        for k in range(n_signs):
            size = int(rng.integers(16, 31))
            x1 = 20 + 90 * k + int(rng.integers(0, 40))
            y1 = int(rng.integers(5, SCENE_HW[0] - size - 5))
            scene[y1 : y1 + size, x1 : x1 + size] = sign_crop(rng, size, 0)
            lines.append(f"{i:05d}.jpg;{x1};{y1};{x1 + size - 1};{y1 + size - 1};{k + 1}")
        Image.fromarray(scene).save(root / f"{i:05d}.jpg", quality=95)
    (root / "gt.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def gtsrb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 classes x 3 crops with a 4-6 px margin around the sign, in GTSRB's GT-000NN.csv layout."""
    root = tmp_path_factory.mktemp("gtsrb")
    rng = np.random.default_rng(2)
    for class_id in (1, 14):
        folder = root / f"{class_id:05d}"
        folder.mkdir()
        rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for n in range(3):
            size, margin = int(rng.integers(24, 40)), int(rng.integers(4, 7))
            name = f"00000_{n:05d}.png"
            Image.fromarray(sign_crop(rng, size, margin)).save(folder / name)
            full = size + 2 * margin
            rows.append(f"{name};{full};{full};{margin};{margin};{margin + size - 1};{margin + size - 1};{class_id}")
        (folder / f"GT-{class_id:05d}.csv").write_text("\n".join(rows) + "\n")
    return root
