"""Model cards: what a model file is, how to feed it, and how it was made.

A model is an ONNX file with a JSON card beside it (``model.onnx`` -> ``model.card.json``).
The card carries the preprocessing (input size, mean, std), the class names, calibration,
provenance (training data hash, parent version) and validation figures, and the sha256 of
the ONNX file, which is checked every time the model loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.errors import ModelError

__all__ = ["ModelCard", "atomic_write_bytes", "card_path_for", "file_sha256", "load_card", "verify_model_file"]


class ModelCard(BaseModel):
    """Description of one exported model version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    task: Literal["classifier", "detector"]
    architecture: str
    class_names: tuple[str, ...]
    input_hw: tuple[int, int] = Field(description="network input (height, width) in pixels")
    mean: tuple[float, float, float] = Field(description="per-channel RGB mean, on 0..1 pixel values")
    std: tuple[float, float, float] = Field(description="per-channel RGB std, on 0..1 pixel values")
    background_class: int | None = Field(None, description="index of the not-a-sign class, if any")
    temperature: float = Field(1.0, gt=0, description="logits are divided by this before softmax")
    reject_threshold: float = Field(0.0, ge=0, le=1, description="calibrated confidence below which -> unknown")
    auto_accept_threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="track confidence at or above which a track is accepted without review (chosen on the frozen "
        "set for a target precision; see metrics['frozen']['auto_accept']); None: every track is reviewed",
    )
    onnx_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    onnx_input: str = "images"
    onnx_output: str = "logits"
    parent_version: str | None = None
    training_data_sha256: str | None = None
    training: dict[str, Any] = Field(default_factory=dict, description="settings the model was trained with")
    metrics: dict[str, Any] = Field(default_factory=dict, description="validation figures")
    extra: dict[str, Any] = Field(default_factory=dict, description="task-specific fields (strides, anchors...)")

    @property
    def num_outputs(self) -> int:
        """Number of network outputs (class count, background included)."""
        return len(self.class_names)

    def save(self, path: Path) -> None:
        """Write the card as JSON, atomically."""
        atomic_write_bytes(path, (self.model_dump_json(indent=2) + "\n").encode())


def card_path_for(model_path: Path) -> Path:
    """``dir/name.onnx`` -> ``dir/name.card.json``."""
    return model_path.with_name(model_path.stem + ".card.json")


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def load_card(path: Path) -> ModelCard:
    """Read and validate a model card, raising ``ModelError`` with a clear reason."""
    if not path.is_file():
        raise ModelError(f"model card: expected a JSON file at {path}, found nothing")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model card {path}: expected JSON, got unparseable content ({exc})") from exc
    try:
        return ModelCard.model_validate(raw)
    except ValidationError as exc:
        raise ModelError(f"model card {path}: invalid ({exc.error_count()} errors): {exc}") from exc


def verify_model_file(model_path: Path, card: ModelCard) -> None:
    """Check that ``model_path`` exists and its sha256 is the one the card names."""
    if not model_path.is_file():
        raise ModelError(f"model file: expected an ONNX file at {model_path}, found nothing")
    digest = file_sha256(model_path)
    if digest != card.onnx_sha256:
        raise ModelError(
            f"model file {model_path}: expected sha256 {card.onnx_sha256} (from its card), got {digest}; "
            "the file is corrupt or does not belong to this card"
        )


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; the file is a normal, shareable output
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
