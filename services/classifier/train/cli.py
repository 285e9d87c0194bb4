"""``roadlabel train classifier``: arguments and the run, with a tqdm bar and per-epoch lines.

This module imports no torch at import time, so ``roadlabel --help`` works on a serving install.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the classifier training options to ``parser``."""
    parser.add_argument("--data", type=Path, required=True, help="GTSRB training folder (000NN/GT-000NN.csv)")
    parser.add_argument(
        "--background",
        type=Path,
        action="append",
        default=[],
        help="GTSDB folder (gt.txt + scenes) or folder of not-a-sign crops; repeatable "
        "(default: the gtsdb_train folder beside --data, when there is one)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder for classifier.onnx and its card")
    parser.add_argument(
        "--epochs", type=int, default=None, help="default: 30 on a GPU, 24 on a CPU (28 min on 2 cores)"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--max-steps", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Train and print per-epoch validation figures; return the exit code."""
    import torch  # noqa: PLC0415 - training-only dependency, kept out of the serving import path
    from tqdm import tqdm  # noqa: PLC0415

    from services.classifier.train.loop import TrainEvent, TrainSettings, train_classifier  # noqa: PLC0415

    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    background = list(args.background)
    beside = args.data.parent / "gtsdb_train"
    if not background and (beside / "gt.txt").is_file():
        background = [beside]
        sys.stderr.write(f"not-a-sign crops from {beside} (pass --background to choose)\n")
    elif not background:
        sys.stderr.write("warning: no --background data: the model will not learn to reject crops that are no sign\n")
    settings = TrainSettings(
        data=args.data,
        background=tuple(background),
        out=args.out,
        epochs=args.epochs or (30 if on_gpu else 24),
        batch_size=args.batch_size,
        lr=args.lr,
        input_size=args.input_size,
        seed=args.seed,
        device=args.device,
        max_steps=args.max_steps,
    )
    bars: dict[str, tqdm[Any]] = {}

    def on_event(event: TrainEvent) -> None:
        if event.stage == "epoch":
            f = event.figures
            tqdm.write(
                f"epoch {event.done}/{event.total}: train loss {f['train_loss']:.4f} acc {f['train_accuracy']:.4f} | "
                f"val sign acc {f['val_sign_accuracy']:.4f} "
                f"background rejected {f['val_background_rejection_rate']:.4f} "
                f"nll {f['val_nll']:.4f} ece {f['val_ece']:.4f}",
                file=sys.stderr,
            )
            return
        key = event.stage.split(":")[0]
        bar = bars.get(key)
        if bar is None or bar.desc != event.stage:
            if bar is not None:
                bar.close()
            bar = bars[key] = tqdm(total=event.total, desc=event.stage, unit="step" if key == "train" else "img")
        bar.n = event.done
        if "loss" in event.figures:
            bar.set_postfix(epoch=int(event.figures["epoch"]), loss=f"{event.figures['loss']:.3f}", refresh=False)
        bar.refresh()

    result = train_classifier(settings, on_event)
    for bar in bars.values():
        bar.close()
    m = result.card.metrics
    sys.stdout.write(
        f"wrote {result.model_path} ({result.card.version}): val sign accuracy {m['val_sign_accuracy']:.4f}, "
        f"ECE {m['val_ece_before_calibration']:.4f} -> {m['val_ece_after_calibration']:.4f} "
        f"(T={result.card.temperature:.3f}), background rejected {m['val_background_rejection_rate']:.4f}, "
        f"signs rejected {m['val_sign_rejection_rate']:.4f}, {m['train_seconds']:.0f} s\n"
    )
    return 0
