"""A whole training run on tiny synthetic data: ImageNet weights, export, card, ONNX parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from services.backbones.mobilenet_v2 import MobileNetV2, load_imagenet_weights
from services.classifier.train.export import export_onnx
from services.classifier.train.loop import TrainEvent, TrainSettings, train_classifier
from services.common.modelcard import file_sha256, load_card


def test_imagenet_weights_load_and_bad_sha256_is_refused(tmp_path: Path) -> None:
    model = MobileNetV2(10)
    load_imagenet_weights(model)
    bad = tmp_path / "w.pth"
    bad.write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="expected sha256 b0353104"):
        load_imagenet_weights(MobileNetV2(10), bad)


def test_training_run_writes_a_consistent_model(gtsrb_dir: Path, gtsdb_dir: Path, tmp_path: Path) -> None:
    events: list[TrainEvent] = []
    settings = TrainSettings(
        data=gtsrb_dir,
        background=(gtsdb_dir,),
        out=tmp_path / "out",
        input_size=32,
        epochs=2,
        batch_size=8,
        max_steps=2,
        background_per_scene=4,
        val_fraction=0.3,
        device="cpu",
    )
    result = train_classifier(settings, events.append)
    assert [e.done for e in events if e.stage == "epoch"] == [1, 2]
    card = load_card(tmp_path / "out" / "classifier.card.json")
    assert card == result.card
    assert card.onnx_sha256 == file_sha256(result.model_path)
    assert card.num_outputs == 44
    assert card.background_class == 43
    assert card.class_names[43] == "not_a_sign"
    assert card.input_hw == (32, 32)
    assert card.temperature > 0
    assert 0 <= card.metrics["val_ece_after_calibration"] <= 1
    assert card.metrics["onnx_max_abs_diff_vs_torch"] < 1e-4
    assert len(card.training_data_sha256 or "") == 64
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)
    assert set(checkpoint) == {"model", "optimizer", "scheduler", "epoch", "settings"}
    assert len(json.loads((tmp_path / "out" / "history.json").read_text())) == 2


def test_onnx_export_matches_torch_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MobileNetV2(5).eval()
    diff = export_onnx(model, tmp_path / "m.onnx", (32, 32), input_name="images", output_name="logits")
    assert diff < 1e-4
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(["logits"], {"images": x})[0], want, atol=1e-4)
