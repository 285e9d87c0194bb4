"""Detector outputs -> boxes, and class-agnostic AP50 against ground truth. Numpy only.

:func:`detections_from_outputs` turns one image's ONNX outputs (already peak-suppressed heatmap, decoded boxes)
into scored boxes: the serving side does the same. :func:`average_precision` is VOC's all-point AP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MatchResult",
    "OperatingPoint",
    "average_precision",
    "box_iou",
    "choose_operating_point",
    "detections_from_outputs",
    "match_detections",
    "nms",
    "operating_point_at",
    "suppress_non_peaks",
]


@dataclass(frozen=True, slots=True)
class MatchResult:
    """Detections of a set of images matched to the ground truth.

    Attributes:
        score: (D,) float32 detection scores, all images together.
        is_tp: (D,) bool, True where the detection matched a not yet matched ground-truth box.
        num_gt: number of ground-truth boxes.
        num_images: number of images.
    """

    score: np.ndarray
    is_tp: np.ndarray
    num_gt: int
    num_images: int


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    """Figures at one score threshold (detections with ``score >= threshold`` are kept)."""

    threshold: float
    recall: float
    precision: float
    fp_per_image: float
    f1: float


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) and (M, 4) ``xyxy`` -> (N, M) float32 IoU in [0, 1]."""
    a = np.asarray(a, np.float32).reshape(-1, 4)
    b = np.asarray(b, np.float32).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0).astype(np.float32)


def nms(xyxy: np.ndarray, score: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression -> (K,) int64 indices of the kept boxes, best score first."""
    order = np.argsort(-score, kind="stable")
    if len(order) == 0:
        return order.astype(np.int64)
    iou = box_iou(xyxy[order], xyxy[order])
    suppressed = np.zeros(len(order), bool)
    keep: list[int] = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[np.asarray(keep, np.int64)]


def suppress_non_peaks(heat: np.ndarray) -> np.ndarray:
    """Keep each value of a (..., h, w) heatmap only where it equals the max of its 3x3 neighbourhood, else 0.

    The numpy twin of the exported graph's peak suppression (a 3x3 max-pool, stride 1, padding 1).
    """
    padded = np.pad(heat, [(0, 0)] * (heat.ndim - 2) + [(1, 1), (1, 1)], constant_values=-np.inf)
    h, w = heat.shape[-2:]
    pooled = np.max(
        np.stack([padded[..., dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]),
        axis=0,
    )
    return np.where(pooled == heat, heat, 0).astype(heat.dtype)


def detections_from_outputs(
    heatmap: np.ndarray,
    boxes: np.ndarray,
    *,
    score_threshold: float,
    nms_iou: float,
    max_detections: int,
    scale: float = 1.0,
    image_hw: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One image's network outputs -> boxes and scores.

    Args:
        heatmap: (1, h, w) or (h, w) float32 peak-suppressed probabilities.
        boxes: (4, h, w) float32 ``xyxy`` in network-input pixels.
        score_threshold: lowest score kept.
        nms_iou: IoU above which a lower-scored box is suppressed.
        max_detections: most boxes returned (the best by score).
        scale: letterbox scale (input pixels per image pixel); boxes are divided by it.
        image_hw: if given, boxes are clipped to the image.

    Returns:
        (N, 4) float32 ``xyxy`` in image pixels and (N,) float32 scores, best first.
    """
    heat = heatmap.reshape(-1)
    cells = np.flatnonzero(heat >= score_threshold)
    if len(cells) > 4 * max_detections:
        cells = cells[np.argpartition(-heat[cells], 4 * max_detections)[: 4 * max_detections]]
    score = heat[cells].astype(np.float32)
    xyxy = boxes.reshape(4, -1)[:, cells].T.astype(np.float32) / np.float32(scale)
    if image_hw is not None:
        xyxy[:, 0::2] = xyxy[:, 0::2].clip(0, image_hw[1])
        xyxy[:, 1::2] = xyxy[:, 1::2].clip(0, image_hw[0])
    keep = nms(xyxy, score, nms_iou)[:max_detections]
    return xyxy[keep], score[keep]


def match_detections(
    detections: Sequence[tuple[np.ndarray, np.ndarray]], ground_truth: Sequence[np.ndarray], iou_threshold: float = 0.5
) -> MatchResult:
    """Match each image's detections to its ground truth, best score first.

    A detection is a true positive when its best-overlapping ground-truth box that is still unmatched has
    IoU >= ``iou_threshold``; every other detection is a false positive.

    Args:
        detections: per image, (N, 4) ``xyxy`` and (N,) scores.
        ground_truth: per image, (M, 4) ``xyxy`` in the same pixels.
        iou_threshold: the IoU a match needs (0.5 for AP50).
    """
    scores: list[np.ndarray] = []
    hits: list[np.ndarray] = []
    for (xyxy, score), gt in zip(detections, ground_truth, strict=True):
        order = np.argsort(-score, kind="stable")
        iou = box_iou(xyxy[order], gt)
        matched = np.zeros(len(gt), bool)
        tp = np.zeros(len(order), bool)
        for i in range(len(order)):
            if not len(gt):
                break
            candidates = np.where(matched, -1.0, iou[i])
            j = int(np.argmax(candidates))
            if candidates[j] >= iou_threshold:
                matched[j] = True
                tp[i] = True
        scores.append(np.asarray(score, np.float32)[order])
        hits.append(tp)
    return MatchResult(
        np.concatenate(scores) if scores else np.zeros(0, np.float32),
        np.concatenate(hits) if hits else np.zeros(0, bool),
        int(sum(len(g) for g in ground_truth)),
        len(ground_truth),
    )


def _cumulative(match: MatchResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(-match.score, kind="stable")
    tp = np.cumsum(match.is_tp[order])
    fp = np.cumsum(~match.is_tp[order])
    return match.score[order], tp, fp


def average_precision(match: MatchResult) -> float:
    """VOC all-point AP: area under the precision-recall curve with precision made monotone.

    Returns 1.0 for no ground truth and no detection, 0.0 for ground truth and no correct detection.
    """
    if match.num_gt == 0:
        return 1.0 if not match.is_tp.size else 0.0
    _, tp, fp = _cumulative(match)
    recall = np.concatenate([[0.0], tp / match.num_gt, [1.0]])
    precision = np.concatenate([[1.0], tp / np.maximum(tp + fp, 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def operating_point_at(match: MatchResult, threshold: float) -> OperatingPoint:
    """Recall, precision, false positives per image and F1 when keeping detections with score >= threshold."""
    keep = match.score >= threshold
    tp = int(match.is_tp[keep].sum())
    fp = int((~match.is_tp[keep]).sum())
    recall = tp / match.num_gt if match.num_gt else 1.0
    precision = tp / (tp + fp) if tp + fp else 1.0
    f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
    return OperatingPoint(float(threshold), recall, precision, fp / max(1, match.num_images), f1)


def choose_operating_point(match: MatchResult, max_fp_per_image: float | None = None) -> OperatingPoint:
    """The threshold with the best F1, among those with at most ``max_fp_per_image`` false positives if given.

    Candidate thresholds are the detection scores themselves (and 1.0, which keeps nothing).
    """
    candidates = np.unique(np.concatenate([match.score, [1.0]]))
    points = [operating_point_at(match, float(t)) for t in candidates]
    if max_fp_per_image is not None:
        allowed = [p for p in points if p.fp_per_image <= max_fp_per_image]
        points = allowed or points
    return max(points, key=lambda p: (p.f1, -p.threshold))
