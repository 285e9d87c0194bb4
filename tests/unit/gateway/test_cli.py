"""``roadlabel classify`` through gateway.cli.main, with the tiny ONNX model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gateway.cli import EXIT_INPUT_ERRORS, EXIT_MODEL_ERROR, EXIT_OK, MODEL_ENV_VAR, main
from services.classifier.api import decide
from services.classifier.onnx import OnnxClassifier
from services.common.images import load_image

# main() installs a log handler on the root logger; keep it from leaking into other tests.
pytestmark = pytest.mark.usefixtures("restore_root_logger")


def write_image(path: Path, seed: int, size: tuple[int, int] = (30, 40)) -> Path:
    """A flat-colour RGB image (colour from the seed), saved in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = tuple(int(v) for v in np.random.default_rng(seed).integers(0, 256, 3))
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture
def images(tmp_path) -> list[Path]:
    """A loose file, then a folder of images in nested subfolders, in the order the CLI should print them."""
    loose = write_image(tmp_path / "loose.jpg", 100)
    folder = tmp_path / "crops"
    in_folder = [
        write_image(folder / "a" / "1.png", 1, (1, 1)),
        write_image(folder / "a" / "2.PNG", 2, (17, 300)),
        write_image(folder / "b.ppm", 3, (64, 64)),
        write_image(folder / "c" / "d" / "x.jpeg", 4, (250, 25)),
        write_image(folder / "z.png", 5),
    ]
    (folder / "notes.txt").write_text("not an image")
    return [loose, *in_folder]


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_lines(capsys, images, tiny_classifier_path):
    loose, folder = images[0], images[1].parents[1]
    code, out, err = run(capsys, "classify", "--json", "--model", str(tiny_classifier_path), str(loose), str(folder))
    assert code == EXIT_OK
    assert err == ""
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in images]
    for record in records:
        assert set(record) == {"path", "class_id", "class_name", "confidence", "unknown"}
        assert isinstance(record["class_id"], int)
        assert isinstance(record["class_name"], str)
        assert isinstance(record["confidence"], float)
        assert isinstance(record["unknown"], bool)
        assert record["confidence"] == round(record["confidence"], 4)
        assert record["unknown"] == (record["class_id"] == -1)
        assert record["unknown"] == (record["class_name"] == "unknown")
    # The same answers as the library gives for the same files.
    classifier = OnnxClassifier(tiny_classifier_path)
    decisions = decide(classifier.classify([load_image(p) for p in images]), classifier.card)
    assert [r["class_id"] for r in records] == decisions.class_id.tolist()
    assert [r["class_name"] for r in records] == decisions.class_names(classifier.card)
    np.testing.assert_allclose([r["confidence"] for r in records], decisions.confidence, atol=5e-5)


def test_order_is_kept_across_batches_and_workers(capsys, tmp_path, tiny_classifier_path):
    paths = [write_image(tmp_path / f"{i:03d}.png", i, (10 + i, 50 - i)) for i in range(23)]
    args = ["classify", "--json", "--model", str(tiny_classifier_path), str(tmp_path)]
    code, out, _ = run(capsys, *args, "--batch-size", "4", "--workers", "3", "--threads", "1")
    assert code == EXIT_OK
    assert [json.loads(line)["path"] for line in out.splitlines()] == [str(p) for p in paths]
    _, out_one_batch, _ = run(capsys, *args, "--batch-size", "64", "--workers", "1")
    assert out == out_one_batch


def test_readable_output(capsys, images, tiny_classifier_path):
    code, out, err = run(capsys, "classify", "--model", str(tiny_classifier_path), str(images[0]))
    assert code == EXIT_OK
    assert err == ""
    path, name, confidence = out.rstrip("\n").split("\t")
    assert path == str(images[0])
    assert name
    assert 0 <= float(confidence) <= 1


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "expected a PNG/JPEG/PPM image, got 0 bytes"),
        (b"hello", "expected a PNG/JPEG/PPM image, got 5 bytes of something else"),
        ("truncate", "expected a complete PNG image, got a truncated or corrupt one"),
    ],
    ids=["empty", "text", "truncated"],
)
def test_unreadable_file_among_good_ones(capsys, images, tiny_classifier_path, content, reason):
    broken = images[3].parent / "broken.png"
    if content == "truncate":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(broken)
        broken.write_bytes(broken.read_bytes()[:500])
    else:
        broken.write_bytes(content)
    folder = images[1].parents[1]
    code, out, err = run(capsys, "classify", "--json", "--model", str(tiny_classifier_path), str(folder))
    assert code == EXIT_INPUT_ERRORS
    assert len(err.splitlines()) == 1
    assert err.startswith(f"roadlabel: {broken}: {reason}")
    assert [json.loads(line)["path"] for line in out.splitlines()] == [str(p) for p in images[1:]]


