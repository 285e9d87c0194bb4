"""ONNX export of a trained classifier, checked against the torch logits on a seeded input."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from services.common.errors import ModelError
from services.common.modelcard import atomic_write_bytes

__all__ = ["export_onnx"]


def export_onnx(
    model: nn.Module, path: Path, input_hw: tuple[int, int], *, input_name: str, output_name: str, atol: float = 1e-4
) -> float:
    """Export ``model`` (eval mode, on CPU) with a dynamic batch axis; return max |onnx - torch| on a seeded batch.

    Raises:
        ModelError: the exported graph disagrees with torch by more than ``atol``.
    """
    model = model.cpu().eval()
    example = torch.zeros(1, 3, *input_hw)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo; it is still the one that produces a
        # plain, small opset-17 graph that every runtime (ONNX Runtime CPU/CUDA, TensorRT) accepts.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buf,  # type: ignore[arg-type]  # torch's stub omits file objects, which export accepts
            dynamo=False,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            opset_version=17,
        )
    data = buf.getvalue()
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(8, 3, *input_hw, generator=g)
    with torch.no_grad():
        want = model(x).numpy()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run([output_name], {input_name: x.numpy()})[0]
    diff = float(np.abs(got - want).max())
    if diff > atol:
        raise ModelError(f"ONNX export: expected logits within {atol} of torch, got max difference {diff}")
    atomic_write_bytes(path, data)
    return diff
