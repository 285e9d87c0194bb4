"""``roadlabel dataset build``: reviewed label files of synthetic clips -> GTSRB, GTSDB, YOLO and COCO layouts."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gateway.cli import EXIT_OK, EXIT_USAGE, main
from gateway.dataset import DatasetSettings, DatasetSummary, build_dataset, find_label_files, select_diverse
from gateway.pipeline import file_sha256
from services.classifier.train.data import BACKGROUND_CLASS, build_crop_sets, scan_gtsrb
from services.common.classes import GTSRB_CLASS_NAMES, NUM_SIGN_CLASSES
from services.common.errors import InputError, UnreadableVideo
from services.common.labelfile import (
    Box,
    LabelFile,
    ModelRef,
    Recording,
    ReviewAction,
    RunStats,
    Track,
    apply_review,
    save_label_file,
)
from services.decode.reader import DecodeSettings, VideoReader
from services.detector.train.data import gtsdb_folder, read_gtsdb
from tests.synthvideo import GtBox, SignSpec, SyntheticVideo, drawn_sign, make_road_video

pytestmark = pytest.mark.usefixtures("restore_root_logger")

AT = "2024-05-01T10:00:00+00:00"


def sign(class_id: int, start: int, end: int, side="right") -> SignSpec:
    crop, roi = drawn_sign(class_id)
    return SignSpec(class_id=class_id, crop=crop, roi_xyxy=roi, start_frame=start, end_frame=end, side=side)


def make_labels(video: SyntheticVideo, recording_id: str, keep_every: dict[int, int] | None = None) -> LabelFile:
    """A machine label file whose track i + 1 holds sign i's ground truth (every ``keep_every[i]``-th box only)."""
    tracks = []
    for sign_index, gt in sorted(video.tracks().items()):
        every = (keep_every or {}).get(sign_index, 1)
        kept = [b for i, b in enumerate(gt) if i % every == 0 or i == len(gt) - 1]
        class_id = video.signs[sign_index].class_id
        boxes = tuple(Box(frame=b.frame, t_s=b.t_s - video.start_s, xyxy=b.xyxy, score=0.9) for b in kept)
        tracks.append(
            Track(
                track_id=sign_index + 1,
                class_id=class_id,
                class_name=GTSRB_CLASS_NAMES[class_id],
                confidence=0.9,
                first_frame=boxes[0].frame,
                last_frame=boxes[-1].frame,
                start_s=boxes[0].t_s,
                end_s=boxes[-1].t_s,
                boxes=boxes,
            )
        )
    recording = Recording(
        id=recording_id,
        source=video.path.name,
        sha256=file_sha256(video.path),
        width=video.width,
        height=video.height,
        fps=25.0,
        frame_count=video.n_frames,
        duration_s=video.n_frames / 25,
    )
    models = {"detector": ModelRef(name="det", version="1", sha256="a" * 64)}
    stats = RunStats(frames_decoded=video.n_frames, frames_detected=video.n_frames, detections=0, tracks_dropped=0,
                     elapsed_s=0.0)  # fmt: skip
    return LabelFile(
        recording=recording, models=models, settings={}, code_version="test", created_at=AT, stats=stats,
        tracks=tuple(tracks),
    )  # fmt: skip


def act(action: str, **fields) -> ReviewAction:
    return ReviewAction(action=action, by="tester", at=AT, **fields)


