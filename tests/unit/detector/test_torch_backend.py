"""TorchDetector on CPU with a small untrained network from the detector's training code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.common.errors import ModelError
from services.common.modelcard import ModelCard
from services.common.types import Frame, FrameRef
from services.detector.api import DetectorSettings
from services.detector.postprocess import LETTERBOX, DetectorSpec, decode, letterbox

torch = pytest.importorskip("torch")
model_module = pytest.importorskip(
    "services.detector.train.model", reason="the detector's training code (services/detector/train/model.py) is absent"
)

CHANNELS = 16
INPUT_HW = (64, 96)


def card() -> ModelCard:
    return ModelCard(
        name="torch-test",
        version="0",
        task="detector",
        architecture="mobilenetv2-fpn-centernet",
        class_names=("traffic_sign",),
        input_hw=INPUT_HW,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        onnx_sha256="0" * 64,
        onnx_output="heatmap",
        extra={
            "stride": 8,
            "box_output": "boxes",
            "letterbox": LETTERBOX,
            "score_threshold": 0.05,
            "nms_iou": 0.5,
            "max_detections": 20,
        },
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = model_module.build_model(imagenet=False, channels=CHANNELS).eval()
    with torch.no_grad():  # an untrained head scores ~0.01 everywhere, all near-ties; spread its scores out
        net.heat_out.weight.normal_(0, 2.0)
        net.heat_out.bias.fill_(-1.0)
    path = tmp_path_factory.mktemp("torch_detector") / "checkpoint.pt"
    torch.save({"model": net.state_dict(), "settings": {"channels": CHANNELS}}, path)
    return path


def test_matches_the_served_graph_on_cpu(checkpoint):
    from services.detector.torch_backend import TorchDetector

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in [(128, 192), (50, 300), (64, 96)]]
    frames = [Frame(FrameRef("r", i, 0.0), image) for i, image in enumerate(images)]
    detector = TorchDetector(checkpoint, card(), settings=DetectorSettings(batch_size=2), device="cpu")
    results = detector.detect(frames)
    assert [d.frame.index for d in results] == [0, 1, 2]

    spec = DetectorSpec.from_card(card())
    graph = model_module.load_inference_model(checkpoint, "cpu")
    batch, scales = letterbox(images, INPUT_HW, spec.mean, spec.std)
    with torch.inference_mode():
        heatmap, boxes = graph(torch.from_numpy(batch))
    expected = decode(heatmap.numpy(), boxes.numpy(), scales, [im.shape[:2] for im in images], spec)
    assert sum(len(d) for d in results) > 0
    for dets, (xyxy, score) in zip(results, expected, strict=True):
        np.testing.assert_allclose(dets.xyxy, xyxy, atol=1e-3)
        np.testing.assert_allclose(dets.score, score, atol=1e-5)
        assert dets.class_id.dtype == np.int16


def test_missing_checkpoint(tmp_path):
    from services.detector.torch_backend import TorchDetector

    with pytest.raises(ModelError, match="expected a checkpoint file at"):
        TorchDetector(tmp_path / "none.pt", card(), device="cpu")


def test_checkpoint_that_does_not_fit(tmp_path):
    from services.detector.torch_backend import TorchDetector

    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {"nothing": torch.zeros(1)}, "settings": {}}, path)
    with pytest.raises(ModelError, match="expected a detector training checkpoint that fits the network"):
        TorchDetector(path, card(), device="cpu")
