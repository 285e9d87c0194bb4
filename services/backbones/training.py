"""What the classifier's and the detector's trainers share: their progress events, their result, the device choice,
and the tqdm bars their CLIs draw from the events.

Importing this module does not import torch (the training CLIs parse their arguments without it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.common.modelcard import ModelCard

if TYPE_CHECKING:
    import torch
    from tqdm import tqdm

__all__ = ["WEIGHTS_FILE", "TrainBars", "TrainEvent", "TrainResult", "pick_device", "save_fp16_weights", "wants_gpu"]

WEIGHTS_FILE = "weights-fp16.pt"
"""The model's weights alone, in fp16: what the registry stores as a version's checkpoint (fine-tuning starts there)."""


@dataclass(frozen=True, slots=True)
class TrainEvent:
    """Progress of a run.

    ``stage`` is 'load:<what>' while data is read, then 'train' (``done`` of ``total`` optimiser steps, with the
    epoch and the running loss in ``figures``), 'val' (images evaluated), 'epoch' (the epoch's figures) and
    'export' (0 of 1 when it starts, 1 of 1 when the model is written).
    """

    stage: str
    done: int
    total: int | None
    figures: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What a run produced."""

    model_path: Path
    card: ModelCard
    history: list[dict[str, float]]


def wants_gpu(choice: str) -> bool:
    """Whether ``choice`` ('auto', 'cpu' or 'cuda') means training on the GPU: 'auto' does when CUDA is there."""
    if choice != "auto":
        return choice == "cuda"
    import torch  # noqa: PLC0415 - only when asked, so that this module imports without torch

    return bool(torch.cuda.is_available())


def pick_device(choice: str) -> torch.device:
    """The torch device for ``choice`` ('auto', 'cpu' or 'cuda')."""
    import torch  # noqa: PLC0415 - see wants_gpu

    return torch.device("cuda" if wants_gpu(choice) else "cpu")


def save_fp16_weights(model: torch.nn.Module, path: Path, **extra: Any) -> None:
    """Write ``model``'s weights in fp16 (half the size; integer buffers as they are) with ``extra``, atomically."""
    import torch  # noqa: PLC0415 - see wants_gpu

    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    torch.save({"model": state, **extra}, tmp)
    tmp.replace(path)


class TrainBars:
    """tqdm bars on stderr for a trainer's events: one per stage ('load:<what>', 'train', 'val'), a line per epoch.

    ``epoch_line`` formats an 'epoch' event's figures; ``export_line``, when given, is written when the export
    starts. The 'train' bar stays on screen; a 'load' or 'val' bar is replaced when its stage changes or starts
    again. Use it as a context manager, so that the bars are closed.
    """

    def __init__(self, epoch_line: Callable[[TrainEvent], str], export_line: str | None = None) -> None:
        self._epoch_line = epoch_line
        self._export_line = export_line
        self._bars: dict[str, tqdm[Any]] = {}

    def __call__(self, event: TrainEvent) -> None:
        from tqdm import tqdm  # noqa: PLC0415 - the CLIs' dependency, not the trainers'

        if event.stage == "epoch":
            tqdm.write(self._epoch_line(event), file=sys.stderr)
            return
        if event.stage == "export":
            if event.done == 0 and self._export_line is not None:
                tqdm.write(self._export_line, file=sys.stderr)
            return
        key = event.stage.split(":")[0]
        bar = self._bars.get(key)
        if bar is None or bar.desc != event.stage or event.done < bar.n:
            if bar is not None:
                bar.close()
            bar = self._bars[key] = tqdm(
                total=event.total,
                desc=event.stage,
                unit="step" if key == "train" else "img",
                leave=key == "train",
                file=sys.stderr,
            )
        bar.n = event.done
        if "loss" in event.figures:
            bar.set_postfix(epoch=int(event.figures["epoch"]), loss=f"{event.figures['loss']:.3f}", refresh=False)
        bar.refresh()

    def close(self) -> None:
        """Close every bar."""
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

    def __enter__(self) -> TrainBars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
