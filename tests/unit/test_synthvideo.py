"""tests/synthvideo.py: the written clips decode as described, and their ground truth is where the signs are."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

import tests.synthvideo as sv
from tests.synthvideo import (
    CODECS,
    CONTAINERS,
    CodecName,
    Side,
    SignSpec,
    SyntheticVideo,
    corrupt_tail,
    drawn_sign,
    load_background,
    load_gtsrb_signs,
    make_audio_only,
    make_road_video,
    make_tiny_video,
    procedural_background,
    truncate_file,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@dataclass
class Decoded:
    rgb: list[np.ndarray]  # (H, W, 3) uint8 per frame, as encoded (not rotated)
    pts_s: list[float]
    rotation: list[int]  # VideoFrame.rotation per frame
    width: int
    height: int
    n_audio_streams: int


def decode(path: Path, *, rgb: bool = True) -> Decoded:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        out = Decoded([], [], [], stream.codec_context.width, stream.codec_context.height, len(container.streams.audio))
        for frame in container.decode(stream):
            assert frame.pts is not None
            assert frame.time_base is not None
            out.pts_s.append(float(frame.pts * frame.time_base))
            out.rotation.append(frame.rotation)
            if rgb:
                out.rgb.append(frame.to_ndarray(format="rgb24"))
    return out


def count_decodable(path: Path) -> tuple[int, int]:
    """(frames decoded, packets the decoder refused); opening or demuxing may raise av.FFmpegError."""
    frames = errors = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            try:
                frames += len(stream.decode(packet))
            except av.InvalidDataError:
                errors += 1
    return frames, errors


def red_bbox(rgb: np.ndarray) -> tuple[int, int, int, int] | None:
    """Exclusive bbox of the saturated red pixels (the drawn signs' rings); None if there are none."""
    r, g, b = (rgb[..., c].astype(np.int16) for c in range(3))
    ys, xs = np.nonzero((r > 140) & (g < 90) & (b < 90))
    if xs.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def three_signs(n_frames: int) -> list[SignSpec]:
    return [
        SignSpec(14, *drawn_sign(14), start_frame=0, end_frame=n_frames, side="right"),
        SignSpec(18, *drawn_sign(18), start_frame=4, end_frame=n_frames, side="left"),
        SignSpec(38, *drawn_sign(38), start_frame=8, end_frame=n_frames - 2, side="top"),
    ]


@pytest.fixture(scope="session")
def clip(tmp_path_factory: pytest.TempPathFactory) -> SyntheticVideo:
    path = tmp_path_factory.mktemp("synth") / "road.mp4"
    return make_road_video(path, width=192, height=108, n_frames=30, signs=three_signs(30))


@pytest.fixture(scope="session")
def clip_decoded(clip: SyntheticVideo) -> Decoded:
    return decode(clip.path)


def one_red_sign(n_frames: int) -> list[SignSpec]:
    return [SignSpec(5, *drawn_sign(5, 96), start_frame=0, end_frame=n_frames, side="right", lateral=0.8)]


# --------------------------------------------------------------------------------------------------------------------
# Frames and times.


def test_clip_decodes_with_its_frame_count_size_and_times(clip: SyntheticVideo, clip_decoded: Decoded) -> None:
    assert (clip_decoded.width, clip_decoded.height) == (clip.width, clip.height) == (192, 108)
    assert len(clip_decoded.pts_s) == clip.n_frames == 30
    assert all(f.shape == (108, 192, 3) for f in clip_decoded.rgb)
    assert clip.frame_times_s == pytest.approx([i / 25 for i in range(30)], abs=1e-9)
    assert clip_decoded.pts_s == pytest.approx(clip.pts_s, abs=1e-6)
    assert clip_decoded.n_audio_streams == 0


@pytest.mark.parametrize("suffix", [".mp4", ".mov", ".mkv"])
@pytest.mark.parametrize("start_pts_s", [0.0, 1.5])
def test_variable_frame_rate_and_start_time_read_back(tmp_path: Path, suffix: str, start_pts_s: float) -> None:
    clip = make_road_video(
        tmp_path / f"vfr{suffix}",
        width=96,
        height=64,
        n_frames=12,
        signs=(),
        variable_frame_rate=True,
        start_pts_s=start_pts_s,
    )
    assert clip.start_s == pytest.approx(start_pts_s)
    durations = np.diff(clip.frame_times_s)
    assert set(np.round(durations, 6)) == {0.05, 0.025}  # 1/20 and 1/40 s alternate at 25 fps
    decoded = decode(clip.path, rgb=False)
    assert decoded.pts_s == pytest.approx(clip.pts_s, abs=1e-6)
    assert decoded.pts_s[0] == pytest.approx(start_pts_s, abs=1e-6)


def test_motion_follows_time_not_frame_index(tmp_path: Path) -> None:
    # With a variable frame rate the sign grows more over a long frame interval than over a short one.
    clip = make_road_video(
        tmp_path / "vfr.mp4", width=192, height=108, n_frames=20, signs=one_red_sign(20), variable_frame_rate=True
    )
    widths = [b.xyxy[2] - b.xyxy[0] for b in clip.tracks()[0]]
    long_steps, short_steps = np.diff(widths)[0::2], np.diff(widths)[1::2]
    assert long_steps[:5].sum() > short_steps[:5].sum()


# --------------------------------------------------------------------------------------------------------------------
# Ground truth.


def test_ground_truth_is_inside_the_frame_and_at_least_min_visible(clip: SyntheticVideo) -> None:
    assert clip.boxes
    for box in clip.boxes:
        x1, y1, x2, y2 = box.xyxy
        assert 0 <= x1 < x2 <= clip.width
        assert 0 <= y1 < y2 <= clip.height
        assert x2 - x1 >= 6
        assert box.t_s == pytest.approx(clip.pts_s[box.frame])
        assert box.class_id == clip.signs[box.track].class_id
    assert [(b.frame, b.track) for b in clip.boxes] == sorted({(b.frame, b.track) for b in clip.boxes})


def test_each_sign_grows_and_moves_outwards(clip: SyntheticVideo) -> None:
    tracks = clip.tracks()
    assert set(tracks) == {0, 1, 2}
    vx, vy = clip.width / 2, sv.VANISHING_Y * clip.height
    for track, boxes in tracks.items():
        spec = clip.signs[track]
        assert [b.frame for b in boxes] == list(range(boxes[0].frame, boxes[-1].frame + 1))
        assert spec.start_frame <= boxes[0].frame
        assert boxes[-1].frame < spec.end_frame
        widths = np.array([b.xyxy[2] - b.xyxy[0] for b in boxes])
        assert (np.diff(widths) >= 0).all()
        assert widths[-1] > 2 * widths[0]
        cx = np.array([(b.xyxy[0] + b.xyxy[2]) / 2 for b in boxes]) - vx
        cy = np.array([(b.xyxy[1] + b.xyxy[3]) / 2 for b in boxes]) - vy
        outward = {"right": cx, "left": -cx, "top": -cy}[spec.side]
        assert outward[-1] > outward[0] > 0


def test_boxes_are_where_the_sign_is_drawn(tmp_path: Path) -> None:
    clip = make_road_video(tmp_path / "red.mp4", width=320, height=240, n_frames=20, signs=one_red_sign(20))
    decoded = decode(clip.path)
    checked = 0
    for box in clip.boxes:
        if box.xyxy[2] - box.xyxy[0] < 16:
            continue
        found = red_bbox(decoded.rgb[box.frame])
        assert found is not None
        assert found == pytest.approx(box.xyxy, abs=2.0)
        checked += 1
    assert checked >= 5


def test_sign_leaving_the_frame_loses_its_ground_truth(tmp_path: Path) -> None:
    far = SignSpec(5, *drawn_sign(5), start_frame=0, end_frame=20, side="right", lateral=2.5)
    clip = make_road_video(tmp_path / "out.mp4", width=192, height=108, n_frames=20, signs=[far])
    frames = [b.frame for b in clip.boxes]
    assert frames == list(range(frames[0], frames[-1] + 1))
    assert frames[0] == 0
    assert frames[-1] < 19  # drawn until the end, but partly outside the frame for the last ones


def test_sign_hidden_behind_a_nearer_one_loses_its_ground_truth(tmp_path: Path) -> None:
    # Both stand on the right and reach the same spot at the end; the later one is pasted over the earlier one.
    signs = [
        SignSpec(14, *drawn_sign(14), start_frame=0, end_frame=20, side="right"),
        SignSpec(1, *drawn_sign(1), start_frame=10, end_frame=20, side="right"),
    ]
    clip = make_road_video(tmp_path / "hide.mp4", width=192, height=108, n_frames=20, signs=signs)
    assert [b.track for b in clip.boxes_in_frame(19)] == [1]
    assert [b.track for b in clip.boxes_in_frame(0)] == [0]
    assert {b.track for b in clip.boxes_in_frame(12)} == {0, 1}


def test_signs_start_small_and_end_large_by_default(tmp_path: Path) -> None:
    clip = make_road_video(tmp_path / "size.mkv", width=640, height=360, n_frames=10, signs=one_red_sign(10))
    boxes = clip.tracks()[0]
    assert 10 <= boxes[0].xyxy[2] - boxes[0].xyxy[0] <= 16
    assert 60 <= boxes[-1].xyxy[2] - boxes[-1].xyxy[0] <= 120


# --------------------------------------------------------------------------------------------------------------------
# Rotation, audio, codecs and containers.


@pytest.mark.parametrize("suffix", [".mp4", ".mov", ".mkv"])
@pytest.mark.parametrize("rotation_deg", [90, 180, 270])
def test_rotation_is_in_the_read_back_frames_and_boxes_follow(tmp_path: Path, suffix: str, rotation_deg: int) -> None:
    clip = make_road_video(
        tmp_path / f"rot{suffix}", width=160, height=120, n_frames=8, signs=one_red_sign(8), rotation_deg=rotation_deg
    )
    decoded = decode(clip.path)
    assert (decoded.width, decoded.height) == (160, 120)  # the encoded frame keeps its size
    assert {r % 360 for r in decoded.rotation} == {rotation_deg}
    assert clip.display_size == ((120, 160) if rotation_deg in (90, 270) else (160, 120))
    last = clip.tracks()[0][-1]
    encoded = decoded.rgb[last.frame]
    assert red_bbox(encoded) == pytest.approx(last.xyxy, abs=2.0)
    # A reader that honours the rotation turns the frame counter-clockwise by VideoFrame.rotation degrees.
    shown = np.rot90(encoded, k=decoded.rotation[last.frame] // 90)
    assert shown.shape[1::-1] == clip.display_size
    displayed = [b for b in clip.displayed_boxes() if (b.frame, b.track) == (last.frame, 0)]
    assert red_bbox(shown) == pytest.approx(displayed[0].xyxy, abs=2.0)
    # Upright: the sign stands on the right of the road and above the horizon in the displayed picture.
    x1, y1, x2, y2 = displayed[0].xyxy
    assert (x1 + x2) / 2 > shown.shape[1] / 2
    assert (y1 + y2) / 2 < shown.shape[0] / 2


@pytest.mark.parametrize(("suffix", "audio_codec"), [(".mp4", "aac"), (".mkv", "aac"), (".avi", "mp2")])
def test_audio_stream_when_asked(tmp_path: Path, suffix: str, audio_codec: str) -> None:
    clip = make_road_video(tmp_path / f"a{suffix}", width=64, height=48, n_frames=25, signs=(), audio=True)
    assert clip.has_audio
    with av.open(str(clip.path)) as container:
        (audio,) = container.streams.audio
        assert audio.codec_context.name == audio_codec
        samples = sum(f.samples for f in container.decode(audio))
    assert samples / 48_000 == pytest.approx(1.0, abs=0.1)  # as long as the 25 frames at 25 fps
    assert len(decode(clip.path, rgb=False).pts_s) == 25


UNSUPPORTED = {(".avi", "hevc"), (".mov", "vp9")}


@pytest.mark.parametrize("suffix", sorted(CONTAINERS))
@pytest.mark.parametrize("codec", sorted(CODECS))
def test_every_codec_and_container_writes_and_reads_back(tmp_path: Path, codec: CodecName, suffix: str) -> None:
    expect: AbstractContextManager[object] = (
        pytest.raises(ValueError, match="does not take") if (suffix, codec) in UNSUPPORTED else nullcontext()
    )
    with expect:
        clip = make_road_video(
            tmp_path / f"c{suffix}", width=96, height=64, n_frames=10, signs=one_red_sign(10), codec=codec, gop=4
        )
    if (suffix, codec) in UNSUPPORTED:
        return
    decoded = decode(clip.path)
    assert len(decoded.rgb) == 10
    assert (decoded.width, decoded.height) == (96, 64)
    assert decoded.pts_s == pytest.approx(clip.pts_s, abs=1e-6)
    with av.open(str(clip.path)) as container:
        assert container.streams.video[0].codec_context.name == codec


@pytest.mark.parametrize(
    "kwargs",
    [{"variable_frame_rate": True}, {"start_pts_s": 1.0}, {"rotation_deg": 90}],
)
def test_avi_refuses_what_it_cannot_store(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="avi"):
        make_road_video(tmp_path / "x.avi", width=64, height=48, n_frames=4, signs=(), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 63}, "even"),
        ({"n_frames": 0}, "n_frames"),
        ({"rotation_deg": 45}, "rotation_deg"),
        ({"codec": "av1"}, "codec"),
        ({"signs": one_red_sign(9)}, "end_frame"),
        ({"background": np.zeros((4, 4), np.uint8)}, "background"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"width": 64, "height": 48, "n_frames": 8, "signs": ()} | kwargs
    with pytest.raises(ValueError, match=match):
        make_road_video(tmp_path / "x.mp4", **args)  # type: ignore[arg-type]


def test_unknown_suffix_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="suffix"):
        make_road_video(tmp_path / "x.webm", signs=())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"crop": np.zeros((8, 8), np.uint8)}, "crop"),
        ({"crop": np.zeros((8, 8, 3), np.float32)}, "crop"),
        ({"roi_xyxy": (2, 2, 2, 6)}, "roi_xyxy"),
        ({"roi_xyxy": (0, 0, 9, 8)}, "roi_xyxy"),
        ({"start_frame": 5, "end_frame": 5}, "start_frame"),
        ({"side": "bottom"}, "side"),
        ({"lateral": 0.0}, "lateral"),
        ({"end_px": -1.0}, "end_px"),
    ],
)
def test_sign_spec_validates(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "class_id": 1,
        "crop": np.zeros((8, 8, 3), np.uint8),
        "roi_xyxy": (1, 1, 7, 7),
        "start_frame": 0,
        "end_frame": 4,
    } | kwargs
    with pytest.raises(ValueError, match=match):
        SignSpec(**args)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------------
