"""``roadlabel detect`` and ``roadlabel eval detector`` through gateway.cli.main, with the tiny detector and classifier.

Also gateway.two_stage (crop windows, one classifier call per batch). The tiny detector scores white squares on black
(see tests/unit/detector/conftest.py); the tiny classifier is the GAP-linear one of tests/unit/conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from gateway.cli import EXIT_INPUT_ERRORS, EXIT_MODEL_ERROR, EXIT_OK, main
from gateway.detect_cli import DETECTOR_ENV_VAR
from gateway.two_stage import SIGN_CLASS_ID, SIGN_CONFIDENCE, TwoStageSettings, classify_detections, crop_boxes
from services.classifier.api import decide
from services.classifier.onnx import OnnxClassifier
from services.common.modelcard import ModelCard
from services.common.types import Detections, FrameRef

# main() installs a log handler on the root logger; keep it from leaking into other tests.
pytestmark = pytest.mark.usefixtures("restore_root_logger")

SQUARE = (32, 48, 16)  # x, y, size in a 128x192 scene: one 8 px cell of the tiny detector at scale 0.5
SQUARE_XYXY = [32.0, 48.0, 48.0, 64.0]


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def scenes(tmp_path, scene) -> list[Path]:
    """Good images of every kind load_image converts, one corrupt file, in the order the CLI prints them."""
    folder = tmp_path / "scenes"
    folder.mkdir()
    rgb = scene((128, 192), [SQUARE])
    Image.fromarray(rgb).save(folder / "a.png")
    Image.fromarray(rgb[..., 0], mode="L").save(folder / "b_gray.png")
    rgba = np.concatenate([rgb, np.full((128, 192, 1), 255, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(folder / "c_rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "d_16bit.png")
    (folder / "e_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    Image.fromarray(scene((8, 8), [])).save(folder / "f_tiny.png")
    Image.fromarray(scene((256, 384), [(64, 96, 32), (320, 32, 32)])).save(folder / "g_two.jpg", quality=95)
    return sorted(folder.iterdir())


@pytest.fixture
def models(tiny_detector_path, make_tiny_classifier) -> list[str]:
    """--detector and --classifier options: a classifier without background class, so nothing is rejected."""
    return ["--detector", str(tiny_detector_path), "--classifier", str(make_tiny_classifier(background_class=None))]


def test_json_lines_with_bad_inputs_among_good(capsys, scenes, models):
    code, out, err = run(capsys, "detect", "--json", "--batch-size", "2", *models, str(scenes[0].parent))
    assert code == EXIT_INPUT_ERRORS
    corrupt = scenes[4]
    assert err.count("roadlabel: ") == 1
    assert str(corrupt) in err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in scenes if p != corrupt]
    by_name = {Path(r["path"]).name: r for r in records}
    for name in ("a.png", "b_gray.png", "c_rgba.png", "d_16bit.png"):
        record = by_name[name]
        assert (record["width"], record["height"]) == (192, 128)
        assert [d["xyxy"] for d in record["detections"]] == [SQUARE_XYXY], name
    assert by_name["f_tiny.png"] == {"path": str(scenes[5]), "width": 8, "height": 8, "detections": []}
    two = by_name["g_two.jpg"]["detections"]
    assert sorted(d["xyxy"] for d in two) == [[64.0, 96.0, 96.0, 128.0], [320.0, 32.0, 352.0, 64.0]]
    for record in records:
        for det in record["detections"]:
            assert set(det) == {"xyxy", "score", "class_id", "class_name", "class_confidence"}
            assert 0.5 <= det["score"] <= 1
            assert 0 <= det["class_id"] <= 43
            assert 0 < det["class_confidence"] <= 1


def test_classes_come_from_the_crop_with_margin(capsys, tmp_path, scene, tiny_detector_path, make_tiny_classifier):
    image = scene((128, 192), [SQUARE])
    image[40:72, 24:56, 1] = 90  # the margin around the square gets its own colour, so the margin changes the crop
    path = tmp_path / "scene.png"
    Image.fromarray(image).save(path)
    classifier_path = make_tiny_classifier(background_class=None)
    classifier = OnnxClassifier(classifier_path)
    models = ["--detector", str(tiny_detector_path), "--classifier", str(classifier_path)]
    for margin in (0.0, 0.15, 0.5):
        code, out, _ = run(capsys, "detect", "--json", "--crop-margin", str(margin), *models, str(path))
        assert code == EXIT_OK
        (det,) = json.loads(out)["detections"]
        x1, y1, x2, y2 = crop_boxes(np.array([SQUARE_XYXY]), margin, (128, 192))[0]
        decision = decide(classifier.classify([image[y1:y2, x1:x2]]), classifier.card)
        assert det["class_id"] == int(decision.class_id[0])
        assert det["class_confidence"] == pytest.approx(float(decision.confidence[0]), abs=1e-4)


def test_rejected_detections_dropped_or_kept(capsys, scenes, tiny_detector_path, make_tiny_classifier):
    models = ["--detector", str(tiny_detector_path), "--classifier", str(make_tiny_classifier(reject_threshold=1.0))]
    _, out, _ = run(capsys, "detect", "--json", *models, str(scenes[0]))
    assert json.loads(out)["detections"] == []
    _, out, _ = run(capsys, "detect", "--json", "--keep-rejected", *models, str(scenes[0]))
    (det,) = json.loads(out)["detections"]
    assert (det["class_id"], det["class_name"], det["rejected"], det["xyxy"]) == (-1, "unknown", True, SQUARE_XYXY)


def test_plain_text_lines(capsys, scenes, models):
    code, out, _ = run(capsys, "detect", *models, str(scenes[0]), str(scenes[5]))
    assert code == EXIT_OK
    first, second = out.splitlines()
    assert first.startswith(f"{scenes[0]}\t1 sign\t")
    assert "at 32,48,48,64 (score " in first
    assert second == f"{scenes[5]}\t0 signs"


def test_missing_path_is_an_input_error(capsys, scenes, models, tmp_path):
    code, out, err = run(capsys, "detect", "--json", *models, str(tmp_path / "nope.png"), str(scenes[0]))
    assert code == EXIT_INPUT_ERRORS
    assert "nope.png" in err
    assert len(out.splitlines()) == 1


def test_missing_detector_model(capsys, scenes, tmp_path, monkeypatch, tiny_classifier_path):
    monkeypatch.setenv(DETECTOR_ENV_VAR, str(tmp_path / "none.onnx"))
    code, out, err = run(capsys, "detect", "--classifier", str(tiny_classifier_path), str(scenes[0]))
    assert code == EXIT_MODEL_ERROR
    assert out == ""
    assert f"from ${DETECTOR_ENV_VAR}" in err


def test_detector_card_given_as_classifier(capsys, scenes, tiny_detector_path):
    code, _, err = run(
        capsys, "detect", "--detector", str(tiny_detector_path), "--classifier", str(tiny_detector_path), str(scenes[0])
    )
    assert code == EXIT_MODEL_ERROR
    assert "expected task 'classifier', got 'detector'" in err


# --- eval detector ---------------------------------------------------------------------------------------------------


@pytest.fixture
def gtsdb(tmp_path, scene) -> Path:
    """Three 128x192 scenes: a has one sign, b two, c none; plus a false positive in c (an unlabelled square)."""
    root = tmp_path / "gtsdb"
    root.mkdir()
    Image.fromarray(scene((128, 192), [SQUARE])).save(root / "a.png")
    Image.fromarray(scene((128, 192), [(16, 16, 16), (96, 64, 16)])).save(root / "b.png")
    Image.fromarray(scene((128, 192), [(160, 96, 16)])).save(root / "c.png")
    return root


def white_square_class(classifier_path: Path, scene) -> int:
    """The tiny classifier's class for the crop of a lone white square, as the CLI cuts it."""
    classifier = OnnxClassifier(classifier_path)
    x1, y1, x2, y2 = crop_boxes(np.array([SQUARE_XYXY]), TwoStageSettings().crop_margin, (128, 192))[0]
    crop = scene((128, 192), [SQUARE])[y1:y2, x1:x2]
    return int(decide(classifier.classify([crop]), classifier.card).class_id[0])


