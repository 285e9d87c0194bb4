from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway.cli import main
from services.common.errors import InputError
from services.detector.train import cli, loop
from services.detector.train.loop import TrainEvent, TrainResult, TrainSettings


@pytest.fixture(autouse=True)
def restore_root_logger():
    """main() installs a log handler on the root logger; keep it from leaking into other tests."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_arguments_parse_with_defaults() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--data", "d", "--out", "o", "--input-hw", "544x960"])
    assert args.input_hw == (544, 960)
    assert args.gtsrb is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--data", "d", "--out", "o", "--input-hw", "544"])


def test_gateway_wires_detector_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[TrainSettings] = []

    def fake_train(settings: TrainSettings, on_event: Callable[[TrainEvent], None]) -> TrainResult:
        seen.append(settings)
        on_event(TrainEvent("train", 1, 1, {"epoch": 1, "loss": 1.0}))
        on_event(TrainEvent("val", 1, 1))
        figures = {"train_total": 1.0, "train_heat": 0.5, "train_size": 0.2, "train_giou": 0.3, "val_ap50": 0.5}
        figures |= {"val_best_f1": 0.5, "val_threshold": 0.3, "val_recall": 0.5, "val_fp_per_image": 0.1, "seconds": 1}
        on_event(TrainEvent("epoch", 1, 1, figures))
        card = SimpleNamespace(
            version="v",
            extra={"score_threshold": 0.3},
            metrics={
                "val_ap50": 0.5,
                "val_images": 2,
                "val_boxes": 3,
                "val_recall": 0.5,
                "val_fp_per_image": 0.1,
                "train_seconds": 1.0,
            },
        )
        return TrainResult(tmp_path / "detector.onnx", card, [])  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "train_detector", fake_train)
    argv = ["train", "detector", "--data", "d", "--gtsrb", "g", "--out", str(tmp_path), "--input-hw", "64x96"]
    assert main([*argv, "--epochs", "3", "--device", "cpu"]) == 0
    assert "val AP50 0.5000" in capsys.readouterr().out
    (settings,) = seen
    assert (settings.data, settings.gtsrb, settings.input_hw, settings.epochs) == (Path("d"), Path("g"), (64, 96), 3)


def test_bad_data_folder_is_a_clear_error(tmp_path: Path) -> None:
    argv = ["train", "detector", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cpu"]
    with pytest.raises(InputError, match="gt.txt"):
        main(argv)
