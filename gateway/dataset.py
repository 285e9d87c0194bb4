"""Training data from reviewed label files: sign crops for the classifier, boxed frames for the detector.

``build_dataset`` reads reviewed label files (what ``GET /recordings/{id}/labels`` returns, or files written by
``roadlabel label`` and then reviewed), decodes each recording once, and writes one folder::

    DIR/
      dataset.json               schema version, settings, inputs (label file sha256, recording, models), counts
      manifest.jsonl             one JSON object per item (below), so that splits can be made by recording
      classification/000NN/GT-000NN.csv + TTTTT_FFFFF.png
                                 GTSRB layout (services.classifier.train.data.scan_gtsrb reads it unchanged);
                                 TTTTT numbers the reviewed tracks across the whole data set, FFFFF is the frame
      classification/background/<recording>_TTTTT-FFFFF.png
                                 crops of rejected tracks (not a sign): the classifier trainer's ``--background``
                                 folder of crops, which groups them by the name before the last ``_``: by recording
      detection/gt.txt           GTSDB lines ``NAME.jpg;x1;y1;x2;y2;ClassId`` (inclusive corners, 2 decimals)
      detection/images/NAME.jpg  the frames; ``gt.txt`` is copied here as well, because
                                 services.detector.train.data.read_gtsdb wants it beside the images
      detection/labels/NAME.txt  YOLO ``class cx cy w h`` (normalised) per image, empty for a negative image
      detection/classes.txt      the 43 GTSRB class names, line i = class i
      detection/coco.json        COCO detection (categories: the 43 classes with their GTSRB ids)

Which tracks: accepted and relabelled tracks with a GTSRB class after review become sign items; rejected tracks
become hard negatives (background crops, and frames in which they are the only thing boxed-or-rejected keep no
box); pending tracks are skipped unless ``include_pending``; tracks whose class after review is ``unknown`` are
skipped. Every skip is counted in the summary.

Crops: up to ``crops_per_track`` of each track's detector boxes (interpolated boxes are never cropped), at least
``min_crop_px`` on their shorter side, chosen by farthest-point selection over (time in the track, log box size):
spread over the track's life and sizes, not the best-scoring ones. A crop is the box grown by ``crop_margin`` on
every side, as the pipeline cuts it (``gateway.two_stage.crop_boxes``); its CSV ``Roi`` is the box inside it.

Frames: every ``frame_step``-th frame of each used track's span. A frame gets a box for every sign track present
in it: the detector's box, or one interpolated linearly between two of the track's boxes (as the MOT export does:
``gateway.exports``, gaps longer than ``max_gap_frames`` are not bridged). A frame in which a skipped track
(pending or unknown) is present is left out: its sign would be an unlabelled positive.

Manifest rows (``manifest.jsonl``, in recording order, then crops by track and frame, then frames):
    ``kind`` (``crop`` | ``background_crop`` | ``frame``), ``path`` (relative to DIR), ``recording_id``,
    ``recording_sha256``, ``track_id`` (the label file's id; null for frames), ``dataset_track`` (TTTTT; null for
    frames), ``frame``, ``t_s``, ``class_id`` (0..42; null for background crops and frames), ``class_name``,
    ``review_status`` (the track's; null for frames), and for crops ``xyxy`` (the box in frame pixels) and
    ``crop_xyxy`` (the window cut); for frames ``box_indices`` (0-based lines of ``gt.txt``; the COCO annotation
    id is index + 1), ``box_track_ids``, ``box_interpolated`` and ``rejected_track_ids`` (rejected tracks in view).

Same inputs give byte-identical files, except ``created_at`` in ``dataset.json``. The folder is built beside DIR
under a temporary name and renamed into place at the end: a failed build leaves nothing behind.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from gateway.exports import DEFAULT_MAX_GAP_FRAMES, _dense_rows, _segments, _track_class
from gateway.pipeline import Progress, file_sha256
from gateway.two_stage import crop_boxes
from services.common.classes import GTSRB_CLASS_NAMES, NUM_SIGN_CLASSES
from services.common.errors import InputError, UnreadableVideo
from services.common.labelfile import LabelFile, Track, load_label_file
from services.decode.reader import DecodeSettings, VideoReader

__all__ = [
    "DATASET_SCHEMA_VERSION",
    "LABELS_GLOB",
    "DatasetSettings",
    "DatasetSummary",
    "build_dataset",
    "find_label_files",
    "select_diverse",
]

log = logging.getLogger(__name__)

DATASET_SCHEMA_VERSION = 1
"""Version of ``dataset.json`` and ``manifest.jsonl``; changes whenever a reader of the old layout would misread."""

LABELS_GLOB = "*.labels.json"
"""Label files a folder given to ``find_label_files`` is searched for (recursively)."""

_VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".ts", ".mts"})
_GTSRB_HEADER = ("Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")
_KIND_ORDER = {"crop": 0, "background_crop": 1, "frame": 2}

ProgressFn = Callable[[Progress], None]
TrackRole = Literal["sign", "negative", "pending", "unknown"]


class DatasetSettings(BaseModel):
    """How reviewed label files become a data set (recorded in ``dataset.json``).

    Attributes:
        crops_per_track: Crops kept per track (sign and rejected tracks alike), chosen for diversity.
        min_crop_px: Boxes whose shorter side is below this many pixels are never cropped.
        crop_margin: Each box is grown by this fraction of its size on every side before it is cut, as the
            pipeline does before classifying (GTSRB crops show such a margin).
        frame_step: Every ``frame_step``-th frame of each track's span goes into the detection set.
        max_gap_frames: Frames without a box that interpolation bridges inside a track (as the exports do).
        include_pending: Use pending (unreviewed) tracks with the machine's class, as if accepted.
        jpeg_quality: Quality of the detection frames (JPEG).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    crops_per_track: int = Field(6, ge=1, le=1000)
    min_crop_px: float = Field(16.0, ge=1)
    crop_margin: float = Field(0.15, ge=0, le=2)
    frame_step: int = Field(5, ge=1)
    max_gap_frames: int = Field(DEFAULT_MAX_GAP_FRAMES, ge=0)
    include_pending: bool = False
    jpeg_quality: int = Field(95, ge=1, le=100)


