"""The reviewed-label-file cache gives exactly what replaying every decision on the file gives."""

from __future__ import annotations

import os

import numpy as np
import pytest

from gateway.review_cache import BoxIndex, ReviewedCache
from services.common.labelfile import ReviewAction, apply_review, load_label_file, save_label_file
from tests.unit.gateway.test_label_exports import label_file, track


def rows(*actions: dict[str, object]) -> list[dict[str, object]]:
    return [{"id": i + 1, "action": {"by": "r", "at": "2026-01-01T00:00:00Z", **a}} for i, a in enumerate(actions)]


def replay(path, actions) -> object:
    return apply_review(load_label_file(path), [ReviewAction.model_validate(a["action"]) for a in actions])


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "rec.labels.json"
    save_label_file(p, label_file(track(1, [0, 1, 2, 3]), track(2, [2, 3, 4, 5, 6]), track(3, [8, 9, 10])))
    return p


def test_incremental_decisions_equal_a_full_replay(path):
    cache = ReviewedCache()
    steps = rows(
        {"action": "accept", "track_id": 1},
        {"action": "split", "track_id": 2, "frame": 4},
        {"action": "relabel", "track_id": 4, "class_id": 14},
        {"action": "merge", "track_id": 3, "other_track_id": 4},
        {"action": "reject", "track_id": 2},
    )
    for n in range(len(steps) + 1):
        assert cache.reviewed(path, steps[:n]) == replay(path, steps[:n])
    # An undo (a shorter list) and a different history after it are right too.
    assert cache.reviewed(path, steps[:2]) == replay(path, steps[:2])
    other = [
        *steps[:2],
        {"id": 99, "action": {"by": "r", "at": "2026-01-01T00:00:00Z", "action": "accept", "track_id": 3}},
    ]
    assert cache.reviewed(path, other) == replay(path, other)


def test_a_rewritten_file_is_read_again(path):
    cache = ReviewedCache()
    before = cache.reviewed(path, [])
    save_label_file(path, label_file(track(7, [0, 1])))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    after = cache.reviewed(path, [])
    assert [t.track_id for t in before.tracks] == [1, 2, 3]
    assert [t.track_id for t in after.tracks] == [7]


def test_box_windows_equal_a_scan_of_every_box(path):
    cache = ReviewedCache()
    actions = rows({"action": "split", "track_id": 2, "frame": 4})
    labels = cache.reviewed(path, actions)
    index = cache.boxes(path, actions)
    assert cache.boxes(path, actions) is index  # kept
    everything = [(b.t_s, t.track_id) for t in labels.tracks for b in t.boxes]
    for lo, hi in [(0.0, 100.0), (0.05, 0.2), (0.3, 0.3), (5.0, 6.0)]:
        got = index.between(lo, hi)
        want = sorted((t, tid) for t, tid in everything if lo <= t <= hi)
        assert [(b["t_s"], b["track_id"]) for b in got] == want
    assert BoxIndex.of(label_file()).between(0, 1) == []
    assert np.all(np.diff(index.t_s) >= 0)