def test_eval_detector_json(capsys, gtsdb, scene, tiny_detector_path, make_tiny_classifier):
    classifier_path = make_tiny_classifier(background_class=None)
    right = white_square_class(classifier_path, scene)
    wrong = (right + 1) % 43
    (gtsdb / "gt.txt").write_text(
        f"a.png;32;48;47;63;{right}\nb.png;16;16;31;31;{right}\nb.png;96;64;111;79;{wrong}\nb.png;150;0;170;20;1\n"
    )
    models = ["--detector", str(tiny_detector_path), "--classifier", str(classifier_path)]
    code, out, _ = run(capsys, "eval", "detector", "--data", str(gtsdb), "--json", *models)
    assert code == EXIT_OK
    report = json.loads(out)
    assert (report["images"], report["gt_signs"], report["split"]) == (3, 4, "all")
    assert report["recall"] == 0.75  # the 4th sign has no square
    assert report["precision"] == 0.75  # c's square is unlabelled
    assert report["fp_per_image"] == pytest.approx(1 / 3, abs=1e-4)
    # All four squares score the same, so AP depends on where the tie puts the false positive: 0.5625 .. 0.75.
    assert 0.56 <= report["ap50"] <= 0.75
    # a and the first of b are named right (class `right`); the second of b is labelled otherwise.
    assert report["end_to_end"] == pytest.approx(2 / 4)
    assert report["named_when_found"] == pytest.approx(2 / 3, abs=1e-4)


