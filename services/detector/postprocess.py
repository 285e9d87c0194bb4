"""What every detector backend shares: the card's contract, letterboxing in, decoding out. Numpy and Pillow only.

The ONNX contract of a detector model, as its card states it (``card.extra`` holds the detector-specific keys):

* input ``card.onnx_input`` (B, 3, H, W) float32 RGB, ``(x / 255 - card.mean) / card.std``, (H, W) =
  ``card.input_hw``, B dynamic;
* output ``card.onnx_output`` (the heatmap) (B, 1, H / s, W / s) float32 probabilities in [0, 1], already
  peak-suppressed in the graph (every cell that is not a local peak is 0), s = ``extra["stride"]``;
* output ``extra["box_output"]`` (B, 4, H / s, W / s) float32 box corners x1, y1, x2, y2 in network-input pixels,
  one box per heatmap cell;
* frames are letterboxed (``extra["letterbox"]`` = "top-left, pad mean"): scaled by ``min(H / h, W / w)``, placed at
  the top-left corner, the rest filled with the mean colour (0 after normalisation);
* ``extra["score_threshold"]``, ``extra["nms_iou"]`` and ``extra["max_detections"]`` are the decoding defaults.

``DetectorSpec.from_card`` checks all that once, when a backend loads; ``letterbox`` and ``decode`` then do the
per-batch work, vectorised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from PIL import Image

from services.common.errors import InputError, ModelError
from services.common.modelcard import ModelCard
from services.detector.api import DetectorSettings

__all__ = [
    "LETTERBOX",
    "PRE_NMS_TOP_K",
    "DetectorSpec",
    "box_iou",
    "decode",
    "letterbox",
    "nms",
]

LETTERBOX: Final = "top-left, pad mean"
"""The only letterbox layout this code implements; the card's ``extra["letterbox"]`` must say the same."""

PRE_NMS_TOP_K: Final = 1000
"""Most heatmap peaks per frame that go into NMS, highest first; bounds its (N, N) IoU matrix to 4 MB."""

# Pillow first shrinks by an integer factor (box filter) when a frame is more than this many times the network
# input, then resamples bilinearly: a 8000 px photo letterboxes ~10x faster. Below that factor (every dashcam frame
# at our input sizes) the result is the plain bilinear resize, pixel for pixel.
_REDUCING_GAP: Final = 3.0


