"""The committed default classifier, on the validation tracks of the shared GTSRB data (skipped without the data).

Guards the shipped model file: its card, its sha256 and its accuracy on the held-out tracks it was validated on
(the card says 0.9892 with rejections counted as errors). A retrained model that is worse fails here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.classifier.api import decide
from services.classifier.models import default_classifier_path
from services.classifier.onnx import OnnxClassifier
from services.classifier.train.data import scan_gtsrb, split_tracks
from services.common.classes import GTSRB_CLASS_NAMES, NOT_A_SIGN

DATA = Path(os.environ.get("ROADLABEL_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
GTSRB = DATA / "gtsrb_train"


@pytest.fixture(scope="module")
def classifier() -> OnnxClassifier:
    return OnnxClassifier(default_classifier_path())


def test_card_describes_the_43_classes_and_not_a_sign(classifier: OnnxClassifier) -> None:
    card = classifier.card
    assert card.class_names == (*GTSRB_CLASS_NAMES, NOT_A_SIGN)
    assert card.background_class == 43
    assert card.input_hw == (64, 64)
    assert card.metrics["val_ece_after_calibration"] < card.metrics["val_ece_before_calibration"]


@pytest.mark.skipif(not GTSRB.is_dir(), reason=f"shared GTSRB data not found at {GTSRB}")
def test_validation_tracks_are_named_as_the_card_says(classifier: OnnxClassifier) -> None:
    samples = scan_gtsrb(GTSRB)
    seed = int(classifier.card.training.get("seed", 0))
    fraction = float(classifier.card.training.get("val_fraction", 0.15))
    _, val_tracks = split_tracks(samples, fraction, seed)
    val = [s for s in samples if s.track in val_tracks]
    crops = []
    for s in val:
        with Image.open(s.path) as img:
            crops.append(np.asarray(img.convert("RGB")))
    decisions = decide(classifier.classify(crops), classifier.card)
    labels = np.array([s.class_id for s in val])
    accuracy = float((decisions.class_id == labels).mean())
    assert len(val) == classifier.card.metrics["val_sign_crops"]
    assert accuracy == pytest.approx(classifier.card.metrics["val_sign_accuracy_after_reject"], abs=0.002)
    assert accuracy >= 0.985
