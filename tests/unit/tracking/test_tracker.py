"""SignTracker: rows kept in order with their payload, one id per moving object, tracks end and are reported."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.common.types import Detections, FrameRef
from tracking.ids import TrackIdAllocator
from tracking.tracker import SignTracker, TrackerSettings, box_distance


def dets(frame: int, xyxy, score=None, **extra) -> Detections:
    boxes = np.asarray(xyxy, np.float32).reshape(-1, 4)
    n = len(boxes)
    return Detections(
        FrameRef("rec", frame, frame / 25),
        boxes,
        np.full(n, 0.9, np.float32) if score is None else np.asarray(score, np.float32),
        np.zeros(n, np.int16),
        extra={k: np.asarray(v) for k, v in extra.items()},
    )


def approaching(frame: int, x0: float, y0: float, dx: float, grow: float) -> list[float]:
    """A sign sliding outwards and growing, as one does when a dashcam approaches it."""
    size = 12 + grow * frame
    x = x0 + dx * frame
    return [x, y0 - 0.3 * grow * frame, x + size, y0 - 0.3 * grow * frame + size]


def run(tracker: SignTracker, frames: list[Detections]) -> list[np.ndarray]:
    return [ids_of(tracker.update(d)) for d in frames]


def ids_of(out: Detections) -> np.ndarray:
    assert out.track_id is not None
    return out.track_id


def test_rows_keep_order_and_payload():
    tracker = SignTracker()
    frame = dets(0, [[10, 10, 30, 30], [100, 100, 120, 130]], score=[0.5, 0.8], tag=[7, 9])
    out = tracker.update(frame)
    assert out.track_id is not None
    np.testing.assert_array_equal(out.xyxy, frame.xyxy)
    np.testing.assert_array_equal(out.score, frame.score)
    np.testing.assert_array_equal(out.extra["tag"], [7, 9])
    assert len(set(out.track_id.tolist())) == 2
    assert (out.track_id >= 1).all()


def test_two_approaching_signs_keep_one_id_each():
    tracker = SignTracker()
    frames = [dets(f, [approaching(f, 400, 150, 6, 1.5), approaching(f, 200, 160, -5, 1.2)]) for f in range(40)]
    out = run(tracker, frames)
    ids = np.stack(out)  # (frames, 2)
    assert len(set(ids[:, 0].tolist())) == 1
    assert len(set(ids[:, 1].tolist())) == 1
    assert ids[0, 0] != ids[0, 1]
    ended = tracker.finish()
    assert sorted(e.track_id for e in ended) == sorted(ids[0].tolist())
    assert all(e.confirmed for e in ended)


def test_short_miss_keeps_the_id_and_a_long_one_ends_the_track():
    tracker = SignTracker(TrackerSettings(hit_counter_max=6))
    seen = [f for f in range(30) if f not in (10, 11)]  # two missed frames
    out = {f: ids_of(tracker.update(dets(f, [approaching(f, 300, 150, 3, 1)] if f in seen else []))) for f in range(30)}
    ids = {int(out[f][0]) for f in seen}
    assert len(ids) == 1
    assert tracker.pop_ended() == []
    for f in range(30, 60):  # the sign is gone
        tracker.update(dets(f, []))
    ended = tracker.pop_ended()
    assert [e.track_id for e in ended] == list(ids)


def test_a_one_off_detection_is_unconfirmed():
    tracker = SignTracker(TrackerSettings(initialization_delay=2, hit_counter_max=4))
    tracker.update(dets(0, [[50, 50, 70, 70]]))
    for f in range(1, 20):
        tracker.update(dets(f, []))
    (ended,) = tracker.pop_ended()
    assert not ended.confirmed


def test_each_recording_counts_from_one():
    first, second = SignTracker(), SignTracker()
    a = first.update(dets(0, [[0, 0, 10, 10]]))
    b = second.update(dets(0, [[0, 0, 10, 10]]))
    assert a.track_id is not None
    assert b.track_id is not None
    assert a.track_id.tolist() == b.track_id.tolist() == [1]


def test_allocator_is_a_visible_counter():
    ids = TrackIdAllocator(start=5)
    assert [ids.allocate() for _ in range(3)] == [5, 6, 7]
    assert ids.issued == 7


def test_settings_refuse_a_delay_at_or_above_the_max():
    with pytest.raises(ValidationError, match="initialization_delay"):
        TrackerSettings(initialization_delay=5, hit_counter_max=5)
    with pytest.raises(ValidationError, match="extra"):
        TrackerSettings.model_validate({"distance_treshold": 0.5})


@settings(max_examples=30)
@given(
    st.lists(
        st.lists(
            st.tuples(st.floats(0, 1000), st.floats(0, 1000), st.floats(1, 200), st.floats(1, 200)),
            max_size=6,
        ),
        min_size=1,
        max_size=12,
    )
)
def test_ids_are_unique_within_a_frame_and_every_row_gets_one(frames):
    tracker = SignTracker()
    for f, boxes in enumerate(frames):
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in boxes]
        out = tracker.update(dets(f, xyxy if xyxy else np.zeros((0, 4))))
        assert out.track_id is not None
        assert len(out) == len(boxes)
        assert (out.track_id >= 1).all()
        assert len(set(out.track_id.tolist())) == len(out)


def test_box_distance_is_one_minus_iou_for_overlapping_boxes_and_small_for_near_ones():
    a = np.array([[0, 0, 10, 10]], np.float32)
    same = box_distance(a, a)
    assert same.shape == (1, 1)
    assert same[0, 0] == pytest.approx(0.0, abs=1e-6)
    half = box_distance(a, np.array([[5, 0, 15, 10]], np.float32))[0, 0]
    assert half == pytest.approx(min(1 - 1 / 3, 0.5 * 0.5), abs=1e-5)
    apart = box_distance(a, np.array([[12, 0, 22, 10]], np.float32))[0, 0]  # no overlap, 1.2 sizes apart
    assert apart == pytest.approx(0.6, abs=1e-5)
    far_bigger = box_distance(a, np.array([[0, 0, 100, 100]], np.float32))[0, 0]
    assert far_bigger > 0.9


@settings(max_examples=50)
@given(st.lists(st.tuples(st.floats(0, 500), st.floats(0, 500), st.floats(1, 100), st.floats(1, 100)), min_size=1))
def test_box_distance_is_symmetric_and_non_negative(boxes):
    xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in boxes], np.float32)
    d = box_distance(xyxy, xyxy)
    assert d.shape == (len(boxes), len(boxes))
    assert (d >= -1e-6).all()
    np.testing.assert_allclose(d, d.T, atol=1e-5)
    np.testing.assert_allclose(np.diag(d), 0, atol=1e-5)


def test_fast_small_sign_keeps_its_id_with_box_distance_but_not_with_iou():
    # A 12 px sign moving 15 px between detector runs: its boxes never overlap.
    frames = [dets(f, [[100 + 15 * f, 100, 112 + 15 * f, 112]]) for f in range(8)]
    box_ids = {int(i) for i in np.concatenate(run(SignTracker(TrackerSettings(distance="box")), frames))}
    iou_ids = {int(i) for i in np.concatenate(run(SignTracker(TrackerSettings(distance="iou")), frames))}
    assert len(box_ids) == 1
    assert len(iou_ids) > 1