def test_missing_path_and_empty_folder_are_reported_and_the_rest_classified(
    capsys, tmp_path, images, tiny_classifier_path
):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    missing = tmp_path / "missing"
    args = ["classify", "--json", "--model", str(tiny_classifier_path), str(missing), str(empty), str(images[0])]
    code, out, err = run(capsys, *args)
    assert code == EXIT_INPUT_ERRORS
    assert err.splitlines() == [
        f"roadlabel: {missing}: expected a file or folder, found no such path",
        f"roadlabel: no .ppm/.png/.jpg/.jpeg images under {empty}",
    ]
    assert [json.loads(line)["path"] for line in out.splitlines()] == [str(images[0])]


def test_only_an_empty_folder(capsys, tmp_path, tiny_classifier_path):
    code, out, err = run(capsys, "classify", "--model", str(tiny_classifier_path), str(tmp_path))
    assert code == EXIT_INPUT_ERRORS
    assert out == ""
    assert err == f"roadlabel: no .ppm/.png/.jpg/.jpeg images under {tmp_path}\n"


def test_model_from_environment(capsys, monkeypatch, images, tiny_classifier_path):
    monkeypatch.setenv(MODEL_ENV_VAR, str(tiny_classifier_path))
    code, out, _ = run(capsys, "classify", "--json", str(images[0]))
    assert code == EXIT_OK
    assert len(out.splitlines()) == 1


def test_missing_model(capsys, tmp_path, images):
    code, out, err = run(capsys, "classify", "--model", str(tmp_path / "none.onnx"), str(images[0]))
    assert code == EXIT_MODEL_ERROR
    assert out == ""
    assert err.startswith("roadlabel: model card: expected a JSON file at ")
    assert "choose one with --model or $ROADLABEL_CLASSIFIER_MODEL" in err


def test_model_not_matching_its_card(capsys, make_tiny_classifier, images):
    model = make_tiny_classifier(input_hw=(32, 32))
    code, out, err = run(capsys, "classify", "--model", str(model), str(images[0]))
    assert code == EXIT_MODEL_ERROR
    assert "expected input 'images' of shape (batch, 3, 64, 64)" in err


@pytest.mark.parametrize(
    "args",
    [["classify"], ["classify", "--batch-size", "0", "x.png"], ["classify", "--workers", "two", "x.png"], []],
    ids=["no-path", "batch-size-0", "workers-not-int", "no-command"],
)
def test_usage_errors(capsys, args):
    with pytest.raises(SystemExit) as exc_info:
        main(args)
    assert exc_info.value.code == 2
    assert "usage: roadlabel" in capsys.readouterr().err


def test_help_lists_commands_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as exc_info:
        main(["--help"])
    assert exc_info.value.code == 0
    out = capsys.readouterr().out
    assert "classify" in out
    assert "train" in out
    assert "exit status" in out


def test_train_classifier_is_wired(capsys):
    with pytest.raises(SystemExit) as exc_info:
        main(["train", "classifier", "--help"])
    assert exc_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: roadlabel train classifier")


def test_progress_bar_only_on_a_terminal(capsys, monkeypatch, images, tiny_classifier_path):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    broken = images[1].parent / "broken.png"
    broken.write_bytes(b"")
    folder = images[1].parents[1]
    code, out, err = run(capsys, "classify", "--model", str(tiny_classifier_path), str(folder))
    assert code == EXIT_INPUT_ERRORS
    assert len(out.splitlines()) == len(images) - 1
    assert "6/6" in err  # tqdm drew its bar on stderr: 5 images and the broken file
    assert f"roadlabel: {broken}: expected a PNG/JPEG/PPM image, got 0 bytes" in err
    # --json output is for machines: no bar even on a terminal.
    code, _, err = run(capsys, "classify", "--json", "--model", str(tiny_classifier_path), str(images[0]))
    assert code == EXIT_OK
    assert err == ""
