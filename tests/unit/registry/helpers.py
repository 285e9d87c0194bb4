"""Tiny fake model versions for registry tests: an arbitrary 'ONNX' file and a valid card naming its sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from services.common.modelcard import ModelCard

MANIFEST = "a" * 64


def classifier_figures(track: float, crop: float, background: float, manifest: str = MANIFEST) -> dict[str, Any]:
    return {
        "manifest_sha256": manifest,
        "track_accuracy": track,
        "sign_accuracy": crop,
        "background_rejection": background,
        "auto_accept": {"threshold": 0.9, "coverage": 0.5},
    }


def make_model(
    folder: Path,
    task: str,
    version: str,
    frozen: dict[str, Any] | None = None,
    parent: str | None = None,
    payload: bytes | None = None,
) -> Path:
    """Write ``folder/<task>.onnx`` (arbitrary bytes) and its card; return the model path."""
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / f"{task}.onnx"
    data = payload if payload is not None else f"model {task} {version}".encode()
    model.write_bytes(data)
    card = ModelCard(
        name=f"test-{task}",
        version=version,
        task=task,
        architecture="test",
        class_names=("a", "b"),
        input_hw=(8, 8),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        onnx_sha256=hashlib.sha256(data).hexdigest(),
        parent_version=parent,
        metrics={} if frozen is None else {"frozen": frozen},
        extra={"created": f"2026-01-01T00:00:{len(version):02d}"},
    )
    card.save(folder / f"{task}.card.json")
    return model
