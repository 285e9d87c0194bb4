from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from services.detector.train.augment import AugmentSettings, CropSampler
from services.detector.train.data import load_gtsrb_patches, load_scenes
from services.detector.train.evaluate import box_iou

NO_PHOTOMETRIC = AugmentSettings(
    brightness=(1, 1),
    contrast=(1, 1),
    saturation=(1, 1),
    gamma=(1, 1),
    channel_gain=0,
    p_blur=0,
    noise_std=0,
    p_paste_blur=0,
    paste_match_strength=(0, 0),
)


def sampler(gtsdb_dir: Path, gtsrb_dir: Path | None, settings: AugmentSettings, seed: int = 0) -> CropSampler:
    scenes = load_scenes(gtsdb_dir, threads=1)
    patches = load_gtsrb_patches(gtsrb_dir, min_roi_px=10, threads=1) if gtsrb_dir else None
    return CropSampler(
        scenes,
        patches,
        input_hw=(96, 160),
        crop_hw=(64, 64),
        fill=(0.485, 0.456, 0.406),
        settings=settings,
        seed=seed,
    )


def test_crops_keep_boxes_valid_and_inside(gtsdb_dir: Path, gtsrb_dir: Path) -> None:
    s = sampler(gtsdb_dir, gtsrb_dir, replace(AugmentSettings(), p_paste=1.0, max_pastes=3))
    pasted = 0
    for k in range(6):
        batch = s.sample(list(range(8)))
        assert batch.images.shape == (8, 3, 64, 64)
        assert batch.images.dtype == torch.float32
        assert float(batch.images.min()) >= 0
        assert float(batch.images.max()) <= 1
        for boxes, ignore in zip(batch.boxes, batch.ignore, strict=True):
            for xyxy in (boxes, ignore):
                assert xyxy.dtype == np.float32
                assert xyxy.shape[1] == 4
                assert (xyxy[:, :2] >= 0).all()
                assert (xyxy[:, 2] <= 64).all()
                assert (xyxy[:, 3] <= 64).all()
                assert (xyxy[:, 2:] > xyxy[:, :2]).all()
            assert (np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= 8).all(), k
        pasted += batch.pasted
    assert pasted > 0


def test_pasted_signs_land_inside_their_box_and_do_not_overlap(gtsdb_dir: Path, gtsrb_dir: Path) -> None:
    settings = replace(NO_PHOTOMETRIC, p_paste=1.0, max_pastes=4, p_around_sign=0.0, p_flip=0.0)
    s = sampler(gtsdb_dir, gtsrb_dir, settings, seed=3)
    sign_free = [i for i, b in enumerate(s.scenes.boxes) if not len(b)]
    found = 0
    for _ in range(5):
        batch = s.sample(sign_free)
        for image, boxes in zip(batch.images, batch.boxes, strict=True):
            iou = box_iou(boxes, boxes)
            assert (iou[~np.eye(len(boxes), dtype=bool)] == 0).all()
            for x1, y1, x2, y2 in boxes:
                cy, cx = int((y1 + y2) / 2), int((x1 + x2) / 2)
                assert float(image[:, cy, cx].min()) > 0.85  # the white middle of the synthetic sign
                found += 1
    assert found > 0


def test_without_patches_there_is_no_paste(gtsdb_dir: Path) -> None:
    batch = sampler(gtsdb_dir, None, replace(AugmentSettings(), p_paste=1.0)).sample(list(range(8)))
    assert batch.pasted == 0


@pytest.mark.parametrize("seed", [0, 7])
def test_same_seed_same_crops(gtsdb_dir: Path, gtsrb_dir: Path, seed: int) -> None:
    a = sampler(gtsdb_dir, gtsrb_dir, AugmentSettings(), seed).sample([0, 1, 2])
    b = sampler(gtsdb_dir, gtsrb_dir, AugmentSettings(), seed).sample([0, 1, 2])
    assert torch.equal(a.images, b.images)
    assert all(np.array_equal(x, y) for x, y in zip(a.boxes, b.boxes, strict=True))


def test_flip_mirrors_the_boxes(gtsdb_dir: Path) -> None:
    plain = replace(NO_PHOTOMETRIC, p_flip=0.0, p_paste=0.0)
    a = sampler(gtsdb_dir, None, plain, seed=5).sample([0])
    b = sampler(gtsdb_dir, None, replace(plain, p_flip=1.0), seed=5).sample([0])
    assert torch.allclose(a.images.flip(-1), b.images)
    np.testing.assert_allclose(b.boxes[0][:, [2, 1, 0, 3]] * [-1, 1, -1, 1] + [64, 0, 64, 0], a.boxes[0])
