from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.classifier.train.data import (
    BACKGROUND_CLASS,
    build_crop_sets,
    data_sha256,
    read_gtsdb_boxes,
    sample_background_boxes,
    scan_gtsrb,
    split_tracks,
)
from services.common.errors import InputError


def test_scan_reads_every_crop_with_its_track(gtsrb_dir: Path) -> None:
    samples = scan_gtsrb(gtsrb_dir)
    assert len(samples) == 36
    assert {s.class_id for s in samples} == {0, 14, 38}
    assert len({s.track for s in samples}) == 12


def test_split_is_by_track_and_keeps_every_class(gtsrb_dir: Path) -> None:
    samples = scan_gtsrb(gtsrb_dir)
    train, val = split_tracks(samples, 0.25, seed=0)
    assert train.isdisjoint(val)
    assert train | val == {s.track for s in samples}
    assert {int(t[:2]) for t in val} == {0, 14, 38}


def test_crop_sets_never_share_a_track_or_a_scene(gtsrb_dir: Path, gtsdb_dir: Path) -> None:
    train, val = build_crop_sets(
        gtsrb_dir, [gtsdb_dir], hw=(32, 32), val_fraction=0.5, background_per_scene=5, seed=3, threads=2
    )
    assert train.images.shape[1:] == (32, 32, 3)
    assert train.images.dtype == np.uint8
    assert set(train.groups.tolist()).isdisjoint(set(val.groups.tolist()))
    assert (train.labels == BACKGROUND_CLASS).any()
    assert len(train) + len(val) > 36


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_signs=st.integers(0, 6))
def test_background_boxes_never_touch_a_sign(seed: int, n_signs: int) -> None:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (400, 600, 3), dtype=np.uint8)
    x1 = rng.uniform(0, 500, n_signs)
    y1 = rng.uniform(0, 300, n_signs)
    size = rng.uniform(16, 90, n_signs)
    signs = np.stack([x1, y1, x1 + size, y1 + size], axis=1).astype(np.float32).reshape(-1, 4)
    boxes = sample_background_boxes(image, signs, 20, rng)
    assert (boxes[:, 0] >= 0).all()
    assert (boxes[:, 2] <= 600).all()
    assert (boxes[:, 3] <= 400).all()
    assert ((boxes[:, 2] - boxes[:, 0]) >= 12).all()
    for box in boxes:
        overlap_x = np.minimum(box[2], signs[:, 2]) - np.maximum(box[0], signs[:, 0])
        overlap_y = np.minimum(box[3], signs[:, 3]) - np.maximum(box[1], signs[:, 1])
        assert not ((overlap_x > 0) & (overlap_y > 0)).any()


def test_bad_data_folders_say_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="expected a folder"):
        scan_gtsrb(tmp_path / "missing")
    with pytest.raises(InputError, match="found none"):
        scan_gtsrb(tmp_path)
    with pytest.raises(InputError, match="gt.txt"):
        read_gtsdb_boxes(tmp_path)
    (tmp_path / "gt.txt").write_text("00000.jpg;1;2;3\n")
    with pytest.raises(InputError, match="expected 'name;x1;y1;x2;y2;class'"):
        read_gtsdb_boxes(tmp_path)


def test_data_hash_changes_with_content(gtsrb_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    first = data_sha256([tmp_path])
    assert first == data_sha256([tmp_path, None])
    (tmp_path / "a.txt").write_text("y")
    assert data_sha256([tmp_path]) != first
