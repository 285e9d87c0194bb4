"""ONNX export of the served detector graph, checked against torch on a seeded input (and real images if given)."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from services.common.errors import ModelError
from services.common.modelcard import atomic_write_bytes
from services.detector.train.model import SignDetectorInference, SignDetectorNet

__all__ = ["INPUT_NAME", "OUTPUT_NAMES", "ExportCheck", "export_onnx"]

INPUT_NAME = "images"
OUTPUT_NAMES = ("heatmap", "boxes")


class ExportCheck(dict[str, float]):
    """How far the ONNX graph is from torch.

    Keys: ``heatmap`` (largest |onnx - torch| over cells both call a peak or both zero), ``boxes`` (largest
    difference at peak cells, input pixels), ``peak_flips`` (cells that only one of them calls a peak: 3x3 near-ties
    that rounding breaks differently) and ``peak_flip_max`` (the largest heatmap value at such a cell).
    """


def export_onnx(
    net: SignDetectorNet,
    path: Path,
    input_hw: tuple[int, int],
    *,
    examples: np.ndarray | None = None,
    heatmap_atol: float = 1e-4,
    boxes_atol: float = 1e-3,
    flip_max: float = 0.05,
) -> ExportCheck:
    """Export :class:`SignDetectorInference` around ``net`` (on CPU, eval mode) with a dynamic batch axis.

    The graph is compared with torch on a seeded batch of 2 noise images plus ``examples``. Box coordinates reach
    ~1000 px, where float32 steps are ~1e-4, hence their own tolerance. Where neighbouring cells are (nearly)
    tied, rounding can make a cell a peak in one runtime and not the other; such flips are allowed only at values
    below ``flip_max``, far below any operating threshold (an untrained head is flat at 0.01, a trained one is
    ~0 away from signs).

    Args:
        net: trained network.
        path: where the ``.onnx`` file goes (written atomically, only if the check passes).
        input_hw: fixed input (H, W), multiples of 32.
        examples: optional (N, 3, H, W) float32 normalised real images to compare on as well.
        heatmap_atol: largest allowed heatmap difference where both agree on the peaks.
        boxes_atol: largest allowed box difference, in input pixels, at the heatmap's peaks.
        flip_max: largest heatmap value allowed at a cell only one runtime calls a peak.

    Returns:
        The largest differences found.

    Raises:
        ModelError: the exported graph disagrees with torch by more than the tolerances.
    """
    model = SignDetectorInference(net.cpu().eval()).eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo; it is still the one that produces a
        # plain, small opset-17 graph that every runtime (ONNX Runtime CPU/CUDA, TensorRT) accepts.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, *input_hw),),
            Path(tmp, "detector.onnx"),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)},
            opset_version=17,
        )
        data = Path(tmp, "detector.onnx").read_bytes()
    x = torch.randn(2, 3, *input_hw, generator=torch.Generator().manual_seed(1234))
    if examples is not None:
        x = torch.cat([x, torch.from_numpy(np.ascontiguousarray(examples, np.float32))])
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    check = ExportCheck(heatmap=0.0, boxes=0.0, peak_flips=0.0, peak_flip_max=0.0)
    for i in range(0, len(x), 2):
        with torch.no_grad():
            want_heat, want_boxes = (t.numpy() for t in model(x[i : i + 2]))
        got_heat, got_boxes = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x[i : i + 2].numpy()})
        flips = (got_heat > 0) != (want_heat > 0)
        diff = np.abs(got_heat - want_heat)
        check["heatmap"] = max(check["heatmap"], float(diff[~flips].max(initial=0.0)))
        check["peak_flips"] += float(flips.sum())
        check["peak_flip_max"] = max(
            check["peak_flip_max"], float(np.maximum(got_heat, want_heat)[flips].max(initial=0))
        )
        peaks = np.broadcast_to((want_heat > 0) & (got_heat > 0), want_boxes.shape)
        check["boxes"] = max(check["boxes"], float(np.abs(got_boxes - want_boxes)[peaks].max(initial=0.0)))
    if check["heatmap"] > heatmap_atol or check["boxes"] > boxes_atol or check["peak_flip_max"] > flip_max:
        raise ModelError(
            f"ONNX export: expected heatmap within {heatmap_atol}, boxes within {boxes_atol} px of torch and peak "
            f"flips only below {flip_max}, got max differences {check['heatmap']:.3g} and {check['boxes']:.3g} px, "
            f"{check['peak_flips']:.0f} flips up to {check['peak_flip_max']:.3g}"
        )
    atomic_write_bytes(path, data)
    return check
