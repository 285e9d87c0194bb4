"""The detector seam: a ``Detector`` protocol and the settings every backend takes.

Every backend (``OnnxDetector``, ``TensorRTDetector``, ``TorchDetector``, an HTTP client, test fakes) takes a batch
of frames and returns one ``Detections`` per frame, in the same order, with boxes in the pixels of each frame. The
preprocessing and the decoding they share live in ``services.detector.postprocess``. No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from services.common.modelcard import ModelCard
from services.common.types import Detections, Frame

__all__ = ["Detector", "DetectorSettings"]


class Detector(Protocol):
    """Finds candidate traffic signs in whole frames."""

    @property
    def card(self) -> ModelCard:
        """The model's card: input size, mean/std, stride, output names, default thresholds."""
        ...

    def detect(self, frames: Sequence[Frame]) -> list[Detections]:
        """Detect signs in a batch of frames.

        Args:
            frames: B frames, each (H, W, 3) uint8 RGB of any size; sizes may differ within a batch.

        Returns:
            B ``Detections``, item i for ``frames[i]`` (``frame`` = ``frames[i].ref``): ``xyxy`` (N, 4) float32 in
            pixels of that frame, clipped to it; ``score`` (N,) float32 in [0, 1], highest first; ``class_id`` (N,)
            int16 zeros (the card's only class, ``"traffic_sign"``).
        """
        ...


class DetectorSettings(BaseModel):
    """How a detector backend batches and decodes; a field left None takes the card's value.

    Attributes:
        score_threshold: Keep heatmap peaks with at least this score (None: ``card.extra["score_threshold"]``).
        nms_iou: Of two boxes overlapping by more than this IoU, drop the lower-scored one
            (None: ``card.extra["nms_iou"]``).
        max_detections: Most boxes per frame, the highest-scored kept (None: ``card.extra["max_detections"]``).
        batch_size: Most frames per model call; more are run in chunks of this size.
        min_box_px: Drop boxes narrower or lower than this many pixels of the frame (after un-letterboxing).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    score_threshold: float | None = Field(None, ge=0, le=1)
    nms_iou: float | None = Field(None, gt=0, le=1)
    max_detections: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    min_box_px: float = Field(0.0, ge=0)
