"""VOC matching, AP50, the operating point and end-to-end naming, on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.common.errors import InputError
from services.detector.metrics import (
    DetectionEvaluator,
    GroundTruth,
    average_precision,
    match_detections,
    read_gtsdb_gt,
)


def boxes(*rows) -> np.ndarray:
    return np.asarray(rows, np.float32).reshape(-1, 4)


def truth(*rows, classes=None) -> GroundTruth:
    xyxy = boxes(*rows)
    return GroundTruth(xyxy, np.asarray(classes if classes is not None else [0] * len(xyxy), np.int16))


GT = truth([0, 0, 10, 10], [20, 20, 40, 40], classes=[14, 2])


def test_perfect_detections_give_ap_one():
    ev = DetectionEvaluator(threshold=0.5)
    ev.add(GT.xyxy, np.array([0.9, 0.8], np.float32), GT, pred_class=np.array([14, 2], np.int16))
    ev.add(boxes(), np.zeros(0, np.float32), GroundTruth.empty(), pred_class=np.zeros(0, np.int16))
    report = ev.report()
    assert report.ap50 == 1.0
    assert (report.recall, report.precision, report.fp_per_image) == (1.0, 1.0, 0.0)
    assert (report.end_to_end, report.named_when_found) == (1.0, 1.0)
    assert (report.images, report.gt_signs, report.detections) == (2, 2, 2)


def test_no_detections_give_ap_zero():
    ev = DetectionEvaluator(threshold=0.5)
    ev.add(boxes(), np.zeros(0, np.float32), GT)
    report = ev.report()
    assert report.ap50 == 0.0
    assert report.recall == 0.0
    assert math.isnan(report.precision)
    assert report.end_to_end == 0.0


def test_duplicates_count_as_false_positives():
    pred = boxes([0, 0, 10, 10], [0, 0, 10, 11], [1, 0, 10, 10])
    score = np.array([0.9, 0.8, 0.7], np.float32)
    assert match_detections(pred, score, GT.xyxy).tolist() == [0, -1, -1]
    ev = DetectionEvaluator(threshold=0.5)
    ev.add(pred, score, GT)
    report = ev.report()
    assert report.precision == pytest.approx(1 / 3)
    assert report.recall == 0.5
    assert report.fp_per_image == 2.0
    assert report.ap50 == pytest.approx(0.5)  # one of two signs, found first: precision 1 up to recall 0.5


def test_matching_is_by_score_not_by_order():
    pred = boxes([0, 0, 10, 11], [0, 0, 10, 10])
    assert match_detections(pred, np.array([0.2, 0.9]), GT.xyxy).tolist() == [-1, 0]


def test_iou_threshold_is_inclusive():
    # IoU of [0,0,10,10] with [0,0,10,20] is exactly 0.5.
    assert match_detections(boxes([0, 0, 10, 20]), np.ones(1), boxes([0, 0, 10, 10])).tolist() == [0]
    assert match_detections(boxes([0, 0, 10, 21]), np.ones(1), boxes([0, 0, 10, 10])).tolist() == [-1]


def test_ap_all_point_interpolation_known_value():
    # Ranked: TP, FP, TP with 3 signs: precision 1 at recall 1/3, 2/3 at recall 2/3 -> AP = 1/3 + 2/9.
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([True, False, True]), 3) == pytest.approx(5 / 9)
    # The envelope: a later higher precision lifts an earlier dip (FP, TP, TP with 2 signs -> 1/2 * 2/3 * 2).
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([False, True, True]), 2) == pytest.approx(2 / 3)
    assert math.isnan(average_precision(np.zeros(0), np.zeros(0, bool), 0))


def test_operating_point_counts_only_detections_above_threshold():
    pred = boxes([0, 0, 10, 10], [20, 20, 40, 40], [100, 100, 110, 110])
    score = np.array([0.9, 0.3, 0.8], np.float32)
    ev = DetectionEvaluator(threshold=0.5)
    ev.add(pred, score, GT, pred_class=np.array([14, 2, 5], np.int16))
    report = ev.report()
    assert report.ap50 == pytest.approx(0.5 + 0.5 * 2 / 3)  # both found, the second after one FP
    assert (report.recall, report.precision, report.fp_per_image) == (0.5, 0.5, 1.0)
    assert report.end_to_end == 0.5  # the second sign is found only below the threshold


def test_end_to_end_needs_the_right_name_and_no_rejection():
    pred = GT.xyxy
    score = np.array([0.9, 0.9], np.float32)
    for classes, expected in (([14, 3], 0.5), ([-1, 2], 0.5), ([-1, -1], 0.0), ([14, 2], 1.0)):
        ev = DetectionEvaluator(threshold=0.5)
        ev.add(pred, score, GT, pred_class=np.array(classes, np.int16))
        assert ev.report().end_to_end == expected, classes
        assert ev.report().recall == 1.0  # the detector's figures ignore the classifier


def test_rejected_duplicate_lets_the_next_detection_name_the_sign():
    pred = boxes([0, 0, 10, 10], [0, 0, 10, 11])
    ev = DetectionEvaluator(threshold=0.5)
    ev.add(pred, np.array([0.9, 0.8], np.float32), GT, pred_class=np.array([-1, 14], np.int16))
    assert ev.report().end_to_end == 0.5
    assert ev.report().named_when_found == 1.0


def test_add_checks_lengths():
    with pytest.raises(InputError, match=r"expected xyxy \(2, 4\)"):
        DetectionEvaluator(0.5).add(boxes([0, 0, 1, 1]), np.ones(2, np.float32), GT)


def test_read_gtsdb_gt(tmp_path):
    path = tmp_path / "gt.txt"
    path.write_text("00000.jpg;774;411;815;446;11\n00001.jpg;983;388;1024;432;40\n\n00001.jpg;0;0;0;0;38\n")
    table = read_gtsdb_gt(path)
    assert sorted(table) == ["00000.jpg", "00001.jpg"]
    assert table["00000.jpg"].xyxy.tolist() == [[774, 411, 816, 447]]
    assert table["00000.jpg"].class_id.tolist() == [11]
    assert table["00001.jpg"].xyxy.tolist() == [[983, 388, 1025, 433], [0, 0, 1, 1]]
    assert table["00001.jpg"].class_id.dtype == np.int16


@pytest.mark.parametrize(
    "line", ["a.jpg;1;2;3;4", "a.jpg;1;2;3;x;5", ";1;2;3;4;5", "a.jpg;5;2;3;4;1", "a.jpg;1.5;2;3;4;1"]
)
def test_read_gtsdb_gt_bad_lines(tmp_path, line):
    path = tmp_path / "gt.txt"
    path.write_text(f"ok.jpg;1;1;2;2;0\n{line}\n")
    with pytest.raises(InputError, match=r"gt\.txt:2: expected"):
        read_gtsdb_gt(path)


def test_read_gtsdb_gt_missing(tmp_path):
    with pytest.raises(InputError, match="found no such file"):
        read_gtsdb_gt(tmp_path / "gt.txt")
