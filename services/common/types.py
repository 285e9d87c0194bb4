"""The core detection type: one column-oriented record per frame (STYLE.md section 2).

Tracks are the same record with ``track_id`` filled in. Columns are read-only once built, so stages share
arrays without defensive copies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from services.common.errors import InvalidDetections

__all__ = ["Detections", "Frame", "FrameRef", "require_column"]


@dataclass(frozen=True, slots=True)
class FrameRef:
    """Which frame of which recording: decode index and presentation time."""

    recording_id: str
    index: int  # decode order, 0-based
    pts_s: float  # presentation time from pts * time_base; never index / fps


@dataclass(frozen=True, slots=True, eq=False)
class Frame:
    """A decoded frame: ``image`` is (H, W, 3) uint8 RGB."""

    ref: FrameRef
    image: np.ndarray

    def __post_init__(self) -> None:
        img = self.image
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8 or img.shape[0] < 1 or img.shape[1] < 1:
            raise InvalidDetections(f"frame image: expected (H, W, 3) uint8 RGB, got {img.shape} {img.dtype}")

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return int(self.image.shape[0]), int(self.image.shape[1])


def require_column(
    name: str,
    col: np.ndarray,
    shape: tuple[int | None, ...],
    dtype: type[np.generic] | None,
    *,
    trailing_ok: bool = False,
) -> int:
    """Check a column's shape (None = any) and dtype; return its row count.

    Raises:
        InvalidDetections: with the expected and the received shape and dtype.
    """
    want = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ("...)" if trailing_ok else ")")
    want_dtype = "" if dtype is None else f" {np.dtype(dtype).name}"
    if not isinstance(col, np.ndarray):
        raise InvalidDetections(f"{name}: expected a numpy array {want}{want_dtype}, got {type(col).__name__}")
    ok_ndim = col.ndim >= len(shape) if trailing_ok else col.ndim == len(shape)
    ok_shape = ok_ndim and all(s is None or col.shape[i] == s for i, s in enumerate(shape))
    if not ok_shape or (dtype is not None and col.dtype != dtype):
        raise InvalidDetections(f"{name}: expected {want}{want_dtype}, got {col.shape} {col.dtype.name}")
    return int(col.shape[0]) if col.ndim else 0


@dataclass(frozen=True, slots=True, eq=False)
class Detections:
    """Objects in one frame. Row i of every column is the same object.

    Attributes:
        frame: The frame these objects are in.
        xyxy: (N, 4) float32 box corners (x1, y1, x2, y2) in pixels of the decoded frame.
        score: (N,) float32 detector confidence in [0, 1].
        class_id: (N,) int16 class in the detector's vocabulary.
        track_id: (N,) int64 track, -1 = tentative; None until tracking sets it.
        extra: (N, ...) per-row payload columns, e.g. "cls_logprob" (N, K) float32.
    """

    frame: FrameRef
    xyxy: np.ndarray
    score: np.ndarray
    class_id: np.ndarray
    track_id: np.ndarray | None = None
    extra: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = require_column("xyxy", self.xyxy, (None, 4), np.float32)
        require_column("score", self.score, (n,), np.float32)
        require_column("class_id", self.class_id, (n,), np.int16)
        if self.track_id is not None:
            require_column("track_id", self.track_id, (n,), np.int64)
        for name, col in self.extra.items():
            require_column(f"extra[{name!r}]", col, (n,), None, trailing_ok=True)
        for column in (self.xyxy, self.score, self.class_id, self.track_id, *self.extra.values()):
            if column is not None:
                column.flags.writeable = False

    @classmethod
    def empty(cls, frame: FrameRef) -> Detections:
        """No objects in ``frame``."""
        return cls(frame, np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int16))

    def __len__(self) -> int:
        return int(self.xyxy.shape[0])

    def take(self, rows: np.ndarray) -> Detections:
        """Rows selected by a bool mask or an int index, every column kept aligned."""
        return Detections(
            self.frame,
            self.xyxy[rows],
            self.score[rows],
            self.class_id[rows],
            None if self.track_id is None else self.track_id[rows],
            {k: v[rows] for k, v in self.extra.items()},
        )

    def with_columns(self, **cols: object) -> Detections:
        """A copy with some columns replaced (re-validated)."""
        return dataclasses.replace(self, **cols)  # type: ignore[arg-type]
