"""OnnxDetector against the tiny ONNX detector (tests/unit/detector/conftest.py): outputs known in advance."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from services.common.errors import ConfigError, ModelError
from services.common.modelcard import card_path_for, load_card
from services.common.types import Detections, Frame, FrameRef
from services.detector.api import Detector, DetectorSettings
from services.detector.models import default_detector_path
from services.detector.onnx import OnnxDetector


def frame(image: np.ndarray, index: int = 0) -> Frame:
    return Frame(FrameRef("rec", index, index / 25), image)


def test_is_a_detector(tiny_detector_path):
    detector: Detector = OnnxDetector(tiny_detector_path)
    assert detector.card.name == "tiny-detector"


def test_detects_white_squares_in_frame_pixels(tiny_detector_path, scene):
    # 128x192 frames: scale 0.5, so a 16 px square on a 16 px grid fills exactly one 8 px cell of the network.
    detector = OnnxDetector(tiny_detector_path)
    (dets,) = detector.detect([frame(scene((128, 192), [(32, 48, 16), (160, 96, 16)]))])
    assert isinstance(dets, Detections)
    assert dets.frame == FrameRef("rec", 0, 0.0)
    assert dets.xyxy.dtype == np.float32
    assert dets.score.dtype == np.float32
    assert dets.class_id.dtype == np.int16
    assert sorted(dets.xyxy.tolist()) == [[32, 48, 48, 64], [160, 96, 176, 112]]
    assert np.all(dets.score > 0.8)
    assert dets.class_id.tolist() == [0, 0]


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_batches_keep_order_and_frame_sizes(make_tiny_detector, scene, batch_size):
    detector = OnnxDetector(make_tiny_detector(), settings=DetectorSettings(batch_size=batch_size))
    frames = [
        frame(scene((128, 192), [(32, 48, 16)]), 0),
        frame(scene((64, 96), []), 1),
        frame(scene((256, 384), [(64, 32, 32)]), 2),  # scale 0.25
        frame(scene((64, 96), [(80, 0, 8)]), 3),  # scale 1, the square at the top-right corner
        frame(scene((50, 300), [(0, 0, 25)]), 4),  # scale 0.32: letterboxed with padding below
    ]
    results = detector.detect(frames)
    assert [d.frame.index for d in results] == [0, 1, 2, 3, 4]
    assert [len(d) for d in results] == [1, 0, 1, 1, 1]
    assert results[0].xyxy.tolist() == [[32, 48, 48, 64]]
    assert results[2].xyxy.tolist() == [[64, 32, 96, 64]]
    assert results[3].xyxy.tolist() == [[80, 0, 88, 8]]
    np.testing.assert_allclose(results[4].xyxy, [[0, 0, 25, 25]], atol=1e-4)


def test_settings_override_card_threshold(make_tiny_detector, scene):
    image = scene((128, 192), [(32, 48, 8)])  # a quarter of a cell: scores ~0.25
    assert len(OnnxDetector(make_tiny_detector()).detect([frame(image)])[0]) == 0
    low = OnnxDetector(make_tiny_detector(), settings=DetectorSettings(score_threshold=0.1))
    assert len(low.detect([frame(image)])[0]) == 1
    assert low.spec.score_threshold == 0.1


def test_empty_batch(tiny_detector_path):
    assert OnnxDetector(tiny_detector_path).detect([]) == []


def test_wrong_input_size(make_tiny_detector):
    with pytest.raises(
        ModelError, match=r"expected input 'images' of shape \(batch, 3, 64, 96\).*got \(batch, 3, 32, 96\)"
    ):
        OnnxDetector(make_tiny_detector(graph_input_hw=(32, 96)))


def test_missing_box_output(make_tiny_detector):
    with pytest.raises(
        ModelError, match=r"expected an output named 'boxes' \(from its card\), got outputs \['heatmap'\]"
    ):
        OnnxDetector(make_tiny_detector(graph_box_output=None))


def test_box_output_name_differs_from_card(make_tiny_detector):
    with pytest.raises(ModelError, match=r"expected an output named 'box_xyxy'"):
        OnnxDetector(make_tiny_detector(extra={"box_output": "box_xyxy"}))


def test_stride_differs_from_card(make_tiny_detector):
    with pytest.raises(
        ModelError, match=r"expected output 'heatmap' of shape \(batch, 1, 16, 24\).*stride 4.*got \(batch, 1, 8, 12\)"
    ):
        OnnxDetector(make_tiny_detector(extra={"stride": 4}))


def test_wrong_input_name(make_tiny_detector):
    with pytest.raises(
        ModelError, match=r"expected one input named 'pixels' \(from its card\), got inputs \['images'\]"
    ):
        OnnxDetector(make_tiny_detector(onnx_input="pixels"))


def test_classifier_card(make_tiny_detector):
    with pytest.raises(ModelError, match="expected task 'detector', got 'classifier'"):
        OnnxDetector(make_tiny_detector(task="classifier"))


def test_card_without_stride(make_tiny_detector):
    with pytest.raises(ModelError, match=r"expected extra\['stride'\] int >= 1, got None"):
        OnnxDetector(make_tiny_detector(extra={"stride": None}))


def test_wrong_sha256(make_tiny_detector):
    with pytest.raises(ModelError, match=r"expected sha256 a{64} \(from its card\), got [0-9a-f]{64}"):
        OnnxDetector(make_tiny_detector(onnx_sha256="a" * 64))


def test_corrupt_onnx_bytes(tiny_detector_path):
    garbage = b"not a protobuf" * 10
    tiny_detector_path.write_bytes(garbage)
    card_path = card_path_for(tiny_detector_path)
    load_card(card_path).model_copy(update={"onnx_sha256": hashlib.sha256(garbage).hexdigest()}).save(card_path)
    with pytest.raises(ModelError, match="expected an ONNX model onnxruntime can load"):
        OnnxDetector(tiny_detector_path)


def test_missing_card(tiny_detector_path):
    card_path_for(tiny_detector_path).unlink()
    with pytest.raises(ModelError, match=r"model card: expected a JSON file at .*tiny_detector\.card\.json"):
        OnnxDetector(tiny_detector_path)


def test_bad_threads(tiny_detector_path):
    with pytest.raises(ConfigError, match="intra_op_threads"):
        OnnxDetector(tiny_detector_path, intra_op_threads=0)


def test_default_path_is_in_deploy_models():
    assert default_detector_path().parts[-3:] == ("deploy", "models", "detector.onnx")
