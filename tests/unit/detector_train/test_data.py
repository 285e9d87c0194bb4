from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.common.errors import InputError
from services.detector.train.data import (
    data_sha256,
    letterbox,
    load_gtsrb_patches,
    load_scenes,
    pad_colour,
    read_gtsdb,
    split_scenes,
)


def test_gt_corners_become_exclusive_and_every_scene_is_listed(gtsdb_dir: Path) -> None:
    scenes, boxes = read_gtsdb(gtsdb_dir)
    assert [p.name for p in scenes] == [f"{i:05d}.jpg" for i in range(8)]
    first = (gtsdb_dir / "gt.txt").read_text().splitlines()[0].split(";")
    x1, y1, x2, y2 = (float(v) for v in first[1:5])
    assert boxes[first[0]][0].tolist() == [x1, y1, x2 + 1, y2 + 1]
    assert "00003.jpg" not in boxes  # a scene without signs has no entry but is still a scene


def test_scenes_load_with_their_boxes(gtsdb_dir: Path) -> None:
    scenes = load_scenes(gtsdb_dir, threads=2)
    assert len(scenes) == 8
    assert scenes.num_boxes == 9
    assert all(im.shape == (120, 200, 3) and im.dtype == np.uint8 for im in scenes.images)
    assert all(b.shape[1] == 4 and b.dtype == np.float32 for b in scenes.boxes)
    sub = scenes.subset(["00005.jpg", "00000.jpg"])
    assert sub.names == ("00005.jpg", "00000.jpg")
    assert sub.images[1] is scenes.images[0]


def test_split_is_by_whole_image_seeded_and_keeps_sign_free_scenes(gtsdb_dir: Path) -> None:
    scenes = load_scenes(gtsdb_dir, threads=1)
    train, val = split_scenes(scenes, 4, seed=0)
    assert len(val) == 4
    assert set(train).isdisjoint(val)
    assert set(train) | set(val) == set(scenes.names)
    assert split_scenes(scenes, 4, seed=0) == (train, val)
    assert any(n in val for n in ("00003.jpg", "00006.jpg"))
    with pytest.raises(InputError, match="expected 0 < val images < 8"):
        split_scenes(scenes, 8, seed=0)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("00000.jpg;1;2;3", "expected 'name;x1;y1;x2;y2;class'"),
        ("00000.jpg;a;2;3;4;1", "expected 'name;x1;y1;x2;y2;class'"),
        ("00000.jpg;9;2;3;4;1", "expected 0 <= x1 <= x2"),
        ("missing.jpg;1;2;3;4;1", "expected scene 'missing.jpg'"),
    ],
)
def test_bad_gt_lines_are_input_errors(tmp_path: Path, line: str, message: str) -> None:
    Image.new("RGB", (20, 10)).save(tmp_path / "00000.jpg")
    (tmp_path / "gt.txt").write_text(line + "\n")
    with pytest.raises(InputError, match=message):
        read_gtsdb(tmp_path)


def test_missing_folder_gt_or_scenes_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a folder"):
        read_gtsdb(tmp_path / "nope")
    with pytest.raises(InputError, match="gt.txt"):
        read_gtsdb(tmp_path)
    (tmp_path / "gt.txt").write_text("")
    with pytest.raises(InputError, match="expected scene images"):
        read_gtsdb(tmp_path)


def test_box_outside_its_scene_is_an_input_error(tmp_path: Path) -> None:
    Image.new("RGB", (20, 10)).save(tmp_path / "00000.jpg")
    (tmp_path / "gt.txt").write_text("00000.jpg;1;2;20;5;1\n")
    with pytest.raises(InputError, match=r"expected boxes inside 00000.jpg \(20x10\)"):
        load_scenes(tmp_path)


def test_gtsrb_patches_carry_their_roi(gtsrb_dir: Path) -> None:
    patches = load_gtsrb_patches(gtsrb_dir, min_roi_px=10, threads=2)
    assert len(patches) == 6
    for crop, (x1, y1, x2, y2) in zip(patches.crops, patches.roi, strict=True):
        assert 0 < x1 < x2 < crop.shape[1]
        assert 0 < y1 < y2 < crop.shape[0]
        assert tuple(crop[(y1 + y2) // 2, x1 + 1]) == (220, 30, 30)  # the red ring starts at the ROI
    with pytest.raises(InputError, match="signs of at least 100 px, found none of 6"):
        load_gtsrb_patches(gtsrb_dir, min_roi_px=100)


def test_gtsrb_problems_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a folder"):
        load_gtsrb_patches(tmp_path / "nope")
    with pytest.raises(InputError, match="found none"):
        load_gtsrb_patches(tmp_path)
    (tmp_path / "00001").mkdir()
    (tmp_path / "00001" / "GT-00001.csv").write_text("Filename;Width;Height\nx.png;3;4\n")
    with pytest.raises(InputError, match="expected Filename;Width;Height;Roi.X1"):
        load_gtsrb_patches(tmp_path)


def test_letterbox_puts_the_scaled_image_top_left_and_pads_with_the_mean() -> None:
    image = np.full((100, 300, 3), 200, np.uint8)
    fill = pad_colour((0.485, 0.456, 0.406))
    assert fill == (124, 116, 104)
    canvas, scale = letterbox(image, (64, 96), fill)
    assert scale == pytest.approx(0.32)
    assert canvas.shape == (64, 96, 3)
    assert (canvas[:32, :96] == 200).all()
    assert (canvas[32:] == np.array(fill, np.uint8)).all()


def test_data_sha256_changes_with_content(gtsdb_dir: Path, tmp_path: Path) -> None:
    a = data_sha256([gtsdb_dir, None])
    assert len(a) == 64
    assert data_sha256([gtsdb_dir]) == a
    (tmp_path / "x.txt").write_text("1")
    assert data_sha256([gtsdb_dir, tmp_path]) != a
