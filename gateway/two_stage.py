"""Two-stage labelling of still images: the detector finds signs, the classifier names each crop.

This is composition, so it lives in the gateway: the detector and classifier services never import each other.
The sign class goes into ``Detections.extra`` next to the detector's own columns, so every row stays aligned.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from services.classifier.api import Classifier, decide
from services.common.errors import InputError
from services.common.types import Detections, Frame
from services.detector.api import Detector

__all__ = ["SIGN_CLASS_ID", "SIGN_CONFIDENCE", "TwoStageSettings", "classify_detections", "crop_boxes", "label_frames"]

SIGN_CLASS_ID = "sign_class_id"
"""``Detections.extra`` column: (N,) int16 classifier class, -1 where the classifier rejected the crop."""
SIGN_CONFIDENCE = "sign_confidence"
"""``Detections.extra`` column: (N,) float32 calibrated probability of the classifier's top class."""


class TwoStageSettings(BaseModel):
    """How detections become classifier crops.

    Attributes:
        crop_margin: Each box is grown by this fraction of its width (height) on the left and right (top and
            bottom) before cropping: the classifier was trained on GTSRB crops, which show such a margin around the
            sign (about 10 % of its size on every side, at least 5 px).
        keep_rejected: Keep detections whose crop the classifier calls no sign (or is unsure of), with sign class
            -1; by default they are dropped.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    crop_margin: float = Field(0.15, ge=0, le=2)
    keep_rejected: bool = False


def crop_boxes(xyxy: np.ndarray, margin: float, hw: tuple[int, int]) -> np.ndarray:
    """Integer crop windows: each box grown by ``margin`` of its size on every side, clipped to the image.

    Args:
        xyxy: (N, 4) float boxes in pixels, far corners exclusive.
        margin: Fraction of the box's width (height) added on the left and right (top and bottom).
        hw: The image's (height, width).

    Returns:
        (N, 4) int64 ``x1, y1, x2, y2`` with ``0 <= x1 < x2 <= width`` and ``0 <= y1 < y2 <= height``: every window
        holds at least one pixel, so ``image[y1:y2, x1:x2]`` is never empty.
    """
    h, w = hw
    xyxy = np.asarray(xyxy, np.float64).reshape(-1, 4)
    grow = (xyxy[:, 2:] - xyxy[:, :2]) * margin
    lo = np.floor(xyxy[:, :2] - grow)
    hi = np.ceil(xyxy[:, 2:] + grow)
    limit = np.array([w, h], np.float64)
    lo = np.clip(lo, 0, limit - 1)
    hi = np.clip(hi, lo + 1, limit)
    return np.concatenate([lo, hi], axis=1).astype(np.int64)


def classify_detections(
    classifier: Classifier,
    images: Sequence[np.ndarray],
    detections: Sequence[Detections],
    settings: TwoStageSettings,
) -> list[Detections]:
    """Name the sign in every detection of a batch of images, with one classifier call for all their crops.

    Args:
        classifier: The sign classifier.
        images: B images, each (H, W, 3) uint8 RGB, the frames the detections were found in.
        detections: B ``Detections``, boxes in pixels of the matching image.
        settings: Crop margin, and whether rejected detections are kept.

    Returns:
        B ``Detections`` with the extra columns ``SIGN_CLASS_ID`` (N,) int16 (-1: rejected) and ``SIGN_CONFIDENCE``
        (N,) float32; rows the classifier rejected are dropped unless ``settings.keep_rejected``.

    Raises:
        InputError: ``images`` and ``detections`` differ in length.
    """
    if len(images) != len(detections):
        raise InputError(f"images: expected {len(detections)} (one per Detections), got {len(images)}")
    crops: list[np.ndarray] = []
    for image, dets in zip(images, detections, strict=True):
        windows = crop_boxes(dets.xyxy, settings.crop_margin, (image.shape[0], image.shape[1]))
        # Slices, not copies: the classifier resizes each crop once.
        crops.extend(image[y1:y2, x1:x2] for x1, y1, x2, y2 in windows.tolist())
    card = classifier.card
    decisions = decide(classifier.classify(crops), card)
    results: list[Detections] = []
    start = 0
    for dets in detections:
        stop = start + len(dets)
        labelled = dets.with_columns(
            extra={
                **dets.extra,
                SIGN_CLASS_ID: decisions.class_id[start:stop],
                SIGN_CONFIDENCE: decisions.confidence[start:stop],
            }
        )
        if not settings.keep_rejected:
            labelled = labelled.take(decisions.class_id[start:stop] >= 0)
        results.append(labelled)
        start = stop
    return results


def label_frames(
    detector: Detector, classifier: Classifier, frames: Sequence[Frame], settings: TwoStageSettings
) -> list[Detections]:
    """Detect, then classify: one detector call and one classifier call for the whole batch.

    Args:
        detector: The sign detector.
        classifier: The sign classifier.
        frames: B frames.
        settings: Crop margin, and whether rejected detections are kept.

    Returns:
        B ``Detections`` as ``classify_detections`` returns them.
    """
    detections = detector.detect(frames)
    return classify_detections(classifier, [f.image for f in frames], detections, settings)
