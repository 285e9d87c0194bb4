"""Where the deployed detector model lives."""

from __future__ import annotations

from pathlib import Path

__all__ = ["default_detector_path"]


def default_detector_path() -> Path:
    """``<repo>/deploy/models/detector.onnx`` of the checkout this package runs from.

    Computed from this file's location, so it holds for an editable install (the project's way); a wheel install
    has no ``deploy/`` and must be given a model path instead. Its card is beside it (``detector.card.json``).
    Entry points may let an environment variable override it; this function reads none.
    """
    return Path(__file__).resolve().parents[2] / "deploy" / "models" / "detector.onnx"