@dataclass(frozen=True)
class Inputs:
    videos: dict[str, SyntheticVideo]
    label_files: dict[str, Path]
    reviewed: dict[str, LabelFile]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    """Two reviewed recordings, each label file beside its video.

    ``a``: sign 0 (stop) accepted, boxes on every 2nd frame only (interpolation), then split at frame 12 and both
    parts accepted; sign 1 relabelled 1 -> 2; sign 2 rejected, alone in view from frame 26 on (negative frames).
    ``b`` (a hostile recording id): sign 0 accepted, sign 1 pending, sign 2 relabelled to unknown.
    """
    root = tmp_path_factory.mktemp("dataset_inputs")
    clip_a = make_road_video(
        root / "a.mp4", width=320, height=180, n_frames=40,
        signs=[sign(14, 0, 26), sign(1, 4, 22, "left"), sign(38, 14, 40, "top")],
    )  # fmt: skip
    clip_b = make_road_video(
        root / "b.mp4", width=320, height=180, n_frames=30, seed=1,
        signs=[sign(17, 0, 30), sign(25, 18, 30, "left"), sign(13, 0, 12, "top")],
    )  # fmt: skip
    a = apply_review(
        make_labels(clip_a, "rec-a", keep_every={0: 2}),
        [act("split", track_id=1, frame=12), act("accept", track_id=1), act("accept", track_id=4),
         act("relabel", track_id=2, class_id=2), act("reject", track_id=3)],
    )  # fmt: skip
    b = apply_review(
        make_labels(clip_b, "../b/..\\evil_id\x01"),
        [act("accept", track_id=1), act("relabel", track_id=3, class_id=-1)],
    )
    files = {"a": root / "a.mp4.labels.json", "b": root / "b.mp4.labels.json"}
    save_label_file(files["a"], a)
    save_label_file(files["b"], b)
    return Inputs({"a": clip_a, "b": clip_b}, files, {"a": a, "b": b})


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory) -> tuple[Path, DatasetSummary]:
    out = tmp_path_factory.mktemp("built") / "ds"
    summary = build_dataset(list(inputs.label_files.values()), out)
    return out, summary


@pytest.fixture(scope="module")
def decoded_frames(inputs) -> dict[str, list[np.ndarray]]:
    """recording id -> every decoded frame (RGB), by decode index."""
    out = {}
    for key, video in inputs.videos.items():
        rec_id = inputs.reviewed[key].recording.id
        with VideoReader(video.path, "t", DecodeSettings()) as reader:
            out[rec_id] = [f.image for f in reader.frames()]
    return out


