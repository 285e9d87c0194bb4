from __future__ import annotations

import numpy as np
import pytest

from services.detector.train.evaluate import (
    average_precision,
    box_iou,
    choose_operating_point,
    match_detections,
    nms,
    operating_point_at,
)

GT = [np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32), np.array([[5, 5, 25, 25]], np.float32)]


def dets(xyxy: list[list[float]], score: list[float]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(xyxy, np.float32).reshape(-1, 4), np.asarray(score, np.float32)


def test_perfect_detections_give_ap_1() -> None:
    match = match_detections([dets(GT[0].tolist(), [0.9, 0.8]), dets(GT[1].tolist(), [0.7])], GT)
    assert average_precision(match) == pytest.approx(1.0)
    assert match.num_gt == 3
    assert match.is_tp.all()


def test_all_misses_give_ap_0() -> None:
    match = match_detections([dets([[100, 100, 110, 110]], [0.9]), dets([], [])], GT)
    assert average_precision(match) == 0.0
    assert not match.is_tp.any()


def test_no_detections_at_all_give_ap_0() -> None:
    assert average_precision(match_detections([dets([], []), dets([], [])], GT)) == 0.0


def test_duplicates_count_as_false_positives_and_ap_is_all_point() -> None:
    # Ranked: TP (0.9), FP duplicate (0.8), TP (0.7); one GT box never found.
    match = match_detections(
        [dets([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 40, 40]], [0.9, 0.8, 0.7]), dets([], [])], GT
    )
    assert match.is_tp[np.argsort(-match.score)].tolist() == [True, False, True]
    # Recall 1/3 at precision 1, recall 2/3 at precision 2/3 -> AP = 1/3 * 1 + 1/3 * 2/3.
    assert average_precision(match) == pytest.approx(1 / 3 + 2 / 9)


def test_iou_below_half_is_a_miss() -> None:
    match = match_detections([dets([[0, 0, 10, 21]], [0.9]), dets([], [])], GT[:1] + [np.zeros((0, 4), np.float32)])
    assert not match.is_tp.any()  # IoU 100 / 210 < 0.5


def test_operating_point_counts_false_positives_per_image() -> None:
    match = match_detections([dets([[0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.4]), dets([[5, 5, 25, 25]], [0.6])], GT)
    p = operating_point_at(match, 0.5)
    assert p.recall == pytest.approx(2 / 3)
    assert (p.precision, p.fp_per_image) == (1.0, 0.0)
    p = operating_point_at(match, 0.3)
    assert p.fp_per_image == 0.5
    best = choose_operating_point(match)
    assert best.threshold == pytest.approx(0.6)
    assert choose_operating_point(match, max_fp_per_image=0.0).fp_per_image == 0.0


def test_iou_and_nms() -> None:
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 20], [30, 30, 31, 31]], np.float32)
    iou = box_iou(a, a)
    np.testing.assert_allclose(np.diag(iou), 1)
    assert iou[0, 1] == pytest.approx(0.5)
    np.testing.assert_allclose(iou, iou.T)
    assert nms(a, np.array([0.5, 0.9, 0.1]), 0.4).tolist() == [1, 2]
    assert nms(a, np.array([0.5, 0.9, 0.1]), 0.6).tolist() == [1, 0, 2]
