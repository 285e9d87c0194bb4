"""services.common.labelfile: schema, validators, save/load, and the committed JSON Schema."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.exports import label_file_json_schema
from services.common.errors import InputError
from services.common.labelfile import (
    SCHEMA_VERSION,
    Box,
    LabelFile,
    ModelRef,
    Recording,
    Review,
    RunStats,
    Track,
    load_label_file,
    save_label_file,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
SCHEMA_PATH = REPO_ROOT / "docs" / "label-file.schema.json"
REGENERATE = (
    '.venv/bin/python -c "from pathlib import Path; from gateway.exports import label_file_json_schema; '
    "Path('docs/label-file.schema.json').write_text(label_file_json_schema())\""
)


def box(
    frame: int, *, t_s: float | None = None, xyxy: Sequence[float] = (1.0, 2.0, 3.0, 4.0), score: float = 0.9
) -> Box:
    x1, y1, x2, y2 = xyxy
    return Box(frame=frame, t_s=frame / 25 if t_s is None else t_s, xyxy=(x1, y1, x2, y2), score=score)


def track_doc(track_id: int = 1, frames: Sequence[int] = (0, 1), **overrides: Any) -> dict[str, Any]:
    """A track as plain JSON-able data, so tests can break it before validation."""
    doc: dict[str, Any] = {
        "track_id": track_id,
        "class_id": 14,
        "class_name": "stop",
        "confidence": 0.9,
        "first_frame": frames[0],
        "last_frame": frames[-1],
        "start_s": frames[0] / 25,
        "end_s": frames[-1] / 25,
        "boxes": [box(f).model_dump() for f in frames],
    }
    doc.update(overrides)
    return doc


def label_doc(*tracks: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A whole label file as plain data."""
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "recording": {
            "id": "rec1",
            "source": "rec.mp4",
            "sha256": "0" * 64,
            "width": 1920,
            "height": 1080,
            "fps": 25.0,
            "frame_count": 100,
            "duration_s": 4.0,
        },
        "models": {"detector": {"name": "det", "version": "3", "sha256": "a" * 64}},
        "settings": {"review_threshold": 0.6},
        "code_version": "0.1.0",
        "created_at": "2026-01-01T00:00:00Z",
        "stats": {
            "frames_decoded": 100,
            "frames_detected": 100,
            "detections": 2,
            "tracks_dropped": 0,
            "elapsed_s": 1.5,
        },
        "tracks": list(tracks),
    }
    doc.update(overrides)
    return doc


def labels(*tracks: dict[str, Any]) -> LabelFile:
    return LabelFile.model_validate(label_doc(*tracks))


# --------------------------------------------------------------------------------------------------------------------
# The committed JSON Schema


def test_committed_json_schema_is_current():
    assert SCHEMA_PATH.is_file(), f"{SCHEMA_PATH} is missing; generate it with: {REGENERATE}"
    assert SCHEMA_PATH.read_text(encoding="utf-8") == label_file_json_schema(), (
        f"docs/label-file.schema.json is out of date with services/common/labelfile.py; regenerate it with: "
        f"{REGENERATE} (and bump SCHEMA_VERSION if an old reader would misread new files)"
    )


def test_json_schema_accepts_a_label_file_shape():
    schema = json.loads(label_file_json_schema())
    assert schema["title"] == "LabelFile"
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) >= {"recording", "models", "settings", "code_version", "created_at", "stats"}


# --------------------------------------------------------------------------------------------------------------------
# Save and load


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def corners(draw: st.DrawFn) -> tuple[float, float, float, float]:
    """A valid ``xyxy``: x1 <= x2 and y1 <= y2."""
    x1, x2 = sorted(draw(st.tuples(finite, finite)))
    y1, y2 = sorted(draw(st.tuples(finite, finite)))
    return x1, y1, x2, y2


