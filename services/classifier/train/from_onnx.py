"""A torch classifier from a base model: its registry checkpoint, or its ONNX file converted back.

The exported classifier has BatchNorm folded into the convolutions; :func:`services.backbones.from_onnx.
load_onnx_weights` undoes that exactly for eval mode (identity BatchNorm carrying the folded bias), so fine-tuning a
converted base keeps its BatchNorms in eval mode.
"""

from __future__ import annotations

from pathlib import Path

import torch

from services.backbones.from_onnx import ConversionError, load_onnx_weights
from services.backbones.mobilenet_v2 import MobileNetV2
from services.common.errors import ModelError
from services.common.modelcard import ModelCard

__all__ = ["classifier_from_checkpoint", "classifier_from_onnx", "load_base_classifier"]


def classifier_from_onnx(onnx_path: Path, num_classes: int) -> MobileNetV2:
    """Rebuild the torch MobileNetV2 of an exported classifier, in eval mode.

    Raises:
        ModelError: the graph is not this network with ``num_classes`` outputs.
    """
    model = MobileNetV2(num_classes=num_classes, dropout=0.2)
    try:
        load_onnx_weights(model, onnx_path, torch.zeros(1, 3, 64, 64))
    except ConversionError as exc:
        raise ModelError(f"{exc}; the base model's class list or architecture differs from this one") from exc
    return model.eval()


def classifier_from_checkpoint(checkpoint: Path, num_classes: int) -> MobileNetV2:
    """The torch MobileNetV2 stored in a training checkpoint (``{'model': state_dict, ...}``; fp16 is widened)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    weights = state.get("model") if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise ModelError(f"{checkpoint}: expected a checkpoint with a 'model' state dict")
    model = MobileNetV2(num_classes=num_classes, dropout=0.2)
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{checkpoint}: expected a MobileNetV2 with {num_classes} outputs ({exc})") from exc
    return model.eval()


def load_base_classifier(model_path: Path, card: ModelCard, checkpoint: Path | None) -> tuple[MobileNetV2, str]:
    """The base model as torch: from ``checkpoint`` when given, else converted from ONNX -> (model, how)."""
    if checkpoint is not None:
        return classifier_from_checkpoint(checkpoint, card.num_outputs), f"checkpoint {checkpoint.name}"
    return classifier_from_onnx(model_path, card.num_outputs), f"converted from {model_path.name}"