@dataclass(slots=True)
class DatasetSummary:
    """What a build wrote and what it left out.

    Attributes:
        out_dir: The data set folder.
        recordings: Recordings (label files) read.
        sign_tracks: Accepted or relabelled tracks (pending too with ``include_pending``) that gave sign items.
        rejected_tracks: Rejected tracks, used as hard negatives.
        skipped_pending: Pending tracks left out.
        skipped_unknown: Tracks whose class after review is ``unknown``, left out.
        tracks_without_crops: Used tracks none of whose boxes reaches ``min_crop_px``.
        crops_per_class: Sign crops written, by GTSRB class id.
        background_crops: Crops of rejected tracks written.
        frames: Detection frames with at least one box.
        negative_frames: Detection frames without a box (only rejected tracks in view).
        boxes: Boxes in the detection set.
        interpolated_boxes: Of those, boxes interpolated between two detector boxes.
        frames_skipped: Sampled frames left out because a skipped (pending or unknown) track was in view.
    """

    out_dir: Path
    recordings: int = 0
    sign_tracks: int = 0
    rejected_tracks: int = 0
    skipped_pending: int = 0
    skipped_unknown: int = 0
    tracks_without_crops: int = 0
    crops_per_class: dict[int, int] = field(default_factory=dict)
    background_crops: int = 0
    frames: int = 0
    negative_frames: int = 0
    boxes: int = 0
    interpolated_boxes: int = 0
    frames_skipped: int = 0

    @property
    def crops(self) -> int:
        """Sign crops written, all classes."""
        return sum(self.crops_per_class.values())

    def counts(self) -> dict[str, Any]:
        """The counts as JSON-ready values (class ids as string keys, in id order)."""
        return {
            "recordings": self.recordings,
            "sign_tracks": self.sign_tracks,
            "rejected_tracks": self.rejected_tracks,
            "skipped_pending": self.skipped_pending,
            "skipped_unknown": self.skipped_unknown,
            "tracks_without_crops": self.tracks_without_crops,
            "crops": self.crops,
            "crops_per_class": {str(k): self.crops_per_class[k] for k in sorted(self.crops_per_class)},
            "background_crops": self.background_crops,
            "frames": self.frames,
            "negative_frames": self.negative_frames,
            "boxes": self.boxes,
            "interpolated_boxes": self.interpolated_boxes,
            "frames_skipped": self.frames_skipped,
        }


