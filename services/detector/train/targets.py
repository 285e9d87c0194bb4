"""CenterNet training targets: sign boxes -> heatmap, center offset and log size on the stride grid. Numpy only.

Each sign is one peak at the grid cell holding its center, with a Gaussian around it whose spread grows with the
box, so that the cells next to a small sign's center are only mildly penalised. The regression targets live at
the peak cell only: the offset of the true center inside the cell (0..1, both axes) and ``log(size / stride)``.
:func:`decode_boxes` is the inverse, and the exported graph computes exactly the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Targets", "decode_boxes", "encode_targets", "targets_to_maps"]

_MIN_SIGMA_CELLS = 0.5
_SIGMA_PER_SIZE = 0.15


@dataclass(frozen=True, slots=True)
class Targets:
    """Targets of one image on a grid of (h, w) cells.

    Attributes:
        heat: (h, w) float32 in [0, 1]; exactly 1 at each sign's center cell.
        weight: (h, w) float32, 0 where the heatmap loss is ignored (tiny or cut-off signs), else 1.
        index: (K,) int64 flat cell index ``row * w + col`` of each sign's center; 0 where ``mask`` is 0.
        reg: (K, 4) float32 ``(offset_x, offset_y, log_w, log_h)``: offsets in cells (0..1), sizes in strides.
        xyxy: (K, 4) float32 box in input pixels.
        mask: (K,) float32, 1 for the rows that hold a sign.
    """

    heat: np.ndarray
    weight: np.ndarray
    index: np.ndarray
    reg: np.ndarray
    xyxy: np.ndarray
    mask: np.ndarray


def _gaussian_max(heat: np.ndarray, col: int, row: int, sigma_x: float, sigma_y: float) -> None:
    h, w = heat.shape
    rx, ry = int(np.ceil(3 * sigma_x)), int(np.ceil(3 * sigma_y))
    c0, c1, r0, r1 = max(0, col - rx), min(w, col + rx + 1), max(0, row - ry), min(h, row + ry + 1)
    dx = (np.arange(c0, c1) - col)[None, :] / sigma_x
    dy = (np.arange(r0, r1) - row)[:, None] / sigma_y
    np.maximum(heat[r0:r1, c0:c1], np.exp(-0.5 * (dx**2 + dy**2)), out=heat[r0:r1, c0:c1])


def encode_targets(
    xyxy: np.ndarray,
    ignore_xyxy: np.ndarray,
    grid_hw: tuple[int, int],
    stride: int,
    max_objects: int = 64,
) -> Targets:
    """Encode the boxes of one image.

    Args:
        xyxy: (N, 4) float boxes to detect, input pixels, inside the ``grid_hw * stride`` image.
        ignore_xyxy: (M, 4) float boxes neither positive nor negative (too small, cut off by the crop): the
            heatmap loss is switched off on the cells they cover.
        grid_hw: output grid (h, w) in cells.
        stride: input pixels per cell.
        max_objects: K, rows of the regression targets; boxes past it are ignored (rather than dropped as
            negatives).

    Returns:
        The targets; when two boxes share a center cell the larger one keeps the regression row.
    """
    h, w = grid_hw
    heat = np.zeros((h, w), np.float32)
    weight = np.ones((h, w), np.float32)
    index = np.zeros(max_objects, np.int64)
    reg = np.zeros((max_objects, 4), np.float32)
    boxes = np.zeros((max_objects, 4), np.float32)
    mask = np.zeros(max_objects, np.float32)

    xyxy = np.asarray(xyxy, np.float32).reshape(-1, 4)
    ignore_xyxy = np.asarray(ignore_xyxy, np.float32).reshape(-1, 4)
    sizes = xyxy[:, 2:] - xyxy[:, :2]
    order = np.argsort(-(sizes[:, 0] * sizes[:, 1]), kind="stable")  # small boxes last: they win shared cells
    if len(order) > max_objects:
        ignore_xyxy = np.concatenate([ignore_xyxy, xyxy[order[max_objects:]]])
        order = order[:max_objects]
    for x1, y1, x2, y2 in ignore_xyxy:
        c0, r0 = int(np.floor(x1 / stride)), int(np.floor(y1 / stride))
        c1, r1 = int(np.ceil(x2 / stride)), int(np.ceil(y2 / stride))
        cc, rc = int((x1 + x2) / 2 / stride), int((y1 + y2) / 2 / stride)
        weight[max(0, min(r0, rc - 1)) : max(r1, rc + 2), max(0, min(c0, cc - 1)) : max(c1, cc + 2)] = 0
    taken: dict[int, int] = {}
    for k, i in enumerate(order):
        x1, y1, x2, y2 = (float(v) for v in xyxy[i])
        bw, bh = max(x2 - x1, 1e-3), max(y2 - y1, 1e-3)
        cx, cy = (x1 + x2) / 2 / stride, (y1 + y2) / 2 / stride
        col, row = min(max(int(np.floor(cx)), 0), w - 1), min(max(int(np.floor(cy)), 0), h - 1)
        _gaussian_max(
            heat,
            col,
            row,
            max(_MIN_SIGMA_CELLS, _SIGMA_PER_SIZE * bw / stride),
            max(_MIN_SIGMA_CELLS, _SIGMA_PER_SIZE * bh / stride),
        )
        heat[row, col] = 1.0
        weight[row, col] = 1.0
        cell = row * w + col
        slot = taken.setdefault(cell, k)
        index[slot] = cell
        reg[slot] = (cx - col, cy - row, np.log(bw / stride), np.log(bh / stride))
        boxes[slot] = (x1, y1, x2, y2)
        mask[slot] = 1.0
    return Targets(heat, weight, index, reg, boxes, mask)


def targets_to_maps(targets: Targets) -> tuple[np.ndarray, np.ndarray]:
    """Dense (2, h, w) offset and (2, h, w) log-size maps holding the regression targets at their cells, else 0."""
    h, w = targets.heat.shape
    offset = np.zeros((2, h * w), np.float32)
    log_size = np.zeros((2, h * w), np.float32)
    rows = targets.mask > 0
    offset[:, targets.index[rows]] = targets.reg[rows, :2].T
    log_size[:, targets.index[rows]] = targets.reg[rows, 2:].T
    return offset.reshape(2, h, w), log_size.reshape(2, h, w)


def decode_boxes(offset: np.ndarray, log_size: np.ndarray, stride: int) -> np.ndarray:
    """(2, h, w) offsets in cells and (2, h, w) log sizes in strides -> (4, h, w) float32 ``xyxy`` input pixels."""
    h, w = offset.shape[1:]
    cx = (np.arange(w, dtype=np.float32)[None, :] + offset[0]) * stride
    cy = (np.arange(h, dtype=np.float32)[:, None] + offset[1]) * stride
    half_w = np.exp(log_size[0]) * (stride / 2)
    half_h = np.exp(log_size[1]) * (stride / 2)
    return np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h]).astype(np.float32)
