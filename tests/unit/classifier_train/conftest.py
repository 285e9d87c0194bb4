"""Synthetic GTSRB-like and GTSDB-like folders, small enough for a training smoke test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _sign(rng: np.random.Generator, class_id: int, size: int) -> np.ndarray:
    img = np.full((size, size, 3), rng.integers(60, 200, 3), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    r = size * 0.4
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r**2
    colours = [(220, 20, 20), (20, 60, 220), (240, 220, 20)]
    img[disc] = colours[class_id % 3]
    return img


@pytest.fixture(scope="session")
def gtsrb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 4 tracks x 3 crops, with the GT-000NN.csv layout of GTSRB."""
    root = tmp_path_factory.mktemp("gtsrb")
    rng = np.random.default_rng(0)
    for class_id in (0, 14, 38):
        folder = root / f"{class_id:05d}"
        folder.mkdir()
        rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for track in range(4):
            for frame in range(0, 9, 3):
                size = int(rng.integers(28, 60))
                name = f"{track:05d}_{frame:05d}.png"
                Image.fromarray(_sign(rng, class_id, size)).save(folder / name)
                rows.append(f"{name};{size};{size};2;2;{size - 2};{size - 2};{class_id}")
        (folder / f"GT-{class_id:05d}.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="session")
def gtsdb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 road-like scenes with one boxed sign each, plus gt.txt."""
    root = tmp_path_factory.mktemp("gtsdb")
    rng = np.random.default_rng(1)
    lines = []
    for i in range(4):
        scene = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
        x1, y1 = 100 + 20 * i, 80
        scene[y1 : y1 + 40, x1 : x1 + 40] = (220, 20, 20)
        Image.fromarray(scene).save(root / f"{i:05d}.jpg", quality=95)
        lines.append(f"{i:05d}.jpg;{x1};{y1};{x1 + 39};{y1 + 39};14")
    (root / "gt.txt").write_text("\n".join(lines) + "\n")
    return root