# --------------------------------------------------------------------------------------------------------------------
# Inputs


def find_label_files(paths: Iterable[Path]) -> list[Path]:
    """The label files named: each path is a file, or a folder searched recursively for ``*.labels.json``.

    Returns:
        The files in argument order (each folder's files sorted), without repeats.

    Raises:
        InputError: A path does not exist, or a folder holds no label file.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob(LABELS_GLOB) if p.is_file())
            if not found:
                raise InputError(f"--from {path}: expected label files ({LABELS_GLOB}) in the folder, found none")
        elif path.is_file():
            found = [path]
        else:
            raise InputError(f"--from {path}: expected a label file or a folder of them, got no such file")
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                out.append(p)
    if not out:
        raise InputError("--from: expected at least one label file, got none")
    return out


@dataclass(frozen=True, slots=True)
class _Input:
    path: Path
    sha256: str
    labels: LabelFile


def _load_inputs(paths: Sequence[Path], settings: DatasetSettings) -> list[_Input]:
    inputs: list[_Input] = []
    by_recording: dict[str, Path] = {}
    for path in paths:
        labels = load_label_file(path)
        tracks = labels.tracks
        decided = sum(t.review.status != "pending" for t in tracks)
        if not decided and not settings.include_pending:
            raise InputError(
                f"label file {path}: expected a reviewed label file (tracks accepted, relabelled or rejected), got "
                f"{len(tracks)} track(s), none reviewed; review it first, or pass --include-pending to use the "
                "machine's classes"
            )
        sha = labels.recording.sha256
        if sha in by_recording:
            raise InputError(
                f"label file {path}: expected one label file per recording, got a second one for recording "
                f"{labels.recording.id!r} (sha256 {sha}); the first is {by_recording[sha]}"
            )
        by_recording[sha] = path
        inputs.append(_Input(path, hashlib.sha256(path.read_bytes()).hexdigest(), labels))
    # Sorted by recording, not by argument order: the same files given in another order build the same data set.
    return sorted(inputs, key=lambda i: (i.labels.recording.id, i.labels.recording.sha256))


class _VideoFinder:
    """Finds each recording's video by name and checks it by sha256; hashes every file at most once."""

    def __init__(self, roots: Sequence[Path], on_progress: ProgressFn | None) -> None:
        for root in roots:
            if not root.is_dir():
                raise InputError(f"--video-root {root}: expected a folder, got no such folder")
        self._roots = list(roots)
        self._on_progress = on_progress
        self._hashes: dict[Path, str] = {}
        self._all_videos: list[Path] | None = None

    def _sha(self, path: Path, recording_id: str) -> str:
        key = path.resolve()
        if key not in self._hashes:
            self._hashes[key] = file_sha256(path, self._on_progress, recording_id)
        return self._hashes[key]

    def _videos_under_roots(self) -> list[Path]:
        if self._all_videos is None:
            self._all_videos = sorted(
                p for root in self._roots for p in root.rglob("*") if p.suffix.lower() in _VIDEO_SUFFIXES
            )
        return self._all_videos

    def find(self, item: _Input) -> Path:
        """The video of ``item``: beside its label file, then under the roots by name, then by content.

        Raises:
            InputError: No file with the recording's sha256 was found; the message names the label file, the
                expected sha256 and every candidate that did not match.
        """
        rec = item.labels.recording
        source = Path(rec.source).name  # the schema stores a name; never trust it to be one
        names = [source] if source not in ("", ".", "..") else []
        if item.path.name.endswith(LABELS_GLOB[1:]):
            names.append(
                item.path.name[: -len(LABELS_GLOB[1:])]
            )  # `roadlabel label` names its output VIDEO.labels.json
        candidates = [item.path.parent / n for n in names]
        for root in self._roots:
            candidates += [root / n for n in names]
            candidates += sorted(p for n in names for p in root.rglob(glob.escape(n)) if p.parent != root)
        mismatched: list[str] = []
        checked: set[Path] = set()
        for path in candidates:
            key = path.resolve()
            if key in checked or not path.is_file():
                continue
            checked.add(key)
            if self._sha(path, rec.id) == rec.sha256:
                return path
            mismatched.append(str(path))
        for path in self._videos_under_roots():
            key = path.resolve()
            if key in checked or not path.is_file():
                continue
            checked.add(key)
            if self._sha(path, rec.id) == rec.sha256:
                return path
        where = ", ".join(str(r) for r in self._roots) or "none given (pass --video-root)"
        wrong = f"; files of that name with other contents: {', '.join(mismatched)}" if mismatched else ""
        raise InputError(
            f"label file {item.path}: expected the video {rec.source!r} with sha256 {rec.sha256} beside it or under "
            f"the video roots ({where}), found none{wrong}"
        )


