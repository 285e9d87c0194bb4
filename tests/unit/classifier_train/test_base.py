"""Fine-tuning from a base model: ONNX -> torch conversion, the frozen manifest and its exclusion, a --base run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from services.backbones.mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD, MobileNetV2
from services.backbones.training import WEIGHTS_FILE
from services.classifier.frozen import load_manifest
from services.classifier.train.export import export_onnx
from services.classifier.train.from_onnx import classifier_from_checkpoint, classifier_from_onnx
from services.classifier.train.frozen import build_classifier_manifest, load_training_crops, resolve_sources
from services.classifier.train.loop import TrainSettings, train_classifier
from services.common.classes import GTSRB_CLASS_NAMES, NOT_A_SIGN
from services.common.errors import InputError, ModelError
from services.common.modelcard import ModelCard, file_sha256, load_card
from services.common.registry import Registry

COMMITTED = Path(__file__).resolve().parents[3] / "deploy" / "models" / "classifier.onnx"


def _random_model(seed: int) -> MobileNetV2:
    torch.manual_seed(seed)
    model = MobileNetV2(num_classes=44)
    with torch.no_grad():  # BatchNorm with non-trivial statistics, so the folding matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                assert m.running_mean is not None
                assert m.running_var is not None
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _ort_logits(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {"images": x.numpy()})[0]
    return out


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly exported 44-class classifier at 32x32 with its card."""
    folder = tmp_path_factory.mktemp("base")
    path = folder / "classifier.onnx"
    export_onnx(_random_model(0), path, (32, 32), input_name="images", output_name="logits")
    ModelCard(
        name="test-base",
        version="base-1",
        task="classifier",
        architecture="mobilenet_v2 32x32",
        class_names=(*GTSRB_CLASS_NAMES, NOT_A_SIGN),
        input_hw=(32, 32),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        background_class=43,
        onnx_sha256=file_sha256(path),
        extra={"created": "2026-01-01T00:00:00+00:00"},
    ).save(folder / "classifier.card.json")
    return path


def test_converted_model_matches_onnx_runtime(base_model: Path) -> None:
    model = classifier_from_onnx(base_model, 44)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(x).numpy()
    want = _ort_logits(base_model, x)
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(want).max() > 0.1  # not a degenerate comparison


@pytest.mark.skipif(not COMMITTED.is_file(), reason="the committed classifier is not in this checkout")
def test_committed_classifier_converts_exactly() -> None:
    model = classifier_from_onnx(COMMITTED, 44)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(x).numpy()
    assert np.abs(got - _ort_logits(COMMITTED, x)).max() < 1e-4


def test_conversion_refuses_another_class_list(base_model: Path) -> None:
    with pytest.raises(ModelError, match="class list or architecture differs"):
        classifier_from_onnx(base_model, 10)


def _manifest(gtsrb_dir: Path, gtsdb_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "frozen.json"
    build_classifier_manifest(
        path, gtsrb_dir, gtsdb_dir, val_fraction=0.3, seed=0, background_per_scene=4, model_version="base-1"
    )
    return path


def test_training_crops_leave_out_every_frozen_file(gtsrb_dir: Path, gtsdb_dir: Path, tmp_path: Path) -> None:
    manifest = load_manifest(_manifest(gtsrb_dir, gtsdb_dir, tmp_path), "classifier")
    frozen_tracks = {t["track"] for t in manifest.body["tracks"]}
    assert len(frozen_tracks) == 3  # one of four tracks per class
    # A reviewed dataset (classification/ layout) holding a copy of a frozen crop under another name, and a
    # track of its own with the same id as a GTSRB track.
    dataset = tmp_path / "reviewed"
    cls = dataset / "classification" / "00014"
    cls.mkdir(parents=True)
    frozen_file = next(t for t in manifest.body["tracks"] if t["class_id"] == 14)["files"][0][0]
    shutil.copy(gtsrb_dir / frozen_file, cls / "09999_00000.png")
    shutil.copy(gtsrb_dir / "00014" / "00000_00000.png", cls / "00000_00000.png")
    (cls / "GT-00014.csv").write_text(
        "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
        "09999_00000.png;1;1;0;0;1;1;14\n00000_00000.png;1;1;0;0;1;1;14\n"
    )
    sources = resolve_sources([gtsrb_dir, dataset], [gtsdb_dir])
    crops, excluded = load_training_crops(sources, manifest, hw=(16, 16), background_per_scene=4, seed=0, threads=1)
    groups = set(crops.groups.tolist())
    assert not any(g.split(":")[-1] in frozen_tracks and g.startswith(gtsrb_dir.name) for g in groups)
    assert excluded.sign_crops == 9 + 1  # 3 frozen GTSRB tracks of 3 crops, and the copy
    assert excluded.tracks == 4
    # The reviewed track keeps its own group, apart from GTSRB's track 14_00000.
    reviewed = [g for g in groups if g.startswith("reviewed/")]
    assert len(reviewed) == 1
    assert f"{gtsrb_dir.name}:14_00000" in groups or "14_00000" in frozen_tracks
    assert excluded.background_crops == sum(len(s["boxes"]) for s in manifest.body["scenes"])


def test_resolve_sources_refuses_an_unknown_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="GTSRB layout"):
        resolve_sources([tmp_path], [])


