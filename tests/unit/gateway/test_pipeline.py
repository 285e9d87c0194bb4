"""The video pipeline with replayed detections: one track per sign, stream times, options, gaps, failures."""

from __future__ import annotations

import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from gateway.pipeline import PipelineSettings, Progress, label_recording
from services.common.errors import ModelError, UnreadableVideo
from services.common.labelfile import LabelFile, load_label_file, save_label_file
from tests.fakes import FakeClassifier, FakeDetector
from tests.synthvideo import SignSpec, SyntheticVideo, corrupt_tail, drawn_sign, make_road_video


def sign(start: int, end: int, side="right", class_id=14) -> SignSpec:
    crop, roi = drawn_sign(class_id)
    return SignSpec(class_id=class_id, crop=crop, roi_xyxy=roi, start_frame=start, end_frame=end, side=side)


@pytest.fixture(scope="module")
def vfr_clip(tmp_path_factory) -> SyntheticVideo:
    return make_road_video(
        tmp_path_factory.mktemp("p") / "vfr.mkv",
        width=320,
        height=180,
        n_frames=48,
        signs=[sign(0, 30, "right"), sign(10, 40, "left"), sign(20, 48, "top")],
        variable_frame_rate=True,
        start_pts_s=2.0,
    )


def label(video: SyntheticVideo, detector=None, classifier=None, **settings) -> LabelFile:
    return label_recording(
        video.path, detector or FakeDetector(video), classifier or FakeClassifier(), PipelineSettings(**settings)
    )


def gt_tracks_of(video: SyntheticVideo, labels: LabelFile) -> dict[int, set[int]]:
    """For each ground-truth sign, the predicted tracks that hold one of its boxes."""
    owner = {}
    for track in labels.tracks:
        for box in track.boxes:
            owner[(box.frame, tuple(round(v, 1) for v in box.xyxy))] = track.track_id
    found: dict[int, set[int]] = defaultdict(set)
    for gt in video.boxes:
        tid = owner.get((gt.frame, tuple(round(v, 1) for v in gt.xyxy)))
        if tid is not None:
            found[gt.track].add(tid)
    return found


def test_one_track_per_sign_with_stream_times(vfr_clip):
    labels = label(vfr_clip)
    matched = gt_tracks_of(vfr_clip, labels)
    assert sorted(matched) == [0, 1, 2]
    assert all(len(ids) == 1 for ids in matched.values()), matched
    assert len(labels.tracks) == 3
    assert [t.track_id for t in labels.tracks] == [1, 2, 3]
    times = dict(enumerate(vfr_clip.frame_times_s))
    for track in labels.tracks:
        for box in track.boxes:
            assert box.t_s == pytest.approx(times[box.frame], abs=1e-3)  # stream time, not index / fps
        assert track.start_s == track.boxes[0].t_s
        assert track.class_name == "stop"
        assert track.review.status == "pending"
    rec = labels.recording
    assert rec.frame_count == 48
    assert rec.start_s == pytest.approx(2.0, abs=1e-3)
    assert rec.variable_frame_rate
    assert (rec.width, rec.height) == (320, 180)
    assert labels.models["detector"].name == "fake-detector"
    assert labels.settings["detect_every"] == 1


def test_boxes_are_the_detectors_and_best_crops_are_bounded(vfr_clip):
    labels = label(vfr_clip, crops_per_track=3)
    gt = {(b.frame, b.track): b.xyxy for b in vfr_clip.boxes}
    assert sum(len(t.boxes) for t in labels.tracks) == len(vfr_clip.boxes)
    for track in labels.tracks:
        assert len(track.best_crops) == 3
        qualities = [c.quality for c in track.best_crops]
        assert qualities == sorted(qualities, reverse=True)
        assert any(np.allclose(track.boxes[0].xyxy, xyxy, atol=0.01) for xyxy in gt.values())


def test_label_file_round_trips(vfr_clip, tmp_path):
    labels = label(vfr_clip)
    save_label_file(tmp_path / "l.json", labels)
    assert load_label_file(tmp_path / "l.json") == labels