@st.composite
def label_files(draw: st.DrawFn) -> LabelFile:
    tracks = []
    last_frame = -1
    for track_id in draw(st.sets(st.integers(1, 10_000), max_size=3)):
        frames = sorted(draw(st.sets(st.integers(0, 10_000), min_size=1, max_size=5)))
        last_frame = max(last_frame, frames[-1])
        times = sorted(draw(st.lists(finite, min_size=len(frames), max_size=len(frames))))
        boxes = [
            box(f, t_s=t, xyxy=draw(corners()), score=draw(st.floats(0, 1))) for f, t in zip(frames, times, strict=True)
        ]
        status = draw(st.sampled_from(["pending", "accepted", "relabelled", "rejected"]))
        review = Review(status=status, class_id=3, class_name="speed_limit_60") if status == "relabelled" else Review()
        tracks.append(
            track_doc(
                track_id,
                frames,
                class_name=draw(st.text(max_size=20)),
                confidence=draw(st.floats(0, 1)),
                boxes=[b.model_dump() for b in boxes],
                review=review.model_dump(),
            )
        )
    doc = label_doc(*tracks)
    doc["recording"]["source"] = draw(st.text(max_size=40))
    doc["recording"]["fps"] = draw(st.floats(0, 240))
    doc["recording"]["frame_count"] = last_frame + 1 + draw(st.integers(0, 100))
    doc["settings"] = draw(st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=3))
    return LabelFile.model_validate(doc)


@given(label_files())
def test_save_load_round_trip(tmp_path_factory, original):
    path = tmp_path_factory.mktemp("rt") / "rec.labels.json"
    save_label_file(path, original)
    assert load_label_file(path) == original


def test_save_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "rec.labels.json"
    path.write_text("old")
    first = labels(track_doc(1))
    save_label_file(path, first)
    assert load_label_file(path) == first
    second = labels(track_doc(1), track_doc(2, (5, 9)))
    save_label_file(path, second)
    assert load_label_file(path) == second
    assert [p.name for p in tmp_path.iterdir()] == ["rec.labels.json"]
    assert path.read_bytes().endswith(b"}\n")


def test_load_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"expected a readable file, got No such file"):
        load_label_file(tmp_path / "absent.json")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", r"expected JSON, got "),
        (b"\xff\xfe", r"expected JSON, got "),
        (b"[1, 2]", r"expected a JSON object, got list$"),
        (json.dumps(label_doc(schema_version=2)).encode(), r"expected schema_version 1, got 2$"),
        (json.dumps({"recording": {}}).encode(), r"expected schema_version 1, got None$"),
    ],
)
def test_load_refuses_what_is_not_a_label_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as info:
        load_label_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("break_it", "field"),
    [
        (lambda d: d["recording"].update(width=0), "recording.width"),
        (lambda d: d["recording"].update(sha256="xyz"), "recording.sha256"),
        (lambda d: d["recording"].update(colour="red"), "recording.colour"),
        (lambda d: d["tracks"][0]["boxes"][0].update(score=1.5), "tracks.0.boxes.0.score"),
        # json.dumps writes NaN and Infinity, json.loads reads them back: the schema, not JSON, refuses them.
        (lambda d: d["tracks"][0]["boxes"][0].update(t_s=float("nan")), "tracks.0.boxes.0.t_s"),
        (lambda d: d["tracks"][0]["boxes"][0].update(xyxy=[1, 2, float("inf"), 4]), "tracks.0.boxes.0.xyxy.2"),
        (lambda d: d["recording"].update(fps=float("nan")), "recording.fps"),
        (lambda d: d["tracks"][0].update(uncertainty=["because"]), "tracks.0.uncertainty.0"),
        (lambda d: d.pop("stats"), "stats"),
    ],
)
def test_load_names_the_bad_field(tmp_path, break_it, field):
    doc = label_doc(track_doc(1))
    break_it(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=rf": {field}: .*\(1 problem\(s\) in all\)$"):
        load_label_file(path)


# --------------------------------------------------------------------------------------------------------------------
# Validators


@pytest.mark.parametrize(
    ("track", "message"),
    [
        (track_doc(3, (0, 5), boxes=[box(5).model_dump(), box(0).model_dump()]), "track 3: boxes must have strictly"),
        (track_doc(3, (0, 5), boxes=[box(0).model_dump(), box(0).model_dump()]), "track 3: boxes must have strictly"),
        (track_doc(3, (0, 5), first_frame=1), r"track 3: first_frame/last_frame 1/5 do not match its boxes \(0..5\)"),
        (track_doc(3, (0, 5), last_frame=7), r"track 3: first_frame/last_frame 0/7 do not match its boxes \(0..5\)"),
        (track_doc(3, (0, 5), boxes=[]), "at least 1 item"),
        (track_doc(3, review={"status": "relabelled", "class_id": 14}), "a relabelled track needs class_id and"),
        (track_doc(3, review={"status": "relabelled", "class_name": "stop"}), "a relabelled track needs class_id and"),
    ],
)
def test_track_validators(track, message):
    with pytest.raises(ValidationError, match=message):
        Track.model_validate(track)


