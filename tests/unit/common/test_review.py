"""apply_review: reviewer decisions replayed onto a label file."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from services.common.errors import InputError
from services.common.labelfile import LabelFile, ReviewAction, apply_review
from tests.unit.gateway.test_label_exports import box, label_file, track

AT = "2026-11-21T00:00:00+00:00"


def act(action: str, **fields: object) -> ReviewAction:
    return ReviewAction.model_validate({"action": action, "by": "rita", "at": AT, **fields})


@pytest.fixture
def labels() -> LabelFile:
    return label_file(
        track(1, [0, 1, 2, 3], confidence=0.99),
        track(2, [5, 6, 7], confidence=0.6),
        track(3, [9, 10, 11, 12, 13], confidence=0.95),
        track(4, [20, 21], confidence=0.3, class_id=-1, class_name="unknown"),
    )


def by_id(labels: LabelFile) -> dict[int, object]:
    return {t.track_id: t for t in labels.tracks}


def test_accept_reject_relabel_record_who_and_when(labels):
    out = apply_review(
        labels, [act("accept", track_id=1), act("reject", track_id=2), act("relabel", track_id=3, class_id=14)]
    )
    tracks = {t.track_id: t for t in out.tracks}
    assert tracks[1].review.status == "accepted"
    assert tracks[1].review.by == "rita"
    assert tracks[2].review.status == "rejected"
    assert (tracks[3].review.status, tracks[3].review.class_id, tracks[3].review.class_name) == (
        "relabelled",
        14,
        "stop",
    )
    assert tracks[4].review.status == "pending"
    assert apply_review(labels, [act("relabel", track_id=4, class_id=-1)]).tracks[3].review.class_name == "unknown"


def test_merge_joins_boxes_and_removes_the_other(labels):
    out = apply_review(labels, [act("merge", track_id=1, other_track_id=2)])
    tracks = {t.track_id: t for t in out.tracks}
    assert 2 not in tracks
    assert [b.frame for b in tracks[1].boxes] == [0, 1, 2, 3, 5, 6, 7]
    assert (tracks[1].first_frame, tracks[1].last_frame) == (0, 7)


def test_merge_keeps_the_better_box_on_a_shared_frame():
    labels = label_file(track(1, [box(0, score=0.5), box(1)]), track(2, [box(1, score=0.99, xyxy=(1, 1, 5, 5))]))
    out = apply_review(labels, [act("merge", track_id=1, other_track_id=2)])
    assert out.tracks[0].boxes[1].score == 0.99


def test_split_makes_a_new_pending_track_with_the_next_id(labels):
    out = apply_review(labels, [act("accept", track_id=3), act("split", track_id=3, frame=11)])
    tracks = {t.track_id: t for t in out.tracks}
    assert [b.frame for b in tracks[3].boxes] == [9, 10]
    assert [b.frame for b in tracks[5].boxes] == [11, 12, 13]
    assert tracks[5].review.status == "pending"
    assert tracks[3].review.status == "pending"  # a split track is decided again


def test_accept_above_takes_only_pending_named_tracks(labels):
    out = apply_review(labels, [act("reject", track_id=1), act("accept_above", threshold=0.9)])
    status = {t.track_id: t.review.status for t in out.tracks}
    assert status == {1: "rejected", 2: "pending", 3: "accepted", 4: "pending"}


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (act("accept", track_id=9), "expected one of the tracks"),
        (act("merge", track_id=1, other_track_id=1), "two different tracks"),
        (act("split", track_id=1, frame=0), "expected a frame inside track 1"),
        (act("split", track_id=1, frame=99), "expected a frame inside track 1"),
    ],
)
def test_impossible_actions_are_refused(labels, action, message):
    with pytest.raises(InputError, match=message):
        apply_review(labels, [action])


def test_an_action_on_a_merged_away_track_is_refused(labels):
    with pytest.raises(InputError, match="got track 2"):
        apply_review(labels, [act("merge", track_id=1, other_track_id=2), act("accept", track_id=2)])


@pytest.mark.parametrize(
    "fields",
    [
        {"action": "relabel", "track_id": 1},
        {"action": "merge", "track_id": 1},
        {"action": "accept_above"},
        {"action": "relabel", "track_id": 1, "class_id": 43},
        {"action": "dance", "track_id": 1},
    ],
)
def test_actions_need_their_fields(fields):
    with pytest.raises(ValidationError):
        ReviewAction.model_validate({"by": "rita", "at": AT, **fields})


@given(st.lists(st.sampled_from(["accept", "reject", "relabel", "merge", "split"]), max_size=8), st.integers(0, 1000))
def test_replay_is_deterministic_and_keeps_a_valid_file(kinds, seed):
    base = label_file(*(track(i, [10 * i, 10 * i + 1, 10 * i + 2]) for i in range(1, 6)))
    actions = []
    current = base
    for n, kind in enumerate(kinds):
        ids = sorted(t.track_id for t in current.tracks)
        tid = ids[(seed + n) % len(ids)]
        fields: dict[str, object] = {"track_id": tid}
        if kind == "relabel":
            fields["class_id"] = (seed + n) % 43
        elif kind == "merge":
            if len(ids) < 2:
                continue
            fields["other_track_id"] = ids[(seed + n + 1) % len(ids)]
            if fields["other_track_id"] == tid:
                continue
        elif kind == "split":
            t = next(t for t in current.tracks if t.track_id == tid)
            if len(t.boxes) < 2:
                continue
            fields["frame"] = t.boxes[1].frame
        action = act(kind, **fields)
        current = apply_review(current, [action])
        actions.append(action)
    replayed = apply_review(base, actions)
    assert replayed == apply_review(base, actions)
    assert replayed == current
    LabelFile.model_validate(replayed.model_dump())  # still a valid label file
