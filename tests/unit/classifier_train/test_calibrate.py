from __future__ import annotations

import numpy as np
import pytest

from services.classifier.train.calibrate import (
    choose_reject_threshold,
    expected_calibration_error,
    fit_temperature,
    log_softmax,
)


def _sample(rng: np.random.Generator, n: int, k: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / temperature): T is the calibrating temperature."""
    logits = rng.normal(0, 3, (n, k))
    probs = np.exp(log_softmax(logits, temperature))
    labels = np.array([rng.choice(k, p=p) for p in probs])
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_true_temperature(true_t: float) -> None:
    logits, labels = _sample(np.random.default_rng(0), 4000, 5, true_t)
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.12)


def test_calibration_lowers_ece_of_overconfident_logits() -> None:
    logits, labels = _sample(np.random.default_rng(1), 4000, 5, 3.0)
    before = expected_calibration_error(np.exp(log_softmax(logits)), labels)
    after = expected_calibration_error(np.exp(log_softmax(logits, fit_temperature(logits, labels))), labels)
    assert after < before / 2


def test_ece_is_zero_for_exact_confidence_and_one_for_confident_mistakes() -> None:
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.0)
    assert expected_calibration_error(probs, np.array([1, 0])) == pytest.approx(1.0)


def test_reject_threshold_rejects_the_asked_share_of_good_signs() -> None:
    rng = np.random.default_rng(2)
    conf = rng.uniform(0.5, 1.0, 1000)
    probs = np.stack([conf, 1 - conf, np.zeros_like(conf)], axis=1)
    labels = np.zeros(1000, int)
    t = choose_reject_threshold(probs, labels, background=2, max_sign_rejection=0.01)
    assert 0.0 < (conf < t).mean() <= 0.01
