"""The auto-accept threshold: the lowest track confidence whose accepted tracks reach the target precision."""

from __future__ import annotations

import numpy as np
import pytest

from services.classifier.calibrate_tracks import choose_auto_accept_threshold
from services.common.errors import InputError


def test_lowest_threshold_reaching_the_target() -> None:
    # 100 tracks: the 10 least confident contain 5 errors, the rest are right.
    conf = np.linspace(0.3, 0.999, 100)
    correct = np.ones(100, bool)
    correct[[0, 2, 4, 6, 8]] = False
    named = np.ones(100, bool)
    got = choose_auto_accept_threshold(conf, correct, named, 0.99)
    assert got is not None
    accepted = conf >= got.threshold
    assert correct[accepted].mean() >= 0.99
    # One step lower would fall below the target.
    lower = conf >= conf[conf < got.threshold].max()
    assert correct[lower].mean() < 0.99
    assert got.accepted == int(accepted.sum())
    assert got.coverage == pytest.approx(accepted.mean())
    assert got.precision == pytest.approx(correct[accepted].mean())


def test_ties_are_accepted_together_and_unnamed_tracks_never() -> None:
    conf = np.array([0.9, 0.9, 0.8, 0.95])
    correct = np.array([True, False, True, True])
    named = np.array([True, True, True, False])
    # At 0.9 both tied tracks are accepted (precision 1/2): no threshold reaches 0.99 below 0.95, and the 0.95
    # track names no sign, so nothing can be accepted.
    assert choose_auto_accept_threshold(conf, correct, named, 0.99) is None
    got = choose_auto_accept_threshold(conf, correct, named, 0.6)
    assert got is not None
    assert got.threshold == pytest.approx(0.8)
    assert got.precision == pytest.approx(2 / 3)


def test_bad_input_is_refused() -> None:
    with pytest.raises(InputError, match="expected three"):
        choose_auto_accept_threshold(np.ones(3), np.ones(2, bool), np.ones(3, bool))
    with pytest.raises(InputError, match="target precision"):
        choose_auto_accept_threshold(np.ones(3), np.ones(3, bool), np.ones(3, bool), 1.5)