# Bad inputs.


@pytest.fixture(scope="module")
def bad_input_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SyntheticVideo]:
    folder = tmp_path_factory.mktemp("bad")
    return {
        name: make_road_video(
            folder / name, width=128, height=96, n_frames=48, signs=one_red_sign(48), faststart=name == "fast.mp4"
        )
        for name in ("plain.mp4", "fast.mp4", "clip.mkv", "clip.avi")
    }


def test_truncated_mp4_without_faststart_cannot_be_opened(bad_input_sources, tmp_path: Path) -> None:
    cut = truncate_file(bad_input_sources["plain.mp4"].path, tmp_path / "cut.mp4", 0.6)
    assert cut.stat().st_size == int(bad_input_sources["plain.mp4"].path.stat().st_size * 0.6)
    with pytest.raises(av.InvalidDataError):
        count_decodable(cut)


@pytest.mark.parametrize("name", ["fast.mp4", "clip.mkv", "clip.avi"])
def test_truncated_file_decodes_fewer_frames(bad_input_sources, tmp_path: Path, name: str) -> None:
    cut = truncate_file(bad_input_sources[name].path, tmp_path / f"cut{Path(name).suffix}", 0.6)
    frames, _ = count_decodable(cut)
    assert 0 < frames < 48


@pytest.mark.parametrize("name", ["plain.mp4", "fast.mp4", "clip.mkv", "clip.avi"])
def test_corrupt_tail_keeps_the_header_and_breaks_the_last_frames(bad_input_sources, tmp_path: Path, name: str) -> None:
    src = bad_input_sources[name].path
    bad = corrupt_tail(src, tmp_path / f"bad{src.suffix}", 0.75)
    assert bad.stat().st_size == src.stat().st_size
    assert bad.read_bytes()[:64] == src.read_bytes()[:64]
    assert count_decodable(src) == (48, 0)
    frames, errors = count_decodable(bad)  # opens: the header survived
    assert frames < 48 or errors > 0
    assert frames >= 24  # the front of the clip is untouched


