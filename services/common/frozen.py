"""What the classifier's and the detector's frozen validation sets share: where the committed manifests live and
how a manifest's own hash is computed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = ["frozen_manifest_path", "manifest_sha256"]


def frozen_manifest_path(task: str) -> Path:
    """``<repo>/deploy/models/frozen/<task>.json`` of the checkout this package runs from."""
    return Path(__file__).resolve().parents[2] / "deploy" / "models" / "frozen" / f"{task}.json"


def manifest_sha256(body: dict[str, Any]) -> str:
    """sha256 of a manifest's canonical JSON, without its own ``manifest_sha256`` field."""
    content = {k: v for k, v in body.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
