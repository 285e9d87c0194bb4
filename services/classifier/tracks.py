"""Track-level decisions from crop-level classifier outputs: one function, used everywhere a track is judged.

The pipeline (one class per physical sign), the frozen-set evaluation of a model, the auto-accept threshold,
self-training and the active-learning experiment all combine a track's crops the same way and rank tracks for
review the same way, so a threshold chosen on the frozen set means the same thing on a recording. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.classifier.api import Decisions, decide
from services.common.errors import InputError
from services.common.modelcard import ModelCard

__all__ = ["TrackDecision", "combine_crops", "decide_track", "review_priority"]


def combine_crops(logprobs: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """(N, K) crop log-probabilities -> (K,) track log-probabilities.

    A weighted geometric mean of the crops' calibrated distributions, renormalised: a crop that is sure of a
    class counts for more than one that is torn, and one confidently wrong crop cannot outvote several right ones.

    Args:
        logprobs: (N, K) calibrated log-probabilities of the N >= 1 crops of one track.
        weights: (N,) non-negative crop weights (quality); equal weights when None.
    """
    if logprobs.ndim != 2 or logprobs.shape[0] < 1:
        raise InputError(f"track crops: expected (N >= 1, K) log-probabilities, got shape {logprobs.shape}")
    if weights is None:
        w = np.full(logprobs.shape[0], 1.0 / logprobs.shape[0])
    else:
        w = np.asarray(weights, np.float64)
        if w.shape != (logprobs.shape[0],) or not np.all(w >= 0) or w.sum() <= 0:
            raise InputError(f"track crop weights: expected {logprobs.shape[0]} non-negative numbers, got {weights!r}")
        w = w / w.sum()
    mean = (w[:, None] * logprobs.astype(np.float64)).sum(axis=0)
    mean -= mean.max()
    out: np.ndarray = (mean - np.log(np.exp(mean).sum())).astype(np.float32)
    return out


@dataclass(frozen=True, slots=True)
class TrackDecision:
    """One track's class (-1 = unknown/not a sign), calibrated confidence and crop agreement."""

    class_id: int
    confidence: float
    crop_agreement: float
    logprobs: np.ndarray  # (K,) track log-probabilities
    per_crop: Decisions  # each crop's own decision, in the order of the crops given

    @property
    def priority(self) -> float:
        """Review priority: lower is more doubtful (see :func:`review_priority`)."""
        return review_priority(self.confidence, self.crop_agreement)


def decide_track(logprobs: np.ndarray, card: ModelCard, weights: np.ndarray | None = None) -> TrackDecision:
    """Combine a track's (N, K) crop log-probabilities and decide its class as the pipeline does."""
    track_lp = combine_crops(logprobs, weights)
    class_id = int(decide(track_lp[None], card).class_id[0])
    per_crop = decide(logprobs.astype(np.float32, copy=False), card)
    confidence = float(np.exp(track_lp[class_id])) if class_id >= 0 else 0.0
    agreement = float((per_crop.class_id == class_id).mean())
    return TrackDecision(class_id, confidence, agreement, track_lp, per_crop)


def review_priority(confidence: float, crop_agreement: float) -> float:
    """How sure the model is of a track, for ordering reviews: ``confidence x crop_agreement``, lowest first.

    Low calibrated confidence and crops that disagree both send a track to the front of the queue.
    """
    return confidence * crop_agreement
