"""The one labelling pipeline: decode -> detect -> track -> classify once per track -> label file.

Plain Python with no web framework in it: ``roadlabel label``, the batch command and the HTTP gateway all call
``label_recording``. Memory stays bounded however long the recording is: frames go through a bounded queue and
are dropped once detected; each live track keeps only its best few crops (small copies, never whole frames); a
track is classified and reduced to its boxes as soon as the tracker lets go of it.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gateway.two_stage import crop_boxes
from services.classifier.api import Classifier
from services.classifier.tracks import decide_track
from services.common.classes import NOT_A_SIGN, UNKNOWN
from services.common.errors import InputError
from services.common.labelfile import (
    Box,
    CropRef,
    Gap,
    LabelFile,
    ModelRef,
    Recording,
    Review,
    RunStats,
    ScoredClass,
    Track,
    UncertaintyReason,
)
from services.common.modelcard import ModelCard
from services.common.types import Detections, Frame
from services.decode.reader import DecodeSettings, VideoReader
from services.detector.api import Detector
from tracking.tracker import SignTracker, TrackerSettings, box_distance

__all__ = ["PipelineSettings", "Progress", "file_sha256", "label_recording"]

log = logging.getLogger(__name__)


class PipelineSettings(BaseModel):
    """Everything that shapes a label file besides the models; recorded in every label file.

    Attributes:
        decode: Decoder settings.
        tracker: Tracker settings, in frames (scaled to detector runs when ``detect_every`` > 1).
        detect_every: Run the detector on every k-th frame only; the tracker links across the frames between.
        detect_batch: Frames per detector call.
        roi_xyxy: Region of interest as fractions of the frame (x1, y1, x2, y2): the detector sees only this part.
        min_sign_px: Ignore detections whose shorter side is below this many pixels.
        crop_margin: Each box is grown by this fraction of its size on every side before it is classified.
        crops_per_track: The best crops kept per track and classified together.
        classify_batch: Crops per classifier call (crops of several ended tracks go together).
        relink_gap_frames: A track that starts at most this many frames after another ended, where that one's
            motion says it would be, continues it (a sign the detector lost for a moment); 0 turns this off.
        relink_distance: How near (``tracking.tracker.box_distance``) the extrapolated box must be.
        min_track_frames: Tracks with fewer detected frames are ``short``.
        short_tracks: ``drop`` short tracks, or keep them ``flag``-ged as uncertain.
        not_a_sign_tracks: Tracks whose crops the classifier calls not a sign: ``drop`` or ``flag``.
        review_below: Tracks with a lower confidence are flagged ``low_confidence``.
        min_confident_px: Tracks whose largest box is smaller than this (shorter side) are flagged ``small``.
        top_k: Candidate classes stored per track.
        auto_accept: Accept without review the tracks the classifier is sure of: a sign class with confidence at or
            above the threshold, every crop agreeing, not short and not small. Their review says ``accepted`` by
            ``auto:<classifier version>@<threshold>``; a reviewer can still change it.
        auto_accept_above: The threshold; None takes the classifier card's ``auto_accept_threshold`` (chosen on
            the frozen validation set for 99 % precision), and no track is auto-accepted when the card has none.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    decode: DecodeSettings = DecodeSettings()
    tracker: TrackerSettings = TrackerSettings()
    detect_every: int = Field(1, ge=1, le=30)
    detect_batch: int = Field(4, ge=1, le=256)
    roi_xyxy: tuple[float, float, float, float] | None = None
    min_sign_px: float = Field(0.0, ge=0)
    crop_margin: float = Field(0.15, ge=0, le=2)
    crops_per_track: int = Field(5, ge=1, le=64)
    classify_batch: int = Field(64, ge=1)
    relink_gap_frames: int = Field(25, ge=0)
    relink_distance: float = Field(0.9, gt=0)
    min_track_frames: int = Field(3, ge=1)
    short_tracks: Literal["drop", "flag"] = "drop"
    not_a_sign_tracks: Literal["drop", "flag"] = "drop"
    review_below: float = Field(0.9, ge=0, le=1)
    min_confident_px: float = Field(20.0, ge=0)
    top_k: int = Field(5, ge=1, le=64)
    auto_accept: bool = True
    auto_accept_above: float | None = Field(None, ge=0, le=1)

    def model_post_init(self, context: object, /) -> None:
        if self.roi_xyxy is not None:
            x1, y1, x2, y2 = self.roi_xyxy
            if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
                raise ValueError(f"roi_xyxy: expected 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1, got {self.roi_xyxy}")


