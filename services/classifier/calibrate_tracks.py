"""The auto-accept threshold: the track confidence above which tracks need no review. Numpy only.

Tracks are judged with :func:`services.classifier.tracks.decide_track` (the pipeline's own rule), on the frozen
validation set; the threshold is then the lowest confidence ``t`` such that, among the frozen tracks with a sign
class and ``confidence >= t``, the share named correctly is at least the target precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.common.errors import InputError

__all__ = ["AutoAccept", "choose_auto_accept_threshold"]


@dataclass(frozen=True, slots=True)
class AutoAccept:
    """A chosen threshold and what it does on the set it was chosen on.

    Attributes:
        threshold: accept a track without review when it names a sign with ``confidence >= threshold``.
        precision: share of the accepted tracks that were named correctly.
        coverage: share of all tracks that are accepted.
        accepted: number of accepted tracks.
        tracks: number of tracks.
        target_precision: the precision asked for.
    """

    threshold: float
    precision: float
    coverage: float
    accepted: int
    tracks: int
    target_precision: float

    def as_dict(self) -> dict[str, float | int]:
        """Plain figures, for a model card."""
        return {
            "threshold": self.threshold,
            "precision": self.precision,
            "coverage": self.coverage,
            "accepted": self.accepted,
            "tracks": self.tracks,
            "target_precision": self.target_precision,
        }


def choose_auto_accept_threshold(
    confidence: np.ndarray, correct: np.ndarray, named: np.ndarray, target_precision: float = 0.99
) -> AutoAccept | None:
    """Lowest threshold whose accepted tracks reach ``target_precision``; None when no threshold does.

    Args:
        confidence: (N,) track confidences in [0, 1].
        correct: (N,) bool, the track's decided class is its true class (a not-a-sign track decided unknown
            counts as correct, but is never accepted: it names no sign).
        named: (N,) bool, the track was decided as a sign class (not unknown); only these can be accepted.
        target_precision: least share of accepted tracks that must be correct, in (0, 1].

    Raises:
        InputError: the columns differ in length, or the target is out of range.
    """
    conf = np.asarray(confidence, np.float64)
    ok = np.asarray(correct, bool)
    can = np.asarray(named, bool)
    if conf.ndim != 1 or ok.shape != conf.shape or can.shape != conf.shape:
        raise InputError(
            f"auto-accept: expected three (N,) columns, got confidence {conf.shape}, correct {ok.shape}, "
            f"named {can.shape}"
        )
    if not 0 < target_precision <= 1:
        raise InputError(f"auto-accept: expected a target precision in (0, 1], got {target_precision}")
    if not can.any():
        return None
    c, k = conf[can], ok[can]
    order = np.argsort(-c, kind="stable")
    c, k = c[order], k[order]
    hits = np.cumsum(k)
    counts = np.arange(1, len(c) + 1)
    # Accepting "confidence >= t" takes every track tied with t, so only the last of each run of ties counts.
    last_of_tie = np.append(c[1:] != c[:-1], True)
    precision = hits / counts
    good = np.flatnonzero(last_of_tie & (precision >= target_precision))
    if not len(good):
        return None
    i = int(good[-1])  # the lowest threshold (most tracks accepted) that reaches the target
    return AutoAccept(
        threshold=float(c[i]),
        precision=float(precision[i]),
        coverage=float(counts[i] / len(conf)),
        accepted=int(counts[i]),
        tracks=int(len(conf)),
        target_precision=float(target_precision),
    )
