"""VideoReader: stream timestamps, rotation, gaps, bad input, and a decoder thread that never hangs its caller."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from services.common.errors import UnreadableVideo
from services.decode.reader import DecodeSettings, VideoReader, open_video, read_frame_at, read_frames_at
from tests.synthvideo import (
    SignSpec,
    corrupt_tail,
    drawn_sign,
    make_audio_only,
    make_road_video,
    make_tiny_video,
    truncate_file,
)


def sign(class_id=14, start=0, end=30):
    crop, roi = drawn_sign(class_id)
    return SignSpec(class_id=class_id, crop=crop, roi_xyxy=roi, start_frame=start, end_frame=end)


def read_all(path: Path, settings: DecodeSettings | None = None):
    with open_video(path, "rec", settings) as reader:
        frames = list(reader.frames())
        return reader, frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_road_video(tmp_path_factory.mktemp("v") / "clip.mp4", width=160, height=96, n_frames=30, signs=[sign()])


def test_frames_carry_index_and_stream_time(clip):
    reader, frames = read_all(clip.path)
    assert reader.info.width == 160
    assert reader.info.height == 96
    assert reader.info.codec == "h264"
    assert [f.ref.index for f in frames] == list(range(30))
    np.testing.assert_allclose([f.ref.pts_s for f in frames], clip.frame_times_s, atol=1e-6)
    assert all(f.image.shape == (96, 160, 3) and f.image.dtype == np.uint8 for f in frames)
    assert reader.gaps == []
    assert reader.frames_decoded == 30
    assert not reader.variable_frame_rate


@pytest.mark.parametrize("start", [0.0, 3.5])
def test_variable_frame_rate_and_start_time_come_from_timestamps(tmp_path, start):
    clip = make_road_video(
        tmp_path / "vfr.mkv", width=96, height=64, n_frames=24, signs=[], variable_frame_rate=True, start_pts_s=start
    )
    reader, frames = read_all(clip.path)
    times = [f.ref.pts_s for f in frames]
    np.testing.assert_allclose(times, clip.frame_times_s, atol=1e-3)
    assert times[0] == pytest.approx(0.0, abs=1e-3)
    assert reader.info.start_s == pytest.approx(start, abs=1e-3)
    assert reader.variable_frame_rate
    steps = np.diff(times)
    assert steps.max() > 1.5 * steps.min()  # index / fps would have made them all equal


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_display_rotation_is_applied(tmp_path, rotation):
    clip = make_road_video(tmp_path / "phone.mp4", width=128, height=64, n_frames=6, signs=[], rotation_deg=rotation)
    reader, frames = read_all(clip.path)
    assert reader.info.rotation_deg == rotation
    expect_hw = (128, 64) if rotation in (90, 270) else (64, 128)
    assert (reader.info.height, reader.info.width) == expect_hw
    assert frames[0].image.shape[:2] == expect_hw


def test_audio_is_ignored(tmp_path):
    clip = make_road_video(tmp_path / "a.mp4", width=96, height=64, n_frames=10, signs=[], audio=True)
    _, frames = read_all(clip.path)
    assert len(frames) == 10


@pytest.mark.parametrize(("suffix", "codec"), [(".mov", "h264"), (".mkv", "hevc"), (".avi", "mpeg4"), (".mkv", "vp9")])
def test_common_containers_and_codecs(tmp_path, suffix, codec):
    clip = make_road_video(tmp_path / f"c{suffix}", width=96, height=64, n_frames=8, signs=[], codec=codec)
    reader, frames = read_all(clip.path)
    assert len(frames) == 8
    assert reader.info.codec in {codec, "libdav1d", "libvpx-vp9", "mpeg4", "hevc", "h264", "vp9"}


def test_tiny_video(tmp_path):
    clip = make_tiny_video(tmp_path / "tiny.mp4", 16, 16)
    _, frames = read_all(clip.path)
    assert frames
    assert frames[0].image.shape == (16, 16, 3)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b""), "got 0 bytes"),
        (lambda p: p.write_bytes(b"this is not a video" * 50), "cannot open"),
        (lambda p: make_audio_only(p), "expected a video stream, got audio"),
        (lambda p: p.mkdir(), "expected a video file"),
    ],
    ids=["empty", "text", "audio-only", "directory"],
)
def test_bad_files_raise_a_clear_error(tmp_path, make, message):
    path = tmp_path / "bad.m4a"
    make(path)
    with pytest.raises(UnreadableVideo, match=message):
        open_video(path, "rec")


def test_missing_file(tmp_path):
    with pytest.raises(UnreadableVideo, match="expected a video file, got No such file"):
        open_video(tmp_path / "nope.mp4", "rec")


def test_too_many_pixels(clip):
    with pytest.raises(UnreadableVideo, match=r"expected at most 100 pixels per frame, got 160x96"):
        open_video(clip.path, "rec", DecodeSettings(max_pixels=100))


def test_truncated_file_records_a_gap_to_the_declared_end(tmp_path):
    clip = make_road_video(tmp_path / "full.mp4", width=96, height=64, n_frames=50, signs=[], faststart=True)
    cut = truncate_file(clip.path, tmp_path / "cut.mp4", 0.5)
    reader, frames = read_all(cut)
    assert 0 < len(frames) < 50
    (gap,) = reader.gaps
    assert gap.after_frame == len(frames) - 1
    assert gap.to_s > gap.from_s
    assert "truncated" in gap.reason or gap.packets > 0


def test_corrupt_tail_is_skipped_and_recorded(tmp_path):
    clip = make_road_video(tmp_path / "full.mp4", width=160, height=96, n_frames=60, signs=[sign(end=60)], gop=10)
    bad = corrupt_tail(clip.path, tmp_path / "bad.mp4", 0.7)
    reader, frames = read_all(bad)
    assert len(frames) >= 30
    assert reader.gaps, "the corrupt GOP at the end must show up as a gap"
    assert reader.gaps[-1].to_s >= reader.gaps[-1].from_s


def test_too_many_bad_packets_in_a_row_raise(tmp_path):
    clip = make_road_video(tmp_path / "full.mp4", width=160, height=96, n_frames=60, signs=[sign(end=60)], gop=10)
    bad = corrupt_tail(clip.path, tmp_path / "bad.mp4", 0.5)
    with pytest.raises(UnreadableVideo, match="corrupt packets in a row"):
        read_all(bad, DecodeSettings(max_consecutive_bad_packets=2))


def test_decoder_error_reaches_the_consumer_instead_of_hanging(clip, monkeypatch):
    def boom(self, q):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(VideoReader, "_decode", boom)
    with open_video(clip.path, "rec") as reader, pytest.raises(RuntimeError, match="decoder exploded"):
        list(reader.frames())


def test_stopping_early_stops_the_thread(clip):
    before = threading.active_count()
    with open_video(clip.path, "rec", DecodeSettings(queue_bytes=1)) as reader:
        frames = reader.frames()
        first = next(frames)
        frames.close()
    assert first.ref.index == 0
    assert threading.active_count() == before


def test_frames_decodes_once(clip):
    with open_video(clip.path, "rec") as reader:
        list(reader.frames())
        with pytest.raises(RuntimeError, match="decodes once"):
            list(reader.frames())


def test_frames_at_times_equal_the_decoded_frames_in_any_order(clip):
    _reader, frames = read_all(clip.path)
    times = [clip.frame_times_s[20], clip.frame_times_s[3], clip.frame_times_s[3] + 1e-3, 0.0]
    got = read_frames_at(clip.path, times)
    assert [round(t, 6) for t, _ in got] == [round(clip.frame_times_s[i], 6) for i in (20, 3, 4, 0)]
    for (_t, image), i in zip(got, (20, 3, 4, 0), strict=True):
        np.testing.assert_array_equal(image, frames[i].image)
    assert read_frame_at(clip.path, times[0])[0] == got[0][0]
    with pytest.raises(UnreadableVideo, match="expected a frame at 99.000 s"):
        read_frames_at(clip.path, [0.0, 99.0])
