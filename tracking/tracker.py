"""A norfair adapter: ``Detections`` in, the same rows out with ``track_id`` filled in.

Boxes stay as the detector saw them and every input row comes back in the same order with its ``extra`` columns
(STYLE.md section 2): the tracker only says which track each row belongs to. Kalman predictions are used for
matching, never emitted. Matching uses norfair's vectorised IoU distance on the box corners, so a sign that grows
and slides outwards as the car approaches is followed by the constant-velocity filter on both corners.

No camera-motion compensation: norfair's ``MotionEstimator`` fits a global homography to background features, which
models pans and shakes; a forward-moving dashcam instead makes every point flow out of the vanishing point at a
speed that depends on its depth, so a homography does not describe the signs' motion, and the box-corner Kalman
filter already follows it (measured on the synthetic approach clips in ``tests/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.common.types import Detections
from tracking.ids import TrackIdAllocator

__all__ = ["EndedTrack", "SignTracker", "TrackerSettings", "box_distance"]


def box_distance(candidates: np.ndarray, objects: np.ndarray, center_weight: float = 0.5) -> np.ndarray:
    """Distance between detections and tracks' predicted boxes: ``1 - IoU``, or less when the centres are close.

    IoU alone cannot link a small, fast sign whose box moved by more than its own width since the last detector
    run (every k-th frame, or near the camera), and such a sign would start a new track each time. So the distance
    is the smaller of ``1 - IoU`` and ``center_weight * d_c + |log(s_a / s_b)|``, where ``d_c`` is the distance of
    the centres in units of the larger box's size ``sqrt(w * h)`` and ``s`` the sizes: boxes of the same size a
    little apart are near; boxes of very different sizes are far.

    Args:
        candidates: (N, 4) or (N, 2, 2) boxes ``x1, y1, x2, y2`` in pixels.
        objects: (M, 4) or (M, 2, 2) boxes.
        center_weight: Weight of the centre distance.

    Returns:
        (N, M) float32 distances, >= 0 (0: the same box).
    """
    a = np.asarray(candidates, np.float64).reshape(-1, 4)
    b = np.asarray(objects, np.float64).reshape(-1, 4)
    wa, ha = np.maximum(a[:, 2] - a[:, 0], 1e-6), np.maximum(a[:, 3] - a[:, 1], 1e-6)
    wb, hb = np.maximum(b[:, 2] - b[:, 0], 1e-6), np.maximum(b[:, 3] - b[:, 1], 1e-6)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    union = (wa * ha)[:, None] + (wb * hb)[None, :] - inter
    iou = inter / np.maximum(union, 1e-12)
    sa, sb = np.sqrt(wa * ha), np.sqrt(wb * hb)
    ca = np.stack([a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]], axis=1) / 2
    cb = np.stack([b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], axis=1) / 2
    d_center = np.linalg.norm(ca[:, None, :] - cb[None, :, :], axis=2) / np.maximum(sa[:, None], sb[None, :])
    d_scale = np.abs(np.log(sa[:, None] / sb[None, :]))
    distance: np.ndarray = np.minimum(1.0 - iou, center_weight * d_center + d_scale).astype(np.float32)
    return distance


class TrackerSettings(BaseModel):
    """How detections are linked into tracks (units are detector runs unless stated).

    Attributes:
        distance: ``iou`` (norfair's ``1 - IoU``) or ``box`` (``box_distance``: also links nearby boxes of the same
            size that no longer overlap).
        center_weight: ``box_distance``'s weight on the centre distance.
        distance_threshold: Largest distance between a detection and a track's predicted box that still matches.
        hit_counter_max: How long a track lives on without detections: it dies after about this many frames
            without a match (norfair's hit counter; each match adds two detector periods, each frame removes one).
        initialization_delay: Matches a new track needs before it counts as confirmed (0: the first detection).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    distance: Literal["iou", "box"] = "box"
    center_weight: float = Field(0.5, gt=0)
    distance_threshold: float = Field(0.9, gt=0, le=1)
    hit_counter_max: int = Field(12, ge=1)
    initialization_delay: int = Field(1, ge=0)

    @model_validator(mode="after")
    def _delay_below_max(self) -> TrackerSettings:
        if self.initialization_delay >= self.hit_counter_max:
            raise ValueError(
                f"initialization_delay: expected less than hit_counter_max ({self.hit_counter_max}), "
                f"got {self.initialization_delay}"
            )
        return self


@dataclass(frozen=True, slots=True)
class EndedTrack:
    """A track the tracker let go of.

    Attributes:
        track_id: The id its rows carried.
        confirmed: Whether it was ever matched often enough to count (``initialization_delay``); an unconfirmed
            track is most likely a one-off false detection.
    """

    track_id: int
    confirmed: bool


class SignTracker:
    """Tracks the signs of one recording; make a new one per recording."""

    def __init__(self, settings: TrackerSettings | None = None, allocator: TrackIdAllocator | None = None) -> None:
        # norfair (with SciPy) is imported only when a tracker is made: the HTTP gateway imports the settings
        # models but never tracks, and stays some 75 MB smaller for it.
        from norfair.distances import VectorizedDistance
        from norfair.tracker import Detection as NorfairDetection
        from norfair.tracker import Tracker as NorfairTracker

        self._detection = NorfairDetection
        self.settings = settings or TrackerSettings()
        self._ids = allocator or TrackIdAllocator()
        self._tracker = NorfairTracker(
            distance_function="iou",
            distance_threshold=self.settings.distance_threshold,
            hit_counter_max=self.settings.hit_counter_max,
            initialization_delay=self.settings.initialization_delay,
        )
        if self.settings.distance == "box":
            # norfair's constructor takes a name or a scalar function only; a vectorised one is set afterwards, as
            # the attribute its matching reads (a scalar function would be called once per pair, in Python).
            self._tracker.distance_function = VectorizedDistance(self._distance)  # type: ignore[assignment]
        # norfair object identity -> (object, our id); the object is held so its id() is never reused meanwhile.
        self._live: dict[int, tuple[Any, int]] = {}
        self._ended: list[EndedTrack] = []

    def _distance(self, candidates: np.ndarray, objects: np.ndarray) -> np.ndarray:
        return box_distance(candidates, objects, self.settings.center_weight)

    def update(self, detections: Detections, *, period: int = 1) -> Detections:
        """Link one frame's detections to tracks.

        Args:
            detections: The frame's boxes (any ``extra`` columns are kept).
            period: Frames since the previous call (the detector interval), so the motion model steps as far.

        Returns:
            The same rows in the same order with ``track_id`` (N,) int64: every row belongs to a track, a new one
            when it matched none.
        """
        xyxy = np.asarray(detections.xyxy, np.float64)
        inputs = [
            self._detection(points=xyxy[i].reshape(2, 2), scores=np.repeat(float(detections.score[i]), 2))
            for i in range(len(detections))
        ]
        self._tracker.update(detections=inputs or None, period=period)
        row_of = {id(det): i for i, det in enumerate(inputs)}
        track_id = np.full(len(detections), -1, np.int64)
        alive: set[int] = set()
        for obj in self._tracker.tracked_objects:
            key = id(obj)
            alive.add(key)
            entry = self._live.get(key)
            if entry is None:
                entry = (obj, self._ids.allocate())
                self._live[key] = entry
            row = row_of.get(id(obj.last_detection))
            if row is not None and obj.last_detection is inputs[row]:
                track_id[row] = entry[1]
        for key in [k for k in self._live if k not in alive]:
            obj, tid = self._live.pop(key)
            self._ended.append(EndedTrack(tid, not obj.is_initializing))
        return detections.with_columns(track_id=track_id)

    def pop_ended(self) -> list[EndedTrack]:
        """Tracks that ended since the last call, in the order they ended."""
        ended, self._ended = self._ended, []
        return ended

    def finish(self) -> list[EndedTrack]:
        """End every live track (the recording is over) and return all tracks not yet popped."""
        for obj, tid in self._live.values():
            self._ended.append(EndedTrack(tid, not obj.is_initializing))
        self._live.clear()
        return self.pop_ended()
