"""Synthetic road videos with exact ground truth, for the tests and the benchmarks.

A clip shows what a dashcam sees while its car drives towards some traffic signs: the background is zoomed
towards a vanishing point a little above the frame centre, and every sign starts small near that point and moves
outwards (right, left or up) while it grows as 1 / distance. Each sign is a whole GTSRB crop (with the little real
background around the sign), or a drawn stand-in when the data set is not there; the ground truth is the box of
the sign itself (the crop's ROI) in pixels of the encoded frame, for every frame where it is wholly visible.

The clip is encoded with PyAV (H.264, HEVC, MPEG-4 part 2 or VP9 in MP4, MOV, Matroska or AVI), optionally with a
variable frame rate, a non-zero start time, display-rotation metadata (as phones write it) and an audio track. The
frame times come back exactly as a reader computes them, ``pts * time_base``.

Helpers for bad inputs (truncated and corrupt files, an audio-only file, a tiny video) sit at the end.

Rotation: ``rotation_deg`` is written with ``VideoStream.set_display_rotation`` (a display matrix in the stream's
coded side data; FFmpeg 7+ ignores the old ``metadata["rotate"]`` tag). PyAV 18 exposes no stream-level side data
on reading: a reader gets it from each decoded frame, ``VideoFrame.rotation`` (counter-clockwise degrees in
[-180, 180]), and shows the frame upright with ``np.rot90(frame.to_ndarray(format="rgb24"), k=rotation // 90)``.

Example::

    signs = [SignSpec(14, *drawn_sign(14), start_frame=0, end_frame=48)]
    clip = make_road_video(tmp_path / "road.mp4", signs=signs, n_frames=48)
    clip.tracks()[0][-1].xyxy  # the stop sign's box in the last frame where it is wholly visible
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Literal, cast

import av
import numpy as np
import numpy.typing as npt
from av.audio.stream import AudioStream
from av.video.stream import VideoStream
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "CODECS",
    "CodecName",
    "CONTAINERS",
    "GtBox",
    "Side",
    "SignSpec",
    "SyntheticVideo",
    "corrupt_tail",
    "drawn_sign",
    "load_background",
    "load_gtsrb_signs",
    "make_audio_only",
    "make_road_video",
    "make_tiny_video",
    "procedural_background",
    "read_gtsdb_sign_free_scenes",
    "truncate_file",
]

Side = Literal["right", "left", "top"]
CodecName = Literal["h264", "hevc", "mpeg4", "vp9"]
XYXY = tuple[float, float, float, float]
RoiXYXY = tuple[int, int, int, int]
Rgb = npt.NDArray[np.uint8]

#: Height of the vanishing point, as a fraction of the displayed frame height (the horizon of a dashcam sits a
#: little above the centre because the camera looks slightly down at the road).
VANISHING_Y = 0.45
#: The background is zoomed by 1 / (1 - ZOOM * t / duration): 1.0 at the first frame, 1.25 at the last.
ZOOM = 0.2
#: A sign more than this share of whose ROI is under a nearer sign's crop gets no ground truth in that frame.
MAX_HIDDEN_FRACTION = 0.5
#: Gap in pixels kept between a sign's final box and the frame edge when ``lateral`` is 1.
EDGE_MARGIN_PX = 4.0

#: Our codec names and the PyAV encoder with its options for each, at a quality that keeps 10-16 px signs legible.
#: x264's veryfast preset keeps B-frames, so decode order differs from presentation order (as in real dashcam files).
CODECS: dict[str, tuple[str, dict[str, str]]] = {
    "h264": ("libx264", {"crf": "20", "preset": "veryfast"}),
    "hevc": ("libx265", {"crf": "22", "preset": "ultrafast", "x265-params": "log-level=error"}),
    "mpeg4": ("mpeg4", {}),  # no CRF: a bit rate is set from the frame size instead
    "vp9": ("libvpx-vp9", {"crf": "32", "b": "0", "deadline": "realtime", "cpu-used": "8", "row-mt": "1"}),
}
#: File suffix -> FFmpeg muxer name.
CONTAINERS: dict[str, str] = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi"}
#: (suffix, codec) pairs FFmpeg's muxers refuse: AVI has no HEVC tag, and the MOV muxer takes VP9 only as MP4.
_UNSUPPORTED = frozenset({(".avi", "hevc"), (".mov", "vp9")})
_MPEG4_BITS_PER_PIXEL = 0.4
_AUDIO_RATE_HZ = 48_000


@dataclasses.dataclass(frozen=True, eq=False)
class SignSpec:
    """One physical sign that the car drives past.

    Attributes:
        class_id: GTSRB class id (0..42) written into the ground truth.
        crop: (H, W, 3) uint8 RGB image holding the sign and a little background around it (a GTSRB crop).
        roi_xyxy: The sign inside ``crop``, in crop pixels, exclusive corners ``(x1, y1, x2, y2)``.
        start_frame: First frame (presentation order, 0-based) in which the sign is drawn.
        end_frame: One past the last frame in which the sign is drawn.
        side: Where the sign stands: beside the road on the right or left, or overhead (``"top"``).
        lateral: How far from the vanishing point the sign's path runs. At 1.0 the sign reaches its final size
            just inside the frame edge; above 1.0 it leaves the frame earlier (those frames have no ground truth);
            below 1.0 it stays nearer the middle of the road.
        start_px: ROI width in pixels in ``start_frame``; ``None`` picks 10-16 px from the frame height.
        end_px: ROI width in pixels in ``end_frame - 1``; ``None`` picks a quarter of the frame height, 24-120 px.
    """

    class_id: int
    crop: Rgb
    roi_xyxy: RoiXYXY
    start_frame: int
    end_frame: int
    side: Side = "right"
    lateral: float = 1.0
    start_px: float | None = None
    end_px: float | None = None

    def __post_init__(self) -> None:
        crop = self.crop
        if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
            raise ValueError(f"crop: expected (H, W, 3) uint8, got {crop.shape} {crop.dtype}")
        x1, y1, x2, y2 = self.roi_xyxy
        if not (0 <= x1 < x2 <= crop.shape[1] and 0 <= y1 < y2 <= crop.shape[0]):
            raise ValueError(
                f"roi_xyxy: expected a non-empty box inside the {crop.shape[1]}x{crop.shape[0]} crop, "
                f"got {self.roi_xyxy}"
            )
        if not 0 <= self.start_frame < self.end_frame:
            raise ValueError(f"frames: expected 0 <= start_frame < end_frame, got {self.start_frame}, {self.end_frame}")
        if self.side not in ("right", "left", "top"):
            raise ValueError(f"side: expected 'right', 'left' or 'top', got {self.side!r}")
        if not self.lateral > 0:
            raise ValueError(f"lateral: expected > 0, got {self.lateral}")
        for name, px in (("start_px", self.start_px), ("end_px", self.end_px)):
            if px is not None and not px > 0:
                raise ValueError(f"{name}: expected > 0 or None, got {px}")


@dataclasses.dataclass(frozen=True)
class GtBox:
    """Ground truth of one sign in one frame.

    Attributes:
        frame: Frame index in presentation (= decode output) order, 0-based.
        t_s: Presentation time in seconds as a reader computes it, ``pts * time_base``
            (``start_s + frame_times_s[frame]``).
        track: The sign's index in ``SyntheticVideo.signs``; one track per physical sign.
        class_id: GTSRB class id.
        xyxy: The sign's ROI, float pixels of the encoded (not the display-rotated) frame, exclusive corners.
    """

    frame: int
    t_s: float
    track: int
    class_id: int
    xyxy: XYXY


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticVideo:
    """A written clip and its exact ground truth.

    Attributes:
        path: The video file.
        width: Encoded frame width in pixels (before any display rotation).
        height: Encoded frame height in pixels.
        frame_times_s: Presentation time of each frame relative to the first frame, seconds; ``[0] == 0``.
        start_s: Presentation time of the first frame, seconds (``pts * time_base`` of the first decoded frame).
        boxes: Ground truth, sorted by frame then track.
        signs: The signs, indexed by track.
        codec: One of ``CODECS``.
        rotation_deg: Display rotation written to the container, counter-clockwise degrees in [0, 360): the reader
            must turn each decoded frame by this much to show it upright. PyAV reports it as
            ``VideoFrame.rotation``, normalised to [-180, 180] (270 reads as -90, 180 as -180).
        has_audio: Whether an audio stream was written too.
    """

    path: Path
    width: int
    height: int
    frame_times_s: tuple[float, ...]
    start_s: float
    boxes: tuple[GtBox, ...]
    signs: tuple[SignSpec, ...]
    codec: str = "h264"
    rotation_deg: int = 0
    has_audio: bool = False

    @property
    def n_frames(self) -> int:
        """Number of video frames written."""
        return len(self.frame_times_s)

    @property
    def pts_s(self) -> tuple[float, ...]:
        """Presentation time of each frame as a reader computes it, ``pts * time_base``, seconds."""
        return tuple(self.start_s + t for t in self.frame_times_s)

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) of the frame after the display rotation is applied."""
        return (self.height, self.width) if self.rotation_deg in (90, 270) else (self.width, self.height)

    def tracks(self) -> dict[int, list[GtBox]]:
        """Ground truth grouped by track, each list in frame order; signs never wholly visible are left out."""
        out: dict[int, list[GtBox]] = {}
        for box in self.boxes:
            out.setdefault(box.track, []).append(box)
        return out

    def boxes_in_frame(self, frame: int) -> list[GtBox]:
        """Ground truth of one frame (presentation order)."""
        return [b for b in self.boxes if b.frame == frame]

    def displayed_boxes(self) -> tuple[GtBox, ...]:
        """The ground truth in pixels of the display-rotated frame, as a reader that honours the rotation sees it."""
        quarter_turns = self.rotation_deg // 90
        return tuple(
            GtBox(b.frame, b.t_s, b.track, b.class_id, _rotate_xyxy_ccw(b.xyxy, self.width, self.height, quarter_turns))
            for b in self.boxes
        )