def test_corrupt_tail_is_seeded(bad_input_sources, tmp_path: Path) -> None:
    src = bad_input_sources["clip.mkv"].path
    a = corrupt_tail(src, tmp_path / "a.mkv", 0.5, seed=3).read_bytes()
    b = corrupt_tail(src, tmp_path / "b.mkv", 0.5, seed=3).read_bytes()
    assert a == b != src.read_bytes()


def test_audio_only_file_has_no_video(tmp_path: Path) -> None:
    path = make_audio_only(tmp_path / "voice.m4a")
    with av.open(str(path)) as container:
        assert [s.type for s in container.streams] == ["audio"]
        assert container.duration is not None
        assert container.duration > 0


def test_tiny_video(tmp_path: Path) -> None:
    clip = make_tiny_video(tmp_path / "tiny.mp4", 16, 16)
    decoded = decode(clip.path)
    assert [f.shape for f in decoded.rgb] == [(16, 16, 3)] * clip.n_frames
    assert clip.boxes == ()


# --------------------------------------------------------------------------------------------------------------------
# Sources.


@pytest.mark.parametrize("class_id", [1, 14, 18, 38])
def test_drawn_sign(class_id: int) -> None:
    crop, (x1, y1, x2, y2) = drawn_sign(class_id, 64)
    assert crop.shape == (64, 64, 3)
    assert crop.dtype == np.uint8
    assert 0 < x1 < x2 < 64
    assert 0 < y1 < y2 < 64
    inside = crop[y1:y2, x1:x2].reshape(-1, 3).astype(int)
    assert inside.std(axis=0).max() > 40  # a drawn sign, not a flat patch
    assert not np.array_equal(drawn_sign(class_id)[0], drawn_sign((class_id + 1) % 43)[0])


