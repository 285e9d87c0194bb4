"""The label file: one JSON document per recording, the contract between the machine and the reviewer.

The gateway writes it, the reviewer page edits its ``review`` fields, the exports read it, and training reads it
back as data. It lives here, not in the gateway, so that training never has to import the gateway (STYLE.md
section 1). ``schema_version`` changes whenever a reader written for the old version would misread a new file;
the JSON Schema of the current version is committed at ``docs/label-file.schema.json`` (a test keeps it in step).

Conventions:
    * ``frame`` is the 0-based decode index of a frame that was actually decoded: frames lost to corrupt packets
      have no index, they are listed in ``recording.gaps``.
    * ``t_s`` is the frame's presentation time in seconds from the stream's own timestamps (pts * time_base),
      minus ``recording.start_s``: the first decoded frame is at 0.0 whatever the container's start time, and
      times stay right under a variable frame rate.
    * ``xyxy`` is in pixels of the displayed frame (after the container's rotation is applied), far corners
      exclusive, floats.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.common.classes import GTSRB_CLASS_NAMES, UNKNOWN
from services.common.errors import InputError
from services.common.modelcard import atomic_write_bytes

__all__ = [
    "SCHEMA_VERSION",
    "Box",
    "CropRef",
    "Gap",
    "LabelFile",
    "ModelRef",
    "Recording",
    "Review",
    "ReviewAction",
    "RunStats",
    "ScoredClass",
    "Track",
    "UncertaintyReason",
    "apply_review",
    "load_label_file",
    "save_label_file",
]

SCHEMA_VERSION = 1

UncertaintyReason = Literal[
    "low_confidence",  # the track's calibrated confidence is below settings' review threshold
    "crops_disagree",  # the track's crops do not all name the same class
    "rejected",  # the classifier called the crops no sign, or was unsure of every one of them
    "short",  # fewer detected frames than settings' min_track_frames
    "small",  # the largest box is below settings' min_confident_px: the classifier saw only a few pixels
]


class _Strict(BaseModel):
    # NaN and infinity would be written as null and then refused on reading: refuse them when built.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Gap(_Strict):
    """Frames lost between two decoded frames (corrupt or undecodable packets).

    Attributes:
        after_frame: Decode index of the last good frame before the gap; -1 when the gap is before the first one.
        from_s: Time of the last good frame before the gap (``t_s`` convention), or 0.0.
        to_s: Time of the first good frame after it, or the stream's end when nothing decoded after it.
        missing_frames: Frames the gap is estimated to hold, from its length and the stream's frame rate.
        packets: Packets that failed to decode in it.
        reason: The decoder's message for the first failure.
    """

    after_frame: int = Field(ge=-1)
    from_s: float
    to_s: float
    missing_frames: int = Field(ge=0)
    packets: int = Field(ge=0)
    reason: str


class Recording(_Strict):
    """The video the labels belong to.

    Attributes:
        id: The recording's id (a content hash prefix unless the caller named it).
        source: The file name it was read from (the name only, never a server path).
        sha256: Of the file's bytes.
        width: Displayed frame width in pixels (after rotation).
        height: Displayed frame height in pixels.
        fps: The stream's average frame rate, for tools that need one; times never come from it.
        frame_count: Frames actually decoded.
        duration_s: From the first decoded frame's time to the last one's, plus one frame.
        start_s: The first decoded frame's presentation time in the stream (subtracted from every ``t_s``).
        rotation_deg: Display rotation the container asked for, applied to every frame (0, 90, 180 or 270).
        codec: The video codec's name (``h264``, ``hevc``, ...).
        variable_frame_rate: Whether frame durations differ by more than 1 % across the stream.
        gaps: Frames lost to corrupt packets, in time order.
    """

    id: str = Field(min_length=1, max_length=128)
    source: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    fps: float = Field(ge=0)
    frame_count: int = Field(ge=0)
    duration_s: float = Field(ge=0)
    start_s: float = 0.0
    rotation_deg: int = 0
    codec: str = ""
    variable_frame_rate: bool = False
    gaps: tuple[Gap, ...] = ()


class ModelRef(_Strict):
    """Which model produced the labels."""

    name: str
    version: str
    sha256: str


class ScoredClass(_Strict):
    """One candidate class of a track with its calibrated probability."""

    class_id: int = Field(ge=-1)
    class_name: str
    p: float = Field(ge=0, le=1)


class Box(_Strict):
    """One detector box of a track.

    Attributes:
        frame: 0-based decode index.
        t_s: Presentation time in seconds (module docstring).
        xyxy: Pixels of the displayed frame.
        score: Detector confidence.
    """

    frame: int = Field(ge=0)
    t_s: float
    xyxy: tuple[float, float, float, float]
    score: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _ordered_corners(self) -> Box:
        x1, y1, x2, y2 = self.xyxy
        if x2 < x1 or y2 < y1:
            raise ValueError(f"xyxy: expected x1 <= x2 and y1 <= y2, got {self.xyxy}")
        return self


class CropRef(_Strict):
    """One of the crops the classifier named the track from: where to cut it again from the video.

    Attributes:
        frame: 0-based decode index.
        t_s: Presentation time in seconds.
        xyxy: The detector box (the crop is this box grown by ``settings.crop_margin``).
        class_id: The class this crop alone names (-1: rejected).
        p: That class's calibrated probability for this crop.
        quality: The score it was kept for (size, sharpness and detector score combined; larger is better).
    """

    frame: int = Field(ge=0)
    t_s: float
    xyxy: tuple[float, float, float, float]
    class_id: int = Field(ge=-1)
    p: float = Field(ge=0, le=1)
    quality: float


class Review(_Strict):
    """What a person decided about a track. ``pending`` until then.

    Attributes:
        status: ``pending``; ``accepted`` (the machine's class is right); ``relabelled`` (``class_id`` /
            ``class_name`` hold the reviewer's class); ``rejected`` (not a sign).
        class_id: The reviewer's class when ``relabelled``.
        class_name: Its name.
        by: Who decided (an API key's name).
        at: When, ISO 8601 UTC.
    """

    status: Literal["pending", "accepted", "relabelled", "rejected"] = "pending"
    class_id: int | None = None
    class_name: str | None = None
    by: str | None = None
    at: str | None = None

    @model_validator(mode="after")
    def _relabel_names_a_class(self) -> Review:
        if self.status == "relabelled" and (self.class_id is None or self.class_name is None):
            raise ValueError("review: a relabelled track needs class_id and class_name")
        return self


class Track(_Strict):
    """One physical sign across frames, named once from its best crops.

    Attributes:
        track_id: Unique within the file, from 1.
        class_id: The classifier's class for the track (-1: no sign class was confident enough, ``unknown``).
        class_name: Its name.
        confidence: Calibrated probability of ``class_id`` from the track's crops together (0 when -1).
        first_frame: Decode index of the first box.
        last_frame: Decode index of the last box.
        start_s: Time of the first box.
        end_s: Time of the last box.
        review: The reviewer's decision.
        top_classes: The most likely classes, most likely first (the reviewer's relabel suggestions).
        crop_agreement: Fraction of the track's crops whose own top class is ``class_id``.
        uncertain: Whether a reviewer should look at this track (``uncertainty`` says why).
        uncertainty: Why; empty when not uncertain.
        best_crops: The crops the class was decided from, best first.
        boxes: Every detector box of the track, in frame order. Frames between two boxes that the detector did not
            run on, or where it missed the sign, have no box; exports interpolate them.
    """

    track_id: int = Field(ge=1)
    class_id: int = Field(ge=-1)
    class_name: str
    confidence: float = Field(ge=0, le=1)
    first_frame: int = Field(ge=0)
    last_frame: int = Field(ge=0)
    start_s: float
    end_s: float
    review: Review = Review()
    top_classes: tuple[ScoredClass, ...] = ()
    crop_agreement: float = Field(1.0, ge=0, le=1)
    uncertain: bool = False
    uncertainty: tuple[UncertaintyReason, ...] = ()
    best_crops: tuple[CropRef, ...] = ()
    boxes: tuple[Box, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _boxes_in_order(self) -> Track:
        frames = [b.frame for b in self.boxes]
        if any(b <= a for a, b in zip(frames, frames[1:], strict=False)):
            raise ValueError(f"track {self.track_id}: boxes must have strictly increasing frames")
        times = [b.t_s for b in self.boxes]
        if any(b < a for a, b in zip(times, times[1:], strict=False)):
            raise ValueError(f"track {self.track_id}: box times must not decrease")
        if frames[0] != self.first_frame or frames[-1] != self.last_frame:
            raise ValueError(
                f"track {self.track_id}: first_frame/last_frame {self.first_frame}/{self.last_frame} do not match "
                f"its boxes ({frames[0]}..{frames[-1]})"
            )
        return self


class RunStats(_Strict):
    """How the labelling went.

    Attributes:
        frames_decoded: Frames decoded.
        frames_detected: Frames the detector ran on.
        detections: Boxes the detector returned in all.
        tracks_dropped: Tracks dropped by the settings (too short, rejected).
        elapsed_s: Wall time of the whole run.
        stage_s: Busy time per stage (decode, detect, track, classify, write).
    """

    frames_decoded: int = Field(ge=0)
    frames_detected: int = Field(ge=0)
    detections: int = Field(ge=0)
    tracks_dropped: int = Field(ge=0)
    elapsed_s: float = Field(ge=0)
    stage_s: dict[str, float] = Field(default_factory=dict)


class LabelFile(_Strict):
    """One recording's labels (module docstring).

    Attributes:
        schema_version: Always ``SCHEMA_VERSION`` for files this code writes.
        recording: The video.
        models: ``detector`` and ``classifier`` (and any later stage), by name, version and sha256.
        settings: The resolved pipeline settings the file was made with.
        code_version: The roadlabel version that wrote it.
        created_at: ISO 8601 UTC.
        stats: Counts and timings of the run.
        tracks: In order of first appearance.
    """

    schema_version: Literal[1] = 1
    recording: Recording
    models: dict[str, ModelRef]
    settings: dict[str, Any]
    code_version: str
    created_at: str
    stats: RunStats
    tracks: tuple[Track, ...] = ()

    @model_validator(mode="after")
    def _unique_track_ids(self) -> LabelFile:
        ids = [t.track_id for t in self.tracks]
        if len(set(ids)) != len(ids):
            raise ValueError("tracks: track_id values must be unique")
        count = self.recording.frame_count
        for track in self.tracks:
            if track.last_frame >= count:
                raise ValueError(
                    f"track {track.track_id}: expected frames below recording.frame_count ({count}), "
                    f"got {track.last_frame}"
                )
        return self


class ReviewAction(_Strict):
    """One reviewer decision, as stored and replayed onto the machine's label file (``apply_review``).

    Attributes:
        action: ``accept`` / ``reject`` (not a sign) / ``relabel`` (``class_id``) one track; ``merge``
            ``other_track_id`` into ``track_id`` (the same sign); ``split`` ``track_id`` at ``frame`` (the part from
            ``frame`` on becomes a new pending track); ``accept_above`` every pending track whose confidence is at
            least ``threshold``.
        track_id: The track acted on.
        other_track_id: ``merge``: the track that disappears into ``track_id``.
        class_id: ``relabel``: 0..42, or -1 for ``unknown``.
        frame: ``split``: the first frame of the new track.
        threshold: ``accept_above``: the confidence from which tracks are accepted.
        by: Who (an API key's name).
        at: When, ISO 8601 UTC.
    """

    action: Literal["accept", "reject", "relabel", "merge", "split", "accept_above"]
    track_id: int | None = None
    other_track_id: int | None = None
    class_id: int | None = Field(None, ge=-1, le=len(GTSRB_CLASS_NAMES) - 1)
    frame: int | None = Field(None, ge=0)
    threshold: float | None = Field(None, ge=0, le=1)
    by: str = Field(min_length=1, max_length=64)
    at: str

    @model_validator(mode="after")
    def _fields_for_the_action(self) -> ReviewAction:
        need = {
            "accept": ("track_id",),
            "reject": ("track_id",),
            "relabel": ("track_id", "class_id"),
            "merge": ("track_id", "other_track_id"),
            "split": ("track_id", "frame"),
            "accept_above": ("threshold",),
        }[self.action]
        missing = [name for name in need if getattr(self, name) is None]
        if missing:
            raise ValueError(f"{self.action}: expected {', '.join(need)}, got no {', '.join(missing)}")
        return self


def _merged(keep: Track, gone: Track) -> Track:
    by_frame: dict[int, Box] = {}
    for box in (*keep.boxes, *gone.boxes):
        if box.frame not in by_frame or box.score > by_frame[box.frame].score:
            by_frame[box.frame] = box
    boxes = tuple(by_frame[f] for f in sorted(by_frame))
    crops = tuple(
        sorted((*keep.best_crops, *gone.best_crops), key=lambda c: -c.quality)[: max(5, len(keep.best_crops))]
    )
    return keep.model_copy(
        update={
            "boxes": boxes,
            "best_crops": crops,
            "first_frame": boxes[0].frame,
            "last_frame": boxes[-1].frame,
            "start_s": boxes[0].t_s,
            "end_s": boxes[-1].t_s,
        }
    )


def _part(track: Track, boxes: tuple[Box, ...], track_id: int) -> Track:
    frames = {b.frame for b in boxes}
    return track.model_copy(
        update={
            "track_id": track_id,
            "boxes": boxes,
            "best_crops": tuple(c for c in track.best_crops if c.frame in frames),
            "first_frame": boxes[0].frame,
            "last_frame": boxes[-1].frame,
            "start_s": boxes[0].t_s,
            "end_s": boxes[-1].t_s,
            "review": Review(),
        }
    )


def apply_review(labels: LabelFile, actions: list[ReviewAction] | tuple[ReviewAction, ...]) -> LabelFile:
    """The label file with reviewer decisions replayed onto it, in order.

    Merges and splits change the tracks (a split's new track gets the next free id, so replaying the same actions
    always gives the same ids); the other actions set each track's ``review``.

    Raises:
        InputError: An action names a track that does not exist (any more), merges a track with itself, or splits
            outside a track; the message names the action.
    """
    tracks: dict[int, Track] = {t.track_id: t for t in labels.tracks}

    def get(track_id: int | None, action: ReviewAction) -> Track:
        if track_id is None or track_id not in tracks:
            raise InputError(f"{action.action}: expected one of the tracks {sorted(tracks)}, got track {track_id}")
        return tracks[track_id]

    for action in actions:
        decided = {"by": action.by, "at": action.at}
        if action.action in ("accept", "reject"):
            track = get(action.track_id, action)
            status = "accepted" if action.action == "accept" else "rejected"
            tracks[track.track_id] = track.model_copy(update={"review": Review(status=status, **decided)})
        elif action.action == "relabel":
            track = get(action.track_id, action)
            cid = action.class_id if action.class_id is not None else -1
            name = UNKNOWN if cid < 0 else GTSRB_CLASS_NAMES[cid]
            review = Review(status="relabelled", class_id=cid, class_name=name, **decided)
            tracks[track.track_id] = track.model_copy(update={"review": review})
        elif action.action == "merge":
            keep, gone = get(action.track_id, action), get(action.other_track_id, action)
            if keep.track_id == gone.track_id:
                raise InputError(f"merge: expected two different tracks, got track {keep.track_id} twice")
            tracks[keep.track_id] = _merged(keep, gone)
            del tracks[gone.track_id]
        elif action.action == "split":
            track = get(action.track_id, action)
            frame = action.frame if action.frame is not None else 0
            before = tuple(b for b in track.boxes if b.frame < frame)
            after = tuple(b for b in track.boxes if b.frame >= frame)
            if not before or not after:
                raise InputError(
                    f"split: expected a frame inside track {track.track_id} ({track.first_frame + 1}.."
                    f"{track.last_frame}), got {frame}"
                )
            new_id = max(tracks) + 1
            tracks[track.track_id] = _part(track, before, track.track_id)
            tracks[new_id] = _part(track, after, new_id)
        else:  # accept_above
            threshold = action.threshold if action.threshold is not None else 1.0
            for tid, track in list(tracks.items()):
                if track.review.status == "pending" and track.class_id >= 0 and track.confidence >= threshold:
                    tracks[tid] = track.model_copy(update={"review": Review(status="accepted", **decided)})
    ordered = sorted(tracks.values(), key=lambda t: (t.first_frame, t.track_id))
    return labels.model_copy(update={"tracks": tuple(ordered)})


def save_label_file(path: Path, labels: LabelFile) -> None:
    """Write ``labels`` as JSON to ``path`` atomically (a reader sees the old file or the new one, never half)."""
    atomic_write_bytes(path, labels.model_dump_json(indent=1).encode() + b"\n")


def load_label_file(path: Path) -> LabelFile:
    """Read and validate a label file.

    Raises:
        InputError: The file is missing, is not JSON, has another ``schema_version``, or breaks the schema; the
            message says which field and what was expected.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"label file {path}: expected a readable file, got {exc.strerror or exc}") from exc
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"label file {path}: expected JSON, got {exc}") from exc
    if not isinstance(doc, dict):
        raise InputError(f"label file {path}: expected a JSON object, got {type(doc).__name__}")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise InputError(f"label file {path}: expected schema_version {SCHEMA_VERSION}, got {version!r}")
    try:
        return LabelFile.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InputError(f"label file {path}: {where}: {first['msg']} ({exc.error_count()} problem(s) in all)") from exc
