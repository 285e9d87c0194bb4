"""The detector's frozen validation set: committed manifest of GTSDB scenes (path, sha256, boxes) and its figures.

The committed detector's own validation scenes (``card.extra['val_images']``), so it was never trained on them.
Training with ``--base`` leaves every frozen scene out (by name in a folder of the frozen source, and by sha256
anywhere); promotions compare AP50 and recall at the operating point on it. No torch here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from services.common.errors import InputError
from services.common.frozen import frozen_manifest_path, manifest_sha256
from services.common.modelcard import ModelCard, atomic_write_bytes, file_sha256
from services.common.types import Frame, FrameRef
from services.detector.api import DetectorSettings
from services.detector.metrics import DetectionEvaluator, GroundTruth, read_gtsdb_gt

__all__ = [
    "build_detector_manifest",
    "default_manifest_path",
    "evaluate_onnx_detector",
    "frozen_scene_filter",
    "load_detector_manifest",
]

_SCHEMA = 1


def default_manifest_path() -> Path:
    """``<repo>/deploy/models/frozen/detector.json`` of the checkout this package runs from."""
    return frozen_manifest_path("detector")


def build_detector_manifest(
    out: Path, gtsdb_root: Path, names: Sequence[str], model_version: str | None
) -> dict[str, Any]:
    """Write the manifest of scenes ``names`` of ``gtsdb_root`` (sha256 and ground-truth boxes of each)."""
    gt = read_gtsdb_gt(gtsdb_root / "gt.txt")
    scenes = []
    for name in sorted(names):
        path = gtsdb_root / name
        if not path.is_file():
            raise InputError(f"frozen detector set: expected scene {path}, found nothing")
        truth = gt.get(name, GroundTruth.empty())
        scenes.append(
            {
                "file": name,
                "sha256": file_sha256(path),
                "boxes": truth.xyxy.astype(float).tolist(),
                "class_id": truth.class_id.astype(int).tolist(),
            }
        )
    body: dict[str, Any] = {
        "schema": _SCHEMA,
        "task": "detector",
        "description": "GTSDB validation scenes of the committed detector's own split; never train on these",
        "gtsdb_dir": gtsdb_root.name,
        "split": {"model_version": model_version, "from": "card.extra.val_images"},
        "scenes": scenes,
    }
    body["manifest_sha256"] = manifest_sha256(body)
    atomic_write_bytes(out, (json.dumps(body, separators=(",", ":"), sort_keys=True) + "\n").encode())
    return body


def load_detector_manifest(path: Path) -> dict[str, Any]:
    """Read the detector's frozen manifest and check its own hash.

    Raises:
        InputError: missing, not a detector manifest, or edited since it was written.
    """
    if not path.is_file():
        raise InputError(f"frozen set: expected a manifest JSON file at {path}, found nothing")
    body = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(body, dict) or body.get("task") != "detector" or body.get("schema") != _SCHEMA:
        raise InputError(f"frozen set {path}: expected a detector manifest with schema {_SCHEMA}")
    if body.get("manifest_sha256") != manifest_sha256(body):
        raise InputError(f"frozen set {path}: its manifest_sha256 does not match its content; it was edited")
    return body


def frozen_scene_filter(manifest: dict[str, Any]) -> Callable[[Path, Path], bool]:
    """A predicate ``(gtsdb_root, scene_path) -> True when the scene is frozen`` (by name in a folder of the
    frozen source, or by sha256 anywhere)."""
    shas = {s["sha256"] for s in manifest["scenes"]}
    names = {s["file"] for s in manifest["scenes"]}
    source = manifest["gtsdb_dir"]

    def is_frozen(root: Path, scene: Path) -> bool:
        if root.name == source and scene.relative_to(root).as_posix() in names:
            return True
        return file_sha256(scene) in shas

    return is_frozen


def evaluate_onnx_detector(
    model_path: Path,
    manifest: dict[str, Any],
    data_root: Path,
    *,
    card: ModelCard | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Frozen figures of an ONNX detector: AP50 (all scores down to 0.01) and figures at its operating point."""
    from services.detector.onnx import OnnxDetector  # noqa: PLC0415 - loads ONNX Runtime only when asked

    model = OnnxDetector(model_path, card, settings=DetectorSettings(score_threshold=0.01, batch_size=2))
    threshold = float(model.card.extra.get("score_threshold", 0.5))
    evaluator = DetectionEvaluator(threshold=threshold)
    root = data_root / manifest["gtsdb_dir"]
    for i, scene in enumerate(manifest["scenes"]):
        path = root / scene["file"]
        if not path.is_file() or file_sha256(path) != scene["sha256"]:
            raise InputError(
                f"frozen set: expected {path} with sha256 {scene['sha256'][:12]}, found it missing or changed"
            )
        with Image.open(path) as img:
            image = np.asarray(img.convert("RGB"))
        det = model.detect([Frame(FrameRef("frozen", i, 0.0), image)])[0]
        truth = GroundTruth(
            np.asarray(scene["boxes"], np.float32).reshape(-1, 4), np.asarray(scene["class_id"], np.int16)
        )
        evaluator.add(det.xyxy, det.score, truth)
        if on_progress is not None:
            on_progress(i + 1, len(manifest["scenes"]))
    report = evaluator.report()
    return {
        "manifest_sha256": manifest["manifest_sha256"],
        "images": report.images,
        "boxes": report.gt_signs,
        "ap50": report.ap50,
        "threshold": report.threshold,
        "recall": report.recall,
        "precision": report.precision,
        "fp_per_image": report.fp_per_image if not math.isnan(report.fp_per_image) else None,
    }
