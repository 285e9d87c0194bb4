"""decide(), calibrated_log_probs() and Decisions."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from services.classifier.api import Decisions, calibrated_log_probs, decide
from services.common.classes import GTSRB_CLASS_NAMES, NOT_A_SIGN, UNKNOWN
from services.common.errors import InputError
from services.common.modelcard import ModelCard

K = len(GTSRB_CLASS_NAMES) + 1
BACKGROUND = K - 1


def card(**overrides) -> ModelCard:
    fields = {
        "name": "test",
        "version": "1",
        "task": "classifier",
        "architecture": "none",
        "class_names": (*GTSRB_CLASS_NAMES, NOT_A_SIGN),
        "input_hw": (64, 64),
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25),
        "background_class": BACKGROUND,
        "onnx_sha256": "0" * 64,
        **overrides,
    }
    return ModelCard(**fields)


def logprobs(rows: list[dict[int, float]]) -> np.ndarray:
    """Log-probs with the given class probabilities per row; the rest of each row's mass spread evenly."""
    out = np.empty((len(rows), K), np.float32)
    for i, probs in enumerate(rows):
        rest = (1 - sum(probs.values())) / (K - len(probs))
        p = np.full(K, rest)
        for class_id, prob in probs.items():
            p[class_id] = prob
        out[i] = np.log(p)
    return out


def test_decide_normal_background_and_threshold():
    lp = logprobs([{14: 0.9}, {BACKGROUND: 0.8}, {2: 0.4}, {2: 0.6}])
    decisions = decide(lp, card(reject_threshold=0.5))
    assert decisions.class_id.tolist() == [14, -1, -1, 2]
    assert decisions.unknown.tolist() == [False, True, True, False]
    np.testing.assert_allclose(decisions.confidence, [0.9, 0.8, 0.4, 0.6], rtol=1e-5)
    assert decisions.class_names(card()) == ["stop", UNKNOWN, UNKNOWN, "speed_limit_50"]
    assert decisions.class_id.dtype == np.int16
    assert decisions.confidence.dtype == np.float32
    assert decisions.unknown.dtype == np.bool_
    assert len(decisions) == 4


def test_decide_threshold_is_inclusive():
    decisions = decide(logprobs([{7: 0.5}]), card(reject_threshold=0.5))
    assert decisions.class_id.tolist() == [7]


def test_decide_without_background_class():
    decisions = decide(logprobs([{BACKGROUND: 0.9}]), card(background_class=None))
    assert decisions.class_id.tolist() == [BACKGROUND]
    assert decisions.class_names(card()) == [NOT_A_SIGN]


def test_decide_nan_is_unknown():
    lp = np.full((1, K), np.nan, np.float32)
    assert decide(lp, card()).class_id.tolist() == [-1]


def test_decide_empty_batch():
    decisions = decide(np.empty((0, K), np.float32), card())
    assert len(decisions) == 0
    assert decisions.class_names(card()) == []


@pytest.mark.parametrize(
    ("lp", "expectation"),
    [
        (np.zeros((2, K), np.float32), nullcontext()),
        (
            np.zeros((2, K - 1), np.float32),
            pytest.raises(InputError, match=rf"expected \(B, {K}\) float, got \(2, 43\)"),
        ),
        (np.zeros(K, np.float32), pytest.raises(InputError, match=r"got \(44,\)")),
        (np.zeros((2, K), np.int64), pytest.raises(InputError, match="int64")),
    ],
)
def test_decide_validates_input(lp, expectation):
    with expectation:
        decide(lp, card())


def test_decisions_columns_are_validated_and_read_only():
    with pytest.raises(InputError, match=r"confidence: expected \(2\) float32, got \(2,\) float64"):
        Decisions(np.zeros(2, np.int16), np.zeros(2), np.zeros(2, bool))
    decisions = Decisions(np.zeros(2, np.int16), np.zeros(2, np.float32), np.zeros(2, bool))
    with pytest.raises(ValueError, match="read-only"):
        decisions.class_id[0] = 1


@given(
    logits=hnp.arrays(np.float32, st.tuples(st.integers(1, 8), st.just(K)), elements=st.floats(-50, 50, width=32)),
    temperature=st.floats(0.05, 20),
)
def test_calibrated_log_probs_are_normalised(logits, temperature):
    lp = calibrated_log_probs(logits, temperature)
    assert lp.dtype == np.float32
    assert lp.shape == logits.shape
    np.testing.assert_allclose(np.exp(lp.astype(np.float64)).sum(axis=1), 1.0, rtol=1e-4)
    # Temperature scaling keeps the ranking (up to float32 ties): the top input is a top output.
    rows = np.arange(len(logits))
    np.testing.assert_array_equal(lp[rows, logits.argmax(axis=1)], lp.max(axis=1))


def test_temperature_flattens_the_distribution():
    logits = np.array([[2.0, 0.0, -1.0]], np.float32)
    p1 = np.exp(calibrated_log_probs(logits, 1.0))
    p2 = np.exp(calibrated_log_probs(logits, 2.0))
    expected2 = np.exp(logits / 2) / np.exp(logits / 2).sum()
    np.testing.assert_allclose(p2, expected2, rtol=1e-6)
    assert p2[0, 0] < p1[0, 0]


@given(lp=hnp.arrays(np.float32, st.tuples(st.integers(0, 6), st.just(K)), elements=st.floats(-30, 0, width=32)))
def test_decide_properties(lp):
    decisions = decide(lp, card(reject_threshold=0.3))
    assert decisions.unknown.tolist() == (decisions.class_id == -1).tolist()
    assert not np.any(decisions.class_id == BACKGROUND)
    known = ~decisions.unknown
    assert np.all(decisions.confidence[known] >= 0.3)
    np.testing.assert_array_equal(decisions.class_id[known], lp.argmax(axis=1)[known])
