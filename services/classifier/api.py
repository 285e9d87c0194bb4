"""The classifier seam: a ``Classifier`` protocol, calibration, and the per-crop decision.

Every backend (``OnnxClassifier``, an HTTP client, test fakes) returns calibrated log-probabilities; turning
them into a class or "unknown" is ``decide``, shared by all of them, so the rule lives in one place. No torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from services.common.classes import UNKNOWN
from services.common.errors import InputError
from services.common.modelcard import ModelCard
from services.common.types import require_column

__all__ = ["Classifier", "Decisions", "calibrated_log_probs", "decide"]


class Classifier(Protocol):
    """Names the sign in each crop of a batch."""

    @property
    def card(self) -> ModelCard:
        """The model's card: class names, preprocessing, temperature, reject threshold."""
        ...

    def classify(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Classify a batch of crops.

        Args:
            crops: B crops, each (H, W, 3) uint8 RGB of any size (at least 1x1); the backend resizes them.

        Returns:
            (B, K) float32 calibrated log-probabilities, row i for crop i, K = ``len(card.class_names)``.
        """
        ...


@dataclass(frozen=True, slots=True, eq=False)
class Decisions:
    """What the classifier decided for each crop of a batch. Row i of every column is crop i.

    Attributes:
        class_id: (B,) int16, the sign class 0..K-1, or -1 for unknown (background or below threshold).
        confidence: (B,) float32 in [0, 1], the calibrated probability of the most likely class (also when
            that class is the background or the crop was rejected).
        unknown: (B,) bool, True where ``class_id`` is -1.
    """

    class_id: np.ndarray
    confidence: np.ndarray
    unknown: np.ndarray

    def __post_init__(self) -> None:
        n = require_column("class_id", self.class_id, (None,), np.int16)
        require_column("confidence", self.confidence, (n,), np.float32)
        require_column("unknown", self.unknown, (n,), np.bool_)
        for col in (self.class_id, self.confidence, self.unknown):
            col.flags.writeable = False

    def __len__(self) -> int:
        return len(self.class_id)

    def class_names(self, card: ModelCard) -> list[str]:
        """Class name of each crop: ``card.class_names[class_id]``, or ``UNKNOWN`` where ``class_id`` is -1."""
        # Index -1 of the extended table is UNKNOWN, so one fancy-index handles both cases.
        table = np.array([*card.class_names, UNKNOWN], dtype=object)
        return [str(name) for name in table[self.class_id]]


def calibrated_log_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scaled log-softmax.

    Args:
        logits: (B, K) raw network outputs.
        temperature: Positive; logits are divided by it before the softmax.

    Returns:
        (B, K) float32 ``log_softmax(logits / temperature)``; ``exp`` of each row sums to 1.
    """
    scaled = logits.astype(np.float32) / np.float32(temperature)
    scaled -= scaled.max(axis=1, keepdims=True)  # keeps exp() in range
    scaled -= np.log(np.exp(scaled).sum(axis=1, keepdims=True))
    return scaled


def decide(logprobs: np.ndarray, card: ModelCard) -> Decisions:
    """Pick a class per crop, or unknown.

    The top class is the most likely of all K (background included). A crop is unknown when the top class
    is ``card.background_class`` or its probability is below ``card.reject_threshold`` (or not a number).

    Args:
        logprobs: (B, K) float calibrated log-probabilities, as ``Classifier.classify`` returns them.
        card: The card of the model that produced them.

    Returns:
        The decision columns for the B crops.

    Raises:
        InputError: ``logprobs`` is not (B, K) floating point with K = ``len(card.class_names)``.
    """
    k = card.num_outputs
    if logprobs.ndim != 2 or logprobs.shape[1] != k or not np.issubdtype(logprobs.dtype, np.floating):
        raise InputError(f"logprobs: expected (B, {k}) float, got {logprobs.shape} {logprobs.dtype}")
    top = logprobs.argmax(axis=1)
    confidence = np.exp(np.take_along_axis(logprobs, top[:, None], axis=1)[:, 0]).astype(np.float32)
    unknown = ~(confidence >= card.reject_threshold)  # written so that NaN is unknown too
    if card.background_class is not None:
        unknown |= top == card.background_class
    class_id = np.where(unknown, -1, top).astype(np.int16)
    return Decisions(class_id=class_id, confidence=confidence, unknown=unknown)