# --------------------------------------------------------------------------------------------------------------------
# Planning: which crops and frames, before any pixel is decoded


def select_diverse(frames: np.ndarray, sizes_px: np.ndarray, k: int) -> np.ndarray:
    """Pick ``k`` boxes spread over a track's life and sizes: farthest-point selection over (time, log size).

    Both features are scaled to [0, 1] over the candidates. The first pick is the largest box (the clearest view);
    each next pick is the box farthest from all picked so far (ties: the earliest).

    Args:
        frames: (N,) frame indices of the candidate boxes.
        sizes_px: (N,) box sizes in pixels (> 0), e.g. the geometric mean of width and height.
        k: Boxes wanted, >= 1.

    Returns:
        (min(k, N),) int64 indices into the candidates, ascending.
    """
    n = len(frames)
    if n <= k:
        return np.arange(n, dtype=np.int64)
    feats = np.stack([np.asarray(frames, np.float64), np.log(np.asarray(sizes_px, np.float64))], axis=1)
    span = feats.max(axis=0) - feats.min(axis=0)
    feats = (feats - feats.min(axis=0)) / np.where(span > 0, span, 1.0)
    chosen = [int(np.argmax(sizes_px))]
    dist = np.linalg.norm(feats - feats[chosen[0]], axis=1)
    dist[chosen[0]] = -1.0
    while len(chosen) < k:
        pick = int(np.argmax(dist))
        chosen.append(pick)
        dist = np.minimum(dist, np.linalg.norm(feats - feats[pick], axis=1))
        dist[chosen] = -1.0
    return np.sort(np.asarray(chosen, np.int64))


XYXY = tuple[float, float, float, float]


@dataclass(frozen=True, slots=True)
class _CropPlan:
    track: Track
    dataset_track: int
    frame: int
    xyxy: XYXY
    class_id: int | None  # None: background


@dataclass(frozen=True, slots=True)
class _FrameBox:
    track_id: int
    class_id: int
    xyxy: XYXY
    interpolated: bool


@dataclass(frozen=True, slots=True)
class _FramePlan:
    frame: int
    boxes: tuple[_FrameBox, ...]
    rejected_track_ids: tuple[int, ...]


@dataclass(slots=True)
class _RecordingPlan:
    crops: dict[int, list[_CropPlan]] = field(default_factory=dict)  # frame -> crops cut from it
    frames: dict[int, _FramePlan] = field(default_factory=dict)

    @property
    def needed(self) -> list[int]:
        return sorted({*self.crops, *self.frames})


def _role(track: Track, include_pending: bool) -> TrackRole:
    status = track.review.status
    if status == "rejected":
        return "negative"
    if status == "pending" and not include_pending:
        return "pending"
    cls = _track_class(track)
    if cls is None or not 0 <= cls[0] < NUM_SIGN_CLASSES:
        return "unknown"
    return "sign"


def _dense(track: Track, max_gap_frames: int) -> dict[int, tuple[XYXY, bool]]:
    """frame -> (box, interpolated) for every frame the track is in view (its boxes and the bridged frames)."""
    real = {b.frame for b in track.boxes}
    return {
        row.frame: (row.xyxy, row.frame not in real)
        for segment in _segments(track.boxes, max_gap_frames)
        for row in _dense_rows(segment)
    }


def _clip(xyxy: XYXY, width: int, height: int) -> XYXY | None:
    x1, y1, x2, y2 = xyxy
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    if x2 - x1 < 1 or y2 - y1 < 1:  # nothing left to see (GTSDB's inclusive corners need one pixel)
        return None
    return (x1, y1, x2, y2)