@pytest.mark.parametrize("t_s", [float("nan"), float("inf"), float("-inf")])
def test_box_time_must_be_finite(t_s):
    with pytest.raises(ValidationError, match=r"t_s\n +Input should be a finite number"):
        box(0, t_s=t_s)


@pytest.mark.parametrize(
    ("xyxy", "where"),
    [
        ((float("inf"), 2.0, 3.0, 4.0), "xyxy.0"),
        ((1.0, 2.0, float("inf"), 4.0), "xyxy.2"),
        ((1.0, float("-inf"), 3.0, 4.0), "xyxy.1"),
        ((1.0, 2.0, 3.0, float("nan")), "xyxy.3"),
    ],
)
def test_box_corners_must_be_finite(xyxy, where):
    with pytest.raises(ValidationError, match=rf"{where}\n +Input should be a finite number"):
        box(0, xyxy=xyxy)


@pytest.mark.parametrize(
    "xyxy",
    [
        (3.0, 2.0, 1.0, 4.0),  # x2 < x1
        (1.0, 4.0, 3.0, 2.0),  # y2 < y1
        (3.0, 4.0, 1.0, 2.0),  # both
    ],
)
def test_box_corners_must_be_ordered(xyxy):
    with pytest.raises(ValidationError, match=r"xyxy: expected x1 <= x2 and y1 <= y2, got \("):
        box(0, xyxy=xyxy)


def test_box_may_be_empty():
    # A zero-width or zero-height box (a detector can return one) is ordered, so it is kept.
    assert box(0, xyxy=(5.0, 6.0, 5.0, 6.0)).xyxy == (5.0, 6.0, 5.0, 6.0)


def test_track_box_times_must_not_decrease():
    boxes = [box(0, t_s=0.5).model_dump(), box(1, t_s=0.2).model_dump()]
    with pytest.raises(ValidationError, match="track 3: box times must not decrease"):
        Track.model_validate(track_doc(3, (0, 1), boxes=boxes, start_s=0.5, end_s=0.2))


def test_track_box_times_may_repeat():
    # Two decoded frames may share a presentation time (a broken or rounded stream): not a decrease.
    boxes = [box(0, t_s=0.5).model_dump(), box(1, t_s=0.5).model_dump()]
    made = Track.model_validate(track_doc(3, (0, 1), boxes=boxes, start_s=0.5, end_s=0.5))
    assert [b.t_s for b in made.boxes] == [0.5, 0.5]


def test_track_frames_must_be_below_frame_count():
    doc = label_doc(track_doc(1, (0, 99)), track_doc(2, (50, 100)))
    with pytest.raises(ValidationError, match=r"track 2: expected frames below recording.frame_count \(100\), got 100"):
        LabelFile.model_validate(doc)
    doc["tracks"].pop()
    assert LabelFile.model_validate(doc).tracks[0].last_frame == 99  # the last decoded frame is fine


def test_track_ids_unique():
    with pytest.raises(ValidationError, match="tracks: track_id values must be unique"):
        labels(track_doc(1), track_doc(2), track_doc(1, (4, 6)))


def test_models_are_frozen_and_forbid_unknown_fields():
    made = labels(track_doc(1))
    with pytest.raises(ValidationError):
        made.tracks[0].boxes[0].frame = 3  # type: ignore[misc]
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ModelRef.model_validate({"name": "d", "version": "1", "sha256": "x", "url": "http://x"})
    assert Recording.model_fields["frame_count"].is_required()
    assert RunStats(frames_decoded=0, frames_detected=0, detections=0, tracks_dropped=0, elapsed_s=0).stage_s == {}


def test_valid_file_loads(tmp_path):
    path = tmp_path / "rec.labels.json"
    path.write_text(json.dumps(label_doc(track_doc(1), track_doc(2, (3, 7, 9)))))
    loaded = load_label_file(path)
    assert [t.track_id for t in loaded.tracks] == [1, 2]
    assert [b.frame for b in loaded.tracks[1].boxes] == [3, 7, 9]
    assert loaded.tracks[0].review.status == "pending"
