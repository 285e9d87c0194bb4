"""gateway.exports: CVAT for video, MOTChallenge and Label Studio exports of a label file."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence
from typing import Any
from xml.etree import ElementTree as ET

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.exports import (
    CVAT_LABEL,
    FORMATS,
    CvatTrack,
    export_labels,
    label_studio_config,
    read_cvat_video,
    to_cvat_video,
    to_label_studio,
    to_mot,
)
from services.common.classes import GTSRB_CLASS_NAMES
from services.common.errors import InputError
from services.common.labelfile import Box, LabelFile, ModelRef, Recording, Review, RunStats, Track

FPS = 10.0
XYXY = (100.0, 50.0, 140.0, 90.0)
HOSTILE = "a<b>&c\"d'e]]>"


# --------------------------------------------------------------------------------------------------------------------
# Builders


def box(frame: int, xyxy: Sequence[float] = XYXY, *, score: float = 0.9, t_s: float | None = None) -> Box:
    """A box on decode index ``frame``, at time frame / FPS unless ``t_s`` is given."""
    x1, y1, x2, y2 = xyxy
    return Box(frame=frame, t_s=frame / FPS if t_s is None else t_s, xyxy=(x1, y1, x2, y2), score=score)


def track(
    track_id: int,
    boxes: Sequence[int | Box],
    *,
    class_id: int = 2,
    class_name: str = "speed_limit_50",
    confidence: float = 0.8,
    review: Review | None = None,
) -> Track:
    """A track from boxes (an int is a default box on that frame); frames and times derived from the boxes."""
    made = tuple(b if isinstance(b, Box) else box(b) for b in boxes)
    return Track(
        track_id=track_id,
        class_id=class_id,
        class_name=class_name,
        confidence=confidence,
        first_frame=made[0].frame,
        last_frame=made[-1].frame,
        start_s=made[0].t_s,
        end_s=made[-1].t_s,
        review=review or Review(),
        boxes=made,
    )


def label_file(
    *tracks: Track,
    frame_count: int = 100,
    width: int = 1000,
    height: int = 500,
    fps: float = FPS,
    source: str = "rec.mp4",
) -> LabelFile:
    """A label file of one recording holding ``tracks``."""
    return LabelFile(
        recording=Recording(
            id="rec1",
            source=source,
            sha256="0" * 64,
            width=width,
            height=height,
            fps=fps,
            frame_count=frame_count,
            duration_s=frame_count / fps if fps else 0.0,
        ),
        models={
            "detector": ModelRef(name="det", version="det-3", sha256="a" * 64),
            "classifier": ModelRef(name="cls", version="cls-7", sha256="b" * 64),
        },
        settings={},
        code_version="0.1.0",
        created_at="2026-01-01T00:00:00Z",
        stats=RunStats(
            frames_decoded=frame_count, frames_detected=frame_count, detections=0, tracks_dropped=0, elapsed_s=1
        ),
        tracks=tracks,
    )


def relabelled(class_name: str, class_id: int = 14) -> Review:
    return Review(status="relabelled", class_id=class_id, class_name=class_name, by="alice", at="2026-01-02T00:00:00Z")


REJECTED = Review(status="rejected", by="alice")


def visible(cvat: CvatTrack) -> list[int]:
    return [b.frame for b in cvat.boxes if not b.outside]


def outside(cvat: CvatTrack) -> list[int]:
    return [b.frame for b in cvat.boxes if b.outside]


def ls_results(doc: bytes) -> list[dict[str, Any]]:
    tasks = json.loads(doc)
    assert isinstance(tasks, list)
    assert len(tasks) == 1
    results: list[dict[str, Any]] = tasks[0]["predictions"][0]["result"]
    return results


# --------------------------------------------------------------------------------------------------------------------
# export_labels and shared rules


def test_formats_named():
    assert FORMATS == ("cvat-video", "mot", "label-studio")


def test_unknown_format_refused(tmp_path):
    with pytest.raises(InputError, match=r"^format: expected one of cvat-video, mot, label-studio, got 'x'$"):
        export_labels(label_file(), "x", tmp_path / "out")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_negative_max_gap_refused(fmt, tmp_path):
    with pytest.raises(InputError, match=r"max_gap_frames: expected an int >= 0, got -1"):
        export_labels(label_file(track(1, [0])), fmt, tmp_path / "out", max_gap_frames=-1)


def test_box_past_frame_count_cannot_reach_the_exports():
    # The schema refuses it when the label file is built, so no export ever sees such a file.
    with pytest.raises(ValidationError, match=r"track 1: expected frames below recording.frame_count \(10\), got 10"):
        label_file(track(1, [3, 10]), frame_count=10)


@pytest.mark.parametrize("fmt", ["cvat-video", "label-studio"])
def test_file_formats_refuse_a_directory(fmt, tmp_path):
    with pytest.raises(InputError, match=r"^out: expected a file path"):
        export_labels(label_file(), fmt, tmp_path)


def test_mot_refuses_a_file_as_directory(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(InputError, match=r"^out: expected a directory \(or a \.zip path\)"):
        export_labels(label_file(), "mot", tmp_path / "taken")


@pytest.mark.parametrize(
    ("fmt", "out", "written"),
    [
        ("cvat-video", "rec.xml", ["rec.xml"]),
        ("mot", "mot", ["mot/gt/gt.txt", "mot/gt/labels.txt", "mot/results.txt"]),
        ("mot", "rec.mot.zip", ["rec.mot.zip"]),
        ("label-studio", "rec.json", ["rec.json", "rec.config.xml"]),
    ],
)
def test_export_writes_the_named_files_and_no_temp_files(fmt, out, written, tmp_path):
    labels = label_file(track(1, [0, 1, 2]))
    # An older export at the same place is replaced.
    (tmp_path / written[0]).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / written[0]).write_bytes(b"old")
    paths = export_labels(labels, fmt, tmp_path / out)
    assert paths == [tmp_path / w for w in written]
    on_disk = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert on_disk == sorted(written)  # nothing else: no .tmp files left behind
    assert all(p.read_bytes() != b"old" for p in paths)


def test_export_contents_equal_the_pure_functions(tmp_path):
    labels = label_file(track(1, [0, 4]), track(2, [1, 2], class_id=14, class_name="stop"))
    assert export_labels(labels, "cvat-video", tmp_path / "a.xml")[0].read_bytes() == to_cvat_video(labels)
    mot = to_mot(labels)
    for path in export_labels(labels, "mot", tmp_path / "mot"):
        assert path.read_bytes() == mot[path.relative_to(tmp_path / "mot").as_posix()]
    tasks, config = export_labels(labels, "label-studio", tmp_path / "ls.json", video_url="s3://b/rec.mp4")
    assert tasks.read_bytes() == to_label_studio(labels, "s3://b/rec.mp4")
    assert config.read_text() == label_studio_config(labels)


# --------------------------------------------------------------------------------------------------------------------
# CVAT for video 1.1


def test_cvat_round_trip_gives_the_same_tracks():
    first = track(
        7,
        [
            box(0, (10.0, 20.0, 30.0, 40.0), score=0.5),
            box(1, (11.111, 21.0, 31.0, 41.0)),
            box(2, (12.5, 22.0, 33.0, 44.0)),
        ],
    )
    second = track(9, [box(5, (500.004, 250.0, 520.0, 270.0), score=0.33)], class_id=-1, class_name="unknown")
    labels = label_file(first, second)
    cvat = read_cvat_video(to_cvat_video(labels))

    assert [(t.cvat_id, t.track_id, t.label, t.sign_class, t.review) for t in cvat] == [
        (7, 7, CVAT_LABEL, "speed_limit_50", "pending"),
        (9, 9, CVAT_LABEL, "unknown", "pending"),
    ]
    for original, back in zip(labels.tracks, cvat, strict=True):
        shown = [b for b in back.boxes if not b.outside]
        assert [b.frame for b in shown] == [b.frame for b in original.boxes]
        for b_back, b_orig in zip(shown, original.boxes, strict=True):
            assert b_back.xyxy == pytest.approx(b_orig.xyxy, abs=0.01)
            assert b_back.score == pytest.approx(b_orig.score, abs=0.005)
            assert b_back.keyframe
    assert outside(cvat[0]) == [3]
    assert outside(cvat[1]) == [6]


@pytest.mark.parametrize(
    ("frames", "max_gap", "expected_outside"),
    [
        ([2, 3, 4], 30, [5]),  # no gap: one outside after the last box
        ([0, 31], 30, [32]),  # 30 frames without a box: still one segment
        ([0, 32], 30, [1, 33]),  # 31: the segment ends on frame 1
        ([0, 2, 3, 10, 50, 51], 5, [4, 11, 52]),
        ([0, 1, 3], 0, [2, 4]),  # max_gap 0: any frame without a box ends a segment
        ([97, 99], 1, []),  # the last box on the video's last frame: no outside past the end
        ([90, 99], 1, [91]),
    ],
)
def test_cvat_outside_keyframes_at_gaps_and_ends(frames, max_gap, expected_outside):
    labels = label_file(track(1, frames), frame_count=100)
    (cvat,) = read_cvat_video(to_cvat_video(labels, max_gap_frames=max_gap))
    assert visible(cvat) == frames
    assert outside(cvat) == expected_outside
    assert [b.frame for b in cvat.boxes] == sorted(frames + expected_outside)  # in frame order
    # An outside keyframe repeats the box that ends the segment.
    by_frame = {b.frame: b for b in cvat.boxes}
    for frame in expected_outside:
        assert by_frame[frame].xyxy == by_frame[frame - 1].xyxy


def test_cvat_single_frame_video_has_no_outside():
    (cvat,) = read_cvat_video(to_cvat_video(label_file(track(1, [0]), frame_count=1)))
    assert [(b.frame, b.outside) for b in cvat.boxes] == [(0, False)]


def test_cvat_header_declares_the_label_and_attributes():
    root = ET.fromstring(to_cvat_video(label_file(track(1, [0]), frame_count=5400, width=1920, height=1080)))
    assert root.findtext("version") == "1.1"
    task = root.find("meta/task")
    assert task is not None
    assert task.findtext("size") == "5400"
    assert task.findtext("mode") == "interpolation"
    assert task.findtext("original_size/width") == "1920"
    assert task.findtext("original_size/height") == "1080"
    (label,) = task.findall("labels/label")
    assert label.findtext("name") == CVAT_LABEL
    specs = {a.findtext("name"): a for a in label.findall("attributes/attribute")}
    assert set(specs) == {"sign_class", "score", "review", "track_confidence", "track_id"}
    sign_class = specs["sign_class"]
    assert (sign_class.findtext("mutable"), sign_class.findtext("input_type")) == ("False", "select")
    assert sign_class.findtext("default_value") == "unknown"
    assert (sign_class.findtext("values") or "").split("\n") == ["unknown", *GTSRB_CLASS_NAMES]
    score = specs["score"]
    assert (score.findtext("mutable"), score.findtext("input_type"), score.findtext("values")) == (
        "True",
        "number",
        "0;1;0.01",
    )
    assert (specs["review"].findtext("values") or "").split("\n") == ["pending", "accepted", "relabelled", "rejected"]
    (track_el,) = root.findall("track")
    assert track_el.attrib == {"id": "1", "label": CVAT_LABEL, "source": "auto"}
    first = track_el.find("box")
    assert first is not None
    assert {k: first.attrib[k] for k in ("frame", "keyframe", "outside", "occluded", "z_order")} == {
        "frame": "0",
        "keyframe": "1",
        "outside": "0",
        "occluded": "0",
        "z_order": "0",
    }
    assert (first.attrib["xtl"], first.attrib["ytl"], first.attrib["xbr"], first.attrib["ybr"]) == (
        "100.00",
        "50.00",
        "140.00",
        "90.00",
    )
    attrs = {a.attrib["name"]: a.text for a in first.findall("attribute")}
    assert attrs == {
        "sign_class": "speed_limit_50",
        "review": "pending",
        "track_confidence": "0.80",
        "track_id": "1",
        "score": "0.90",
    }


def test_cvat_leaves_rejected_tracks_out_and_uses_the_reviewers_class():
    labels = label_file(
        track(1, [0, 1], review=REJECTED),
        track(2, [2, 3], review=relabelled("stop")),
        track(3, [4], review=Review(status="accepted")),
    )
    cvat = read_cvat_video(to_cvat_video(labels))
    assert [(t.track_id, t.sign_class, t.review) for t in cvat] == [
        (2, "stop", "relabelled"),
        (3, "speed_limit_50", "accepted"),
    ]


def test_cvat_escapes_hostile_strings():
    labels = label_file(track(1, [0], review=relabelled(HOSTILE, class_id=99)), source=HOSTILE + "\x01.mp4")
    xml = to_cvat_video(labels)
    root = ET.fromstring(xml)  # well-formed despite <, &, quotes, ]]> and a control character
    assert root.findtext("meta/task/name") == HOSTILE + "\ufffd.mp4"
    values = root.findtext("meta/task/labels/label/attributes/attribute/values") or ""
    assert values.split("\n")[-1] == HOSTILE  # a reviewer's own class is declared after the GTSRB ones
    (cvat,) = read_cvat_video(xml)
    assert cvat.sign_class == HOSTILE


def test_cvat_empty_recording():
    xml = to_cvat_video(label_file(frame_count=0, fps=0.0))
    assert read_cvat_video(xml) == []
    assert ET.fromstring(xml).findtext("meta/task/size") == "0"


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        (b"not xml <", r"^CVAT XML: expected a well-formed XML document, got "),
        (b"<View/>", r"^CVAT XML: expected an <annotations> root, got <View>$"),
        (b'<annotations><track id="0" label="a"><box frame="x"/></track></annotations>', r"^CVAT XML: track '0': "),
    ],
)
def test_read_cvat_refuses_what_is_not_cvat(xml, message):
    with pytest.raises(InputError, match=message):
        read_cvat_video(xml)


def test_read_cvat_reads_interpolated_boxes_as_non_keyframes():
    xml = (
        b'<annotations><version>1.1</version><track id="4" label="car">'
        b'<box frame="0" keyframe="1" outside="0" occluded="0" xtl="1" ytl="2" xbr="3" ybr="4"/>'
        b'<box frame="1" keyframe="0" outside="0" occluded="0" xtl="1.5" ytl="2" xbr="3" ybr="4"/>'
        b"</track></annotations>"
    )
    (cvat,) = read_cvat_video(xml)
    assert (cvat.cvat_id, cvat.label, cvat.sign_class, cvat.review, cvat.track_id) == (4, "car", "unknown", None, None)
    assert [(b.frame, b.keyframe, b.score) for b in cvat.boxes] == [(0, True, None), (1, False, None)]


coordinate = st.floats(min_value=0, max_value=4000, allow_nan=False, allow_infinity=False)


@st.composite
def corners(draw: st.DrawFn) -> tuple[float, float, float, float]:
    """A valid ``xyxy``: x1 <= x2 and y1 <= y2."""
    x1, x2 = sorted(draw(st.tuples(coordinate, coordinate)))
    y1, y2 = sorted(draw(st.tuples(coordinate, coordinate)))
    return x1, y1, x2, y2


@st.composite
def random_tracks(draw: st.DrawFn) -> tuple[LabelFile, int]:
    frame_count = draw(st.integers(1, 120))
    tracks = []
    for track_id in range(1, draw(st.integers(0, 4)) + 1):
        frames = sorted(draw(st.sets(st.integers(0, frame_count - 1), min_size=1, max_size=15)))
        boxes = [box(f, draw(corners()), score=draw(st.floats(0, 1))) for f in frames]
        tracks.append(track(track_id, boxes, class_name=draw(st.sampled_from(GTSRB_CLASS_NAMES))))
    return label_file(*tracks, frame_count=frame_count), draw(st.integers(0, 10))


@given(random_tracks())
def test_cvat_round_trip_property(case):
    labels, max_gap = case
    cvat = read_cvat_video(to_cvat_video(labels, max_gap_frames=max_gap))
    assert [t.track_id for t in cvat] == [t.track_id for t in labels.tracks]
    for original, back in zip(labels.tracks, cvat, strict=True):
        assert back.sign_class == original.class_name
        shown = [b for b in back.boxes if not b.outside]
        assert [b.frame for b in shown] == [b.frame for b in original.boxes]
        for b_back, b_orig in zip(shown, original.boxes, strict=True):
            assert b_back.xyxy == pytest.approx(b_orig.xyxy, abs=0.01)
        frames = [b.frame for b in original.boxes]
        expected = [a + 1 for a, b in zip(frames, frames[1:], strict=False) if b - a - 1 > max_gap]
        if frames[-1] + 1 < labels.recording.frame_count:
            expected.append(frames[-1] + 1)
        assert outside(back) == expected


# --------------------------------------------------------------------------------------------------------------------
# MOTChallenge


def mot_text(labels: LabelFile, **kwargs: Any) -> dict[str, list[str]]:
    return {name: data.decode().splitlines() for name, data in to_mot(labels, **kwargs).items()}


def test_mot_lines_interpolated_and_sorted():
    labels = label_file(
        track(
            5,
            [box(0, (10.0, 20.0, 30.0, 40.0), score=0.9), box(3, (16.0, 26.0, 39.0, 49.0), score=0.6)],
            class_id=14,
            class_name="stop",
        ),
        track(2, [box(1, (0.5, 1.25, 2.0, 3.0), score=0.5)], class_id=2, class_name="speed_limit_50"),
    )
    text = mot_text(labels)
    # Frames are 1-based; frames 1 and 2 of track 5 are interpolated (a third and two thirds of the way), with the
    # lower neighbour score as conf; sorted by frame then track id.
    assert text["gt/gt.txt"] == [
        "1,5,10.00,20.00,20.00,20.00,1,2,1",
        "2,2,0.50,1.25,1.50,1.75,1,1,1",
        "2,5,12.00,22.00,21.00,21.00,1,2,1",
        "3,5,14.00,24.00,22.00,22.00,1,2,1",
        "4,5,16.00,26.00,23.00,23.00,1,2,1",
    ]
    assert text["results.txt"] == [
        "1,5,10.00,20.00,20.00,20.00,0.9000,-1,-1,-1",
        "2,2,0.50,1.25,1.50,1.75,0.5000,-1,-1,-1",
        "2,5,12.00,22.00,21.00,21.00,0.6000,-1,-1,-1",
        "3,5,14.00,24.00,22.00,22.00,0.6000,-1,-1,-1",
        "4,5,16.00,26.00,23.00,23.00,0.6000,-1,-1,-1",
    ]
    # class_id is the 1-based line in labels.txt, which lists the classes used by class id.
    assert text["gt/labels.txt"] == ["speed_limit_50", "stop"]


def test_mot_gaps_longer_than_max_gap_get_no_rows():
    labels = label_file(track(1, [0, 2, 6]))
    assert [line.split(",")[0] for line in mot_text(labels, max_gap_frames=2)["gt/gt.txt"]] == ["1", "2", "3", "7"]
    assert [line.split(",")[0] for line in mot_text(labels, max_gap_frames=3)["gt/gt.txt"]] == [
        str(f) for f in range(1, 8)
    ]
    assert [line.split(",")[0] for line in mot_text(labels, max_gap_frames=0)["gt/gt.txt"]] == ["1", "3", "7"]


def test_mot_labels_reviewed_classes_unknown_first_rejected_out():
    labels = label_file(
        track(1, [0], class_id=14, class_name="stop"),
        track(2, [1], class_id=-1, class_name="unknown"),
        track(3, [2], review=relabelled("yield", class_id=13)),
        track(4, [3], class_id=17, class_name="no_entry", review=REJECTED),
        track(5, [4], class_id=14, class_name="stop"),
    )
    text = mot_text(labels)
    assert text["gt/labels.txt"] == ["unknown", "yield", "stop"]
    assert [(line.split(",")[1], line.split(",")[7]) for line in text["gt/gt.txt"]] == [
        ("1", "3"),
        ("2", "1"),
        ("3", "2"),
        ("5", "3"),
    ]
    assert "4" not in {line.split(",")[1] for line in text["results.txt"]}


def test_mot_empty():
    assert to_mot(label_file(frame_count=0)) == {"gt/gt.txt": b"", "gt/labels.txt": b"", "results.txt": b""}


def test_mot_zip_holds_the_three_files(tmp_path):
    labels = label_file(track(1, [0, 2]), track(2, [1], class_id=14, class_name="stop"))
    (path,) = export_labels(labels, "mot", tmp_path / "rec.zip")
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["gt/gt.txt", "gt/labels.txt", "results.txt"]
        assert {n: archive.read(n) for n in archive.namelist()} == to_mot(labels)
    # Fixed timestamps: the same labels give the same bytes.
    again = export_labels(labels, "mot", tmp_path / "again.zip")[0]
    assert again.read_bytes() == path.read_bytes()
    assert zipfile.ZipFile(io.BytesIO(path.read_bytes())).testzip() is None


# --------------------------------------------------------------------------------------------------------------------
# Label Studio


def test_label_studio_task_layout():
    labels = label_file(track(3, [0, 1]), frame_count=5400, source="rec 1.mp4")
    (task,) = json.loads(to_label_studio(labels))
    assert task["data"] == {"video": "rec 1.mp4", "fps": FPS}
    (prediction,) = task["predictions"]
    assert prediction["model_version"] == "det-3+cls-7"
    (result,) = prediction["result"]
    assert {k: result[k] for k in ("id", "from_name", "to_name", "type", "score")} == {
        "id": "trk3",
        "from_name": "box",
        "to_name": "video",
        "type": "videorectangle",
        "score": 0.8,
    }
    value = result["value"]
    assert (value["framesCount"], value["duration"], value["labels"]) == (5400, 540.0, ["speed_limit_50"])
    assert json.loads(to_label_studio(labels, "https://x/rec.mp4"))[0]["data"]["video"] == "https://x/rec.mp4"


def test_label_studio_percent_coordinates():
    labels = label_file(track(1, [box(0, (100.0, 50.0, 140.0, 90.0)), box(1, (0.0, 0.0, 1000.0, 500.0))]))
    ((first, second),) = [r["value"]["sequence"] for r in ls_results(to_label_studio(labels))]
    assert (first["x"], first["y"], first["width"], first["height"], first["rotation"]) == (10.0, 10.0, 4.0, 8.0, 0)
    assert (second["x"], second["y"], second["width"], second["height"]) == (0.0, 0.0, 100.0, 100.0)


def test_label_studio_frames_follow_time_under_variable_frame_rate():
    # Decode indices 0..4, but the frames came at uneven times: frame = round(t_s * fps) + 1, never index + 1.
    times = [0.0, 0.21, 0.26, 0.52, 0.94]
    labels = label_file(track(1, [box(i, t_s=t) for i, t in enumerate(times)]))
    ((sequence,),) = [[r["value"]["sequence"]] for r in ls_results(to_label_studio(labels))]
    assert [(s["frame"], s["time"]) for s in sequence] == [(1, 0.0), (3, 0.21), (4, 0.26), (6, 0.52), (10, 0.94)]


def test_label_studio_boxes_on_one_player_frame_keep_the_later():
    labels = label_file(track(1, [box(0, t_s=0.0), box(1, t_s=0.31, score=0.5), box(2, t_s=0.34, score=0.6)]))
    (result,) = ls_results(to_label_studio(labels))
    assert [(s["frame"], s["time"], s["enabled"]) for s in result["value"]["sequence"]] == [
        (1, 0.0, True),
        (4, 0.34, False),
    ]


def test_box_times_going_backwards_cannot_reach_the_exports():
    # The schema refuses it when the track is built, so Label Studio frames (from times) never go backwards.
    with pytest.raises(ValidationError, match=r"track 1: box times must not decrease"):
        track(1, [box(0, t_s=0.5), box(1, t_s=0.2)])


@given(
    st.lists(st.floats(0, 3600, allow_nan=False, allow_infinity=False), min_size=1, max_size=20),
    st.floats(0.1, 240, allow_nan=False, allow_infinity=False),
)
def test_label_studio_frames_increase_whenever_times_do_not_decrease(times, fps):
    labels = label_file(track(1, [box(i, t_s=t) for i, t in enumerate(sorted(times))]), fps=fps)
    (result,) = ls_results(to_label_studio(labels, max_gap_frames=len(times)))
    frames = [s["frame"] for s in result["value"]["sequence"]]
    assert frames == sorted(set(frames))  # strictly increasing: boxes on one player frame were merged
    assert result["value"]["sequence"][-1]["time"] == round(max(times), 6)  # the later box is the one kept


def test_label_studio_disables_segment_ends():
    labels = label_file(track(1, [0, 1, 2, 10, 11, 40]), frame_count=100)
    (result,) = ls_results(to_label_studio(labels, max_gap_frames=5))
    assert [(s["frame"], s["enabled"]) for s in result["value"]["sequence"]] == [
        (1, True),
        (2, True),
        (3, False),
        (11, True),
        (12, False),
        (41, False),
    ]


def test_label_studio_scores_and_reviewed_classes():
    labels = label_file(
        track(1, [0], confidence=0.7),
        track(2, [1], confidence=0.4, review=REJECTED),  # left out: its low confidence does not count
        track(3, [2], confidence=0.2, review=relabelled("stop")),  # decided by a person: 1.0
        track(4, [3], confidence=0.55, class_id=-1, class_name="unknown"),
    )
    (task,) = json.loads(to_label_studio(labels))
    (prediction,) = task["predictions"]
    assert prediction["score"] == 0.55
    assert [(r["id"], r["score"], r["value"]["labels"]) for r in prediction["result"]] == [
        ("trk1", 0.7, ["speed_limit_50"]),
        ("trk3", 1.0, ["stop"]),
        ("trk4", 0.55, ["unknown"]),
    ]


def test_label_studio_empty_recording():
    (task,) = json.loads(to_label_studio(label_file(frame_count=0, fps=0.0)))
    assert task["predictions"] == [{"model_version": "det-3+cls-7", "score": 1.0, "result": []}]


def test_label_studio_needs_a_frame_rate_for_tracks():
    with pytest.raises(InputError, match=r"^recording.fps: expected > 0"):
        to_label_studio(label_file(track(1, [0]), fps=0.0))


def test_label_studio_config_lists_every_class_and_escapes():
    labels = label_file(track(1, [0], review=relabelled(HOSTILE, class_id=99)), track(2, [1], review=REJECTED))
    root = ET.fromstring(label_studio_config(labels))
    assert root.tag == "View"
    video = root.find("Video")
    rectangle = root.find("VideoRectangle")
    labels_el = root.find("Labels")
    assert video is not None
    assert rectangle is not None
    assert labels_el is not None
    assert video.attrib == {"name": "video", "value": "$video", "framerate": "$fps"}
    assert rectangle.attrib == {"name": "box", "toName": "video"}
    assert labels_el.attrib == {"name": "videoLabels", "toName": "video"}
    assert [e.attrib["value"] for e in labels_el.findall("Label")] == ["unknown", *GTSRB_CLASS_NAMES, HOSTILE]
    # The JSON's names are the config's, so Label Studio matches them.
    (result,) = ls_results(to_label_studio(labels))
    assert result["value"]["labels"] == [HOSTILE]