# --------------------------------------------------------------------------------------------------------------------
# Sources: GTSRB crops and GTSDB scenes when the data set is there; drawn stand-ins when it is not.


def load_gtsrb_signs(
    root: Path, class_ids: Sequence[int], per_class: int = 1, seed: int = 0
) -> list[tuple[int, Rgb, RoiXYXY]]:
    """Pick large GTSRB crops (both sides >= 50 px when the class has them), from different tracks where possible.

    Args:
        root: The ``gtsrb_train`` folder holding ``000NN/GT-000NN.csv`` and the PNG crops.
        class_ids: Classes to take, in order.
        per_class: Crops per class.
        seed: Which tracks are chosen.

    Returns:
        ``(class_id, crop, roi_xyxy)`` per crop: crop (H, W, 3) uint8 RGB, roi in crop pixels with exclusive
        corners (the CSV's corners are inclusive).

    Raises:
        FileNotFoundError: A class folder or its CSV is missing.
        ValueError: A class's CSV lists no crop, or ``per_class`` < 1.
    """
    if per_class < 1:
        raise ValueError(f"per_class: expected >= 1, got {per_class}")
    rng = np.random.default_rng(seed)
    out: list[tuple[int, Rgb, RoiXYXY]] = []
    for class_id in class_ids:
        folder = Path(root) / f"{class_id:05d}"
        rows: list[tuple[str, int, int, RoiXYXY]] = []
        with (folder / f"GT-{class_id:05d}.csv").open(newline="") as f:
            for row in csv.DictReader(f, delimiter=";"):
                w, h = int(row["Width"]), int(row["Height"])
                roi = (int(row["Roi.X1"]), int(row["Roi.Y1"]), int(row["Roi.X2"]) + 1, int(row["Roi.Y2"]) + 1)
                rows.append((row["Filename"], w, h, (roi[0], roi[1], min(roi[2], w), min(roi[3], h))))
        if not rows:
            raise ValueError(f"{folder}: expected at least one crop in the CSV, got none")
        large = [r for r in rows if min(r[1], r[2]) >= 50]
        pool = large or rows
        # The largest crop of each track is its nearest (sharpest) view of that physical sign.
        by_track: dict[str, list[tuple[str, int, int, RoiXYXY]]] = {}
        for r in pool:
            by_track.setdefault(r[0].split("_")[0], []).append(r)
        tracks = [sorted(v, key=lambda r: -r[1] * r[2]) for _, v in sorted(by_track.items())]
        order = rng.permutation(len(tracks))
        for k in range(per_class):
            ranked = tracks[int(order[k % len(tracks)])]
            name, _, _, roi = ranked[(k // len(tracks)) % len(ranked)]
            with Image.open(folder / name) as img:
                crop = np.array(img.convert("RGB"), dtype=np.uint8)
            out.append((class_id, crop, roi))
    return out


def read_gtsdb_sign_free_scenes(gtsdb_root: Path) -> list[Path]:
    """The GTSDB scenes that ``gt.txt`` lists no sign for, sorted by name."""
    root = Path(gtsdb_root)
    with_signs = {line.split(";", 1)[0] for line in (root / "gt.txt").read_text().splitlines() if line.strip()}
    return [p for p in sorted(root.glob("*.jpg")) if p.name not in with_signs]


def load_background(gtsdb_root: Path, seed: int = 0) -> Rgb:
    """One GTSDB road scene with no (labelled) sign in it, as a background.

    Args:
        gtsdb_root: The ``gtsdb_train`` folder with ``NNNNN.jpg`` and ``gt.txt``.
        seed: Which of the sign-free scenes.

    Returns:
        (800, 1360, 3) uint8 RGB.

    Raises:
        FileNotFoundError: ``gt.txt`` is missing.
        ValueError: Every scene has a sign.
    """
    scenes = read_gtsdb_sign_free_scenes(gtsdb_root)
    if not scenes:
        raise ValueError(f"{gtsdb_root}: expected scenes without signs in gt.txt, got none")
    pick = scenes[int(np.random.default_rng(seed).integers(len(scenes)))]
    with Image.open(pick) as img:
        return np.array(img.convert("RGB"), dtype=np.uint8)


_TRIANGLE_CLASSES = frozenset({11, *range(18, 32)})
_BLUE_CLASSES = frozenset(range(33, 41))


def drawn_sign(class_id: int, size: int = 64) -> tuple[Rgb, RoiXYXY]:
    """A drawn stand-in for a GTSRB crop: red-ring circle, red triangle or blue disc, with the class id inside.

    Args:
        class_id: 0..42; decides the shape (triangles for warnings, blue discs for mandatory signs, a red ring
            otherwise) and the number drawn inside.
        size: Side of the square crop in pixels (>= 16).

    Returns:
        ``(crop, roi_xyxy)``: (size, size, 3) uint8 RGB with a grey-green margin, and the sign's box inside it
        (exclusive corners), as ``load_gtsrb_signs`` returns them.
    """
    if size < 16:
        raise ValueError(f"size: expected >= 16, got {size}")
    ss = 4  # supersampling, for smooth edges after the downscale
    big = size * ss
    margin = max(2, size // 10)
    img = Image.new("RGB", (big, big), (118, 126, 112))
    draw = ImageDraw.Draw(img)
    x1, y1, x2, y2 = (margin * ss, margin * ss, (size - margin) * ss - 1, (size - margin) * ss - 1)
    side = x2 - x1
    ring = max(ss, side // 8)
    if class_id in _TRIANGLE_CLASSES:
        outer = [(x1, y2), ((x1 + x2) // 2, y1), (x2, y2)]
        draw.polygon(outer, fill=(200, 20, 30))
        inset = ring * 2
        inner = [(x1 + inset, y2 - ring), ((x1 + x2) // 2, y1 + inset + ring // 2), (x2 - inset, y2 - ring)]
        draw.polygon(inner, fill=(245, 245, 240))
        text_xy = ((x1 + x2) / 2, y1 + side * 0.66)
    elif class_id in _BLUE_CLASSES:
        draw.ellipse((x1, y1, x2, y2), fill=(20, 70, 170))
        text_xy = ((x1 + x2) / 2, (y1 + y2) / 2)
    else:
        draw.ellipse((x1, y1, x2, y2), fill=(200, 20, 30))
        draw.ellipse((x1 + ring, y1 + ring, x2 - ring, y2 - ring), fill=(245, 245, 240))
        text_xy = ((x1 + x2) / 2, (y1 + y2) / 2)
    font = ImageFont.load_default(size=max(8, int(side * 0.38)))
    ink = (245, 245, 240) if class_id in _BLUE_CLASSES else (15, 15, 15)
    draw.text(text_xy, str(class_id), fill=ink, font=font, anchor="mm")
    crop = np.array(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    return crop, (margin, margin, size - margin, size - margin)


def procedural_background(width: int, height: int, seed: int = 0) -> Rgb:
    """A data-free road scene: sky gradient, tree line, grey road narrowing to the vanishing point, green verges.

    Args:
        width: Pixels.
        height: Pixels.
        seed: Noise and tree line.

    Returns:
        (height, width, 3) uint8 RGB, with its vanishing point at ``(width / 2, VANISHING_Y * height)`` like the
        motion of ``make_road_video``.
    """
    if width < 1 or height < 1:
        raise ValueError(f"size: expected >= 1x1, got {width}x{height}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    horizon = VANISHING_Y * height
    vx = width / 2
    img = np.empty((height, width, 3), np.float32)
    # Sky: deep blue at the top, pale at the horizon.
    f = np.clip(yy / max(horizon, 1.0), 0, 1)[..., None]
    img[:] = (1 - f) * np.array([70, 120, 200], np.float32) + f * np.array([190, 210, 225], np.float32)
    # Ground below the horizon: verges, with the road as a trapezoid whose sides meet at the vanishing point.
    depth = np.clip((yy - horizon) / max(height - horizon, 1.0), 0, 1)
    ground = yy >= horizon
    img[ground] = np.array([70, 120, 55], np.float32)
    road = ground & (np.abs(xx - vx) <= 1.0 + depth * 0.75 * width)
    img[road] = np.array([105, 105, 108], np.float32)
    # Dashed centre line: dashes repeat in 1 / depth so they look evenly spaced on the road.
    line = ground & (np.abs(xx - vx) <= 0.5 + depth * 0.012 * width) & (np.sin(6.0 / (depth + 0.05)) > 0)
    img[line] = np.array([235, 235, 230], np.float32)
    # A tree line along the horizon, so the zoom shows texture moving outwards.
    raw_h = rng.uniform(0.02, 0.08, width) * height
    col_h = np.convolve(raw_h, np.ones(9) / 9, mode="same")
    trees = (yy < horizon) & (yy >= horizon - col_h[None, :]) & ~road
    img[trees] = np.array([40, 75, 40], np.float32)
    img += rng.normal(0.0, 6.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------------
# The clip.


def _default_px(display_w: int, display_h: int) -> tuple[float, float]:
    short = min(display_w, display_h)
    return float(np.clip(0.035 * short, 10, 16)), float(np.clip(0.25 * short, 24, 120))


def _rotate_xyxy_ccw(xyxy: XYXY, width: int, height: int, quarter_turns: int) -> XYXY:
    """A box in a width x height image after the image is turned counter-clockwise by quarter_turns * 90 degrees."""
    x1, y1, x2, y2 = xyxy
    w, h = width, height
    for _ in range(quarter_turns % 4):
        # Turning counter-clockwise sends (x, y) to (y, w - x); the image becomes h wide and w high.
        x1, y1, x2, y2 = y1, w - x2, y2, w - x1
        w, h = h, w
    return (x1, y1, x2, y2)


def _frame_ticks(
    n_frames: int, rate: Fraction, clock: Fraction, start_pts_s: float, variable_frame_rate: bool
) -> list[int]:
    """pts of each frame in ``clock`` units: constant 1 / rate, or alternating 1.25 / rate and 0.625 / rate."""
    start = round(Fraction(start_pts_s) / clock)
    ticks, t = [], Fraction(0)
    for i in range(n_frames):
        ticks.append(start + round(t / clock))
        t += (Fraction(5, 4) if i % 2 == 0 else Fraction(5, 8)) / rate if variable_frame_rate else 1 / rate
    return ticks


@dataclasses.dataclass(frozen=True)
class _Placement:
    """Where one sign is pasted in one displayed frame."""

    track: int
    crop_wh: tuple[int, int]
    paste_xy: tuple[int, int]
    roi_xyxy: XYXY  # displayed-frame pixels


def _place(
    track: int, spec: SignSpec, u: float, display_w: int, display_h: int, start_px: float, end_px: float
) -> _Placement:
    """The sign's paste position and ROI box at progress u in [0, 1] along its path."""
    # The sign moves at constant speed towards the camera, so its width grows as 1 / distance and its offset from
    # the vanishing point is proportional to its width.
    width_px = 1.0 / ((1.0 - u) / start_px + u / end_px)
    rx1, ry1, rx2, ry2 = spec.roi_xyxy
    aspect = (ry2 - ry1) / (rx2 - rx1)
    vx, vy = display_w / 2, VANISHING_Y * display_h
    if spec.side == "top":
        k = spec.lateral * (vy - end_px * aspect / 2 - EDGE_MARGIN_PX) / end_px
        dx, dy = 0.3 * width_px, -max(k, 0.6) * width_px
    else:
        k = spec.lateral * (display_w / 2 - end_px / 2 - EDGE_MARGIN_PX) / end_px
        dx = max(k, 0.6) * width_px * (1 if spec.side == "right" else -1)
        dy = -0.6 * width_px  # sign faces are mounted above the camera's height
    scale = width_px / (rx2 - rx1)
    crop_h, crop_w = spec.crop.shape[:2]
    new_w, new_h = max(1, round(crop_w * scale)), max(1, round(crop_h * scale))
    sx, sy = new_w / crop_w, new_h / crop_h
    roi = (rx1 * sx, ry1 * sy, rx2 * sx, ry2 * sy)
    px = round(vx + dx - (roi[0] + roi[2]) / 2)
    py = round(vy + dy - (roi[1] + roi[3]) / 2)
    return _Placement(track, (new_w, new_h), (px, py), (px + roi[0], py + roi[1], px + roi[2], py + roi[3]))


def _covered_fraction(roi_xyxy: XYXY, above: Sequence[_Placement]) -> float:
    """Share of a ROI's area under the crops pasted after it (overlaps between those crops counted twice)."""
    x1, y1, x2, y2 = roi_xyxy
    covered = 0.0
    for q in above:
        qx1, qy1 = q.paste_xy
        qx2, qy2 = qx1 + q.crop_wh[0], qy1 + q.crop_wh[1]
        covered += max(0.0, min(x2, qx2) - max(x1, qx1)) * max(0.0, min(y2, qy2) - max(y1, qy1))
    return min(1.0, covered / ((x2 - x1) * (y2 - y1)))


_TRANSPOSE_CW = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}


def _audio_frame(stream: AudioStream, first_sample: int, n: int) -> av.AudioFrame:
    """n samples of a quiet 440 Hz tone with a little noise, in the stream's sample format, mono."""
    t = (first_sample + np.arange(n)) / _AUDIO_RATE_HZ
    wave = 0.1 * np.sin(2 * np.pi * 440.0 * t) + 0.01 * np.sin(2 * np.pi * 3100.0 * t)
    fmt = stream.format.name
    if fmt == "fltp":
        frame = av.AudioFrame.from_ndarray(wave.astype(np.float32)[None, :], format="fltp", layout="mono")
    else:  # mp2 takes packed 16-bit
        frame = av.AudioFrame.from_ndarray((wave * 32767).astype(np.int16)[None, :], format="s16", layout="mono")
    frame.sample_rate = _AUDIO_RATE_HZ
    return frame


def make_road_video(
    path: Path,
    *,
    width: int = 640,
    height: int = 360,
    n_frames: int = 60,
    signs: Sequence[SignSpec],
    background: Rgb | None = None,
    fps: float = 25.0,
    codec: CodecName = "h264",
    variable_frame_rate: bool = False,
    start_pts_s: float = 0.0,
    rotation_deg: int = 0,
    audio: bool = False,
    gop: int = 12,
    seed: int = 0,
    min_visible_px: float = 6.0,
    faststart: bool = False,
) -> SyntheticVideo:
    """Write a dashcam-like clip of a car approaching ``signs``, and return it with its exact ground truth.

    Args:
        path: Output file; the suffix picks the container (``CONTAINERS``: .mp4 .mov .mkv .avi).
        width: Encoded frame width in pixels, even.
        height: Encoded frame height in pixels, even.
        n_frames: Number of frames.
        signs: The signs; track i is ``signs[i]``. Their ``end_frame`` must be <= ``n_frames``.
        background: (H, W, 3) uint8 RGB scene of any size (centre-cropped to the frame's aspect), its vanishing
            point near ``(W / 2, VANISHING_Y * H)``; ``None`` draws ``procedural_background``.
        fps: Nominal frame rate.
        codec: One of ``CODECS``.
        variable_frame_rate: Frame durations alternate 1.25 / fps and 0.625 / fps (1/20 s and 1/40 s at 25 fps),
            on a 1/90000 s clock (MP4/MOV; 1/60000 s for MPEG-4 part 2) or 1 ms (Matroska). Not for AVI.
        start_pts_s: Presentation time of the first frame (and of the audio). Must be 0 for AVI, which stores no
            times: FFmpeg rebuilds them from the frame order, and reads H.264 in AVI as starting one frame late
            (pts = dts + 1); ``start_s`` reports what it reads.
        rotation_deg: Display rotation, counter-clockwise degrees (0, 90, 180, 270; -90 = 270), written as the
            stream's display matrix (not for AVI). The picture is drawn upright for the viewer and encoded turned
            the other way, so a reader must rotate each decoded frame by ``VideoFrame.rotation`` to see it upright,
            as with a phone video.
        audio: Also write a mono audio stream (AAC; MP2 in AVI) as long as the video.
        gop: Keyframe interval in frames.
        seed: Seeds the procedural background.
        min_visible_px: Frames where a sign's ROI is narrower than this get no ground truth; so do frames where it
            is partly outside the frame, or more than ``MAX_HIDDEN_FRACTION`` of it is covered by a nearer sign.
        faststart: MP4/MOV only: put the index (moov) before the media data.

    Returns:
        The clip: frame times as read back, and ground truth in encoded-frame pixels.

    Raises:
        ValueError: An argument is out of range, or the container cannot store what was asked (AVI with a variable
            frame rate, a start time or a rotation; a codec the muxer does not take).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CONTAINERS:
        raise ValueError(f"path: expected a suffix in {sorted(CONTAINERS)}, got {path.suffix!r}")
    if codec not in CODECS:
        raise ValueError(f"codec: expected one of {sorted(CODECS)}, got {codec!r}")
    if width < 2 or height < 2 or width % 2 or height % 2:
        raise ValueError(f"size: expected even width and height >= 2 (yuv420p), got {width}x{height}")
    if n_frames < 1 or gop < 1 or not fps > 0:
        raise ValueError(f"expected n_frames >= 1, gop >= 1, fps > 0, got {n_frames}, {gop}, {fps}")
    rotation = rotation_deg % 360
    if rotation not in (0, 90, 180, 270):
        raise ValueError(f"rotation_deg: expected a multiple of 90, got {rotation_deg}")
    if start_pts_s < 0:
        raise ValueError(f"start_pts_s: expected >= 0, got {start_pts_s}")
    for i, spec in enumerate(signs):
        if spec.end_frame > n_frames:
            raise ValueError(f"signs[{i}].end_frame: expected <= n_frames={n_frames}, got {spec.end_frame}")
    if background is not None and (background.ndim != 3 or background.shape[2] != 3 or background.dtype != np.uint8):
        raise ValueError(f"background: expected (H, W, 3) uint8, got {background.shape} {background.dtype}")
    if suffix == ".avi" and (variable_frame_rate or start_pts_s or rotation):
        raise ValueError(
            "avi stores no timestamps nor display matrix: use variable_frame_rate=False, "
            f"start_pts_s=0, rotation_deg=0, got {variable_frame_rate}, {start_pts_s}, {rotation_deg}"
        )

    if (suffix, codec) in _UNSUPPORTED:
        raise ValueError(f"codec: the {CONTAINERS[suffix]} muxer does not take {codec!r}")
    encoder, options = CODECS[codec]
    if encoder not in av.codecs_available:
        raise ValueError(f"codec: {codec!r} needs the {encoder} encoder, which this PyAV build lacks")
    rate = Fraction(fps).limit_denominator(1001)
    if suffix == ".avi":
        clock = 1 / rate  # AVI has no timestamps: one tick per frame
    elif suffix == ".mkv":
        clock = Fraction(1, 1000)  # Matroska stores milliseconds
    elif codec == "mpeg4":
        clock = Fraction(1, 60000)  # MPEG-4 part 2 takes time base denominators up to 65535 only
    else:
        clock = Fraction(1, 90000)
    ticks = _frame_ticks(n_frames, rate, clock, start_pts_s, variable_frame_rate)
    start_s = float(ticks[0] * clock)
    times_s = tuple(float((t - ticks[0]) * clock) for t in ticks)
    duration_s = float((ticks[-1] - ticks[0]) * clock) or 1.0

    display_w, display_h = (height, width) if rotation in (90, 270) else (width, height)
    bg = _fit_background(
        background if background is not None else procedural_background(display_w, display_h, seed),
        display_w,
        display_h,
    )
    vx, vy = display_w / 2, VANISHING_Y * display_h
    crops = [Image.fromarray(spec.crop) for spec in signs]
    default_start_px, default_end_px = _default_px(display_w, display_h)

    boxes: list[GtBox] = []
    container_options = {"movflags": "+faststart"} if faststart and suffix in (".mp4", ".mov") else {}
    with av.open(str(path), "w", format=CONTAINERS[suffix], options=container_options) as out:
        stream = cast(VideoStream, out.add_stream(encoder, rate=rate, options=dict(options)))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = clock
        stream.time_base = clock
        stream.gop_size = gop
        if codec == "mpeg4":
            stream.bit_rate = int(_MPEG4_BITS_PER_PIXEL * width * height * float(rate))
        if suffix == ".avi":
            stream.max_b_frames = 0  # AVI keeps no presentation times, so frames must not be reordered
        if rotation:
            stream.set_display_rotation(rotation)
        audio_stream: AudioStream | None = None
        if audio:
            audio_stream = out.add_stream("mp2" if suffix == ".avi" else "aac", rate=_AUDIO_RATE_HZ)
            audio_stream.layout = "mono"
            audio_stream.time_base = Fraction(1, _AUDIO_RATE_HZ)
        audio_start = round(start_s * _AUDIO_RATE_HZ)
        audio_done = 0

        for i in range(n_frames):
            t = times_s[i]
            zoom = 1.0 / (1.0 - ZOOM * t / duration_s)
            box = (vx - vx / zoom, vy - vy / zoom, vx + (display_w - vx) / zoom, vy + (display_h - vy) / zoom)
            img = bg.resize((display_w, display_h), Image.Resampling.BILINEAR, box=box)
            placements = []
            for track, spec in enumerate(signs):
                if not spec.start_frame <= i < spec.end_frame:
                    continue
                t0, t1 = times_s[spec.start_frame], times_s[spec.end_frame - 1]
                u = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
                placements.append(
                    _place(
                        track,
                        spec,
                        u,
                        display_w,
                        display_h,
                        spec.start_px or default_start_px,
                        spec.end_px or default_end_px,
                    )
                )
            # Far (small) signs first, so nearer ones cover them.
            placements.sort(key=lambda p: p.roi_xyxy[2] - p.roi_xyxy[0])
            for j, p in enumerate(placements):
                img.paste(crops[p.track].resize(p.crop_wh, Image.Resampling.BILINEAR), p.paste_xy)
                x1, y1, x2, y2 = p.roi_xyxy
                inside = x1 >= 0 and y1 >= 0 and x2 <= display_w and y2 <= display_h
                hidden = _covered_fraction(p.roi_xyxy, placements[j + 1 :])
                if x2 - x1 >= min_visible_px and inside and hidden <= MAX_HIDDEN_FRACTION:
                    xyxy = _rotate_xyxy_ccw(p.roi_xyxy, display_w, display_h, (4 - rotation // 90) % 4)
                    boxes.append(GtBox(i, start_s + t, p.track, signs[p.track].class_id, xyxy))
            if rotation:
                img = img.transpose(_TRANSPOSE_CW[rotation])
            frame = av.VideoFrame.from_image(img)
            frame.pts = ticks[i]
            frame.time_base = clock
            out.mux(stream.encode(frame))
            if audio_stream is not None:
                # Keep the audio level with the video so the muxer interleaves without buffering the whole clip.
                frame_size = 1152 if audio_stream.codec_context.name == "mp2" else 1024
                video_end_s = t + (times_s[i + 1] - t if i + 1 < n_frames else 1 / float(rate))
                while audio_done < video_end_s * _AUDIO_RATE_HZ:
                    aframe = _audio_frame(audio_stream, audio_done, frame_size)
                    aframe.pts = audio_start + audio_done
                    aframe.time_base = Fraction(1, _AUDIO_RATE_HZ)
                    out.mux(audio_stream.encode(aframe))
                    audio_done += frame_size
        out.mux(stream.encode(None))
        if audio_stream is not None:
            out.mux(audio_stream.encode(None))

    if suffix == ".avi":
        # AVI stores no presentation times; FFmpeg rebuilds them from the frame order, and for H.264 it starts one
        # frame late (pts = dts + 1). Report what a reader gets.
        read_start_s = _first_pts_s(path)
        boxes = [dataclasses.replace(b, t_s=b.t_s - start_s + read_start_s) for b in boxes]
        start_s = read_start_s
    boxes.sort(key=lambda b: (b.frame, b.track))
    return SyntheticVideo(
        path=path,
        width=width,
        height=height,
        frame_times_s=times_s,
        start_s=start_s,
        boxes=tuple(boxes),
        signs=tuple(signs),
        codec=codec,
        rotation_deg=rotation,
        has_audio=audio,
    )


def _first_pts_s(path: Path) -> float:
    """``pts * time_base`` of the first decoded video frame."""
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            if frame.pts is not None and frame.time_base is not None:
                return float(frame.pts * frame.time_base)
    raise ValueError(f"{path}: expected a decodable video frame with a pts, got none")


def _fit_background(background: Rgb, display_w: int, display_h: int) -> Image.Image:
    """Centre-crop to the display aspect, then resize to the display size (zoomed per frame from there)."""
    h, w = background.shape[:2]
    target = display_w / display_h
    if w / h > target:
        cw, ch = h * target, float(h)
    else:
        cw, ch = float(w), w / target
    x0, y0 = (w - cw) / 2, (h - ch) / 2
    return Image.fromarray(background).resize(
        (display_w, display_h), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch)
    )


# --------------------------------------------------------------------------------------------------------------------
# Bad inputs.


def truncate_file(src: Path, dst: Path, fraction: float) -> Path:
    """Copy the first ``fraction`` of ``src``'s bytes to ``dst``, as a recording cut off by a power loss.

    An MP4 written without ``faststart`` keeps its index at the end, so cutting it makes it unopenable; a
    Matroska or AVI file, or a fast-start MP4, still yields its first frames.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction: expected in [0, 1], got {fraction}")
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def _media_span(data: bytes) -> tuple[int, int]:
    """Byte range of the coded frames: the last MP4 ``mdat`` payload, the AVI ``movi`` list, else the whole file."""
    if data[4:8] == b"ftyp":
        pos, span = 0, None
        while pos + 8 <= len(data):
            size = int.from_bytes(data[pos : pos + 4], "big")
            header = 8
            if size == 1:
                size, header = int.from_bytes(data[pos + 8 : pos + 16], "big"), 16
            elif size == 0:
                size = len(data) - pos
            if data[pos + 4 : pos + 8] == b"mdat":
                span = (pos + header, min(pos + size, len(data)))
            if size < header:
                break
            pos += size
        if span is not None:
            return span
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        at = data.find(b"LIST", 12)
        while at >= 0:
            if data[at + 8 : at + 12] == b"movi":
                size = int.from_bytes(data[at + 4 : at + 8], "little")
                return at + 12, min(at + 8 + size, len(data))
            at = data.find(b"LIST", at + 4)
    return 0, len(data)


def corrupt_tail(src: Path, dst: Path, from_fraction: float, seed: int = 0) -> Path:
    """Copy ``src`` to ``dst`` with the coded frames from ``from_fraction`` on overwritten by random bytes.

    Only the media data is overwritten (MP4 ``mdat``, AVI ``movi``; for Matroska, ``from_fraction`` of the whole
    file on), so the header and the index survive: the file opens, its last frames fail to decode.
    """
    if not 0 <= from_fraction < 1:
        raise ValueError(f"from_fraction: expected in [0, 1), got {from_fraction}")
    data = bytearray(Path(src).read_bytes())
    lo, hi = _media_span(bytes(data))
    start = lo + int((hi - lo) * from_fraction)
    data[start:hi] = np.random.default_rng(seed).integers(0, 256, hi - start, dtype=np.uint8).tobytes()
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def make_audio_only(path: Path, duration_s: float = 1.0) -> Path:
    """Write a file with one AAC audio stream (MP2 for .avi, .mp2) and no video, e.g. ``voice.m4a``."""
    path = Path(path)
    with av.open(str(path), "w") as out:
        codec = "mp2" if path.suffix.lower() in (".avi", ".mp2") else "aac"
        stream = cast(AudioStream, out.add_stream(codec, rate=_AUDIO_RATE_HZ))
        stream.layout = "mono"
        frame_size = 1152 if codec == "mp2" else 1024
        done = 0
        while done < duration_s * _AUDIO_RATE_HZ:
            frame = _audio_frame(stream, done, frame_size)
            frame.pts = done
            frame.time_base = Fraction(1, _AUDIO_RATE_HZ)
            out.mux(stream.encode(frame))
            done += frame_size
        out.mux(stream.encode(None))
    return path


def make_tiny_video(
    path: Path, width: int = 16, height: int = 16, n_frames: int = 5, codec: CodecName = "h264"
) -> SyntheticVideo:
    """A valid clip far smaller than any model input (no signs), for size edge cases."""
    return make_road_video(path, width=width, height=height, n_frames=n_frames, signs=(), codec=codec)