def manifest(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def expected_box(track: Track, frame: int) -> tuple[float, float, float, float]:
    """The track's box at ``frame``: its own, or linearly interpolated between its neighbours (computed here anew)."""
    frames = [b.frame for b in track.boxes]
    coords = np.array([b.xyxy for b in track.boxes], np.float64)
    return tuple(float(np.interp(frame, frames, coords[:, i])) for i in range(4))  # type: ignore[return-value]


def test_summary_counts_every_kind_of_track(built):
    _, summary = built
    assert summary.recordings == 2
    assert summary.sign_tracks == 4  # a: two parts of the split + the relabelled; b: the accepted
    assert summary.rejected_tracks == 1
    assert summary.skipped_pending == 1
    assert summary.skipped_unknown == 1
    assert set(summary.crops_per_class) == {2, 14, 17}
    assert summary.background_crops > 0
    assert summary.negative_frames > 0
    assert summary.interpolated_boxes > 0
    assert summary.frames_skipped > 0  # b's frames with its pending sign in view


def test_classification_folder_reads_as_gtsrb(built, inputs):
    out, summary = built
    samples = scan_gtsrb(out / "classification")
    assert len(samples) == summary.crops
    rows = [r for r in manifest(out) if r["kind"] == "crop"]
    assert sorted(str(s.path.relative_to(out)) for s in samples) == sorted(r["path"] for r in rows)
    by_path = {r["path"]: r for r in rows}
    per_track: dict[tuple[str, int], int] = {}
    for s in samples:
        row = by_path[str(s.path.relative_to(out))]
        assert s.class_id == row["class_id"]
        assert row["class_name"] == GTSRB_CLASS_NAMES[s.class_id]
        assert s.path.name == f"{row['dataset_track']:05d}_{row['frame']:05d}.png"
        key = (row["recording_id"], row["track_id"])
        per_track[key] = per_track.get(key, 0) + 1
    # Track 1 of a is the split's first part: its sign is below 16 px in all of it, so it gives no crop.
    assert per_track == {("rec-a", 2): 6, ("rec-a", 4): 6, ("../b/..\\evil_id\x01", 1): 6}
    assert summary.tracks_without_crops == 1
    # The relabelled track carries the reviewer's class; the split's parts are separate tracks in the data set.
    assert {r["class_id"] for r in rows if r["track_id"] == 2 and r["recording_id"] == "rec-a"} == {2}
    assert len({s.track for s in samples}) == 3


def test_crops_are_the_reviewed_boxes_with_a_margin_and_roi(built, inputs, decoded_frames):
    out, _ = built
    tracks = {(lf.recording.id, t.track_id): t for lf in inputs.reviewed.values() for t in lf.tracks}
    for csv_path in sorted((out / "classification").glob("*/GT-*.csv")):
        with csv_path.open(newline="") as fh:
            roi_rows = {r["Filename"]: r for r in csv.DictReader(fh, delimiter=";")}
        assert list(roi_rows) == sorted(roi_rows)
        for row in manifest(out):
            if row["kind"] != "crop" or not row["path"].startswith(str(csv_path.parent.relative_to(out))):
                continue
            box = next(b for b in tracks[(row["recording_id"], row["track_id"])].boxes if b.frame == row["frame"])
            assert row["xyxy"] == pytest.approx(box.xyxy, abs=0.01)  # a detector box, never an interpolated one
            assert min(box.xyxy[2] - box.xyxy[0], box.xyxy[3] - box.xyxy[1]) >= 16
            wx1, wy1, wx2, wy2 = row["crop_xyxy"]
            with Image.open(out / row["path"]) as img:
                crop = np.asarray(img.convert("RGB"))
            # Lossless: exactly the decoded frame's pixels in the window.
            np.testing.assert_array_equal(crop, decoded_frames[row["recording_id"]][row["frame"]][wy1:wy2, wx1:wx2])
            assert wx1 < box.xyxy[0]
            assert wx2 > box.xyxy[2]
            roi = roi_rows[Path(row["path"]).name]
            assert (int(roi["Width"]), int(roi["Height"])) == (wx2 - wx1, wy2 - wy1)
            assert int(roi["Roi.X1"]) == pytest.approx(box.xyxy[0] - wx1, abs=0.5)
            assert int(roi["Roi.X2"]) + 1 == pytest.approx(box.xyxy[2] - wx1, abs=0.5)  # inclusive corner
            assert int(roi["Roi.Y2"]) + 1 == pytest.approx(box.xyxy[3] - wy1, abs=0.5)


def test_crops_spread_over_the_track(built, inputs):
    out, _ = built
    track = next(t for t in inputs.reviewed["a"].tracks if t.track_id == 4)
    usable = [b for b in track.boxes if min(b.xyxy[2] - b.xyxy[0], b.xyxy[3] - b.xyxy[1]) >= 16]
    frames = sorted(r["frame"] for r in manifest(out) if r["kind"] == "crop" and r["recording_id"] == "rec-a"
                    and r["track_id"] == 4)  # fmt: skip
    assert len(usable) > 6
    assert len(frames) == 6
    largest = sorted(b.frame for b in sorted(usable, key=lambda b: b.xyxy[2] - b.xyxy[0])[-6:])
    # Not the six largest (the last frames): from the first usable frame to the last.
    assert frames != largest
    assert frames[0] == usable[0].frame
    assert frames[-1] == usable[-1].frame


def test_background_folder_reads_as_the_trainers_crop_folder(built, inputs):
    out, summary = built
    background = out / "classification" / "background"
    rows = [r for r in manifest(out) if r["kind"] == "background_crop"]
    assert len(rows) == summary.background_crops == len(list(background.iterdir()))
    assert {(r["recording_id"], r["track_id"], r["review_status"], r["class_id"]) for r in rows} == {
        ("rec-a", 3, "rejected", None)
    }
    train, val = build_crop_sets(
        out / "classification", [background], hw=(32, 32), val_fraction=0.5, background_per_scene=1, seed=0
    )
    is_bg_train, is_bg_val = train.labels == BACKGROUND_CLASS, val.labels == BACKGROUND_CLASS
    assert int(is_bg_train.sum() + is_bg_val.sum()) == summary.background_crops
    # Grouped by recording (the name before the last "_"), so a split keeps a recording's crops together.
    groups = set(train.groups[is_bg_train]) | set(val.groups[is_bg_val])
    assert len(groups) == 1
    assert next(iter(groups)).startswith("background/rec-a-")


def test_detection_folder_reads_as_gtsdb_with_the_reviewed_and_interpolated_boxes(built, inputs, decoded_frames):
    out, summary = built
    assert gtsdb_folder(out) == out / "detection" / "images"  # what 'train detector --data OUT' reads
    assert gtsdb_folder(out / "detection" / "images") == out / "detection" / "images"
    scenes, boxes = read_gtsdb(gtsdb_folder(out))
    assert (out / "detection" / "gt.txt").read_bytes() == (out / "detection" / "images" / "gt.txt").read_bytes()
    frames = {r["path"]: r for r in manifest(out) if r["kind"] == "frame"}
    assert sorted(f"detection/images/{p.name}" for p in scenes) == sorted(frames)
    assert len(frames) == summary.frames + summary.negative_frames
    reviewed = {lf.recording.id: lf for lf in inputs.reviewed.values()}
    interpolated = 0
    for path, row in frames.items():
        name = Path(path).name
        labels = reviewed[row["recording_id"]]
        tracks = {t.track_id: t for t in labels.tracks}
        got = boxes.get(name, np.zeros((0, 4), np.float32))
        assert len(got) == len(row["box_track_ids"]) == len(row["box_indices"])
        for xyxy, track_id, was_interpolated in zip(got, row["box_track_ids"], row["box_interpolated"], strict=True):
            track = tracks[track_id]
            assert track.review.status in ("accepted", "relabelled")
            assert was_interpolated == (row["frame"] not in {b.frame for b in track.boxes})
            interpolated += was_interpolated
            assert xyxy == pytest.approx(expected_box(track, row["frame"]), abs=0.01)
        # Every accepted sign in view is boxed; a rejected one never is.
        in_view = {t.track_id for t in labels.tracks if t.first_frame <= row["frame"] <= t.last_frame}
        signs = {tid for tid in in_view if tracks[tid].review.status in ("accepted", "relabelled")
                 and tracks[tid].review.class_id != -1}  # fmt: skip
        assert set(row["box_track_ids"]) == signs
        assert set(row["rejected_track_ids"]) == {tid for tid in in_view if tracks[tid].review.status == "rejected"}
        assert not {tid for tid in in_view if tracks[tid].review.status == "pending"}
        # The right recording's frame, at the right index (JPEG: close, not equal).
        with Image.open(out / path) as img:
            pixels = np.asarray(img.convert("RGB"), np.float64)
        decoded = decoded_frames[row["recording_id"]]
        assert np.abs(pixels - decoded[row["frame"]]).mean() < 3
        assert (
            np.abs(pixels - decoded[(row["frame"] + 3) % len(decoded)]).mean()
            > np.abs(pixels - decoded[row["frame"]]).mean()
        )
    assert interpolated == summary.interpolated_boxes > 0
    negatives = [r for r in frames.values() if not r["box_track_ids"]]
    assert negatives
    assert all(r["rejected_track_ids"] == [3] for r in negatives)


def test_yolo_and_coco_hold_the_same_boxes(built):
    out, summary = built
    det = out / "detection"
    _, gt_boxes = read_gtsdb(det / "images")
    assert (det / "classes.txt").read_text().splitlines() == list(GTSRB_CLASS_NAMES)
    coco = json.loads((det / "coco.json").read_text())
    assert [c["id"] for c in coco["categories"]] == list(range(NUM_SIGN_CLASSES))
    assert [c["name"] for c in coco["categories"]] == list(GTSRB_CLASS_NAMES)
    images = {img["id"]: img for img in coco["images"]}
    assert len(images) == summary.frames + summary.negative_frames
    assert len(coco["annotations"]) == summary.boxes
    gt_lines = (det / "gt.txt").read_text().splitlines()
    for ann in coco["annotations"]:
        line = gt_lines[ann["id"] - 1].split(";")
        assert line[0] == images[ann["image_id"]]["file_name"]
        assert int(line[5]) == ann["category_id"]
        x, y, w, h = ann["bbox"]
        assert [x, y, x + w - 1, y + h - 1] == pytest.approx([float(v) for v in line[1:5]], abs=0.011)
    for img in images.values():
        stem = Path(img["file_name"]).stem
        label_lines = (det / "labels" / f"{stem}.txt").read_text().splitlines()
        expected = gt_boxes.get(img["file_name"], np.zeros((0, 4), np.float32))
        assert len(label_lines) == len(expected)
        for line, xyxy in zip(label_lines, expected, strict=True):
            cls, cx, cy, w, h = line.split()
            assert 0 <= int(cls) < NUM_SIGN_CLASSES
            W, H = img["width"], img["height"]
            back = [(float(cx) - float(w) / 2) * W, (float(cy) - float(h) / 2) * H,
                    (float(cx) + float(w) / 2) * W, (float(cy) + float(h) / 2) * H]  # fmt: skip
            assert back == pytest.approx(xyxy.tolist(), abs=0.02)
    assert sorted(p.stem for p in (det / "labels").iterdir()) == sorted(
        Path(i["file_name"]).stem for i in images.values()
    )


def test_manifest_points_at_files_and_keeps_the_recording(built, inputs):
    out, _ = built
    rows = manifest(out)
    shas = {lf.recording.id: lf.recording.sha256 for lf in inputs.reviewed.values()}
    for row in rows:
        path = out / row["path"]
        assert path.is_file()
        assert path.resolve().is_relative_to(out.resolve())
        assert ".." not in Path(row["path"]).parts
        assert row["recording_sha256"] == shas[row["recording_id"]]
        assert row["t_s"] == pytest.approx(
            inputs.videos["a" if row["recording_id"] == "rec-a" else "b"].frame_times_s[row["frame"]], abs=1e-3
        )
        if row["kind"] == "frame":
            assert row["track_id"] is None
            assert row["class_id"] is None
        else:
            assert isinstance(row["track_id"], int)
    # Hostile recording id: sanitised in every name, kept verbatim in the manifest.
    names = [p.name for p in out.rglob("*")]
    assert all("\x01" not in n and "\\" not in n and not n.startswith("..") for n in names)
    assert any(n.startswith("b-..-evil-id-") for n in names)
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["schema_version"] == 1
    assert [i["recording_id"] for i in doc["inputs"]] == ["../b/..\\evil_id\x01", "rec-a"]  # sorted by recording
    for entry in doc["inputs"]:
        assert entry["sha256"] == file_sha256(Path(entry["path"]))
        assert entry["models"]["detector"]["version"] == "1"
    assert doc["settings"] == DatasetSettings().model_dump(mode="json")
    assert doc["counts"]["skipped_pending"] == 1


def test_same_inputs_give_identical_files(built, inputs, tmp_path):
    out, _ = built
    again = tmp_path / "again"
    build_dataset(list(reversed(inputs.label_files.values())), again)  # another order, the same data set
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(again)) for p in again.rglob("*") if p.is_file())
    for rel in files:
        if rel == "dataset.json":
            first, second = json.loads((out / rel).read_text()), json.loads((again / rel).read_text())
            first.pop("created_at"), second.pop("created_at")
            first["inputs"] = second["inputs"] = None
            assert first == second
        else:
            assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_select_diverse_spreads_over_time_and_size():
    frames = np.arange(100)
    sizes = 10 + frames.astype(float)  # grows along the track
    picked = select_diverse(frames, sizes, 6)
    assert picked.tolist() == sorted(set(picked.tolist()))
    assert picked[0] == 0
    assert picked[-1] == 99
    assert np.diff(picked).max() < 50  # never half of the track without a pick
    assert select_diverse(frames[:4], sizes[:4], 6).tolist() == [0, 1, 2, 3]
    same = select_diverse(np.zeros(10, int), np.ones(10), 3)  # identical candidates: still distinct picks
    assert len(set(same.tolist())) == 3


