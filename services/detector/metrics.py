"""Detection figures against ground truth: VOC matching, AP50, the operating point, end-to-end naming. Numpy only.

Boxes are ``xyxy`` in pixels with exclusive far corners, as the detector returns them; GTSDB's ``gt.txt`` gives
inclusive corners, so ``read_gtsdb_gt`` adds 1 to x2 and y2 (a box of pixels 10..20 is 11 pixels wide).

Matching follows PASCAL VOC: an image's detections are taken from the highest score down; each one is compared
with every ground-truth box of its image, and if the best IoU is at least the threshold and that box is not taken
yet, the detection is a true positive and takes it; otherwise (too little overlap, or a duplicate of a box already
found) it is a false positive. AP is VOC's all-point interpolated area under the precision-recall curve.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.common.errors import InputError
from services.detector.postprocess import box_iou

__all__ = [
    "DetectionEvaluator",
    "DetectionReport",
    "GroundTruth",
    "average_precision",
    "match_detections",
    "read_gtsdb_gt",
]

_GT_FORMAT = "'name;x1;y1;x2;y2;class_id' (integer pixel corners, inclusive)"


@dataclass(frozen=True, slots=True, eq=False)
class GroundTruth:
    """The labelled signs of one image.

    Attributes:
        xyxy: (N, 4) float32 boxes, pixels, far corners exclusive.
        class_id: (N,) int16 GTSRB class ids 0..42.
    """

    xyxy: np.ndarray
    class_id: np.ndarray

    @classmethod
    def empty(cls) -> GroundTruth:
        """An image without signs."""
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.int16))

    def __len__(self) -> int:
        return int(self.xyxy.shape[0])


def read_gtsdb_gt(path: Path) -> dict[str, GroundTruth]:
    """Parse a GTSDB ``gt.txt``: one line ``name;x1;y1;x2;y2;class_id`` per sign, inclusive corners.

    Args:
        path: The ``gt.txt`` file.

    Returns:
        Image file name -> its signs, for the images that have any (an image without a line has none).

    Raises:
        InputError: The file is missing or a line is malformed (the message names the line).
    """
    if not path.is_file():
        raise InputError(f"{path}: expected a GTSDB gt.txt with lines {_GT_FORMAT}, found no such file")
    rows: dict[str, tuple[list[list[float]], list[int]]] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(";")
        try:
            if len(parts) != 6 or not parts[0]:
                raise ValueError
            x1, y1, x2, y2, class_id = (int(v) for v in parts[1:])
        except ValueError:
            raise InputError(f"{path}:{line_no}: expected {_GT_FORMAT}, got {line!r}") from None
        if not (0 <= x1 <= x2 and 0 <= y1 <= y2 and 0 <= class_id < 2**15):
            raise InputError(f"{path}:{line_no}: expected 0 <= x1 <= x2, 0 <= y1 <= y2, class_id >= 0, got {line!r}")
        boxes, classes = rows.setdefault(parts[0], ([], []))
        boxes.append([x1, y1, x2 + 1, y2 + 1])
        classes.append(class_id)
    return {
        name: GroundTruth(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int16))
        for name, (boxes, classes) in rows.items()
    }


def match_detections(
    pred_xyxy: np.ndarray, pred_score: np.ndarray, gt_xyxy: np.ndarray, iou_threshold: float = 0.5
) -> np.ndarray:
    """VOC matching of one image's detections to its ground truth.

    Args:
        pred_xyxy: (D, 4) detected boxes.
        pred_score: (D,) their scores.
        gt_xyxy: (G, 4) ground-truth boxes.
        iou_threshold: Least IoU for a match.

    Returns:
        (D,) int64: for each detection, the index of the ground-truth box it found, or -1 for a false positive
        (no box overlapping enough, or a duplicate of a box a higher-scored detection found).
    """
    matched_gt = np.full(len(pred_score), -1, np.int64)
    if len(pred_score) == 0 or len(gt_xyxy) == 0:
        return matched_gt
    iou = box_iou(pred_xyxy, gt_xyxy)
    best = iou.argmax(axis=1)
    best_iou = iou[np.arange(len(best)), best]
    taken = np.zeros(len(gt_xyxy), bool)
    # The greedy order is the point of VOC matching: a duplicate is a false positive only after its better twin.
    for d in np.argsort(-np.asarray(pred_score, np.float64), kind="stable"):
        g = best[d]
        if best_iou[d] >= iou_threshold and not taken[g]:
            taken[g] = True
            matched_gt[d] = g
    return matched_gt


def average_precision(score: np.ndarray, is_tp: np.ndarray, num_gt: int) -> float:
    """VOC all-point interpolated average precision.

    Args:
        score: (D,) scores of all detections, all images together.
        is_tp: (D,) bool, True for the detections that matched.
        num_gt: Number of ground-truth boxes.

    Returns:
        AP in [0, 1]; NaN when there is no ground truth (AP is undefined); 0 when nothing was detected.
    """
    if num_gt == 0:
        return float("nan")
    if len(score) == 0:
        return 0.0
    order = np.argsort(-np.asarray(score, np.float64), kind="stable")
    tp = np.cumsum(np.asarray(is_tp, bool)[order])
    fp = np.cumsum(~np.asarray(is_tp, bool)[order])
    recall = tp / num_gt
    precision = tp / np.maximum(tp + fp, 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope: best precision at this recall or beyond
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


@dataclass(frozen=True, slots=True)
class DetectionReport:
    """Figures over a set of images.

    Attributes:
        images: Images evaluated.
        gt_signs: Ground-truth signs in them.
        detections: Detections scored (at any score down to the evaluation floor).
        ap50: Class-agnostic VOC AP at IoU 0.5 over all scored detections (NaN without ground truth).
        threshold: The operating score threshold.
        recall: Share of signs found by a detection at or above ``threshold``.
        precision: Share of detections at or above ``threshold`` that found a sign.
        fp_per_image: False positives at or above ``threshold`` per image.
        end_to_end: Share of signs found (IoU >= 0.5) by a detection at or above ``threshold`` that the classifier
            kept (did not reject) and named with the sign's class.
        named_when_found: Of the signs found that way, the share named correctly.
    """

    images: int
    gt_signs: int
    detections: int
    ap50: float
    threshold: float
    recall: float
    precision: float
    fp_per_image: float
    end_to_end: float
    named_when_found: float


@dataclass(slots=True)
class DetectionEvaluator:
    """Collects detections and ground truth image by image; ``report()`` gives the figures.

    Args:
        threshold: The operating score threshold (the card's, as served).
        iou_threshold: Least IoU for a detection to find a sign.
    """

    threshold: float
    iou_threshold: float = 0.5
    _scores: list[np.ndarray] = field(default_factory=list)
    _is_tp: list[np.ndarray] = field(default_factory=list)
    _images: int = 0
    _gt: int = 0
    _found_kept: int = 0
    _named: int = 0

    def add(
        self,
        pred_xyxy: np.ndarray,
        pred_score: np.ndarray,
        truth: GroundTruth,
        pred_class: np.ndarray | None = None,
    ) -> None:
        """Add one image.

        Args:
            pred_xyxy: (D, 4) detected boxes, all scores (the evaluation may run below the operating threshold).
            pred_score: (D,) detector scores.
            truth: The image's labelled signs.
            pred_class: (D,) the classifier's class per detection, -1 where it rejected the crop; None when only
                the detector is evaluated (end-to-end figures then count nothing as named).

        Raises:
            InputError: The columns' lengths differ.
        """
        n = len(pred_score)
        if pred_xyxy.shape != (n, 4) or (pred_class is not None and pred_class.shape != (n,)):
            raise InputError(
                f"detections: expected xyxy ({n}, 4) and class ({n},) for {n} scores, got {pred_xyxy.shape} and "
                f"{None if pred_class is None else pred_class.shape}"
            )
        matched = match_detections(pred_xyxy, pred_score, truth.xyxy, self.iou_threshold)
        self._scores.append(np.asarray(pred_score, np.float32))
        self._is_tp.append(matched >= 0)
        self._images += 1
        self._gt += len(truth)
        if pred_class is None:
            return
        # What a user of the two-stage output sees: detections at the operating threshold the classifier kept.
        kept = (pred_score >= self.threshold) & (pred_class >= 0)
        found = match_detections(pred_xyxy[kept], pred_score[kept], truth.xyxy, self.iou_threshold)
        hit = found >= 0
        self._found_kept += int(hit.sum())
        self._named += int(np.sum(pred_class[kept][hit] == truth.class_id[found[hit]]))

    def report(self) -> DetectionReport:
        """The figures over every image added so far."""
        score = np.concatenate(self._scores) if self._scores else np.zeros(0, np.float32)
        is_tp = np.concatenate(self._is_tp) if self._is_tp else np.zeros(0, bool)
        # VOC matching goes down the scores, so the matches at the operating point are those of the full run.
        at_op = score >= self.threshold
        tp = int(is_tp[at_op].sum())
        fp = int(at_op.sum()) - tp
        nan = float("nan")
        return DetectionReport(
            images=self._images,
            gt_signs=self._gt,
            detections=len(score),
            ap50=average_precision(score, is_tp, self._gt),
            threshold=self.threshold,
            recall=tp / self._gt if self._gt else nan,
            precision=tp / (tp + fp) if tp + fp else nan,
            fp_per_image=fp / self._images if self._images else nan,
            end_to_end=self._named / self._gt if self._gt else nan,
            named_when_found=self._named / self._found_kept if self._found_kept else nan,
        )