def _plan(labels: LabelFile, settings: DatasetSettings, first_track: int, summary: DatasetSummary) -> _RecordingPlan:
    """Choose the crops and frames of one recording; dataset track numbers start at ``first_track``."""
    rec = labels.recording
    plan = _RecordingPlan()
    # track id -> (role, GTSRB class or None, frame -> (box, interpolated))
    in_view: dict[int, tuple[TrackRole, int | None, dict[int, tuple[XYXY, bool]]]] = {}
    sampled: set[int] = set()
    number = first_track
    for track in labels.tracks:
        role = _role(track, settings.include_pending)
        if role == "pending":
            summary.skipped_pending += 1
        elif role == "unknown":
            summary.skipped_unknown += 1
        cls = _track_class(track)
        class_id = cls[0] if role == "sign" and cls is not None else None
        dense = _dense(track, settings.max_gap_frames)
        in_view[track.track_id] = (role, class_id, dense)
        if role == "sign":
            summary.sign_tracks += 1
        elif role == "negative":
            summary.rejected_tracks += 1
        else:
            continue
        boxes = [
            (b.frame, clipped)
            for b in track.boxes
            if (clipped := _clip(b.xyxy, rec.width, rec.height)) is not None
            and min(clipped[2] - clipped[0], clipped[3] - clipped[1]) >= settings.min_crop_px
        ]
        if boxes:
            frames = np.array([f for f, _ in boxes])
            sizes = np.array([math.sqrt((x2 - x1) * (y2 - y1)) for _, (x1, y1, x2, y2) in boxes])
            for i in select_diverse(frames, sizes, settings.crops_per_track).tolist():
                frame, xyxy = boxes[i]
                plan.crops.setdefault(frame, []).append(_CropPlan(track, number, frame, xyxy, class_id))
        else:
            summary.tracks_without_crops += 1
        sampled.update(f for f in range(track.first_frame, track.last_frame + 1, settings.frame_step) if f in dense)
        number += 1

    for frame in sorted(sampled):
        present = [(tid, role, cid, dense[frame]) for tid, (role, cid, dense) in in_view.items() if frame in dense]
        if any(role in ("pending", "unknown") for _, role, _, _ in present):
            summary.frames_skipped += 1
            continue
        frame_boxes: list[_FrameBox] = []
        rejected: list[int] = []
        for tid, role, cid, (xyxy, interpolated) in present:
            if role == "negative" or cid is None:
                rejected.append(tid)
                continue
            clipped = _clip(xyxy, rec.width, rec.height)
            if clipped is not None:
                frame_boxes.append(_FrameBox(tid, cid, clipped, interpolated))
        if not frame_boxes and not rejected:
            summary.frames_skipped += 1
            continue
        plan.frames[frame] = _FramePlan(frame, tuple(frame_boxes), tuple(rejected))
    return plan


# --------------------------------------------------------------------------------------------------------------------
# Writing


_UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")


def _recording_key(labels: LabelFile) -> str:
    """A file-name-safe key for a recording: its id, sanitised and cut to 32 characters, plus 8 digits of its sha256.

    Recording ids come from uploads and may hold anything (``../``, ``/``, control characters, ``_``): only ASCII
    letters, digits, ``.`` and ``-`` are kept, and no leading dot. No ``_``: the classifier trainer groups background
    crops by the name before the last ``_``.
    """
    safe = _UNSAFE.sub("-", labels.recording.id).strip(".-")[:32].strip(".-") or "recording"
    return f"{safe}-{labels.recording.sha256[:8]}"


