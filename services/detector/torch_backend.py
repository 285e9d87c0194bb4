"""``TorchDetector``: the detector's GPU fallback on PyTorch, for machines with CUDA but no TensorRT.

It runs the training checkpoint (``checkpoint.pt``) through the same served graph that is exported to ONNX
(``services.detector.train.model.load_inference_model``), with FP16 autocast on CUDA, and shares letterboxing and
decoding with the other backends. torch and the training package are imported only when a ``TorchDetector`` is
created, so importing this module needs neither (the serving path runs without torch, STYLE.md section 1). On CPU
it is slower than ``OnnxDetector``; the CPU mode exists for tests and for checking a checkpoint against its export.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from services.common.errors import ModelError
from services.common.modelcard import ModelCard
from services.common.types import Detections, Frame
from services.detector.api import DetectorSettings
from services.detector.postprocess import DetectorSpec, decode, letterbox

__all__ = ["TorchDetector"]

log = logging.getLogger(__name__)

_MISSING = "torch backend: expected torch and the detector's training code (the train extra), got an import error"


class TorchDetector:
    """A ``Detector`` running the training checkpoint on PyTorch.

    The checkpoint has no sha256 in the card (the card's is the ONNX file's), so only its keys and shapes are
    checked, by ``load_state_dict(strict=True)``; the card supplies the preprocessing, stride and thresholds.

    Args:
        checkpoint_path: ``checkpoint.pt`` written by the detector's training (EMA weights under ``"model"``).
        card: The card of the model exported from that checkpoint (``detector.card.json``).
        settings: Batching and decoding; fields left None take the card's values.
        device: A torch device string; None picks "cuda" when available, else "cpu".
        fp16: Run under FP16 autocast; None means on CUDA only (CPU autocast to FP16 is slow and inexact).

    Raises:
        ModelError: torch or the training code is missing, the card is not a detector's, or the checkpoint is
            missing or does not fit the network.
    """

    def __init__(
        self,
        checkpoint_path: Path,
        card: ModelCard,
        *,
        settings: DetectorSettings | None = None,
        device: str | None = None,
        fp16: bool | None = None,
    ) -> None:
        try:
            # Lazy on purpose: this module must import without torch (pyproject.toml's import-linter contract
            # names this one exception).
            import torch

            from services.detector.train.model import load_inference_model
        except ImportError as exc:
            raise ModelError(f"{_MISSING}: {exc}") from exc
        self._torch = torch
        self._card = card
        self._spec = DetectorSpec.from_card(card, settings)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._fp16 = self._device.type == "cuda" if fp16 is None else fp16
        if not checkpoint_path.is_file():
            raise ModelError(f"torch backend: expected a checkpoint file at {checkpoint_path}, found nothing")
        try:
            self._model = load_inference_model(checkpoint_path, self._device)
        except (KeyError, RuntimeError, ValueError, OSError) as exc:  # torch.load / load_state_dict failures
            raise ModelError(
                f"{checkpoint_path}: expected a detector training checkpoint that fits the network, got: {exc}"
            ) from exc
        log.info(
            "detector loaded",
            extra={"checkpoint": str(checkpoint_path), "device": str(self._device), "fp16": self._fp16},
        )

    @property
    def card(self) -> ModelCard:
        """The card of the exported model."""
        return self._card

    def detect(self, frames: Sequence[Frame]) -> list[Detections]:
        """Detect signs in frames of any size; see ``Detector.detect``."""
        torch, spec = self._torch, self._spec
        results: list[Detections] = []
        for start in range(0, len(frames), spec.batch_size):
            chunk = frames[start : start + spec.batch_size]
            batch, scales = letterbox([f.image for f in chunk], spec.input_hw, spec.mean, spec.std)
            x = torch.from_numpy(batch).to(self._device, non_blocking=True)
            with (
                torch.inference_mode(),
                torch.autocast(self._device.type, dtype=torch.float16, enabled=self._fp16),
            ):
                heatmap, boxes = self._model(x)
            heatmap_np = heatmap.float().cpu().numpy()
            boxes_np = boxes.float().cpu().numpy()
            decoded = decode(heatmap_np, boxes_np, scales, [f.hw for f in chunk], spec)
            for frame, (xyxy, score) in zip(chunk, decoded, strict=True):
                results.append(Detections(frame.ref, xyxy, score, np.zeros(len(score), np.int16)))
        return results
