"""Fine-tuning the detector from a base: ONNX -> torch conversion, frozen scenes as validation, provenance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from services.backbones.from_onnx import load_onnx_weights
from services.backbones.training import WEIGHTS_FILE
from services.common.errors import InputError
from services.common.modelcard import ModelCard, file_sha256, load_card
from services.detector.frozen import build_detector_manifest, load_detector_manifest
from services.detector.train.export import export_onnx
from services.detector.train.loop import TrainSettings, train_detector
from services.detector.train.model import SignDetectorInference, SignDetectorNet

INPUT_HW = (64, 96)
COMMITTED = Path(__file__).resolve().parents[3] / "deploy" / "models" / "detector.onnx"


@dataclass(frozen=True)
class Base:
    model_path: Path
    card: ModelCard


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    """A freshly exported detector (random weights, non-trivial BatchNorm statistics) with a card."""
    if not COMMITTED.is_file():
        pytest.skip("the committed detector's card is the template of the test card")
    folder = tmp_path_factory.mktemp("det-base")
    torch.manual_seed(0)
    net = SignDetectorNet(64)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                assert m.running_mean is not None
                assert m.running_var is not None
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        # A heatmap with clear peaks (a flat one makes near-ties that rounding may flip), most cells low.
        net.heat_out.weight.mul_(30.0)
        assert net.heat_out.bias is not None
        net.heat_out.bias.fill_(-4.0)
    path = folder / "detector.onnx"
    export_onnx(net.eval(), path, INPUT_HW)
    template = load_card(COMMITTED.with_name("detector.card.json"))
    card = ModelCard.model_validate(
        template.model_dump()
        | {
            "version": "det-base-1",
            "input_hw": INPUT_HW,
            "onnx_sha256": file_sha256(path),
            "metrics": {},
            "extra": template.extra | {"val_images": ["00001.jpg", "00003.jpg"]},
        }
    )
    card.save(folder / "detector.card.json")
    return Base(path, card)


def _compare(net: SignDetectorNet, onnx_path: Path, hw: tuple[int, int]) -> tuple[float, float, float]:
    """(max heat difference where both keep a peak, share of cells where only one keeps a peak, max box difference).

    The served heatmap keeps 3x3 local maxima only; where two neighbours are nearly equal, rounding may move the
    peak (the exporter's own check allows such flips), so kept peaks are compared and flips counted.
    """
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        heat, boxes = (t.numpy() for t in SignDetectorInference(net.eval())(x))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    want_heat, want_boxes = session.run(["heatmap", "boxes"], {"images": x.numpy()})
    both = (heat > 0) & (want_heat > 0)
    flips = float(((heat > 0) != (want_heat > 0)).mean())
    return float(np.abs(heat - want_heat)[both].max()), flips, float(np.abs(boxes - want_boxes).max())


def test_converted_detector_matches_onnx_runtime(base: Base) -> None:
    net = SignDetectorNet(64)
    load_onnx_weights(net, base.model_path, torch.zeros(1, 3, 64, 64))
    heat, flips, boxes = _compare(net, base.model_path, INPUT_HW)
    assert heat < 1e-5
    assert flips < 0.05
    assert boxes < 1e-3


@pytest.mark.skipif(not COMMITTED.is_file(), reason="the committed detector is not in this checkout")
def test_committed_detector_converts_exactly() -> None:
    net = SignDetectorNet(64)
    load_onnx_weights(net, COMMITTED, torch.zeros(1, 3, 64, 64))
    heat, flips, boxes = _compare(net, COMMITTED, (576, 1024))
    assert heat < 1e-5
    assert flips < 0.001
    assert boxes < 1e-2  # pixels, at 1024 px


def test_fine_tune_validates_on_the_frozen_scenes(base: Base, gtsdb_dir: Path, tmp_path: Path) -> None:
    frozen = tmp_path / "frozen.json"
    names = base.card.extra["val_images"]
    build_detector_manifest(frozen, gtsdb_dir, names, base.card.version)
    settings = TrainSettings(
        data=gtsdb_dir,
        out=tmp_path / "out",
        input_hw=INPUT_HW,
        crop_size=64,
        epochs=1,
        batch_size=2,
        max_steps=1,
        lr=5e-4,
        device="cpu",
        base=base.model_path,
        frozen=frozen,
        data_root=gtsdb_dir.parent,
    )
    result = train_detector(settings)
    card = load_card(tmp_path / "out" / "detector.card.json")
    assert card == result.card
    assert card.parent_version == base.card.version
    assert card.extra["val_images"] == sorted(names)  # validated on the frozen scenes, not trained on them
    assert card.training["train_images"] == 8 - len(names)
    figures = card.metrics["frozen"]
    assert figures["manifest_sha256"] == load_detector_manifest(frozen)["manifest_sha256"]
    assert figures["images"] == len(names)
    assert card.extra["initialised_from"].startswith("converted from")
    assert (tmp_path / "out" / WEIGHTS_FILE).is_file()


def test_fine_tune_needs_the_frozen_scenes_in_the_data(base: Base, gtsdb_dir: Path, tmp_path: Path) -> None:
    frozen = tmp_path / "frozen.json"
    build_detector_manifest(frozen, gtsdb_dir, ["00000.jpg"], None)
    other = tmp_path / "other"
    other.mkdir()
    lines = (gtsdb_dir / "gt.txt").read_text().splitlines()
    (other / "gt.txt").write_text("\n".join(line for line in lines if not line.startswith("00000.jpg")) + "\n")
    for p in sorted(gtsdb_dir.glob("*.jpg"))[1:]:
        (other / p.name).write_bytes(p.read_bytes())
    settings = TrainSettings(
        data=other, out=tmp_path / "out", input_hw=INPUT_HW, crop_size=64, base=base.model_path, frozen=frozen
    )
    with pytest.raises(InputError, match="expected its 1 scenes in --data"):
        train_detector(settings)