def test_same_video_same_tracks(vfr_clip):
    a, b = label(vfr_clip), label(vfr_clip)
    assert a.tracks == b.tracks


def test_detect_every_k_runs_the_detector_on_every_kth_frame(vfr_clip):
    detector = FakeDetector(vfr_clip)
    labels = label(vfr_clip, detector, detect_every=3)
    called = [i for batch in detector.calls for i in batch]
    assert called == list(range(0, 48, 3))
    assert labels.stats.frames_detected == 16
    matched = gt_tracks_of(vfr_clip, labels)
    assert all(len(ids) == 1 for ids in matched.values())
    assert len(labels.tracks) == 3


def test_missed_detections_do_not_split_tracks(vfr_clip):
    labels = label(vfr_clip, FakeDetector(vfr_clip, miss_every=4))
    assert len(labels.tracks) == 3


def test_a_sign_lost_for_a_while_is_relinked_into_one_track(vfr_clip):
    blind = frozenset(range(12, 28))  # the detector sees nothing for 16 frames: the tracker lets go of every track
    relinked = label(vfr_clip, FakeDetector(vfr_clip, blind_frames=blind))
    assert all(len(ids) == 1 for ids in gt_tracks_of(vfr_clip, relinked).values())
    assert len(relinked.tracks) == 3
    spans = [(t.first_frame, t.last_frame) for t in relinked.tracks]
    assert (10, 39) in spans  # the second sign, seen on frames 10-11 and 28-39, is one track
    split = label(vfr_clip, FakeDetector(vfr_clip, blind_frames=blind), relink_gap_frames=0)
    assert (28, 39) in [(t.first_frame, t.last_frame) for t in split.tracks]  # without relinking it starts again
    assert split.stats.tracks_dropped > relinked.stats.tracks_dropped  # ... and its 2-box start is dropped as short


def test_region_of_interest(vfr_clip):
    detector = FakeDetector(vfr_clip)
    labels = label(vfr_clip, detector, roi_xyxy=(0.5, 0.0, 1.0, 0.5))
    assert set(detector.shapes) == {(90, 160, 3)}  # the detector sees only the region
    assert labels.tracks
    for track in labels.tracks:  # ... and its boxes come back in frame pixels, shifted by the region's corner
        assert all(b.xyxy[0] >= 160 - 1e-3 for b in track.boxes)


def test_min_sign_px_drops_small_boxes(vfr_clip):
    labels = label(vfr_clip, min_sign_px=20)
    for track in labels.tracks:
        for b in track.boxes:
            assert min(b.xyxy[2] - b.xyxy[0], b.xyxy[3] - b.xyxy[1]) >= 20


def test_short_tracks_dropped_or_flagged(vfr_clip):
    assert label(vfr_clip, min_track_frames=100).tracks == ()
    flagged = label(vfr_clip, min_track_frames=100, short_tracks="flag")
    assert len(flagged.tracks) == 3
    assert all("short" in t.uncertainty and t.uncertain for t in flagged.tracks)


def test_not_a_sign_tracks_dropped_or_flagged(vfr_clip):
    background = FakeClassifier(class_id=43, p=0.9)
    dropped = label(vfr_clip, classifier=background)
    assert dropped.tracks == ()
    assert dropped.stats.tracks_dropped >= 3
    kept = label(vfr_clip, classifier=background, not_a_sign_tracks="flag")
    assert [t.class_name for t in kept.tracks] == ["unknown"] * 3
    assert all("rejected" in t.uncertainty for t in kept.tracks)


def test_low_confidence_is_flagged_with_top_classes(vfr_clip):
    labels = label(vfr_clip, classifier=FakeClassifier(class_id=2, p=0.7))
    for track in labels.tracks:
        assert track.class_name == "speed_limit_50"
        assert track.confidence == pytest.approx(0.7, abs=1e-3)
        assert track.uncertainty[0] == "low_confidence"
        assert track.top_classes[0].class_id == 2