def test_eval_detector_val_split_and_text(capsys, gtsdb, tiny_detector_path, make_tiny_classifier):
    (gtsdb / "gt.txt").write_text("a.png;32;48;47;63;1\nb.png;16;16;31;31;1\nb.png;96;64;111;79;1\n")
    models = ["--detector", str(tiny_detector_path), "--classifier", str(make_tiny_classifier())]
    code, out, _ = run(capsys, "eval", "detector", "--data", str(gtsdb), "--split", "val", "--json", *models)
    assert code == EXIT_OK
    report = json.loads(out)
    assert (report["images"], report["gt_signs"], report["recall"], report["ap50"]) == (1, 2, 1.0, 1.0)  # b.png only
    code, out, _ = run(capsys, "eval", "detector", "--data", str(gtsdb), *models)
    assert code == EXIT_OK
    assert "AP50 (class-agnostic, VOC all-point): " in out
    assert "recall 100.0 %, precision 75.0 %" in out


def test_eval_detector_without_gt(capsys, gtsdb, tiny_detector_path, tiny_classifier_path):
    models = ["--detector", str(tiny_detector_path), "--classifier", str(tiny_classifier_path)]
    code, out, err = run(capsys, "eval", "detector", "--data", str(gtsdb), *models)
    assert code == EXIT_INPUT_ERRORS
    assert out == ""
    assert "gt.txt" in err


# --- gateway.two_stage -----------------------------------------------------------------------------------------------


def test_crop_boxes_margin_and_clipping():
    xyxy = np.array([[10, 20, 30, 60], [0, 0, 4, 4], [95.5, 45, 100, 50], [50, 50, 50, 50]], np.float32)
    windows = crop_boxes(xyxy, 0.15, (50, 100))
    assert windows.dtype == np.int64
    assert windows.tolist() == [[7, 14, 33, 50], [0, 0, 5, 5], [94, 44, 100, 50], [50, 49, 51, 50]]