def test_procedural_background() -> None:
    bg = procedural_background(200, 100, seed=1)
    assert bg.shape == (100, 200, 3)
    assert bg.dtype == np.uint8
    assert np.array_equal(bg, procedural_background(200, 100, seed=1))
    sky, road = bg[5, 100].astype(int), bg[95, 100].astype(int)
    assert sky[2] > sky[0] + 40  # blue above
    assert abs(road[0] - road[2]) < 30  # grey below


def write_fake_gtsrb(root: Path) -> None:
    rng = np.random.default_rng(0)
    folder = root / "00007"
    folder.mkdir(parents=True)
    lines = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for track, sizes in enumerate([(30, 60), (40, 70), (30,)]):
        for k, size in enumerate(sizes):
            name = f"{track:05d}_{k:05d}.png"
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / name)
            lines.append(f"{name};{size};{size};5;5;{size - 6};{size - 6};7")
    (folder / "GT-00007.csv").write_text("\n".join(lines) + "\n")


def test_load_gtsrb_signs_prefers_large_crops_and_makes_roi_exclusive(tmp_path: Path) -> None:
    write_fake_gtsrb(tmp_path)
    signs = load_gtsrb_signs(tmp_path, [7], per_class=2, seed=0)
    assert [s[0] for s in signs] == [7, 7]
    assert sorted(s[1].shape[0] for s in signs) == [60, 70]  # one per track, each track's largest; 30 px skipped
    for _, crop, roi in signs:
        size = crop.shape[0]
        assert roi == (5, 5, size - 5, size - 5)
        SignSpec(7, crop, roi, 0, 1)  # usable as is


