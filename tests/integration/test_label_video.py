"""End to end with the committed models: real GTSRB signs driven past on a real GTSDB road, variable frame rate.

Each sign must come out as exactly one track, with the right class, and with box times equal to the stream's own
(variable) timestamps. Skipped when the shared data is absent (the models are committed, the sign crops are not).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from gateway.exports import read_cvat_video
from services.common.labelfile import load_label_file
from services.detector.postprocess import box_iou
from tests.synthvideo import SignSpec, SyntheticVideo, load_background, load_gtsrb_signs, make_road_video

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
CLASSES = (1, 14, 13, 38)


def iou(a, b) -> float:
    return float(box_iou(np.asarray([a]), np.asarray([b]))[0, 0])  # speed limit 30, stop, yield, keep right


N_FRAMES = 64

pytestmark = pytest.mark.skipif(not (DATA / "gtsrb_train").is_dir(), reason="shared data absent")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> SyntheticVideo:
    signs = load_gtsrb_signs(DATA / "gtsrb_train", CLASSES, per_class=1, seed=0)
    specs = [
        SignSpec(
            class_id=cid,
            crop=crop,
            roi_xyxy=roi,
            start_frame=i * N_FRAMES // 8,
            end_frame=i * N_FRAMES // 8 + N_FRAMES // 2,
            side=("right", "left", "top", "right")[i],
        )
        for i, (cid, crop, roi) in enumerate(signs)
    ]
    return make_road_video(
        tmp_path_factory.mktemp("e2e") / "drive.mp4",
        width=640,
        height=360,
        n_frames=N_FRAMES,
        signs=specs,
        background=load_background(DATA / "gtsdb_train", seed=0),
        variable_frame_rate=True,
        start_pts_s=1.5,
    )


@pytest.fixture(scope="module")
def labelled(clip, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "drive.labels.json"
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "label", str(clip.path), "-o", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "4 tracks" in run.stderr
    return out


def test_every_sign_is_one_track_with_the_right_class(clip, labelled):
    labels = load_label_file(labelled)
    by_frame = defaultdict(list)
    for track in labels.tracks:
        for box in track.boxes:
            by_frame[box.frame].append((track, box))
    matched: dict[int, set[int]] = defaultdict(set)
    hits = 0
    for gt in clip.boxes:
        best = max(by_frame[gt.frame], key=lambda tb: iou(tb[1].xyxy, gt.xyxy), default=None)
        if best is not None and iou(best[1].xyxy, gt.xyxy) >= 0.5:
            matched[gt.track].add(best[0].track_id)
            hits += 1
    assert sorted(matched) == [0, 1, 2, 3]
    assert all(len(ids) == 1 for ids in matched.values()), matched
    assert len(labels.tracks) == 4
    classes = {gt_track: labels.tracks[next(iter(ids)) - 1].class_id for gt_track, ids in matched.items()}
    assert classes == dict(enumerate(CLASSES))
    assert hits / len(clip.boxes) >= 0.8  # boxes found on most frames, not just somewhere
    for track in labels.tracks:
        assert track.confidence >= 0.9
        assert len(track.best_crops) == 5


def test_times_follow_the_variable_frame_rate(clip, labelled):
    labels = load_label_file(labelled)
    assert labels.recording.variable_frame_rate
    assert labels.recording.start_s == pytest.approx(1.5, abs=1e-3)
    times = np.array(clip.frame_times_s)
    for track in labels.tracks:
        got = np.array([b.t_s for b in track.boxes])
        np.testing.assert_allclose(got, times[[b.frame for b in track.boxes]], atol=1e-3)


def test_exports_from_the_command_line(labelled, tmp_path):
    for fmt, out in (
        ("cvat-video", tmp_path / "a.xml"),
        ("mot", tmp_path / "mot"),
        ("label-studio", tmp_path / "l.json"),
    ):
        run = subprocess.run(
            [sys.executable, "-m", "gateway", "export", str(labelled), "--format", fmt, "-o", str(out)],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stderr.strip().splitlines()[-1])["format"] == fmt
    labels = load_label_file(labelled)
    back = read_cvat_video((tmp_path / "a.xml").read_bytes())
    assert [t.sign_class for t in back] == [t.class_name for t in labels.tracks]
    assert (tmp_path / "mot" / "gt" / "gt.txt").read_text().count("\n") >= sum(len(t.boxes) for t in labels.tracks)
    task = json.loads((tmp_path / "l.json").read_text())[0]
    assert len(task["predictions"][0]["result"]) == 4