def test_tracks_are_classified_in_batches_across_tracks(vfr_clip):
    classifier = FakeClassifier()
    label(vfr_clip, classifier=classifier, crops_per_track=5, classify_batch=1000)
    assert classifier.batches == [15]  # three tracks x five crops, one call


def test_progress_events(vfr_clip):
    events: list[Progress] = []
    label_recording(vfr_clip.path, FakeDetector(vfr_clip), FakeClassifier(), on_progress=events.append)
    stages = [e.stage for e in events]
    assert stages[0] == "hash"
    assert stages[-1] == "done"
    done = [e.done for e in events if e.stage == "label"]
    assert done == sorted(done)
    assert done[-1] == 48


def test_a_failing_detector_reaches_the_caller_and_stops_decoding(vfr_clip):
    before = threading.active_count()
    with pytest.raises(ModelError, match="frame 20"):
        label(vfr_clip, FakeDetector(vfr_clip, fail_at=20))
    assert threading.active_count() == before


def test_corrupt_tail_gives_a_label_file_with_gaps(tmp_path):
    clip = make_road_video(tmp_path / "c.mp4", width=320, height=180, n_frames=60, signs=[sign(0, 60)], gop=10)
    bad = corrupt_tail(clip.path, tmp_path / "bad.mp4", 0.7)
    labels = label_recording(bad, FakeDetector(clip), FakeClassifier())
    assert labels.recording.gaps
    gap = labels.recording.gaps[-1]
    assert gap.after_frame == labels.recording.frame_count - 1
    assert gap.missing_frames > 0
    assert labels.recording.frame_count < 60


def test_not_a_video(tmp_path):
    path = tmp_path / "x.mp4"
    path.write_bytes(b"not a video at all" * 10)
    with pytest.raises(UnreadableVideo, match="expected a video file"):
        label_recording(path, FakeDetector.__new__(FakeDetector), FakeClassifier())


def test_settings_refuse_bad_roi():
    with pytest.raises(ValueError, match="roi_xyxy"):
        PipelineSettings(roi_xyxy=(0.5, 0.0, 0.4, 1.0))


def test_source_is_the_file_name_only(vfr_clip):
    labels = label(vfr_clip)
    assert labels.recording.source == Path(vfr_clip.path).name


def test_an_8k_recording_is_labelled(tmp_path):
    clip = make_road_video(tmp_path / "8k.mp4", width=7680, height=4320, n_frames=2, signs=[sign(0, 2)])
    labels = label_recording(clip.path, FakeDetector(clip), FakeClassifier())
    assert (labels.recording.width, labels.recording.height) == (7680, 4320)
    assert labels.recording.frame_count == 2
    assert labels.stats.detections == len(clip.boxes) > 0  # every frame went through detect and track


def test_sure_tracks_are_accepted_without_review_at_the_cards_threshold(vfr_clip):
    sure = FakeClassifier(p=0.95)
    sure._card = sure.card.model_copy(update={"auto_accept_threshold": 0.9})
    labels = label(vfr_clip, classifier=sure)
    assert len(labels.tracks) == 3
    for track in labels.tracks:
        assert track.review.status == "accepted"
        assert track.review.by == f"auto:{sure.card.version}@0.9000"
    # Below the threshold, switched off, or a stricter threshold in the settings: every track waits for a person.
    unsure = FakeClassifier(p=0.85)
    unsure._card = sure.card
    assert {t.review.status for t in label(vfr_clip, classifier=unsure).tracks} == {"pending"}
    assert {t.review.status for t in label(vfr_clip, classifier=sure, auto_accept=False).tracks} == {"pending"}
    assert {t.review.status for t in label(vfr_clip, classifier=sure, auto_accept_above=0.99).tracks} == {"pending"}
    # A card without a threshold auto-accepts nothing unless the settings give one.
    assert {t.review.status for t in label(vfr_clip).tracks} == {"pending"}
    assert {t.review.status for t in label(vfr_clip, auto_accept_above=0.5).tracks} == {"accepted"}
