"""OnnxClassifier against a tiny ONNX model built with onnx.helper (no torch, no real weights)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from services.classifier.api import Classifier, decide
from services.classifier.models import default_classifier_path
from services.classifier.onnx import OnnxClassifier
from services.common.errors import ConfigError, InputError, ModelError
from services.common.modelcard import card_path_for, load_card

K = 44


def crops_of_sizes(sizes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def uniform_crops(n: int) -> list[np.ndarray]:
    """n crops of 64x64, each one flat colour, all different."""
    rng = np.random.default_rng(1)
    return [np.full((64, 64, 3), colour, np.uint8) for colour in rng.integers(0, 256, (n, 3), dtype=np.uint8)]


def test_is_a_classifier(tiny_classifier_path):
    classifier: Classifier = OnnxClassifier(tiny_classifier_path)
    assert classifier.card.name == "tiny"


def test_classify_varied_sizes(tiny_classifier_path):
    classifier = OnnxClassifier(tiny_classifier_path)
    crops = crops_of_sizes([(1, 1), (17, 300), (64, 64), (500, 500)])
    lp = classifier.classify(crops)
    assert lp.shape == (4, K)
    assert lp.dtype == np.float32
    np.testing.assert_allclose(np.exp(lp.astype(np.float64)).sum(axis=1), 1.0, rtol=1e-5)
    # Same rows, one crop at a time: the batch keeps the input order.
    one_by_one = np.concatenate([classifier.classify([crop]) for crop in crops])
    np.testing.assert_allclose(lp, one_by_one, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_classify_matches_reference_in_order_across_chunks(make_tiny_classifier, tiny_reference, batch_size):
    classifier = OnnxClassifier(make_tiny_classifier(), batch_size=batch_size, intra_op_threads=1)
    crops = uniform_crops(10)
    lp = classifier.classify(crops)
    np.testing.assert_allclose(lp, tiny_reference(np.stack(crops)), rtol=1e-5, atol=1e-4)
    assert len(set(lp.argmax(axis=1).tolist())) > 1  # the crops really are told apart


def test_temperature_is_applied(make_tiny_classifier, tiny_reference):
    crops = uniform_crops(5)
    lp = OnnxClassifier(make_tiny_classifier(temperature=2.5)).classify(crops)
    np.testing.assert_allclose(lp, tiny_reference(np.stack(crops), temperature=2.5), rtol=1e-5, atol=1e-4)
    lp1 = OnnxClassifier(make_tiny_classifier()).classify(crops)
    assert np.all(lp.max(axis=1) < lp1.max(axis=1))  # a higher temperature lowers the top probability


def test_empty_batch(tiny_classifier_path):
    assert OnnxClassifier(tiny_classifier_path).classify([]).shape == (0, K)


def test_decide_on_classifier_output(make_tiny_classifier):
    classifier = OnnxClassifier(make_tiny_classifier(reject_threshold=1.0))
    decisions = decide(classifier.classify(uniform_crops(3)), classifier.card)
    assert decisions.class_id.tolist() == [-1, -1, -1]  # nothing reaches a probability of 1


@pytest.mark.parametrize(
    "crop",
    [np.zeros((0, 5, 3), np.uint8), np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32)],
    ids=["empty", "gray", "float"],
)
def test_bad_crop(tiny_classifier_path, crop):
    with pytest.raises(InputError, match="crop: expected"):
        OnnxClassifier(tiny_classifier_path).classify([crop])


def test_wrong_sha256(make_tiny_classifier):
    path = make_tiny_classifier(onnx_sha256="a" * 64)
    with pytest.raises(ModelError, match=r"expected sha256 a{64} \(from its card\), got [0-9a-f]{64}"):
        OnnxClassifier(path)


def test_wrong_class_count_in_card(make_tiny_classifier):
    path = make_tiny_classifier(class_names=tuple(f"c{i}" for i in range(43)), background_class=None)
    with pytest.raises(ModelError, match=r"expected output 'logits' of shape \(batch, 43\).* got \(batch, 44\)"):
        OnnxClassifier(path)


def test_wrong_input_size(make_tiny_classifier):
    path = make_tiny_classifier(input_hw=(32, 32))
    with pytest.raises(
        ModelError, match=r"expected input 'images' of shape \(batch, 3, 64, 64\).* got \(batch, 3, 32, 32\)"
    ):
        OnnxClassifier(path)


def test_wrong_input_name(make_tiny_classifier):
    path = make_tiny_classifier(onnx_input="pixels")
    with pytest.raises(
        ModelError, match=r"expected one input named 'pixels' \(from its card\), got inputs \['images'\]"
    ):
        OnnxClassifier(path)


def test_background_class_out_of_range(make_tiny_classifier):
    with pytest.raises(ModelError, match=r"expected background_class in 0\.\.43, got 44"):
        OnnxClassifier(make_tiny_classifier(background_class=44))


def test_detector_card(make_tiny_classifier):
    with pytest.raises(ModelError, match="expected task 'classifier', got 'detector'"):
        OnnxClassifier(make_tiny_classifier(task="detector"))


def test_corrupt_onnx_bytes(tiny_classifier_path):
    card_path = card_path_for(tiny_classifier_path)
    garbage = b"this is not a protobuf" * 10
    tiny_classifier_path.write_bytes(garbage)
    card = load_card(card_path)
    # Re-sign the card so that the sha256 check passes and onnxruntime itself has to reject the bytes.
    card.model_copy(update={"onnx_sha256": hashlib.sha256(garbage).hexdigest()}).save(card_path)
    with pytest.raises(ModelError, match="expected an ONNX model onnxruntime can load, got an error"):
        OnnxClassifier(tiny_classifier_path)


def test_truncated_onnx_fails_the_sha256_check(tiny_classifier_path):
    data = tiny_classifier_path.read_bytes()
    tiny_classifier_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="the file is corrupt or does not belong to this card"):
        OnnxClassifier(tiny_classifier_path)


def test_missing_card(tiny_classifier_path):
    card_path_for(tiny_classifier_path).unlink()
    with pytest.raises(ModelError, match=r"model card: expected a JSON file at .*tiny\.card\.json, found nothing"):
        OnnxClassifier(tiny_classifier_path)


def test_invalid_card(tiny_classifier_path):
    card_path = card_path_for(tiny_classifier_path)
    raw = json.loads(card_path.read_text())
    raw["surprise"] = 1
    card_path.write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="invalid"):
        OnnxClassifier(tiny_classifier_path)


def test_missing_model(tmp_path: Path, tiny_classifier_path):
    card = load_card(card_path_for(tiny_classifier_path))
    with pytest.raises(ModelError, match=r"expected an ONNX file at .*nothing\.onnx, found nothing"):
        OnnxClassifier(tmp_path / "nothing.onnx", card)


def test_explicit_card_wins(tiny_classifier_path, make_tiny_classifier):
    card = load_card(card_path_for(tiny_classifier_path)).model_copy(update={"temperature": 3.0})
    assert OnnxClassifier(tiny_classifier_path, card).card.temperature == 3.0


@pytest.mark.parametrize(("kwargs", "message"), [({"batch_size": 0}, "batch_size"), ({"intra_op_threads": 0}, "intra")])
def test_bad_settings(tiny_classifier_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        OnnxClassifier(tiny_classifier_path, **kwargs)


def test_default_path_is_in_deploy_models():
    path = default_classifier_path()
    assert path.parts[-3:] == ("deploy", "models", "classifier.onnx")
    assert (path.parents[2] / "services" / "classifier" / "models.py").is_file()