def _round(values: Iterable[float], digits: int = 2) -> list[float]:
    return [round(float(v), digits) for v in values]


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(image: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _write(root: Path, relative: str, data: bytes) -> None:
    # Plain writes: the whole folder is renamed into place at the end (build_dataset), which is what makes it atomic.
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@dataclass(slots=True)
class _Outputs:
    """Everything written besides the images, gathered while decoding and written at the end."""

    manifest: list[tuple[tuple[int, int, int, int], dict[str, Any]]] = field(default_factory=list)
    gtsrb_rows: dict[int, list[tuple[str, int, int, int, int, int, int, int]]] = field(default_factory=dict)
    gt_lines: list[str] = field(default_factory=list)
    coco_images: list[dict[str, Any]] = field(default_factory=list)
    coco_annotations: list[dict[str, Any]] = field(default_factory=list)
    yolo: dict[str, str] = field(default_factory=dict)  # relative path -> content


def _decode_needed(
    video: Path, item: _Input, needed: list[int], on_progress: ProgressFn | None
) -> Iterator[tuple[int, float, np.ndarray]]:
    """Yield ``(frame, t_s, image)`` for the ``needed`` frames (ascending), decoding the video once, in order."""
    rec = item.labels.recording
    wanted = set(needed)
    last = needed[-1]
    with VideoReader(video, rec.id, DecodeSettings()) as reader:
        if (reader.info.width, reader.info.height) != (rec.width, rec.height):
            raise InputError(
                f"label file {item.path}: expected {video} to show {rec.width}x{rec.height} frames, got "
                f"{reader.info.width}x{reader.info.height}"
            )
        frames = reader.frames()
        try:
            for frame in frames:
                index = frame.ref.index
                if on_progress is not None:
                    on_progress(Progress(rec.id, "decode", index + 1, last + 1))
                if index in wanted:
                    yield index, frame.ref.pts_s, frame.image
                if index >= last:
                    return
        finally:
            frames.close()
    raise UnreadableVideo(
        f"label file {item.path}: expected {video} to hold frame {last}, got {reader.frames_decoded} decoded frames"
    )


def _write_recording(
    root: Path,
    item: _Input,
    video: Path,
    plan: _RecordingPlan,
    rec_index: int,
    settings: DatasetSettings,
    outputs: _Outputs,
    summary: DatasetSummary,
    on_progress: ProgressFn | None,
) -> None:
    rec = item.labels.recording
    key = _recording_key(item.labels)
    needed = plan.needed
    if not needed:
        return
    common = {"recording_id": rec.id, "recording_sha256": rec.sha256}
    for frame, t_s, image in _decode_needed(video, item, needed, on_progress):
        for crop in plan.crops.get(frame, []):
            window = crop_boxes(np.asarray([crop.xyxy]), settings.crop_margin, (rec.height, rec.width))[0]
            wx1, wy1, wx2, wy2 = (int(v) for v in window)
            pixels = image[wy1:wy2, wx1:wx2]
            if crop.class_id is None:
                relative = f"classification/background/{key}_{crop.dataset_track:05d}-{frame:05d}.png"
                summary.background_crops += 1
                kind, class_name = "background_crop", None
            else:
                name = f"{crop.dataset_track:05d}_{frame:05d}.png"
                relative = f"classification/{crop.class_id:05d}/{name}"
                summary.crops_per_class[crop.class_id] = summary.crops_per_class.get(crop.class_id, 0) + 1
                kind, class_name = "crop", GTSRB_CLASS_NAMES[crop.class_id]
                x1, y1, x2, y2 = crop.xyxy
                cw, ch = wx2 - wx1, wy2 - wy1
                # GTSRB's Roi corners are inclusive pixels, as the detector trainer's copy-paste reads them.
                roi = (
                    min(max(round(x1 - wx1), 0), cw - 1),
                    min(max(round(y1 - wy1), 0), ch - 1),
                    min(max(round(x2 - wx1) - 1, 0), cw - 1),
                    min(max(round(y2 - wy1) - 1, 0), ch - 1),
                )
                outputs.gtsrb_rows.setdefault(crop.class_id, []).append((name, cw, ch, *roi, crop.class_id))
            _write(root, relative, _png(pixels))
            row: dict[str, Any] = {
                "kind": kind,
                "path": relative,
                **common,
                "track_id": crop.track.track_id,
                "dataset_track": crop.dataset_track,
                "frame": frame,
                "t_s": round(t_s, 6),
                "class_id": crop.class_id,
                "class_name": class_name,
                "review_status": crop.track.review.status,
                "xyxy": _round(crop.xyxy),
                "crop_xyxy": [wx1, wy1, wx2, wy2],
            }
            order = (rec_index, _KIND_ORDER[kind], crop.dataset_track, frame)
            outputs.manifest.append((order, row))
        frame_plan = plan.frames.get(frame)
        if frame_plan is None:
            continue
        stem = f"{key}_{frame:06d}"
        image_name = f"{stem}.jpg"
        _write(root, f"detection/images/{image_name}", _jpeg(image, settings.jpeg_quality))
        image_id = len(outputs.coco_images) + 1
        outputs.coco_images.append({"id": image_id, "file_name": image_name, "width": rec.width, "height": rec.height})
        yolo_lines: list[str] = []
        indices: list[int] = []
        for box in frame_plan.boxes:
            x1, y1, x2, y2 = box.xyxy
            index = len(outputs.gt_lines)
            indices.append(index)
            outputs.gt_lines.append(f"{image_name};{x1:.2f};{y1:.2f};{x2 - 1:.2f};{y2 - 1:.2f};{box.class_id}")
            cx, cy = (x1 + x2) / 2 / rec.width, (y1 + y2) / 2 / rec.height
            w, h = (x2 - x1) / rec.width, (y2 - y1) / rec.height
            yolo_lines.append(f"{box.class_id} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
            outputs.coco_annotations.append(
                {
                    "id": index + 1,
                    "image_id": image_id,
                    "category_id": box.class_id,
                    "bbox": _round((x1, y1, x2 - x1, y2 - y1)),
                    "area": round((x2 - x1) * (y2 - y1), 2),
                    "iscrowd": 0,
                }
            )
            summary.boxes += 1
            summary.interpolated_boxes += box.interpolated
        outputs.yolo[f"detection/labels/{stem}.txt"] = "".join(line + "\n" for line in yolo_lines)
        if frame_plan.boxes:
            summary.frames += 1
        else:
            summary.negative_frames += 1
        frame_row: dict[str, Any] = {
            "kind": "frame",
            "path": f"detection/images/{image_name}",
            **common,
            "track_id": None,
            "dataset_track": None,
            "frame": frame,
            "t_s": round(t_s, 6),
            "class_id": None,
            "class_name": None,
            "review_status": None,
            "box_indices": indices,
            "box_track_ids": [b.track_id for b in frame_plan.boxes],
            "box_interpolated": [b.interpolated for b in frame_plan.boxes],
            "rejected_track_ids": list(frame_plan.rejected_track_ids),
        }
        outputs.manifest.append(((rec_index, _KIND_ORDER["frame"], -1, frame), frame_row))


def _csv_bytes(rows: Sequence[Sequence[object]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=";", lineterminator="\n")
    writer.writerow(_GTSRB_HEADER)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _json_bytes(doc: object) -> bytes:
    return (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode()


def _code_version() -> str:
    try:
        return metadata.version("roadlabel")
    except metadata.PackageNotFoundError:
        return "unknown"


def _write_index(
    root: Path, inputs: Sequence[_Input], settings: DatasetSettings, outputs: _Outputs, summary: DatasetSummary
) -> None:
    for class_id, csv_rows in sorted(outputs.gtsrb_rows.items()):
        _write(root, f"classification/{class_id:05d}/GT-{class_id:05d}.csv", _csv_bytes(sorted(csv_rows)))
    gt = "".join(line + "\n" for line in outputs.gt_lines).encode()
    _write(root, "detection/gt.txt", gt)
    if outputs.coco_images:
        _write(root, "detection/images/gt.txt", gt)
    for relative, text in sorted(outputs.yolo.items()):
        _write(root, relative, text.encode())
    _write(root, "detection/classes.txt", "".join(n + "\n" for n in GTSRB_CLASS_NAMES).encode())
    coco = {
        "info": {"description": "roadlabel dataset build: frames of reviewed recordings", "version": "1"},
        "images": outputs.coco_images,
        "annotations": outputs.coco_annotations,
        "categories": [{"id": i, "name": n, "supercategory": "traffic_sign"} for i, n in enumerate(GTSRB_CLASS_NAMES)],
    }
    _write(root, "detection/coco.json", _json_bytes(coco))
    manifest = [row for _, row in sorted(outputs.manifest, key=lambda pair: pair[0])]
    _write(root, "manifest.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in manifest).encode())
    doc = {
        "schema_version": DATASET_SCHEMA_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": _code_version(),
        "settings": settings.model_dump(mode="json"),
        "inputs": [
            {
                "path": str(i.path),
                "sha256": i.sha256,
                "recording_id": i.labels.recording.id,
                "recording_sha256": i.labels.recording.sha256,
                "recording_source": i.labels.recording.source,
                "models": {name: ref.model_dump(mode="json") for name, ref in sorted(i.labels.models.items())},
            }
            for i in inputs
        ],
        "counts": summary.counts(),
        "classes": list(GTSRB_CLASS_NAMES),
    }
    _write(root, "dataset.json", _json_bytes(doc))


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    here = Path.cwd()
    target = Path(os.path.abspath(out_dir))
    if target == here or target in here.parents:
        # The data set is renamed into place as a whole: the folder you are in would be replaced by another one.
        raise InputError(f"-o {out_dir}: expected a folder outside the current one, got {target}; name a new one")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"-o {out_dir}: expected a folder for the data set, got a file")
    if out_dir.is_dir() and not overwrite and any(out_dir.iterdir()):
        raise InputError(f"-o {out_dir}: expected an empty or new folder, got one with files in it (pass --overwrite)")


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    _check_out_dir(out_dir, overwrite)
    old: Path | None = None
    if out_dir.is_dir():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        try:
            os.replace(out_dir, old)  # replaces the empty folder mkdtemp made
        except BaseException:
            old.rmdir()
            raise
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_dataset(
    label_files: Sequence[Path],
    out_dir: Path,
    settings: DatasetSettings | None = None,
    on_progress: ProgressFn | None = None,
    *,
    video_roots: Sequence[Path] = (),
    overwrite: bool = False,
) -> DatasetSummary:
    """Build a training data set from reviewed label files (module docstring: layout and rules).

    Args:
        label_files: Label files, or folders searched recursively for ``*.labels.json``.
        out_dir: The data set folder: new, empty, or (with ``overwrite``) replaced as a whole.
        settings: Crops per track, frame step, ...; defaults when None.
        on_progress: Called with ``Progress`` events: ``hash`` (bytes of a video being checked) and ``decode``
            (frames of the recording decoded, out of those up to its last needed frame), then ``done`` once per
            recording.
        video_roots: Folders searched (recursively) for the videos when they are not beside their label files;
            each video is found by name and checked by sha256, or found by sha256 alone.
        overwrite: Replace an existing, non-empty ``out_dir``.

    Returns:
        The counts of what was written and left out.

    Raises:
        InputError: A label file is missing, not JSON, not a label file, or not reviewed (no decided track, unless
            ``include_pending``); two label files are of one recording; a video is missing or has other contents
            (``UnreadableVideo`` when it does not decode); ``out_dir`` is a file or is not empty.
    """
    settings = settings or DatasetSettings()
    _check_out_dir(out_dir, overwrite)
    target = Path(os.path.abspath(out_dir))  # '..' or 'a/..' have no name to put the temporary folder beside
    inputs = _load_inputs(find_label_files(label_files), settings)
    finder = _VideoFinder(video_roots, on_progress)
    summary = DatasetSummary(out_dir=out_dir, recordings=len(inputs))
    plans: list[_RecordingPlan] = []
    first_track = 0
    for item in inputs:
        before = summary.sign_tracks + summary.rejected_tracks
        plans.append(_plan(item.labels, settings, first_track, summary))
        first_track += summary.sign_tracks + summary.rejected_tracks - before
    # Every video is found and checked before anything is decoded: a missing one fails the build at once.
    videos = [finder.find(item) if plan.needed else None for item, plan in zip(inputs, plans, strict=True)]

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the data set is a normal, shareable folder
        outputs = _Outputs()
        for rec_index, (item, plan, video) in enumerate(zip(inputs, plans, videos, strict=True)):
            if video is not None:
                _write_recording(tmp, item, video, plan, rec_index, settings, outputs, summary, on_progress)
            if on_progress is not None:
                on_progress(Progress(item.labels.recording.id, "done", rec_index + 1, len(inputs)))
        _write_index(tmp, inputs, settings, outputs, summary)
        _move_into_place(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("dataset built", extra={"out_dir": str(out_dir), **summary.counts()})
    return summary
