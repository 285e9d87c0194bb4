"""The classifier's frozen validation set: a committed manifest of files no training run may use, and its figures.

The manifest (``deploy/models/frozen/classifier.json``) names GTSRB validation tracks (each crop by path relative
to the GTSRB folder and sha256) and GTSDB scenes with not-a-sign boxes (scene path, sha256, boxes), plus the
sha256 of its own content (``manifest_sha256``), which every figure measured on it carries. No image data is
committed: the files are read from the data folder and checked against their sha256.

Training excludes every frozen file (by path inside a folder of the same source, and by sha256 anywhere, so a
copy in a reviewed dataset is excluded too); models are compared on it before a promotion. The figures here
judge tracks with :func:`services.classifier.tracks.decide_track`, the pipeline's rule. No torch here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from services.classifier.api import decide
from services.classifier.calibrate_tracks import choose_auto_accept_threshold
from services.classifier.tracks import decide_track
from services.common.errors import InputError
from services.common.frozen import frozen_manifest_path, manifest_sha256
from services.common.modelcard import ModelCard, atomic_write_bytes, file_sha256

__all__ = [
    "DATA_ENV_VAR",
    "FrozenCrops",
    "FrozenManifest",
    "default_data_root",
    "default_manifest_path",
    "evaluate_onnx_classifier",
    "frozen_figures",
    "load_frozen_crops",
    "load_manifest",
    "manifest_sha256",
    "save_manifest",
]

DATA_ENV_VAR = "ROADLABEL_DATA"
_SCHEMA = 1


def default_manifest_path(task: str = "classifier") -> Path:
    """``<repo>/deploy/models/frozen/<task>.json`` of the checkout this package runs from."""
    return frozen_manifest_path(task)


def default_data_root() -> Path:
    """``$ROADLABEL_DATA``, else the shared data folder beside the checkout (``<repo>/../shared/data``)."""
    env = os.environ.get(DATA_ENV_VAR)
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


@dataclass(frozen=True, slots=True)
class FrozenManifest:
    """A loaded, hash-checked frozen manifest (classifier or detector)."""

    path: Path
    body: dict[str, Any]

    @property
    def sha256(self) -> str:
        return str(self.body["manifest_sha256"])

    @property
    def task(self) -> str:
        return str(self.body["task"])

    def file_hashes(self) -> set[str]:
        """sha256 of every frozen file (crops and scenes)."""
        out = {f[1] for t in self.body.get("tracks", []) for f in t["files"]}
        out |= {s["sha256"] for s in self.body.get("scenes", [])}
        return out

    def gtsrb_paths(self) -> dict[str, str]:
        """Frozen crop path (relative to the GTSRB folder) -> its track id."""
        return {f[0]: t["track"] for t in self.body.get("tracks", []) for f in t["files"]}

    def scene_names(self) -> set[str]:
        """Frozen scene paths (relative to the GTSDB folder)."""
        return {s["file"] for s in self.body.get("scenes", [])}


def save_manifest(path: Path, body: dict[str, Any]) -> FrozenManifest:
    """Write a manifest with its ``manifest_sha256``, atomically."""
    body = dict(body) | {"schema": _SCHEMA}
    body["manifest_sha256"] = manifest_sha256(body)
    atomic_write_bytes(path, (json.dumps(body, indent=None, separators=(",", ":"), sort_keys=True) + "\n").encode())
    return FrozenManifest(path, body)


def load_manifest(path: Path, task: str | None = None) -> FrozenManifest:
    """Read a frozen manifest and check its own hash (and its task).

    Raises:
        InputError: missing, unparseable, of another task, or changed since it was written.
    """
    if not path.is_file():
        raise InputError(f"frozen set: expected a manifest JSON file at {path}, found nothing")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"frozen set {path}: expected JSON, got unparseable content ({exc})") from exc
    if not isinstance(body, dict) or body.get("schema") != _SCHEMA:
        raise InputError(f"frozen set {path}: expected a manifest object with schema {_SCHEMA}")
    if task is not None and body.get("task") != task:
        raise InputError(f"frozen set {path}: expected a {task} manifest, got task {body.get('task')!r}")
    want = manifest_sha256(body)
    if body.get("manifest_sha256") != want:
        raise InputError(
            f"frozen set {path}: expected manifest_sha256 {want[:12]} (hash of its content), got "
            f"{str(body.get('manifest_sha256'))[:12]}; the manifest was edited, and a frozen set must not change"
        )
    return FrozenManifest(path, body)


@dataclass(frozen=True, slots=True)
class FrozenCrops:
    """The classifier's frozen crops: ``crops`` (list of (h, w, 3) uint8), ``labels`` (N,) int64 (background =
    ``background_class``), ``groups`` (N,) str (GTSRB track id; ``bg:<scene>:<n>`` for background crops)."""

    crops: list[np.ndarray]
    labels: np.ndarray
    groups: np.ndarray
    manifest: FrozenManifest


def _read_checked(path: Path, want: str) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"frozen set: expected the file {path}, found nothing (is the data root right?)")
    got = file_sha256(path)
    if got != want:
        raise InputError(f"frozen set: expected {path} with sha256 {want[:12]}, got {got[:12]}")
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def load_frozen_crops(
    manifest: FrozenManifest,
    data_root: Path,
    background_class: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> FrozenCrops:
    """Read every frozen crop from ``data_root`` (checking each file's sha256) and cut the background boxes."""
    body = manifest.body
    gtsrb = data_root / body["gtsrb_dir"]
    gtsdb = data_root / body["gtsdb_dir"]
    crops: list[np.ndarray] = []
    labels: list[int] = []
    groups: list[str] = []
    total = len(body["tracks"]) + len(body["scenes"])
    done = 0
    for track in body["tracks"]:
        for rel, sha in track["files"]:
            crops.append(_read_checked(gtsrb / rel, sha))
            labels.append(int(track["class_id"]))
            groups.append(str(track["track"]))
        done += 1
        if on_progress is not None:
            on_progress(done, total)
    for scene in body["scenes"]:
        image = _read_checked(gtsdb / scene["file"], scene["sha256"])
        for n, (x1, y1, x2, y2) in enumerate(scene["boxes"]):
            crops.append(image[y1:y2, x1:x2])
            labels.append(background_class)
            groups.append(f"bg:{scene['file']}:{n}")
        done += 1
        if on_progress is not None:
            on_progress(done, total)
    return FrozenCrops(crops, np.asarray(labels, np.int64), np.asarray(groups), manifest)


def frozen_figures(
    logprobs: np.ndarray,
    frozen: FrozenCrops,
    card: ModelCard,
    auto_accept_precision: float = 0.99,
) -> dict[str, Any]:
    """Figures of a model on the frozen set, from its calibrated (N, K) log-probabilities and its card.

    Crop level: ``sign_accuracy`` (top class of all K, over sign crops), ``sign_accuracy_after_reject``,
    ``background_rejection`` (background crops decided unknown), ``nll`` and ``ece`` (calibrated). Track level,
    with :func:`decide_track` over each GTSRB track's crops: ``track_accuracy`` (decided class is the true one;
    unknown counts as wrong) and ``track_unknown_rate``. ``auto_accept``: the lowest track confidence at which
    accepted tracks reach ``auto_accept_precision``, each background crop counting as a one-crop track (accepting
    one as a sign is a wrong acceptance); its ``coverage`` is the share of sign tracks accepted.
    """
    labels, groups = frozen.labels, frozen.groups
    if logprobs.shape != (len(labels), card.num_outputs):
        raise InputError(
            f"frozen log-probabilities: expected ({len(labels)}, {card.num_outputs}), got {logprobs.shape}"
        )
    lp = logprobs.astype(np.float32, copy=False)
    bg = card.background_class
    is_sign = labels != bg
    top = lp.argmax(axis=1)
    dec = decide(lp, card)
    probs = np.exp(lp.astype(np.float64))
    nll = float(-lp[np.arange(len(labels)), labels].astype(np.float64).mean())
    figures: dict[str, Any] = {
        "manifest_sha256": frozen.manifest.sha256,
        "sign_crops": int(is_sign.sum()),
        "background_crops": int((~is_sign).sum()),
        "sign_accuracy": float((top[is_sign] == labels[is_sign]).mean()) if is_sign.any() else math.nan,
        "sign_accuracy_after_reject": float((dec.class_id[is_sign] == labels[is_sign]).mean())
        if is_sign.any()
        else math.nan,
        "background_rejection": float(dec.unknown[~is_sign].mean()) if (~is_sign).any() else math.nan,
        "nll": nll,
        "ece": _ece(probs, labels),
    }
    conf: list[float] = []
    correct: list[bool] = []
    named: list[bool] = []
    sign_tracks = sorted(set(groups[is_sign].tolist()))
    for track in sign_tracks:
        rows = np.flatnonzero(groups == track)
        d = decide_track(lp[rows], card)
        conf.append(d.confidence)
        correct.append(d.class_id == int(labels[rows[0]]))
        named.append(d.class_id >= 0)
    n_tracks = len(sign_tracks)
    figures["tracks"] = n_tracks
    figures["track_accuracy"] = float(np.mean(correct)) if n_tracks else math.nan
    figures["track_unknown_rate"] = float(1 - np.mean(named)) if n_tracks else math.nan
    # The threshold must hold for the tracks the pipeline makes, which can be a few small, blurred crops of a
    # distant sign, not ten clean GTSRB views: every sign crop also counts as a one-crop track (harder, and 10x
    # more of them, so 99 % is measured on ~2,000 decisions instead of ~200), and every background crop as a
    # one-crop track that must not be accepted as a sign.
    for i in np.flatnonzero(is_sign):
        d = decide_track(lp[i : i + 1], card)
        conf.append(d.confidence)
        correct.append(d.class_id == int(labels[i]))
        named.append(d.class_id >= 0)
    for i in np.flatnonzero(~is_sign):
        d = decide_track(lp[i : i + 1], card)
        conf.append(d.confidence)
        correct.append(d.class_id < 0)
        named.append(d.class_id >= 0)
    chosen = choose_auto_accept_threshold(
        np.asarray(conf), np.asarray(correct), np.asarray(named), auto_accept_precision
    )
    if chosen is None:
        figures["auto_accept"] = {"threshold": None, "target_precision": auto_accept_precision}
    else:
        track_conf = np.asarray(conf[:n_tracks])
        accepted = (track_conf >= chosen.threshold) & np.asarray(named[:n_tracks])
        right = accepted & np.asarray(correct[:n_tracks])
        figures["auto_accept"] = chosen.as_dict() | {
            "coverage": int(accepted.sum()) / n_tracks if n_tracks else math.nan,
            "coverage_all": chosen.coverage,
            "track_precision": int(right.sum()) / int(accepted.sum()) if accepted.any() else math.nan,
            "precision_lower_95": wilson_lower(chosen.precision, chosen.accepted),
            "decisions": "full tracks + single sign crops + background crops",
        }
    return figures


def evaluate_onnx_classifier(
    model_path: Path,
    manifest: FrozenManifest,
    data_root: Path,
    *,
    card: ModelCard | None = None,
    auto_accept_precision: float = 0.99,
    frozen: FrozenCrops | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Frozen figures of an ONNX classifier (loaded and checked like the pipeline loads it)."""
    from services.classifier.onnx import OnnxClassifier  # noqa: PLC0415 - loads ONNX Runtime only when asked

    model = OnnxClassifier(model_path, card)
    crops = frozen or load_frozen_crops(manifest, data_root, int(model.card.background_class or 0), on_progress)
    parts = [model.classify(crops.crops[i : i + 256]) for i in range(0, len(crops.crops), 256)]
    return frozen_figures(np.concatenate(parts), crops, model.card, auto_accept_precision)


def wilson_lower(p: float, n: int, z: float = 1.645) -> float:
    """One-sided 95 % Wilson lower bound of a proportion ``p`` measured on ``n`` trials."""
    if n <= 0:
        return math.nan
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - margin) / (1 + z * z / n)


def _ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    return float(
        sum(
            abs(correct[which == b].mean() - conf[which == b].mean()) * (which == b).mean()
            for b in range(bins)
            if (which == b).any()
        )
    )
