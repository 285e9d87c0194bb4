"""Fixtures shared by the unit tests: a tiny ONNX classifier built without torch; root logger restore."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.common.classes import GTSRB_CLASS_NAMES, NOT_A_SIGN
from services.common.modelcard import ModelCard, card_path_for, file_sha256

TINY_CLASS_NAMES = (*GTSRB_CLASS_NAMES, NOT_A_SIGN)
TINY_MEAN = (0.5, 0.5, 0.5)
TINY_STD = (0.25, 0.25, 0.25)


def tiny_weights(num_classes: int = len(TINY_CLASS_NAMES)) -> tuple[np.ndarray, np.ndarray]:
    """(3, K) float32 weights and (K,) float32 bias of the tiny model's linear layer, seeded."""
    rng = np.random.default_rng(0)
    return rng.normal(0, 2, (3, num_classes)).astype(np.float32), rng.normal(0, 0.5, num_classes).astype(np.float32)


def tiny_onnx_bytes(*, input_hw: tuple[int, int] = (64, 64), num_classes: int = len(TINY_CLASS_NAMES)) -> bytes:
    """A classifier-shaped ONNX model: images (batch, 3, H, W) -> GlobalAveragePool -> MatMul + Add -> logits."""
    # onnx comes with the train extra; without it, only the tests that need a model are skipped.
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight, bias = tiny_weights(num_classes)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
            helper.make_node("MatMul", ["features", "weight"], ["scores"]),
            helper.make_node("Add", ["scores", "bias"], ["logits"]),
        ],
        "tiny_classifier",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, *input_hw])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        initializer=[numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # what onnxruntime releases of the last two years all load
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _tiny_reference_log_probs(crops_64: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """What the tiny model should return for (B, 64, 64, 3) uint8 crops that need no resizing, in float64."""
    x = (crops_64.astype(np.float64) / 255 - np.asarray(TINY_MEAN)) / np.asarray(TINY_STD)
    weight, bias = tiny_weights()
    logits = (x.mean(axis=(1, 2)) @ weight + bias) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


MakeTinyClassifier = Callable[..., Path]


@pytest.fixture
def make_tiny_classifier(tmp_path: Path) -> MakeTinyClassifier:
    """Factory: writes ``tiny.onnx`` and its card into a fresh folder and returns the model path.

    Keyword arguments ``input_hw`` and ``num_classes`` shape the ONNX graph; any other keyword overrides a card
    field (for instance ``class_names``, ``temperature``, ``onnx_sha256``).
    """
    counter = iter(range(1_000_000))

    def make(*, input_hw: tuple[int, int] = (64, 64), num_classes: int = len(TINY_CLASS_NAMES), **card: Any) -> Path:
        folder = tmp_path / f"model{next(counter)}"
        folder.mkdir()
        model_path = folder / "tiny.onnx"
        model_path.write_bytes(tiny_onnx_bytes(input_hw=input_hw, num_classes=num_classes))
        fields: dict[str, Any] = {
            "name": "tiny",
            "version": "0.0.1",
            "task": "classifier",
            "architecture": "gap-linear",
            "class_names": TINY_CLASS_NAMES,
            "input_hw": (64, 64),
            "mean": TINY_MEAN,
            "std": TINY_STD,
            "background_class": TINY_CLASS_NAMES.index(NOT_A_SIGN),
            "onnx_sha256": file_sha256(model_path),
        }
        ModelCard(**{**fields, **card}).save(card_path_for(model_path))
        return model_path

    return make


@pytest.fixture
def tiny_classifier_path(make_tiny_classifier: MakeTinyClassifier) -> Path:
    """The tiny model with a default card (T = 1, no reject threshold, background class 43)."""
    return make_tiny_classifier()


@pytest.fixture
def tiny_reference() -> Callable[..., np.ndarray]:
    """``f(crops_64, temperature=1.0)``: the tiny model's log-probs computed in numpy, for (B, 64, 64, 3) crops."""
    return _tiny_reference_log_probs