def test_pending_tracks_are_used_only_when_asked(inputs, tmp_path):
    summary = build_dataset(
        [inputs.label_files["b"]], tmp_path / "ds", DatasetSettings(include_pending=True, crops_per_track=2)
    )
    assert summary.skipped_pending == 0
    assert set(summary.crops_per_class) == {17, 25}
    assert summary.frames_skipped > 0  # still: the unknown-class sign is in view in some frames


@pytest.fixture
def bad_inputs(tmp_path, inputs):
    """name -> (label file, message)"""
    not_json = tmp_path / "x.labels.json"
    not_json.write_text("{not json")
    not_labels = tmp_path / "y.labels.json"
    not_labels.write_text('{"hello": 1}')
    unreviewed = tmp_path / "u.labels.json"
    save_label_file(unreviewed, make_labels(inputs.videos["a"], "rec-u"))
    elsewhere = tmp_path / "moved" / "a.mp4.labels.json"
    save_label_file(elsewhere, inputs.reviewed["a"])
    other = tmp_path / "other" / "a.mp4.labels.json"
    save_label_file(other, inputs.reviewed["a"])
    (other.parent / "a.mp4").write_bytes(inputs.videos["b"].path.read_bytes())  # the name, not the contents
    empty = tmp_path / "empty"
    empty.mkdir()
    return {
        "missing": ([tmp_path / "nope.labels.json"], "expected a label file or a folder of them, got no such file"),
        "not-json": ([not_json], "expected JSON"),
        "not-a-label-file": ([not_labels], "expected schema_version 1"),
        "no-reviews": ([unreviewed], "expected a reviewed label file"),
        "empty-folder": ([empty], "expected label files (*.labels.json) in the folder, found none"),
        "twice": ([inputs.label_files["a"], elsewhere], "expected one label file per recording"),
        "no-video": ([elsewhere], f"expected the video 'a.mp4' with sha256 {inputs.reviewed['a'].recording.sha256}"),
        "other-video": ([other], f"files of that name with other contents: {other.parent / 'a.mp4'}"),
    }