def test_fine_tune_from_base_writes_a_child_version(
    base_model: Path, gtsrb_dir: Path, gtsdb_dir: Path, tmp_path: Path
) -> None:
    frozen = _manifest(gtsrb_dir, gtsdb_dir, tmp_path)
    settings = TrainSettings(
        data=gtsrb_dir,
        background=(gtsdb_dir,),
        out=tmp_path / "out",
        input_size=32,
        epochs=1,
        batch_size=8,
        max_steps=2,
        lr=3e-4,
        background_per_scene=4,
        device="cpu",
        base=base_model,
        frozen=frozen,
        data_root=gtsrb_dir.parent,
    )
    result = train_classifier(settings)
    card = load_card(tmp_path / "out" / "classifier.card.json")
    assert card == result.card
    assert card.parent_version == "base-1"
    figures = card.metrics["frozen"]
    assert figures["manifest_sha256"] == load_manifest(frozen).sha256
    assert figures["tracks"] == 3
    assert 0 <= figures["track_accuracy"] <= 1
    assert card.auto_accept_threshold == figures["auto_accept"].get("threshold")
    assert card.extra["initialised_from"].startswith("converted from")
    assert card.extra["excluded_as_frozen"]["tracks"] == 3
    # The registry keeps the fp16 EMA weights; a second fine-tune starts from them.
    weights = tmp_path / "out" / WEIGHTS_FILE
    info = Registry(tmp_path / "reg").add(result.model_path, checkpoint=weights)
    assert info.checkpoint is not None
    restored = classifier_from_checkpoint(info.checkpoint, 44)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = np.abs(restored(x).numpy() - _ort_logits(info.model_path, x)).max()
    assert diff < 0.05  # fp16 weights


def test_base_with_another_class_list_is_refused(base_model: Path, gtsrb_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "other"
    folder.mkdir()
    shutil.copy(base_model, folder / "classifier.onnx")
    card = load_card(base_model.with_name("classifier.card.json"))
    ModelCard.model_validate(card.model_dump() | {"class_names": ("a", "b"), "background_class": 1}).save(
        folder / "classifier.card.json"
    )
    settings = TrainSettings(
        data=gtsrb_dir,
        out=tmp_path / "out",
        input_size=32,
        base=folder / "classifier.onnx",
        frozen=tmp_path / "unused.json",
    )
    with pytest.raises(ModelError, match="keeps the class list"):
        train_classifier(settings)


def test_selftrain_fine_tunes_from_a_base_and_reports_the_frozen_set_each_round(
    base_model: Path, gtsrb_dir: Path, gtsdb_dir: Path, tmp_path: Path
) -> None:
    from gateway.cli import main

    frozen = _manifest(gtsrb_dir, gtsdb_dir, tmp_path)
    unlabeled = tmp_path / "crops" / "rec1"
    unlabeled.mkdir(parents=True)
    for i, src in enumerate(sorted((gtsrb_dir / "00014").glob("00001_*.png"))):
        (unlabeled / f"00003_{i:05d}.png").write_bytes(src.read_bytes())
    out = tmp_path / "self"
    argv = ["selftrain", "--labeled", str(gtsrb_dir), "--unlabeled", str(tmp_path / "crops"), "--threshold", "0.0"]
    argv += ["--rounds", "1", "--out", str(out), "--base", str(base_model), "--frozen", str(frozen)]
    argv += ["--data-root", str(gtsrb_dir.parent), "--epochs", "1", "--max-steps", "1", "--input-size", "32"]
    argv += ["--device", "cpu", "--background", str(gtsdb_dir)]
    assert main(argv) == 0
    report = json.loads((out / "selftrain.json").read_text())
    assert report["base"] == str(base_model)
    assert [r["round"] for r in report["frozen"]] == [0, 1]
    assert all(r["manifest_sha256"] == load_manifest(frozen).sha256 for r in report["frozen"])
    card = load_card(out / "round_01" / "model" / "classifier.card.json")
    assert card.parent_version == "base-1"  # every round starts from the base, not from ImageNet
    assert card.extra["excluded_as_frozen"]["tracks"] == 3  # and never trains on the frozen tracks
