"""A tiny ONNX detector built with onnx.helper, following the detector contract, with outputs known in advance.

The graph: heatmap = AveragePool_s(clip(red_normalised / 2, 0, 1)), so with mean 0.5 and std 0.25 a black pixel
counts 0, a white one 1 and the letterbox padding (0 after normalisation) 0; a white square covering exactly one
s x s cell of the network input gives that cell a score of about 1. boxes = a constant grid: the box of cell (i, j)
is that cell, ``[j*s, i*s, (j+1)*s, (i+1)*s]`` in network pixels, for every image of the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.common.modelcard import ModelCard, card_path_for, file_sha256
from services.detector.postprocess import LETTERBOX

TINY_INPUT_HW = (64, 96)
TINY_STRIDE = 8
TINY_MEAN = (0.5, 0.5, 0.5)
TINY_STD = (0.25, 0.25, 0.25)


def cell_grid(output_hw: tuple[int, int], stride: int) -> np.ndarray:
    """(1, 4, h, w) float32: cell (i, j) -> its own extent in network pixels."""
    h, w = output_hw
    ii, jj = np.mgrid[:h, :w].astype(np.float32)
    return np.stack([jj * stride, ii * stride, (jj + 1) * stride, (ii + 1) * stride])[None].astype(np.float32)


def tiny_detector_bytes(
    *,
    input_hw: tuple[int, int] = TINY_INPUT_HW,
    stride: int = TINY_STRIDE,
    box_output: str | None = "boxes",
    heatmap_output: str = "heatmap",
) -> bytes:
    """The tiny detector's ONNX bytes; ``box_output=None`` leaves the box output out."""
    # onnx comes with the train extra; without it, only the tests that need a model are skipped.
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    oh, ow = input_hw[0] // stride, input_hw[1] // stride
    nodes = [
        helper.make_node("Slice", ["images", "c0", "c1", "axis1"], ["red"]),
        helper.make_node("Div", ["red", "two"], ["half"]),
        helper.make_node("Clip", ["half", "zero", "one"], ["white"]),
        helper.make_node(
            "AveragePool", ["white"], [heatmap_output], kernel_shape=[stride, stride], strides=[stride] * 2
        ),
    ]
    outputs = [helper.make_tensor_value_info(heatmap_output, TensorProto.FLOAT, ["batch", 1, oh, ow])]
    initializers = [
        numpy_helper.from_array(np.array([0], np.int64), "c0"),
        numpy_helper.from_array(np.array([1], np.int64), "c1"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(cell_grid((oh, ow), stride), "grid"),
    ]
    if box_output is not None:
        nodes += [
            helper.make_node("Shape", [heatmap_output], ["heatmap_shape"]),
            helper.make_node("Expand", ["grid", "heatmap_shape"], [box_output]),
        ]
        outputs.append(helper.make_tensor_value_info(box_output, TensorProto.FLOAT, ["batch", 4, oh, ow]))
    graph = helper.make_graph(
        nodes,
        "tiny_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, *input_hw])],
        outputs,
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # what onnxruntime releases of the last two years all load
    onnx.checker.check_model(model)
    return model.SerializeToString()


def tiny_detector_card_fields(model_path: Path) -> dict[str, Any]:
    return {
        "name": "tiny-detector",
        "version": "0.0.1",
        "task": "detector",
        "architecture": "avgpool-grid",
        "class_names": ("traffic_sign",),
        "input_hw": TINY_INPUT_HW,
        "mean": TINY_MEAN,
        "std": TINY_STD,
        "onnx_sha256": file_sha256(model_path),
        "onnx_input": "images",
        "onnx_output": "heatmap",
        "extra": {
            "stride": TINY_STRIDE,
            "box_output": "boxes",
            "letterbox": LETTERBOX,
            "score_threshold": 0.5,
            "nms_iou": 0.5,
            "max_detections": 100,
            "val_images": ["b.png"],
        },
    }


MakeTinyDetector = Callable[..., Path]


@pytest.fixture
def make_tiny_detector(tmp_path: Path) -> MakeTinyDetector:
    """Factory: writes ``tiny_detector.onnx`` and its card into a fresh folder and returns the model path.

    Keywords ``graph_input_hw``, ``graph_stride``, ``graph_box_output`` shape the ONNX graph; ``extra`` is merged
    into the card's ``extra``; any other keyword overrides a card field.
    """
    counter = iter(range(1_000_000))

    def make(
        *,
        graph_input_hw: tuple[int, int] = TINY_INPUT_HW,
        graph_stride: int = TINY_STRIDE,
        graph_box_output: str | None = "boxes",
        extra: dict[str, Any] | None = None,
        **card: Any,
    ) -> Path:
        folder = tmp_path / f"detector{next(counter)}"
        folder.mkdir()
        model_path = folder / "tiny_detector.onnx"
        model_path.write_bytes(
            tiny_detector_bytes(input_hw=graph_input_hw, stride=graph_stride, box_output=graph_box_output)
        )
        fields = tiny_detector_card_fields(model_path)
        fields["extra"] = {**fields["extra"], **(extra or {})}
        ModelCard(**{**fields, **card}).save(card_path_for(model_path))
        return model_path

    return make


@pytest.fixture
def tiny_detector_path(make_tiny_detector: MakeTinyDetector) -> Path:
    """The tiny detector with its default card (stride 8, input 64x96, threshold 0.5)."""
    return make_tiny_detector()


def _scene(hw: tuple[int, int], squares: list[tuple[int, int, int]]) -> np.ndarray:
    image = np.zeros((*hw, 3), np.uint8)
    for x, y, size in squares:
        image[y : y + size, x : x + size] = 255
    return image


@pytest.fixture
def scene() -> Callable[[tuple[int, int], list[tuple[int, int, int]]], np.ndarray]:
    """``scene(hw, [(x, y, size), ...])``: (h, w, 3) uint8 black image with white squares, in pixels."""
    return _scene
