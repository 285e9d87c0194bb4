"""Confidence calibration: temperature scaling, expected calibration error, reject threshold. Numpy only."""

from __future__ import annotations

import numpy as np

__all__ = ["choose_reject_threshold", "expected_calibration_error", "fit_temperature", "log_softmax"]


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N, K) logits -> (N, K) float64 log-probabilities of ``softmax(logits / temperature)``."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    out: np.ndarray = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return out


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    return float(-log_softmax(logits, temperature)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimising the validation negative log-likelihood (golden-section search on log T)."""
    lo, hi = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = _nll(logits, labels, np.exp(a)), _nll(logits, labels, np.exp(b))
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = _nll(logits, labels, np.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = _nll(logits, labels, np.exp(b))
    return float(np.exp((lo + hi) / 2))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-1 confidence: sum over equal-width bins of |accuracy - confidence| x bin share."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def choose_reject_threshold(probs: np.ndarray, labels: np.ndarray, background: int, max_sign_rejection: float) -> float:
    """Largest confidence threshold that rejects at most ``max_sign_rejection`` of the correctly named signs.

    Crops below it are reported as unknown rather than as a confident wrong class.
    """
    top = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    good = (labels != background) & (top == labels)
    if not good.any():
        return 0.0
    return float(np.quantile(conf[good], max_sign_rejection, method="lower"))