@dataclass(frozen=True, slots=True)
class Progress:
    """A progress event.

    Attributes:
        recording_id: Which recording.
        stage: ``hash``, ``label`` (frames decoded and processed) or ``done``.
        done: Units done (frames for ``label``, bytes for ``hash``).
        total: Units in all, or None when the container does not say.
        fps: Frames per second so far (``label`` only).
    """

    recording_id: str
    stage: str
    done: int
    total: int | None
    fps: float = 0.0


ProgressFn = Callable[[Progress], None]


def file_sha256(path: Path, on_progress: ProgressFn | None = None, recording_id: str = "") -> str:
    """The sha256 of a file, read in 4 MiB chunks (any size, bounded memory)."""
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as fh:
        while chunk := fh.read(4 << 20):
            digest.update(chunk)
            done += len(chunk)
            if on_progress is not None:
                on_progress(Progress(recording_id, "hash", done, total))
    return digest.hexdigest()


@dataclass(order=True, slots=True)
class _Crop:
    quality: float
    frame: int = field(compare=False)
    t_s: float = field(compare=False)
    xyxy: tuple[float, float, float, float] = field(compare=False)
    pixels: np.ndarray = field(compare=False, repr=False)


@dataclass(slots=True)
class _LiveTrack:
    boxes: list[Box] = field(default_factory=list)
    crops: list[_Crop] = field(default_factory=list)  # a min-heap on quality, at most crops_per_track long
    max_side_px: float = 0.0
    confirmed: bool = False

    def predict(self, frame: int) -> np.ndarray:
        """(4,) the box extrapolated to ``frame`` at the velocity of the last few boxes (constant without two)."""
        last = self.boxes[-1]
        xyxy = np.asarray(last.xyxy, np.float64)
        if len(self.boxes) < 2:
            return xyxy
        ref = self.boxes[max(0, len(self.boxes) - 4)]
        span = last.frame - ref.frame
        velocity = (xyxy - np.asarray(ref.xyxy, np.float64)) / max(span, 1)
        return xyxy + velocity * (frame - last.frame)

    def absorb_earlier(self, older: _LiveTrack, keep: int) -> None:
        """Prepend ``older`` (a fragment of the same sign that ended before this one began)."""
        self.boxes[:0] = older.boxes
        self.crops = heapq.nlargest(keep, [*self.crops, *older.crops])
        heapq.heapify(self.crops)
        self.max_side_px = max(self.max_side_px, older.max_side_px)
        self.confirmed = self.confirmed or older.confirmed


@dataclass(slots=True)
class _Counters:
    frames_detected: int = 0
    detections: int = 0
    dropped: int = 0
    detect_s: float = 0.0
    track_s: float = 0.0
    classify_s: float = 0.0


def _sharpness(gray: np.ndarray) -> float:
    """Variance of a 4-neighbour Laplacian: larger for a crisp crop, small for a blurred or tiny one."""
    if gray.shape[0] < 3 or gray.shape[1] < 3:
        return 0.0
    lap = gray[1:-1, :-2] + gray[1:-1, 2:] + gray[:-2, 1:-1] + gray[2:, 1:-1] - 4.0 * gray[1:-1, 1:-1]
    return float(lap.var())


def crop_quality(side_px: float, score: float, sharpness: float) -> float:
    """How much a crop is worth to the classifier: size first (up to 64 px, the classifier's input), then
    sharpness, then the detector's score; each term is in [0, 1]."""
    return min(side_px, 64.0) / 64.0 + 0.5 * min(sharpness / 400.0, 1.0) + 0.25 * score