@pytest.mark.parametrize(
    "case",
    ["missing", "not-json", "not-a-label-file", "no-reviews", "empty-folder", "twice", "no-video", "other-video"],
)
def test_bad_inputs_are_refused_with_exit_2_and_nothing_written(bad_inputs, case, tmp_path, capsys):
    paths, message = bad_inputs[case]
    out = tmp_path / "out" / "ds"
    with pytest.raises(InputError, match="label file|--from") as info:
        build_dataset(paths, out)
    assert message in str(info.value)
    args = ["dataset", "build", "--from", *map(str, paths), "-o", str(out), "--no-progress"]
    assert main(args) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_video_found_under_a_root_by_name_or_by_content(inputs, tmp_path):
    labels_dir = tmp_path / "labels"
    save_label_file(labels_dir / "deep" / "whatever.labels.json", inputs.reviewed["a"])
    videos = tmp_path / "videos"
    (videos / "x").mkdir(parents=True)
    (videos / "x" / "renamed.mp4").write_bytes(inputs.videos["a"].path.read_bytes())
    with pytest.raises(InputError, match="pass --video-root"):
        build_dataset([labels_dir], tmp_path / "ds0")
    summary = build_dataset([labels_dir], tmp_path / "ds1", DatasetSettings(crops_per_track=1), video_roots=[videos])
    assert summary.crops == 2  # track 1 (the split's first part) is too small to crop
    assert find_label_files([labels_dir]) == [labels_dir / "deep" / "whatever.labels.json"]


