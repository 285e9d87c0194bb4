"""The trainers' shared pieces: the device choice and the CLI's progress bars."""

from __future__ import annotations

import pytest

from services.backbones.training import TrainBars, TrainEvent, wants_gpu


def test_device_choice() -> None:
    assert wants_gpu("cuda") is True
    assert wants_gpu("cpu") is False
    import torch

    assert wants_gpu("auto") is torch.cuda.is_available()


def test_bars_follow_the_events(capsys: pytest.CaptureFixture[str]) -> None:
    events = [
        TrainEvent("load:gtsrb", 0, 10),
        TrainEvent("load:gtsrb", 10, 10),
        TrainEvent("load:background", 4, 4),  # a new load stage: a new bar
        TrainEvent("train", 3, 6, {"epoch": 1, "loss": 0.51234}),
        TrainEvent("val", 5, 5),
        TrainEvent("epoch", 1, 2, {"loss": 0.5}),
        TrainEvent("train", 6, 6, {"epoch": 2, "loss": 0.25}),
        TrainEvent("val", 2, 5),  # validation again: the bar starts over
        TrainEvent("epoch", 2, 2, {"loss": 0.25}),
        TrainEvent("export", 0, 1),
        TrainEvent("export", 1, 1),
    ]
    with TrainBars(lambda e: f"epoch {e.done}/{e.total}: loss {e.figures['loss']}", "exporting") as bars:
        for event in events:
            bars(event)
        assert sorted(bars._bars) == ["load", "train", "val"]
        assert bars._bars["load"].desc == "load:background"
        assert (bars._bars["train"].n, bars._bars["val"].n) == (6, 2)
    assert bars._bars == {}
    err = capsys.readouterr().err
    assert "epoch 1/2: loss 0.5" in err
    assert "epoch 2/2: loss 0.25" in err
    assert err.count("exporting") == 1
    assert "loss=0.250" in err
    assert "load:gtsrb" in err