class _Labeller:
    """The state of one run; ``label_recording`` drives it."""

    def __init__(
        self,
        detector: Detector,
        classifier: Classifier,
        settings: PipelineSettings,
    ) -> None:
        self.detector = detector
        self.classifier = classifier
        self.settings = settings
        k = settings.detect_every
        tracker_settings = settings.tracker
        if k > 1:
            # The tracker counts detector runs: keep the same lifetime in frames.
            runs = max(1, math.ceil(tracker_settings.hit_counter_max / k))
            tracker_settings = tracker_settings.model_copy(
                update={
                    "hit_counter_max": max(runs, tracker_settings.initialization_delay + 1),
                }
            )
        self.tracker = SignTracker(tracker_settings)
        self.live: dict[int, _LiveTrack] = {}
        self.to_classify: list[_LiveTrack] = []
        self.recent: list[_LiveTrack] = []  # ended, but a later track may still continue them
        self.tracks: list[Track] = []
        self.counters = _Counters()

    # -- detection and tracking -------------------------------------------------------------------------------

    def _roi_frames(self, frames: Sequence[Frame]) -> tuple[list[Frame], list[tuple[int, int]]]:
        roi = self.settings.roi_xyxy
        if roi is None:
            return list(frames), [(0, 0)] * len(frames)
        out: list[Frame] = []
        offsets: list[tuple[int, int]] = []
        for frame in frames:
            h, w = frame.hw
            x1, y1 = math.floor(roi[0] * w), math.floor(roi[1] * h)
            x2, y2 = max(x1 + 1, math.ceil(roi[2] * w)), max(y1 + 1, math.ceil(roi[3] * h))
            out.append(Frame(frame.ref, frame.image[y1:y2, x1:x2]))
            offsets.append((x1, y1))
        return out, offsets

    def detect_and_track(self, frames: Sequence[Frame]) -> None:
        tick = time.perf_counter()
        inputs, offsets = self._roi_frames(frames)
        found = self.detector.detect(inputs)
        now = time.perf_counter()
        self.counters.detect_s += now - tick
        self.counters.frames_detected += len(frames)
        for frame, dets, (dx, dy) in zip(frames, found, offsets, strict=True):
            if dx or dy:
                shift = np.array([dx, dy, dx, dy], np.float32)
                dets = dets.with_columns(xyxy=dets.xyxy + shift)
            if self.settings.min_sign_px > 0 and len(dets):
                sides = np.minimum(dets.xyxy[:, 2] - dets.xyxy[:, 0], dets.xyxy[:, 3] - dets.xyxy[:, 1])
                dets = dets.take(sides >= self.settings.min_sign_px)
            self.counters.detections += len(dets)
            tracked = self.tracker.update(dets)
            self._store(frame, tracked)
            for ended in self.tracker.pop_ended():
                self._end(ended.track_id, ended.confirmed)
            self._finalize_recent(before=frame.ref.index - self.settings.relink_gap_frames)
        self.counters.track_s += time.perf_counter() - now
        if sum(len(t.crops) for t in self.to_classify) >= self.settings.classify_batch:
            self.classify_pending()

    def _store(self, frame: Frame, tracked: Detections) -> None:
        if not len(tracked):
            return
        assert tracked.track_id is not None  # noqa: S101 - SignTracker.update always fills it
        keep = self.settings.crops_per_track
        windows = crop_boxes(tracked.xyxy, self.settings.crop_margin, frame.hw)
        t_s = round(frame.ref.pts_s, 6)
        for row in range(len(tracked)):
            tid = int(tracked.track_id[row])
            x1f, y1f, x2f, y2f = (round(float(v), 2) for v in tracked.xyxy[row])
            score = float(tracked.score[row])
            box = Box(frame=frame.ref.index, t_s=t_s, xyxy=(x1f, y1f, x2f, y2f), score=score)
            live = self.live.get(tid)
            if live is None:
                live = self.live[tid] = _LiveTrack()
                older = self._relink(self.recent, box)
                if older is not None:
                    self.recent.remove(older)
                    live.absorb_earlier(older, keep)
            live.boxes.append(box)
            side = min(x2f - x1f, y2f - y1f)
            live.max_side_px = max(live.max_side_px, side)
            x1, y1, x2, y2 = windows[row].tolist()
            patch = frame.image[y1:y2, x1:x2]
            gray = patch.mean(axis=2, dtype=np.float32)
            quality = crop_quality(side, score, _sharpness(gray))
            if len(live.crops) >= keep and quality <= live.crops[0].quality:
                continue
            crop = _Crop(quality, frame.ref.index, t_s, (x1f, y1f, x2f, y2f), np.array(patch))  # a copy, not a view
            if len(live.crops) < keep:
                heapq.heappush(live.crops, crop)
            else:
                heapq.heapreplace(live.crops, crop)

    def _relink(self, candidates: Iterable[_LiveTrack], box: Box) -> _LiveTrack | None:
        """The ended fragment that ``box`` (the first box of a new track) most likely continues, if any.

        The tracker ends a young track after a few missed detections, so a sign the detector loses for a moment
        comes back as a new track. A fragment continues it when it ended at most ``relink_gap_frames`` earlier and
        its extrapolated box is within ``relink_distance`` (``tracking.tracker.box_distance``) of the new box.
        """
        best: _LiveTrack | None = None
        best_d = self.settings.relink_distance
        for older in candidates:
            gap = box.frame - older.boxes[-1].frame
            if gap <= 0 or gap > self.settings.relink_gap_frames:
                continue
            d = float(box_distance(np.asarray([box.xyxy]), older.predict(box.frame)[None])[0, 0])
            if d < best_d:
                best, best_d = older, d
        return best

    def _end(self, track_id: int, confirmed: bool) -> None:
        live = self.live.pop(track_id, None)
        if live is None:
            return
        live.confirmed = live.confirmed or confirmed
        # A younger live track may already continue this fragment (the tracker ends tracks late).
        for younger in self.live.values():
            first = younger.boxes[0]
            if first.frame > live.boxes[-1].frame and self._relink([live], first) is live:
                younger.absorb_earlier(live, self.settings.crops_per_track)
                return
        self.recent.append(live)

    def _finalize_recent(self, before: int) -> None:
        """Fragments that ended before frame ``before`` can no longer be continued: keep or drop them."""
        done = [t for t in self.recent if t.boxes[-1].frame < before]
        if not done:
            return
        self.recent = [t for t in self.recent if t.boxes[-1].frame >= before]
        for live in done:
            short = len(live.boxes) < self.settings.min_track_frames
            if not live.confirmed or (short and self.settings.short_tracks == "drop"):
                self.counters.dropped += 1
            else:
                self.to_classify.append(live)

    # -- classification -----------------------------------------------------------------------------------------

    def classify_pending(self) -> None:
        pending, self.to_classify = self.to_classify, []
        if not pending:
            return
        tick = time.perf_counter()
        crops = [c for live in pending for c in sorted(live.crops, reverse=True)]
        logprobs = self.classifier.classify([c.pixels for c in crops])
        start = 0
        for live in pending:
            n = len(live.crops)
            track = self._make_track(live, sorted(live.crops, reverse=True), logprobs[start : start + n])
            start += n
            if track is None:
                self.counters.dropped += 1
            else:
                self.tracks.append(track)
        self.counters.classify_s += time.perf_counter() - tick

    def _make_track(self, live: _LiveTrack, crops: list[_Crop], logprobs: np.ndarray) -> Track | None:
        card = self.classifier.card
        settings = self.settings
        decision = decide_track(logprobs, card, np.array([c.quality for c in crops], np.float64))
        per_crop = decision.per_crop
        track_lp = decision.logprobs
        class_id = decision.class_id
        top = int(track_lp.argmax())
        is_background = card.background_class is not None and top == card.background_class
        if is_background and settings.not_a_sign_tracks == "drop":
            return None
        probs = np.exp(track_lp)
        reasons: list[UncertaintyReason] = []
        confidence = decision.confidence
        if class_id < 0:
            reasons.append("rejected")
        elif confidence < settings.review_below:
            reasons.append("low_confidence")
        agreement = decision.crop_agreement
        if agreement < 1.0:
            reasons.append("crops_disagree")
        if len(live.boxes) < settings.min_track_frames:
            reasons.append("short")
        if live.max_side_px < settings.min_confident_px:
            reasons.append("small")
        review = Review()
        threshold = settings.auto_accept_above if settings.auto_accept_above is not None else card.auto_accept_threshold
        if (
            settings.auto_accept
            and threshold is not None
            and class_id >= 0
            and confidence >= threshold
            and not set(reasons) - {"low_confidence"}
        ):
            # No time: the decision is the run's (the label file's created_at), and label files of the same input
            # stay identical apart from created_at and timings.
            review = Review(status="accepted", by=f"auto:{card.version}@{threshold:.4f}")
        order = np.argsort(-probs, kind="stable")[: settings.top_k]
        top_classes = tuple(
            ScoredClass(class_id=_public_id(int(i), card), class_name=_class_name(int(i), card), p=float(probs[i]))
            for i in order
        )
        best = tuple(
            CropRef(
                frame=c.frame,
                t_s=c.t_s,
                xyxy=c.xyxy,
                class_id=int(per_crop.class_id[j]),
                p=float(per_crop.confidence[j]),
                quality=round(c.quality, 4),
            )
            for j, c in enumerate(crops)
        )
        boxes = tuple(live.boxes)
        return Track(
            track_id=1,  # renumbered in order of appearance once every track is known
            class_id=class_id,
            class_name=UNKNOWN if class_id < 0 else card.class_names[class_id],
            confidence=round(confidence, 6),
            first_frame=boxes[0].frame,
            last_frame=boxes[-1].frame,
            start_s=boxes[0].t_s,
            end_s=boxes[-1].t_s,
            top_classes=top_classes,
            crop_agreement=round(agreement, 4),
            uncertain=bool(reasons),
            uncertainty=tuple(reasons),
            review=review,
            best_crops=best,
            boxes=boxes,
        )

    def finish(self) -> list[Track]:
        for ended in self.tracker.finish():
            self._end(ended.track_id, ended.confirmed)
        self._finalize_recent(before=2**62)
        self.classify_pending()
        ordered = sorted(self.tracks, key=lambda t: (t.first_frame, t.boxes[0].xyxy))
        return [t.model_copy(update={"track_id": i}) for i, t in enumerate(ordered, start=1)]


