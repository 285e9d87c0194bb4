"""The learning loop: active learning (a reviewer labels the tracks the model doubts most) and self-training.

Both loops are round-based and generic over a :class:`Trainer`: ``fit(items, labels, human)`` returns a
:class:`Predictor` giving calibrated per-crop log-probabilities. Items are integer indices into whatever data the
trainer holds (cached features in the experiment, image files in ``roadlabel selftrain``), grouped into tracks
(the ~10 crops of one physical sign). Every track-level judgement goes through
:func:`services.classifier.tracks.decide_track`, the product's rule, so the loop selects, pseudo-labels and
scores tracks exactly as the review queue ranks them:

* one human decision labels one whole track (all its crops);
* ``uncertainty`` selection sends the tracks with the lowest :func:`~services.classifier.tracks.review_priority`
  first; ``random`` selection is the baseline;
* self-training accepts an unlabelled track when its decided class is a sign and its track confidence is at or
  above the threshold, and gives all its crops that class; accepted tracks stay labelled in later rounds.

No torch here: the trainers bring their own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal, Protocol

import numpy as np

from services.classifier.tracks import TrackDecision, decide_track
from services.common.errors import InputError
from services.common.modelcard import ModelCard

__all__ = [
    "Evaluator",
    "Predictor",
    "Reviewer",
    "RoundRecord",
    "Strategy",
    "Trainer",
    "decide_tracks",
    "group_tracks",
    "run_active_learning",
    "run_self_training",
    "select_confident",
    "select_random",
    "select_uncertain",
    "track_evaluator",
]

Strategy = Literal["uncertainty", "random"]


class Predictor(Protocol):
    """A trained model: calibrated log-probabilities per crop."""

    @property
    def card(self) -> ModelCard:
        """Class names, background class and reject threshold, as :func:`decide_track` needs them."""
        ...

    def log_probs(self, items: np.ndarray) -> np.ndarray:
        """(N,) int item indices -> (N, K) calibrated log-probabilities."""
        ...


class Trainer(Protocol):
    """Trains a model on labelled items."""

    def fit(self, items: np.ndarray, labels: np.ndarray, human: np.ndarray) -> Predictor:
        """Train on ``items`` (N,) int with ``labels`` (N,) int; ``human`` (N,) bool marks reviewer labels.

        A trainer that calibrates should hold out a slice of the human-labelled items (pseudo labels are the
        model's own opinion, not ground truth).
        """
        ...


Reviewer = Callable[[str], int]
"""The human: track id -> the class of that track."""

Evaluator = Callable[[Predictor], dict[str, float]]
"""Scores a predictor on a fixed validation set -> figures (e.g. crop_accuracy, track_accuracy)."""


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """One round of a loop, after its retraining.

    ``human_decisions`` counts every track a human labelled so far (the initial set included). ``pseudo_*`` are
    zero (and precision None) for active learning. Precision is None when the truth is unknown or nothing was
    pseudo-labelled.
    """

    loop: str  # "uncertainty", "random", "full" or "selftrain@0.9"
    round: int
    human_decisions: int
    labelled_crops: int
    pseudo_tracks: int  # pseudo-labelled tracks so far
    new_pseudo_tracks: int  # pseudo-labelled in this round
    new_pseudo_precision: float | None
    pseudo_precision: float | None  # over all pseudo-labelled tracks so far
    unlabelled_tracks: int
    figures: dict[str, float]
    seconds: float

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return asdict(self)


def group_tracks(groups: Sequence[str] | np.ndarray, items: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Track id of each item -> {track: (n,) int item indices}, tracks in order of first appearance.

    Args:
        groups: (N,) track id of each item.
        items: (N,) item index of each row; ``arange(N)`` when None.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1:
        raise InputError(f"track ids: expected a 1-D sequence, got shape {groups.shape}")
    index = np.arange(len(groups)) if items is None else np.asarray(items, np.int64)
    if index.shape != groups.shape:
        raise InputError(f"items: expected {groups.shape[0]} indices (one per track id), got {index.shape}")
    out: dict[str, list[int]] = {}
    for g, i in zip(groups.tolist(), index.tolist(), strict=True):
        out.setdefault(str(g), []).append(int(i))
    return {g: np.asarray(v, np.int64) for g, v in out.items()}


def decide_tracks(predictor: Predictor, tracks: Mapping[str, np.ndarray]) -> dict[str, TrackDecision]:
    """Decide every track with one batched ``log_probs`` call and :func:`decide_track`."""
    if not tracks:
        return {}
    names = list(tracks)
    sizes = [len(tracks[t]) for t in names]
    if min(sizes) < 1:
        raise InputError("tracks: expected at least one item per track, got an empty track")
    lp = predictor.log_probs(np.concatenate([tracks[t] for t in names]))
    if lp.ndim != 2 or lp.shape[0] != sum(sizes):
        raise InputError(f"predictor: expected ({sum(sizes)}, K) log-probabilities, got shape {lp.shape}")
    bounds = np.cumsum([0, *sizes])
    card = predictor.card
    return {t: decide_track(lp[bounds[i] : bounds[i + 1]], card) for i, t in enumerate(names)}


def select_uncertain(decisions: Mapping[str, TrackDecision], k: int) -> list[str]:
    """The ``k`` tracks with the lowest review priority (most doubtful first; ties by track id)."""
    order = sorted(decisions, key=lambda t: (decisions[t].priority, t))
    return order[: max(0, k)]


def select_random(tracks: Iterable[str], k: int, rng: np.random.Generator) -> list[str]:
    """``k`` tracks drawn uniformly without replacement (sorted first, so a seed gives the same draw)."""
    pool = sorted(tracks)
    if k >= len(pool):
        return pool
    return [pool[i] for i in sorted(rng.choice(len(pool), size=k, replace=False).tolist())]


def select_confident(decisions: Mapping[str, TrackDecision], threshold: float) -> dict[str, int]:
    """Tracks to pseudo-label: decided as a sign (not unknown) with track confidence >= ``threshold``."""
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"self-training threshold: expected a confidence in [0, 1], got {threshold}")
    return {t: d.class_id for t, d in sorted(decisions.items()) if d.class_id >= 0 and d.confidence >= threshold}


def track_evaluator(predictor_items: np.ndarray, labels: np.ndarray, groups: Sequence[str] | np.ndarray) -> Evaluator:
    """An evaluator on a fixed labelled set: crop accuracy (per-crop argmax) and track accuracy (decide_track).

    A crop or track decided as unknown (background or below the reject threshold) counts as wrong.
    """
    items = np.asarray(predictor_items, np.int64)
    labels = np.asarray(labels, np.int64)
    if items.shape != labels.shape or len(items) != len(groups):
        raise InputError(
            f"validation set: expected as many labels and track ids as items ({len(items)}), "
            f"got {labels.shape[0]} labels and {len(groups)} track ids"
        )
    tracks = group_tracks(groups, np.arange(len(items)))
    track_truth = {t: int(labels[idx[0]]) for t, idx in tracks.items()}
    for t, idx in tracks.items():
        if np.any(labels[idx] != track_truth[t]):
            raise InputError(f"validation track {t}: expected one class for all its crops, got {set(labels[idx])}")

    def evaluate(predictor: Predictor) -> dict[str, float]:
        lp = predictor.log_probs(items)
        crop_acc = float((lp.argmax(axis=1) == labels).mean())
        card = predictor.card
        right = sum(decide_track(lp[idx], card).class_id == track_truth[t] for t, idx in tracks.items())
        return {"crop_accuracy": crop_acc, "track_accuracy": right / len(tracks)}

    return evaluate


def _items_and_labels(
    tracks: Mapping[str, np.ndarray], human: Mapping[str, int], pseudo: Mapping[str, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    names = [*human, *pseudo]
    if not names:
        raise InputError("training set: expected at least one labelled track, got none")
    items = np.concatenate([tracks[t] for t in names])
    labels = np.concatenate([np.full(len(tracks[t]), {**pseudo, **human}[t], np.int64) for t in names])
    is_human = np.concatenate([np.full(len(tracks[t]), t in human) for t in names])
    return items, labels, is_human


def _check_start(tracks: Mapping[str, np.ndarray], labelled: Iterable[str]) -> list[str]:
    start = list(labelled)
    unknown = [t for t in start if t not in tracks]
    if unknown:
        raise InputError(f"initial tracks: expected ids of pool tracks, got {len(unknown)} unknown (e.g. {unknown[0]})")
    if not start:
        raise InputError("initial tracks: expected at least one labelled track, got none")
    return start


def run_active_learning(
    tracks: Mapping[str, np.ndarray],
    initial: Mapping[str, int],
    trainer: Trainer,
    reviewer: Reviewer,
    *,
    strategy: Strategy,
    k: int,
    rounds: int,
    evaluate: Evaluator,
    seed: int = 0,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> list[RoundRecord]:
    """Round 0 trains on ``initial``; each next round has the model decide every unlabelled track, sends ``k``
    of them (``strategy``) to ``reviewer``, adds the whole tracks with the reviewer's class, and retrains.

    Args:
        tracks: The pool: track id -> item indices (labelled and unlabelled tracks).
        initial: Track id -> class of the tracks labelled before the loop starts (human decisions).
        trainer: Fits a predictor on labelled items.
        reviewer: Returns the true class of a track (one human decision).
        strategy: ``uncertainty`` (lowest review priority first) or ``random``.
        k: Tracks reviewed per round (>= 1).
        rounds: Rounds after round 0 (>= 0); the loop stops early when no unlabelled track is left.
        evaluate: Scores each round's predictor on a fixed validation set.
        seed: Seeds the random selection.
        on_round: Called with each round's record as soon as it is done.

    Returns:
        One record per round, round 0 first.
    """
    if strategy not in ("uncertainty", "random"):
        raise InputError(f"selection strategy: expected 'uncertainty' or 'random', got {strategy!r}")
    if k < 1 or rounds < 0:
        raise InputError(f"active learning: expected k >= 1 and rounds >= 0, got k={k}, rounds={rounds}")
    human = {t: initial[t] for t in _check_start(tracks, initial)}
    rng = np.random.default_rng(seed)
    records: list[RoundRecord] = []
    predictor: Predictor | None = None
    for round_index in range(rounds + 1):
        started = time.perf_counter()
        if predictor is not None:
            unlabelled = {t: idx for t, idx in tracks.items() if t not in human}
            if not unlabelled:
                break
            if strategy == "uncertainty":
                picked = select_uncertain(decide_tracks(predictor, unlabelled), k)
            else:
                picked = select_random(unlabelled, k, rng)
            for t in picked:
                human[t] = int(reviewer(t))
        items, labels, is_human = _items_and_labels(tracks, human, {})
        predictor = trainer.fit(items, labels, is_human)
        record = RoundRecord(
            loop=strategy,
            round=round_index,
            human_decisions=len(human),
            labelled_crops=len(items),
            pseudo_tracks=0,
            new_pseudo_tracks=0,
            new_pseudo_precision=None,
            pseudo_precision=None,
            unlabelled_tracks=len(tracks) - len(human),
            figures=evaluate(predictor),
            seconds=round(time.perf_counter() - started, 3),
        )
        records.append(record)
        if on_round is not None:
            on_round(record)
    return records


def _precision(pseudo: Mapping[str, int], truth: Callable[[str], int] | None) -> float | None:
    if truth is None or not pseudo:
        return None
    return sum(truth(t) == c for t, c in pseudo.items()) / len(pseudo)


def run_self_training(
    tracks: Mapping[str, np.ndarray],
    labelled: Mapping[str, int],
    trainer: Trainer,
    *,
    threshold: float,
    rounds: int,
    evaluate: Evaluator | None = None,
    truth: Callable[[str], int] | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> list[RoundRecord]:
    """Round 0 trains on ``labelled``; each next round the model decides every still-unlabelled track, those at
    or above ``threshold`` (:func:`select_confident`) join the training set with all their crops, and it retrains.

    The human decisions stay ``len(labelled)``. The loop stops early when a round adds no track (converged) or
    none is left. ``truth`` (track -> true class), when known, gives the pseudo-label precision; it never
    influences the loop. ``evaluate`` scores each round (figures are empty without it).

    Returns:
        One record per round, round 0 first.
    """
    if rounds < 0 or not math.isfinite(threshold):
        raise InputError(f"self-training: expected rounds >= 0 and a finite threshold, got {rounds}, {threshold}")
    human = {t: labelled[t] for t in _check_start(tracks, labelled)}
    pseudo: dict[str, int] = {}
    name = f"selftrain@{threshold:g}"
    records: list[RoundRecord] = []
    new: dict[str, int] = {}
    predictor: Predictor | None = None
    for round_index in range(rounds + 1):
        started = time.perf_counter()
        if predictor is not None:
            unlabelled = {t: idx for t, idx in tracks.items() if t not in human and t not in pseudo}
            new = select_confident(decide_tracks(predictor, unlabelled), threshold) if unlabelled else {}
            if not new:
                break
            pseudo.update(new)
        items, labels, is_human = _items_and_labels(tracks, human, pseudo)
        predictor = trainer.fit(items, labels, is_human)
        record = RoundRecord(
            loop=name,
            round=round_index,
            human_decisions=len(human),
            labelled_crops=len(items),
            pseudo_tracks=len(pseudo),
            new_pseudo_tracks=len(new),
            new_pseudo_precision=_precision(new, truth),
            pseudo_precision=_precision(pseudo, truth),
            unlabelled_tracks=len(tracks) - len(human) - len(pseudo),
            figures=evaluate(predictor) if evaluate is not None else {},
            seconds=round(time.perf_counter() - started, 3),
        )
        records.append(record)
        if on_round is not None:
            on_round(record)
    return records
