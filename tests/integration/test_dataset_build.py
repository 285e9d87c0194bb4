"""Video -> pipeline (detector on every 2nd frame) -> review -> ``roadlabel dataset build`` -> trainers' readers."""

from __future__ import annotations

import json

import pytest

from gateway.cli import EXIT_OK, main
from gateway.pipeline import PipelineSettings, label_recording
from services.classifier.train.data import scan_gtsrb
from services.common.labelfile import ReviewAction, apply_review, save_label_file
from services.detector.train.data import read_gtsdb
from tests.fakes import FakeClassifier, FakeDetector
from tests.synthvideo import SignSpec, drawn_sign, make_road_video

pytestmark = pytest.mark.usefixtures("restore_root_logger")

AT = "2024-05-01T10:00:00+00:00"


def test_pipeline_labels_reviewed_then_built(tmp_path, capsys):
    signs = [
        SignSpec(14, *drawn_sign(14), start_frame=0, end_frame=36, side="right"),
        SignSpec(1, *drawn_sign(1), start_frame=6, end_frame=40, side="left"),
    ]
    videos = tmp_path / "videos"
    videos.mkdir()
    clip = make_road_video(videos / "drive.mp4", width=320, height=180, n_frames=40, signs=signs)
    labels = label_recording(
        clip.path, FakeDetector(clip), FakeClassifier(class_id=14), PipelineSettings(detect_every=2)
    )
    assert len(labels.tracks) == 2
    first, second = labels.tracks
    reviewed = apply_review(
        labels,
        [
            ReviewAction(action="accept", track_id=first.track_id, by="t", at=AT),
            ReviewAction(action="relabel", track_id=second.track_id, class_id=1, by="t", at=AT),
        ],
    )
    save_label_file(tmp_path / "labels" / "drive.mp4.labels.json", reviewed)

    out = tmp_path / "ds"
    args = ["dataset", "build", "--from", str(tmp_path / "labels"), "-o", str(out), "--video-root", str(videos)]
    assert main([*args, "--no-progress"]) == EXIT_OK
    assert "1 recording(s): 2 sign track(s)" in capsys.readouterr().err

    samples = scan_gtsrb(out / "classification")
    assert {s.class_id for s in samples} == {1, 14}
    scenes, boxes = read_gtsdb(out / "detection" / "images")
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    frames = [r for r in rows if r["kind"] == "frame"]
    assert len(scenes) == len(frames) > 0
    # The detector ran on even frames only: frames between have interpolated boxes.
    assert any(any(r["box_interpolated"]) for r in frames)
    assert all(r["frame"] % 2 == 0 or all(r["box_interpolated"]) for r in frames)
    assert sum(len(b) for b in boxes.values()) == sum(len(r["box_indices"]) for r in frames)
    assert {r["recording_id"] for r in rows} == {labels.recording.id}
