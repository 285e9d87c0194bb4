from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.detector.train.evaluate import detections_from_outputs, suppress_non_peaks
from services.detector.train.targets import decode_boxes, encode_targets, targets_to_maps

STRIDE = 8
GRID = (12, 20)  # 96 x 160 input


def round_trip(xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Encode boxes, then decode the target maps as the served graph and the serving side would."""
    t = encode_targets(xyxy, np.zeros((0, 4)), GRID, STRIDE)
    offset, log_size = targets_to_maps(t)
    boxes = decode_boxes(offset, log_size, STRIDE)
    return detections_from_outputs(
        suppress_non_peaks(t.heat[None]), boxes, score_threshold=0.99, nms_iou=0.5, max_detections=100
    )


def test_encoded_boxes_decode_back_exactly() -> None:
    xyxy = np.array([[10, 12, 26, 28], [60.5, 40, 100, 81], [130, 5, 150, 29]], np.float32)
    got, score = round_trip(xyxy)
    assert (score == 1).all()
    order = np.argsort(got[:, 0])
    np.testing.assert_allclose(got[order], xyxy, atol=1e-3)


def test_targets_have_one_peak_per_box_with_their_regression_row() -> None:
    xyxy = np.array([[10, 12, 26, 28], [60, 40, 100, 80]], np.float32)
    t = encode_targets(xyxy, np.zeros((0, 4)), GRID, STRIDE, max_objects=4)
    assert t.heat.shape == GRID
    assert int((t.heat == 1).sum()) == 2
    assert t.mask.tolist() == [1, 1, 0, 0]
    big = t.reg[0]  # the larger box comes first
    assert t.index[0] == (60 // STRIDE) * GRID[1] + (80 // STRIDE)
    np.testing.assert_allclose(big, [0, 0.5, np.log(40 / 8), np.log(40 / 8)], atol=1e-6)
    assert ((t.heat >= 0) & (t.heat <= 1)).all()
    assert (t.weight == 1).all()


def test_ignored_boxes_switch_the_heatmap_loss_off_there() -> None:
    t = encode_targets(np.zeros((0, 4)), np.array([[40, 40, 44, 44]]), GRID, STRIDE)
    assert (t.heat == 0).all()
    assert t.weight[5, 5] == 0
    assert t.weight[0, 0] == 1
    assert t.mask.sum() == 0


def test_boxes_past_max_objects_are_ignored_not_negative() -> None:
    xyxy = np.array([[8 * i, 0, 8 * i + 8, 8] for i in range(0, 20, 2)], np.float32)
    t = encode_targets(xyxy, np.zeros((0, 4)), GRID, STRIDE, max_objects=4)
    assert t.mask.sum() == 4
    assert int((t.heat == 1).sum()) == 4
    assert (t.weight == 0).sum() > 0


@settings(max_examples=40, deadline=None)
@given(
    st.dictionaries(
        st.integers(0, 4), st.tuples(st.integers(0, 4), st.floats(0, 7.99), st.floats(10, 30), st.floats(10, 30))
    )
)
def test_any_separate_boxes_round_trip(cells: dict[int, tuple[int, float, float, float]]) -> None:
    # One box per 32 px column band: every center in its own cell and no two boxes overlapping.
    rows = []
    for col, (row, dx, w, h) in cells.items():
        cx, cy = col * 32 + 12 + dx, row * 20 + 14.5
        rows.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    xyxy = np.array(rows, np.float32).reshape(-1, 4)
    got, _ = round_trip(xyxy)
    assert len(got) == len(xyxy)
    for box in xyxy:
        assert np.abs(got - box).max(axis=1).min() < 1e-3


def test_decode_boxes_matches_the_formula() -> None:
    offset = np.full((2, 2, 3), 0.5, np.float32)
    log_size = np.zeros((2, 2, 3), np.float32)
    boxes = decode_boxes(offset, log_size, 8)
    assert boxes.shape == (4, 2, 3)
    np.testing.assert_allclose(boxes[:, 1, 2], [16, 8, 24, 16])


@pytest.mark.parametrize("value", [0.0, 0.3])
def test_suppress_non_peaks_keeps_local_maxima_only(value: float) -> None:
    heat = np.full((1, 4, 5), value, np.float32)
    heat[0, 1, 1] = 0.9
    heat[0, 1, 2] = 0.5
    heat[0, 3, 4] = 0.7
    kept = suppress_non_peaks(heat)
    assert kept[0, 1, 1] == pytest.approx(0.9)
    assert kept[0, 1, 2] == 0
    assert kept[0, 3, 4] == pytest.approx(0.7)