def test_out_dir_is_never_the_current_folder_or_one_around_it(inputs, tmp_path, monkeypatch):
    here = tmp_path / "here"
    (here / "sub").mkdir(parents=True)
    monkeypatch.chdir(here / "sub")
    for out in (Path("."), Path(".."), here):
        with pytest.raises(InputError, match="expected a folder outside the current one"):
            build_dataset([inputs.label_files["b"]], out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]
    assert [p.name for p in here.iterdir()] == ["sub"]
    # A new folder named relative to '..' is fine, and nothing is left beside it.
    summary = build_dataset([inputs.label_files["b"]], Path("../ds"))
    assert summary.out_dir == Path("../ds")
    assert (here / "ds" / "dataset.json").is_file()
    assert sorted(p.name for p in here.iterdir()) == ["ds", "sub"]


def test_out_dir_is_refused_when_not_empty_and_replaced_with_overwrite(inputs, tmp_path, capsys):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    args = ["dataset", "build", "--from", str(inputs.label_files["b"]), "-o", str(out), "--no-progress"]
    assert main(args) == EXIT_USAGE
    assert "expected an empty or new folder" in capsys.readouterr().err
    assert (out / "old.txt").read_text() == "keep me"
    assert main([*args, "--overwrite", "--crops-per-track", "2", "--frame-step", "10"]) == EXIT_OK
    err = capsys.readouterr().err
    assert "1 recording(s): 1 sign track(s) -> 2 crops in 1 class(es)" in err
    assert "skipped tracks: 1 pending, 1 of unknown class" in err
    assert not (out / "old.txt").exists()
    assert (out / "dataset.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temp folders left


def test_a_failure_while_decoding_leaves_nothing(inputs, tmp_path, capsys):
    """The label file names frames past the video's end: crops are being written when decoding fails."""
    labels = inputs.reviewed["a"]
    late = labels.tracks[0].model_copy(
        update={"track_id": 99, "boxes": (Box(frame=70, t_s=2.8, xyxy=(10, 10, 40, 40), score=0.9),),
                "first_frame": 70, "last_frame": 70, "start_s": 2.8, "end_s": 2.8}
    )  # fmt: skip
    rec = labels.recording.model_copy(update={"frame_count": 80})
    broken = labels.model_copy(update={"recording": rec, "tracks": (*labels.tracks, late)})
    path = inputs.videos["a"].path.parent / "broken" / "a.mp4.labels.json"
    save_label_file(path, LabelFile.model_validate(broken.model_dump()))
    out = tmp_path / "ds"
    with pytest.raises(UnreadableVideo, match="to hold frame 70, got 40 decoded frames"):
        build_dataset([path], out, video_roots=[inputs.videos["a"].path.parent])
    assert main(["dataset", "build", "--from", str(path), "-o", str(out), "--video-root",
                 str(inputs.videos["a"].path.parent), "--no-progress"]) == EXIT_USAGE  # fmt: skip
    assert "to hold frame 70" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--crops-per-track", "0", "--crops-per-track"), ("--frame-step", "0", "--frame-step")],
)
def test_bad_options_exit_2(inputs, tmp_path, capsys, option, value, message):
    args = ["dataset", "build", "--from", str(inputs.label_files["b"]), "-o", str(tmp_path / "ds"), option, value]
    assert main(args) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


def test_gt_box_helper_matches_the_clip(inputs):
    """The fixture's premise: track i + 1 of ``a`` is sign i's ground truth (guards the other tests' meaning)."""
    clip = inputs.videos["a"]
    gt: list[GtBox] = clip.tracks()[1]
    track = next(t for t in inputs.reviewed["a"].tracks if t.track_id == 2)
    assert [b.frame for b in track.boxes] == [b.frame for b in gt]
