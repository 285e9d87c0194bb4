"""Load an exported ONNX graph's weights back into the torch network it was exported from.

The TorchScript exporter folds each BatchNorm into the convolution before it (``W' = W * g / sqrt(v + eps)``,
``b' = beta - m * g / sqrt(v + eps)``). Converting back puts ``W'`` into ``conv.weight`` and turns that BatchNorm
into identity plus the folded bias: ``gamma = 1``, ``beta = b'``, ``running_mean = 0``, ``running_var = 1 - eps``,
which equals the graph in eval mode. Convolutions without a BatchNorm take ``W'`` and ``b'`` as they are.

Convolutions are matched by execution order: a forward pass with hooks records the order torch calls them, the
order the exporter traced them in, which is the order of the graph's Conv nodes. Every shape is checked, and the
``Gemm`` nodes map onto the ``nn.Linear`` layers the same way. A network trained from such a conversion must keep
its BatchNorms in eval mode (batch statistics would undo the folding).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

__all__ = ["ConversionError", "load_onnx_weights"]


class ConversionError(ValueError):
    """The graph does not match the network."""


def _execution_order(model: nn.Module, example: torch.Tensor) -> tuple[list[nn.Conv2d], list[nn.Linear]]:
    convs: list[nn.Conv2d] = []
    linears: list[nn.Linear] = []
    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda mod, _i, _o: convs.append(mod)))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(lambda mod, _i, _o: linears.append(mod)))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return convs, linears


def _bn_after(model: nn.Module) -> dict[nn.Conv2d, nn.BatchNorm2d]:
    """Each convolution directly followed by a BatchNorm in a Sequential."""
    pairs: dict[nn.Conv2d, nn.BatchNorm2d] = {}
    for m in model.modules():
        if isinstance(m, nn.Sequential):
            children = list(m.children())
            for a, b in zip(children, children[1:], strict=False):
                if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                    pairs[a] = b
    return pairs


def load_onnx_weights(model: nn.Module, onnx_path: Path, example: torch.Tensor) -> None:
    """Copy the weights of ``onnx_path`` into ``model`` (see the module doc); ``example`` drives the hooks.

    Raises:
        ConversionError: the graph's convolutions or dense layers differ from the network's in number or shape.
    """
    graph = onnx.load(str(onnx_path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            init.setdefault(node.output[0], numpy_helper.to_array(node.attribute[0].t))
    conv_nodes = [n for n in graph.node if n.op_type == "Conv"]
    gemm_nodes = [n for n in graph.node if n.op_type == "Gemm"]
    convs, linears = _execution_order(model, example)
    if len(conv_nodes) != len(convs) or len(gemm_nodes) != len(linears):
        raise ConversionError(
            f"{onnx_path}: expected {len(convs)} Conv and {len(linears)} Gemm nodes for this network, got "
            f"{len(conv_nodes)} Conv and {len(gemm_nodes)} Gemm"
        )
    bns = _bn_after(model)

    def weight(node: onnx.NodeProto, i: int, what: str) -> np.ndarray:
        if len(node.input) <= i or node.input[i] not in init:
            raise ConversionError(f"{onnx_path}: {node.op_type} node {node.name} has no constant {what}")
        return np.array(init[node.input[i]], np.float32)

    with torch.no_grad():
        for n, (node, conv) in enumerate(zip(conv_nodes, convs, strict=True)):
            w, b = weight(node, 1, "weight"), weight(node, 2, "bias")
            if w.shape != tuple(conv.weight.shape) or b.shape != (conv.out_channels,):
                raise ConversionError(
                    f"{onnx_path}: Conv node {n}: expected weight {tuple(conv.weight.shape)} and bias "
                    f"({conv.out_channels},), got {w.shape} and {b.shape}"
                )
            conv.weight.copy_(torch.from_numpy(w))
            bn = bns.get(conv)
            if bn is not None:
                assert bn.running_mean is not None
                assert bn.running_var is not None
                bn.weight.fill_(1.0)
                bn.bias.copy_(torch.from_numpy(b))
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)
            elif conv.bias is not None:
                conv.bias.copy_(torch.from_numpy(b))
            elif np.any(b != 0):
                raise ConversionError(f"{onnx_path}: Conv node {n} has a bias, its convolution has neither bias nor BN")
        for n, (node, lin) in enumerate(zip(gemm_nodes, linears, strict=True)):
            w, b = weight(node, 1, "weight"), weight(node, 2, "bias")
            if w.shape != tuple(lin.weight.shape) or b.shape != (lin.out_features,):
                raise ConversionError(
                    f"{onnx_path}: Gemm node {n}: expected weight {tuple(lin.weight.shape)}, got {w.shape}"
                )
            lin.weight.copy_(torch.from_numpy(w))
            if lin.bias is not None:
                lin.bias.copy_(torch.from_numpy(b))
