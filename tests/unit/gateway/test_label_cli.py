"""``roadlabel label`` and ``roadlabel export`` through gateway.cli.main, with the committed models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import EXIT_INPUT_ERRORS, EXIT_OK, EXIT_USAGE, main
from gateway.label_cli import load_pipeline_settings
from services.common.errors import ConfigError
from services.common.labelfile import load_label_file
from tests.synthvideo import make_tiny_video

pytestmark = pytest.mark.usefixtures("restore_root_logger")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_video(tmp_path_factory.mktemp("v") / "tiny.mp4", 64, 48, n_frames=6).path


def test_label_writes_a_valid_file_and_a_summary(tiny, tmp_path, capsys):
    out = tmp_path / "tiny.labels.json"
    assert main(["label", str(tiny), "-o", str(out), "--no-progress"]) == EXIT_OK
    labels = load_label_file(out)
    assert labels.recording.frame_count == 6
    assert labels.recording.source == "tiny.mp4"
    assert labels.models["detector"].sha256
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary.startswith("tiny.mp4: 0 tracks (0 to review), 6 frames in ")
    assert summary.endswith(f"-> {out}")


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "got 0 bytes"), (b"not a video" * 20, "cannot open"), (b"GIF89a not a video" * 20, "expected a video")],
    ids=["empty", "garbage", "gif-header"],
)
def test_bad_video_leaves_no_file_and_keeps_an_old_one(tmp_path, capsys, content, message):
    video = tmp_path / "in.mp4"
    video.write_bytes(content)
    out = tmp_path / "out.json"
    assert main(["label", str(video), "-o", str(out), "--no-progress"]) == EXIT_INPUT_ERRORS
    assert not out.exists()
    out.write_text("previous labels")
    assert main(["label", str(video), "-o", str(out), "--no-progress"]) == EXIT_INPUT_ERRORS
    assert out.read_text() == "previous labels"
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.json"]  # no temp files left


def test_missing_video(tmp_path, capsys):
    assert main(["label", str(tmp_path / "nope.mp4"), "--no-progress"]) == EXIT_INPUT_ERRORS
    assert "expected a video file, got no such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--roi", "0.5,0.5"], "--roi: expected four numbers"),
        (["--roi", "0.6,0,0.5,1"], "roi_xyxy"),
        (["--detect-every", "0"], "detect_every"),
    ],
)
def test_bad_options_are_usage_errors(tiny, tmp_path, capsys, args, message):
    assert main(["label", str(tiny), "-o", str(tmp_path / "o.json"), *args]) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_settings_file_and_unknown_keys(tmp_path):
    good = tmp_path / "s.yaml"
    good.write_text("detect_every: 2\ntracker:\n  hit_counter_max: 20\n")
    settings = load_pipeline_settings(good, min_sign_px=12.0)
    assert settings.detect_every == 2
    assert settings.tracker.hit_counter_max == 20
    assert settings.min_sign_px == 12.0
    bad = tmp_path / "bad.yaml"
    bad.write_text("detect_evry: 2\n")
    with pytest.raises(ConfigError, match="detect_evry"):
        load_pipeline_settings(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping of settings, got list"):
        load_pipeline_settings(bad)


def test_export_round_trip_and_bad_label_file(tiny, tmp_path, capsys):
    out = tmp_path / "l.json"
    assert main(["label", str(tiny), "-o", str(out), "--no-progress"]) == EXIT_OK
    xml = tmp_path / "x.xml"
    assert main(["export", str(out), "--format", "cvat-video", "-o", str(xml)]) == EXIT_OK
    assert xml.read_bytes().startswith(b"<?xml")
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["written"] == [str(xml)]
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema_version": 1, "recording": {}}')
    assert main(["export", str(broken), "--format", "mot", "-o", str(tmp_path / "m")]) == EXIT_INPUT_ERRORS
    assert "label file" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