@dataclass(frozen=True, slots=True)
class DetectorSpec:
    """A detector card's contract, checked, with the decoding settings resolved against its defaults.

    Attributes:
        input_hw: Network input (height, width) in pixels.
        mean: Per-channel RGB mean on 0..1 pixel values.
        std: Per-channel RGB std on 0..1 pixel values.
        stride: Network-input pixels per heatmap cell.
        output_hw: Heatmap (height, width) in cells: ``input_hw // stride``.
        input_name: Name of the ONNX input.
        heatmap_output: Name of the (B, 1, h, w) heatmap output.
        box_output: Name of the (B, 4, h, w) box output.
        score_threshold: Keep peaks scoring at least this (and above 0).
        nms_iou: Suppress boxes overlapping a better one by more than this IoU.
        max_detections: Most boxes per frame.
        min_box_px: Drop boxes narrower or lower than this, in frame pixels.
        batch_size: Most frames per model call.
    """

    input_hw: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stride: int
    output_hw: tuple[int, int]
    input_name: str
    heatmap_output: str
    box_output: str
    score_threshold: float
    nms_iou: float
    max_detections: int
    min_box_px: float
    batch_size: int

    @classmethod
    def from_card(cls, card: ModelCard, settings: DetectorSettings | None = None) -> DetectorSpec:
        """Check that ``card`` describes a detector following the contract; resolve ``settings`` against it.

        Args:
            card: The detector's card.
            settings: Overrides of the card's decoding defaults; None keeps them all.

        Returns:
            The checked contract.

        Raises:
            ModelError: The card is not a detector's, or a key of ``card.extra`` is missing or out of range, or
                the input size is not a multiple of the stride.
        """
        settings = DetectorSettings() if settings is None else settings
        where = f"detector card {card.name!r} {card.version}"
        if card.task != "detector":
            raise ModelError(f"{where}: expected task 'detector', got {card.task!r}")
        if len(card.class_names) != 1:
            raise ModelError(f"{where}: expected one class (class-agnostic heatmap), got {list(card.class_names)}")
        extra = card.extra
        stride = _extra(extra, "stride", int, where, lambda v: v >= 1, ">= 1")
        box_output = _extra(extra, "box_output", str, where, bool, "a non-empty name")
        layout = _extra(extra, "letterbox", str, where, lambda v: v == LETTERBOX, repr(LETTERBOX))
        del layout  # checked only: it is the one layout ``letterbox`` implements
        h, w = card.input_hw
        if h < 1 or w < 1 or h % stride or w % stride:
            raise ModelError(f"{where}: expected input_hw positive multiples of stride {stride}, got {card.input_hw}")
        if box_output in {card.onnx_output, card.onnx_input}:
            raise ModelError(f"{where}: expected a box output name other than {box_output!r}")

        def pick(value: float | None, key: str, check: Any, want: str) -> Any:
            if value is not None:
                return value
            return _extra(extra, key, float if key != "max_detections" else int, where, check, want)

        return cls(
            input_hw=(h, w),
            mean=card.mean,
            std=card.std,
            stride=stride,
            output_hw=(h // stride, w // stride),
            input_name=card.onnx_input,
            heatmap_output=card.onnx_output,
            box_output=box_output,
            score_threshold=float(
                pick(settings.score_threshold, "score_threshold", lambda v: 0 <= v <= 1, "in [0, 1]")
            ),
            nms_iou=float(pick(settings.nms_iou, "nms_iou", lambda v: 0 < v <= 1, "in (0, 1]")),
            max_detections=int(pick(settings.max_detections, "max_detections", lambda v: v >= 1, ">= 1")),
            min_box_px=settings.min_box_px,
            batch_size=settings.batch_size,
        )


def _extra(extra: dict[str, Any], key: str, kind: type, where: str, check: Any, want: str) -> Any:
    """``extra[key]`` if it is a ``kind`` passing ``check``; ModelError naming the key, ``want`` and the value."""
    value = extra.get(key)
    # bool is an int subclass; True is no stride. An int is a fine float.
    ok_type = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok_type = float(value), True
    if not ok_type or (isinstance(value, float) and not math.isfinite(value)) or not check(value):
        raise ModelError(f"{where}: expected extra[{key!r}] {kind.__name__} {want}, got {value!r}")
    return value


def letterbox(
    images: Sequence[np.ndarray],
    input_hw: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scale each image into the network input, top-left, pad with the mean colour, and normalise.

    Each image is resized once (Pillow, bilinear with antialiasing) by ``min(H / h, W / w)`` to
    ``round(w * scale) x round(h * scale)`` and normalised straight into its slot of the batch, one channel at a
    time; the rest of the slot is 0, which is the mean colour after normalisation.

    Args:
        images: B images, each (h, w, 3) uint8 RGB, at least 1x1.
        input_hw: Network input (H, W).
        mean: Per-channel RGB mean on 0..1 values.
        std: Per-channel RGB std on 0..1 values.
        out: Optional (B', 3, H, W) float32 C-contiguous buffer with B' >= B to write into; its first B rows are
            returned.

    Returns:
        ``(batch, scales)``: batch (B, 3, H, W) float32 ``(x / 255 - mean) / std``; scales (B,) float64, network
        pixels per frame pixel, so that frame coordinates = network coordinates / scale.

    Raises:
        InputError: An image is not (h, w, 3) uint8 with h, w >= 1, or ``out`` has the wrong shape or dtype.
    """
    big_h, big_w = input_hw
    n = len(images)
    if out is None:
        out = np.empty((n, 3, big_h, big_w), np.float32)
    elif out.dtype != np.float32 or out.ndim != 4 or out.shape[1:] != (3, big_h, big_w) or out.shape[0] < n:
        raise InputError(f"out: expected (>={n}, 3, {big_h}, {big_w}) float32, got {out.shape} {out.dtype}")
    batch = out[:n]
    gain = (np.float32(1.0 / 255.0) / np.asarray(std, np.float32)).tolist()
    shift = (np.asarray(mean, np.float32) / np.asarray(std, np.float32)).tolist()
    scales = np.empty(n, np.float64)
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
            raise InputError(f"image {i}: expected (h, w, 3) uint8 RGB, at least 1x1, got {image.shape} {image.dtype}")
        h, w = image.shape[:2]
        scale = min(big_h / h, big_w / w)
        new_w, new_h = min(big_w, max(1, round(w * scale))), min(big_h, max(1, round(h * scale)))
        if (new_h, new_w) == (h, w):
            resized = image
        else:
            pil = Image.fromarray(np.ascontiguousarray(image), mode="RGB")
            resized = np.asarray(pil.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=_REDUCING_GAP))
        slot = batch[i]
        for c in range(3):
            # uint8 -> float32 scaled in one pass into the strided slot, then shifted in place: no temporaries.
            np.multiply(resized[..., c], np.float32(gain[c]), out=slot[c, :new_h, :new_w], casting="unsafe")
            slot[c, :new_h, :new_w] -= np.float32(shift[c])
        slot[:, new_h:, :] = 0.0
        slot[:, :new_h, new_w:] = 0.0
        scales[i] = scale
    return batch, scales


def box_iou(a: np.ndarray, b: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """Intersection over union of every box of ``a`` with every box of ``b``.

    Args:
        a: (N, 4) boxes x1, y1, x2, y2 (x2 >= x1, y2 >= y1).
        b: (M, 4) boxes, same format.
        out: Optional (N, M) float32 buffer for the result.

    Returns:
        (N, M) float32 IoU in [0, 1]; 0 where both boxes have no area.
    """
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None)
    inter *= np.clip(iy2 - iy1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    if out is None:
        out = np.zeros((a.shape[0], b.shape[0]), np.float32)
    else:
        out[...] = 0.0
    np.divide(inter, union, out=out, where=union > 0)
    # Rounding can put a box's IoU with itself a hair above 1.
    return np.clip(out, 0.0, 1.0, out=out)


def nms(xyxy: np.ndarray, score: np.ndarray, iou_threshold: float, max_keep: int | None = None) -> np.ndarray:
    """Greedy class-agnostic non-maximum suppression.

    Boxes are visited from the highest score down; a box is kept unless it overlaps an already kept box by more
    than ``iou_threshold``. The IoU matrix is computed once, by broadcasting; the loop only walks its rows.

    Args:
        xyxy: (N, 4) float boxes.
        score: (N,) float scores.
        iou_threshold: Overlap above which the lower-scored box is dropped.
        max_keep: Stop after keeping this many boxes; None keeps all survivors.

    Returns:
        (K,) int64 indices into the inputs of the kept boxes, highest score first; no two of them overlap by more
        than ``iou_threshold``.
    """
    order = np.argsort(-np.asarray(score, np.float64), kind="stable")
    if order.size == 0:
        return order.astype(np.int64)
    iou = box_iou(xyxy[order], xyxy[order])
    suppressed = np.zeros(order.size, bool)
    keep: list[int] = []
    limit = order.size if max_keep is None else max_keep
    for i in range(order.size):
        if suppressed[i]:
            continue
        keep.append(i)
        if len(keep) >= limit:
            break
        suppressed |= iou[i] > iou_threshold
    return order[np.asarray(keep, np.int64)]


def decode(
    heatmap: np.ndarray,
    boxes: np.ndarray,
    scales: np.ndarray,
    frame_hw: Sequence[tuple[int, int]],
    spec: DetectorSpec,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Turn a batch of model outputs into boxes in frame pixels.

    Per frame: keep heatmap cells scoring at least ``spec.score_threshold`` (and above 0: non-peaks are 0), at most
    ``PRE_NMS_TOP_K`` of them; take their boxes, undo the letterbox (divide by the scale; the image sits at the
    top-left, so there is no offset), clip to the frame, drop boxes smaller than ``spec.min_box_px`` on a side and
    non-finite ones, then run NMS at ``spec.nms_iou`` and keep the best ``spec.max_detections``.

    Args:
        heatmap: (B, 1, h, w) float32 peak scores, (h, w) = ``spec.output_hw``.
        boxes: (B, 4, h, w) float32 x1, y1, x2, y2 in network-input pixels.
        scales: (B,) network pixels per frame pixel, as ``letterbox`` returns them.
        frame_hw: B (height, width) of the original frames.
        spec: The model's contract and decoding settings.

    Returns:
        B pairs ``(xyxy, score)``: xyxy (N, 4) float32 frame pixels within [0, width] x [0, height], score (N,)
        float32, highest first.

    Raises:
        ModelError: ``heatmap`` or ``boxes`` do not have the shape the card promises.
    """
    n = len(frame_hw)
    oh, ow = spec.output_hw
    for name, array, channels in ((spec.heatmap_output, heatmap, 1), (spec.box_output, boxes, 4)):
        if array.shape != (n, channels, oh, ow) or not np.issubdtype(array.dtype, np.floating):
            raise ModelError(
                f"detector output {name!r}: expected ({n}, {channels}, {oh}, {ow}) float "
                f"(batch, {channels}, input_hw / stride {spec.stride}, from its card), got {array.shape} {array.dtype}"
            )
    if len(scales) != n:
        raise InputError(f"scales: expected {n} (one per frame), got {len(scales)}")
    results: list[tuple[np.ndarray, np.ndarray]] = []
    flat_scores = heatmap.reshape(n, oh * ow)
    flat_boxes = boxes.reshape(n, 4, oh * ow)
    for i, (h, w) in enumerate(frame_hw):
        scores = flat_scores[i]
        cells = np.flatnonzero((scores >= spec.score_threshold) & (scores > 0))
        if cells.size > PRE_NMS_TOP_K:
            cells = cells[np.argpartition(-scores[cells], PRE_NMS_TOP_K - 1)[:PRE_NMS_TOP_K]]
        score = scores[cells].astype(np.float32)
        xyxy = flat_boxes[i][:, cells].T.astype(np.float32) / np.float32(scales[i])
        # Corners may come out swapped from an untrained or odd model; order them rather than lose the box.
        xyxy = np.concatenate([np.minimum(xyxy[:, :2], xyxy[:, 2:]), np.maximum(xyxy[:, :2], xyxy[:, 2:])], axis=1)
        np.clip(xyxy, 0.0, np.array([w, h, w, h], np.float32), out=xyxy)
        size = xyxy[:, 2:] - xyxy[:, :2]
        ok = np.isfinite(xyxy).all(axis=1) & (size >= spec.min_box_px).all(axis=1) & (size > 0).all(axis=1)
        xyxy, score = xyxy[ok], score[ok]
        keep = nms(xyxy, score, spec.nms_iou, spec.max_detections)
        results.append((np.ascontiguousarray(xyxy[keep]), score[keep]))
    return results
