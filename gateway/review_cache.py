"""Reviewed label files kept in memory while neither the file nor its decisions change.

A 2-hour recording's label file is megabytes of JSON; the reviewer page asks for its timeline, its queue and a
window of boxes many times a minute. Parsing and validating the file, and replaying every decision, on each of
those requests would make scrubbing and deciding slow in proportion to the recording's length. This cache keeps,
per label file (keyed by path, size and mtime, so a rewritten file is read again):

- the machine's label file, parsed once;
- the reviewed label file for the latest list of decisions; a new decision is applied on top of the cached result
  instead of replaying them all (replay is sequential, so the result is the same), and an undo finds its earlier
  state in the cache;
- a time index of every box, so a window of boxes is two binary searches and a slice.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.common.labelfile import LabelFile, ReviewAction, apply_review, load_label_file

__all__ = ["BoxIndex", "ReviewedCache"]


@dataclass(frozen=True, slots=True)
class BoxIndex:
    """Every box of a label file sorted by time, as columns."""

    t_s: np.ndarray  # (N,) float64, sorted
    track_id: np.ndarray  # (N,) int64
    frame: np.ndarray  # (N,) int64
    xyxy: np.ndarray  # (N, 4) float64
    score: np.ndarray  # (N,) float64

    @staticmethod
    def of(labels: LabelFile) -> BoxIndex:
        rows = [(b.t_s, t.track_id, b.frame, *b.xyxy, b.score) for t in labels.tracks for b in t.boxes]
        table = np.array(rows, np.float64).reshape(-1, 8)
        table = table[np.lexsort((table[:, 1], table[:, 0]))]
        return BoxIndex(
            t_s=table[:, 0].copy(),
            track_id=table[:, 1].astype(np.int64),
            frame=table[:, 2].astype(np.int64),
            xyxy=table[:, 3:7].copy(),
            score=table[:, 7].copy(),
        )

    def between(self, from_s: float, to_s: float) -> list[dict[str, Any]]:
        """The boxes with ``from_s <= t_s <= to_s``, in time order."""
        lo = int(np.searchsorted(self.t_s, from_s, side="left"))
        hi = int(np.searchsorted(self.t_s, to_s, side="right"))
        return [
            {
                "track_id": int(self.track_id[i]),
                "frame": int(self.frame[i]),
                "t_s": float(self.t_s[i]),
                "xyxy": [float(v) for v in self.xyxy[i]],
                "score": float(self.score[i]),
            }
            for i in range(lo, hi)
        ]


@dataclass(slots=True)
class _Entry:
    machine: LabelFile
    # Reviewed states by the ids of the decisions applied, most recent last (a few, for undo).
    reviewed: OrderedDict[tuple[int, ...], LabelFile]
    boxes: dict[tuple[int, ...], BoxIndex]


class ReviewedCache:
    """Thread-safe cache of machine and reviewed label files (see the module's docstring).

    Args:
        files: How many label files to keep.
        states_per_file: How many reviewed states to keep per file (undo steps served without replay).
    """

    def __init__(self, files: int = 4, states_per_file: int = 8) -> None:
        self._files = files
        self._states = states_per_file
        self._entries: OrderedDict[tuple[str, int, int], _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def _entry(self, path: Path) -> _Entry:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
        machine = load_label_file(path)  # outside the lock: parsing a big file must not block other files
        entry = _Entry(machine, OrderedDict(), {})
        with self._lock:
            entry = self._entries.setdefault(key, entry)
            while len(self._entries) > self._files:
                self._entries.popitem(last=False)
        return entry

    def reviewed(self, path: Path, actions: list[dict[str, Any]]) -> LabelFile:
        """The label file at ``path`` with ``actions`` (stored rows: ``id`` and ``action``) applied in order."""
        entry = self._entry(path)
        ids = tuple(int(a["id"]) for a in actions)
        with self._lock:
            hit = entry.reviewed.get(ids)
            if hit is not None:
                entry.reviewed.move_to_end(ids)
                return hit
            # The longest cached prefix of these decisions (the previous state, after a new decision).
            base_ids: tuple[int, ...] = ()
            base = entry.machine
            for known, labels in entry.reviewed.items():
                if len(known) > len(base_ids) and ids[: len(known)] == known:
                    base_ids, base = known, labels
        rest = [ReviewAction.model_validate(a["action"]) for a in actions[len(base_ids) :]]
        labels = apply_review(base, rest) if rest or not base_ids else base
        with self._lock:
            entry.reviewed[ids] = labels
            while len(entry.reviewed) > self._states:
                old, _ = entry.reviewed.popitem(last=False)
                entry.boxes.pop(old, None)
        return labels

    def boxes(self, path: Path, actions: list[dict[str, Any]]) -> BoxIndex:
        """The time index of the reviewed label file's boxes."""
        labels = self.reviewed(path, actions)
        entry = self._entry(path)
        ids = tuple(int(a["id"]) for a in actions)
        with self._lock:
            index = entry.boxes.get(ids)
        if index is None:
            index = BoxIndex.of(labels)
            with self._lock:
                if ids in entry.reviewed:  # not already evicted: keep it with its state
                    entry.boxes[ids] = index
        return index