def _public_id(index: int, card: ModelCard) -> int:
    return -1 if card.background_class is not None and index == card.background_class else index


def _class_name(index: int, card: ModelCard) -> str:
    if card.background_class is not None and index == card.background_class:
        return NOT_A_SIGN
    return card.class_names[index]


def _model_ref(card: ModelCard) -> ModelRef:
    return ModelRef(name=card.name, version=card.version, sha256=card.onnx_sha256)


def _code_version() -> str:
    try:
        return metadata.version("roadlabel")
    except metadata.PackageNotFoundError:
        return "unknown"


def _batches(frames: Iterable[Frame], every: int, size: int) -> Iterable[tuple[list[Frame], int]]:
    """Frames to detect, ``size`` at a time, each batch with the count of frames decoded up to its end."""
    batch: list[Frame] = []
    decoded = 0
    for frame in frames:
        decoded += 1
        if frame.ref.index % every == 0:
            batch.append(frame)
            if len(batch) == size:
                yield batch, decoded
                batch = []
    yield batch, decoded


def label_recording(
    path: Path,
    detector: Detector,
    classifier: Classifier,
    settings: PipelineSettings | None = None,
    *,
    recording_id: str | None = None,
    source_name: str | None = None,
    on_progress: ProgressFn | None = None,
) -> LabelFile:
    """Label one recording: every sign as one track with one class and a calibrated confidence.

    Args:
        path: The video file.
        detector: Finds signs in whole frames.
        classifier: Names each track from its best crops.
        settings: Pipeline settings (defaults when None).
        recording_id: The id written into the label file; the first 16 hex digits of the file's sha256 if None.
        source_name: The file name to record (default: ``path.name``); never a server path.
        on_progress: Called with ``Progress`` events (hashing, then every detector batch).

    Returns:
        The label file, not yet written: ``save_label_file`` writes it atomically.

    Raises:
        UnreadableVideo: Not a video, no video stream, or too corrupt to decode (the message says what was found).
        InputError: Bad settings for this video.
        ModelError: A model failed.
    """
    settings = settings or PipelineSettings()
    started = time.perf_counter()
    sha256 = file_sha256(path, on_progress, recording_id or "")
    rec_id = recording_id or sha256[:16]
    if not rec_id.isprintable() or len(rec_id) > 128:
        raise InputError(f"recording_id: expected at most 128 printable characters, got {rec_id!r}")
    labeller = _Labeller(detector, classifier, settings)
    with VideoReader(path, rec_id, settings.decode) as reader:
        info = reader.info
        total = info.frame_count_hint
        for batch, decoded in _batches(reader.frames(), settings.detect_every, settings.detect_batch):
            if batch:
                labeller.detect_and_track(batch)
            if on_progress is not None:
                elapsed = time.perf_counter() - started
                on_progress(Progress(rec_id, "label", decoded, total, decoded / elapsed if elapsed > 0 else 0.0))
        frames_decoded = reader.frames_decoded
        gaps = reader.gaps
        decode_s = reader.decode_s
        last_t = reader.last_pts_s
        vfr = reader.variable_frame_rate
    tracks = labeller.finish()
    fps = info.fps
    step = 1.0 / fps if fps > 0 else 0.0
    # The last frame lasts one nominal frame; a stream without a frame rate ends at its last frame.
    duration = last_t + step if frames_decoded else 0.0
    counters = labeller.counters
    elapsed = time.perf_counter() - started
    labels = LabelFile(
        recording=Recording(
            id=rec_id,
            source=source_name or path.name,
            sha256=sha256,
            width=info.width,
            height=info.height,
            fps=round(fps, 6),
            frame_count=frames_decoded,
            duration_s=round(duration, 6),
            start_s=round(info.start_s, 6),
            rotation_deg=info.rotation_deg,
            codec=info.codec,
            variable_frame_rate=vfr,
            gaps=tuple(
                Gap(
                    after_frame=g.after_frame,
                    from_s=round(g.from_s, 6),
                    to_s=round(g.to_s, 6),
                    missing_frames=max(0, round((g.to_s - g.from_s) / step) - 1) if step else 0,
                    packets=g.packets,
                    reason=g.reason,
                )
                for g in gaps
            ),
        ),
        models={"detector": _model_ref(detector.card), "classifier": _model_ref(classifier.card)},
        settings=settings.model_dump(mode="json"),
        code_version=_code_version(),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        stats=RunStats(
            frames_decoded=frames_decoded,
            frames_detected=counters.frames_detected,
            detections=counters.detections,
            tracks_dropped=counters.dropped,
            elapsed_s=round(elapsed, 3),
            stage_s={
                "decode": round(decode_s, 3),
                "detect": round(counters.detect_s, 3),
                "track": round(counters.track_s, 3),
                "classify": round(counters.classify_s, 3),
            },
        ),
        tracks=tuple(tracks),
    )
    log.info(
        "recording labelled",
        extra={
            "recording_id": rec_id,
            "frames": frames_decoded,
            "tracks": len(tracks),
            "elapsed_s": round(elapsed, 3),
            **{f"{k}_s": v for k, v in labels.stats.stage_s.items()},
        },
    )
    if on_progress is not None:
        on_progress(Progress(rec_id, "done", frames_decoded, frames_decoded, frames_decoded / max(elapsed, 1e-9)))
    return labels