@settings(max_examples=60, deadline=None)
@given(
    box=st.tuples(*[st.floats(-50, 250, allow_nan=False)] * 4),
    margin=st.floats(0, 1),
    hw=st.tuples(st.integers(1, 200), st.integers(1, 200)),
)
def test_crop_windows_are_never_empty_and_inside(box, margin, hw):
    x1, y1, x2, y2 = box
    xyxy = np.array([[min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]])
    (cx1, cy1, cx2, cy2) = crop_boxes(xyxy, margin, hw)[0]
    assert 0 <= cx1 < cx2 <= hw[1]
    assert 0 <= cy1 < cy2 <= hw[0]


class CountingClassifier:
    """Classifier fake: class = mean red value of the crop % 43, confidence 0.9; counts calls."""

    def __init__(self, card: ModelCard):
        self.card = card
        self.calls: list[int] = []

    def classify(self, crops):
        self.calls.append(len(crops))
        classes = np.array([int(c[..., 0].mean()) % 43 for c in crops], np.int64)
        logprobs = np.full((len(crops), self.card.num_outputs), np.log(0.1 / (self.card.num_outputs - 1)), np.float32)
        logprobs[np.arange(len(crops)), classes] = np.log(0.9)
        return logprobs


def test_classify_detections_one_call_rows_aligned(make_tiny_classifier):
    from services.common.modelcard import card_path_for, load_card

    card = load_card(card_path_for(make_tiny_classifier(background_class=None)))
    classifier = CountingClassifier(card)
    images = [np.full((20, 30, 3), v, np.uint8) for v in (5, 7)]
    images[1][10:, :, 0] = 12  # bottom half of the 2nd image: red 12
    dets = [
        Detections(
            FrameRef("a", 0, 0.0), np.array([[0, 0, 4, 4]], np.float32), np.ones(1, np.float32), np.zeros(1, np.int16)
        ),
        Detections(
            FrameRef("b", 0, 0.0),
            np.array([[0, 0, 10, 5], [0, 14, 10, 20]], np.float32),
            np.array([0.9, 0.8], np.float32),
            np.zeros(2, np.int16),
            extra={"note": np.array([1, 2])},
        ),
    ]
    labelled = classify_detections(classifier, images, dets, TwoStageSettings(crop_margin=0.0))
    assert classifier.calls == [3]
    assert labelled[0].extra[SIGN_CLASS_ID].tolist() == [5]
    assert labelled[1].extra[SIGN_CLASS_ID].tolist() == [7, 12]
    assert labelled[1].extra[SIGN_CONFIDENCE] == pytest.approx([0.9, 0.9])
    assert labelled[1].extra["note"].tolist() == [1, 2]
    assert labelled[1].score.tolist() == pytest.approx([0.9, 0.8])


def test_two_stage_settings_reject_unknown_keys():
    with pytest.raises(ValueError, match="Extra inputs"):
        TwoStageSettings(crop_marign=0.2)  # type: ignore[call-arg]


def test_huge_image(capsys, tmp_path, scene, models):
    # 8000 px wide: letterboxed at scale 96/8000 (Pillow shrinks by an integer factor first), crops are slices.
    path = tmp_path / "wide.png"
    Image.fromarray(scene((600, 8000), [(2000, 0, 500)])).save(path, compress_level=1)
    code, out, _ = run(capsys, "detect", "--json", "--score-threshold", "0.3", *models, str(path))
    assert code == EXIT_OK
    record = json.loads(out)
    assert (record["width"], record["height"]) == (8000, 600)
    assert record["detections"]
    for det in record["detections"]:
        x1, y1, x2, y2 = det["xyxy"]
        # The box overlaps the square (one 8 px cell of the network is 667 px of this image).
        assert x1 < 2500
        assert x2 > 2000
        assert 0 <= y1 < y2 <= 600