def test_load_background_picks_a_scene_without_signs(tmp_path: Path) -> None:
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (40, 20), colour).save(tmp_path / f"{i:05d}.jpg")
    (tmp_path / "gt.txt").write_text("00000.jpg;1;1;5;5;3\n00002.jpg;1;1;5;5;3\n")
    for seed in range(4):
        bg = load_background(tmp_path, seed=seed)
        assert bg.shape == (20, 40, 3)
        assert bg[10, 20, 1] > 200  # always the green one
        assert bg[10, 20, 0] < 60


def test_real_gtsrb_signs_on_a_gtsdb_background(tmp_path: Path) -> None:
    if not (DATA / "gtsrb_train").is_dir() or not (DATA / "gtsdb_train").is_dir():
        pytest.skip(f"no shared data at {DATA}")
    sources = load_gtsrb_signs(DATA / "gtsrb_train", [14, 1, 12], seed=0)
    assert all(min(crop.shape[:2]) >= 50 for _, crop, _ in sources)
    background = load_background(DATA / "gtsdb_train", seed=0)
    assert background.shape == (800, 1360, 3)
    sides: tuple[Side, ...] = ("right", "left", "top")
    signs = [SignSpec(c, crop, roi, 0, 24, sides[i]) for i, (c, crop, roi) in enumerate(sources)]
    clip = make_road_video(
        tmp_path / "real.mp4", width=320, height=180, n_frames=24, signs=signs, background=background
    )
    assert set(clip.tracks()) == {0, 1, 2}
    assert len(decode(clip.path, rgb=False).pts_s) == 24


def test_all_is_complete() -> None:
    public = {
        n for n in vars(sv) if not n.startswith("_") and getattr(getattr(sv, n), "__module__", None) == sv.__name__
    }
    assert public <= set(sv.__all__)
    assert all(hasattr(sv, n) for n in sv.__all__)
