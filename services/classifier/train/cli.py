"""``roadlabel train classifier``: arguments and the run, with a tqdm bar and per-epoch lines.

This module imports no torch at import time, so ``roadlabel --help`` works on a serving install.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.backbones.training import WEIGHTS_FILE, TrainBars, TrainEvent, wants_gpu
from services.classifier.frozen import default_manifest_path
from services.classifier.train.frozen import resolve_sources
from services.common.errors import InputError, ModelError
from services.common.registry import Registry, resolve_base

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the classifier training options to ``parser``."""
    parser.add_argument(
        "--data",
        type=Path,
        action="append",
        required=True,
        help="GTSRB training folder (000NN/GT-000NN.csv), or a dataset folder with classification/ (from "
        "'roadlabel dataset build'); repeatable with --base or --frozen",
    )
    parser.add_argument(
        "--base",
        help="fine-tune from this model: classifier@VERSION / classifier@promoted (registry) or PATH.onnx with its "
        "card; its class list is kept. Implies --frozen (default manifest)",
    )
    parser.add_argument(
        "--frozen",
        type=Path,
        help="frozen validation manifest: never trained on, the validation set (default with --base: "
        "deploy/models/frozen/classifier.json)",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        help="folder holding the frozen set's files (default: $ROADLABEL_DATA or ../shared/data)",
    )
    parser.add_argument(
        "--registry",
        type=Path,
        help="register the new version here (not promoted); default "
        "$ROADLABEL_REGISTRY when --base names a registry version",
    )
    parser.add_argument(
        "--auto-accept-precision",
        type=float,
        default=0.99,
        help="precision of auto-accepted tracks on the frozen set (default: %(default)s)",
    )
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
        "--epochs",
        type=int,
        default=None,
        help="default: 30 on a GPU, 24 on a CPU (28 min on 2 cores); with --base: 4 (GPU), 3 (CPU)",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=None, help="default: 2e-3; with --base: 3e-4")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--max-steps", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Train and print per-epoch validation figures; return the exit code."""
    from services.classifier.train.loop import (  # noqa: PLC0415 - torch, kept out of the serving import path
        TrainSettings,
        train_classifier,
    )

    on_gpu = wants_gpu(args.device)
    if not 0 < args.auto_accept_precision <= 1:
        raise SystemExit(f"--auto-accept-precision: expected a number in (0, 1], got {args.auto_accept_precision}")
    data = list(args.data)
    base_path, base_checkpoint, registry = _resolve_base(args)
    frozen = args.frozen
    if frozen is None and (base_path is not None or len(data) > 1):
        frozen = default_manifest_path("classifier")
    background = list(args.background)
    if frozen is None and (data[0] / "classification").is_dir():
        # A 'roadlabel dataset build' folder trained on alone: its crops in the GTSRB layout, and its background.
        sources = resolve_sources(data, ())
        data, background = list(sources.signs), [*background, *sources.background]
    beside = data[0].parent / "gtsdb_train"
    if not background and (beside / "gt.txt").is_file():
        background = [beside]
        sys.stderr.write(f"not-a-sign crops from {beside} (pass --background to choose)\n")
    elif not background:
        sys.stderr.write("warning: no --background data: the model will not learn to reject crops that are no sign\n")
    fine_tune = base_path is not None
    settings = TrainSettings(
        data=data[0],
        extra_data=tuple(data[1:]),
        base=base_path,
        base_checkpoint=base_checkpoint,
        frozen=frozen,
        data_root=args.data_root,
        auto_accept_precision=args.auto_accept_precision,
        background=tuple(background),
        out=args.out,
        epochs=args.epochs or ((4 if on_gpu else 3) if fine_tune else (30 if on_gpu else 24)),
        batch_size=args.batch_size,
        lr=args.lr or (3e-4 if fine_tune else 2e-3),
        input_size=args.input_size,
        seed=args.seed,
        device=args.device,
        max_steps=args.max_steps,
    )

    def epoch_line(event: TrainEvent) -> str:
        f = event.figures
        return (
            f"epoch {event.done}/{event.total}: train loss {f['train_loss']:.4f} acc {f['train_accuracy']:.4f} | "
            f"val sign acc {f['val_sign_accuracy']:.4f} "
            f"background rejected {f['val_background_rejection_rate']:.4f} "
            f"nll {f['val_nll']:.4f} ece {f['val_ece']:.4f}"
        )

    with TrainBars(epoch_line, "calibrating on val, exporting ONNX and checking it against torch") as bars:
        result = train_classifier(settings, bars)
    m = result.card.metrics
    sys.stdout.write(
        f"wrote {result.model_path} ({result.card.version}): val sign accuracy {m['val_sign_accuracy']:.4f}, "
        f"ECE {m['val_ece_before_calibration']:.4f} -> {m['val_ece_after_calibration']:.4f} "
        f"(T={result.card.temperature:.3f}), background rejected {m['val_background_rejection_rate']:.4f}, "
        f"signs rejected {m['val_sign_rejection_rate']:.4f}, {m['train_seconds']:.0f} s\n"
    )
    frozen_fig = m.get("frozen")
    if frozen_fig is not None:
        auto = frozen_fig["auto_accept"]
        sys.stdout.write(
            f"frozen set {frozen_fig['manifest_sha256'][:12]}: track accuracy {frozen_fig['track_accuracy']:.4f} "
            f"({frozen_fig['tracks']} tracks), crop sign accuracy {frozen_fig['sign_accuracy']:.4f}, background "
            f"rejection {frozen_fig['background_rejection']:.4f}, NLL {frozen_fig['nll']:.4f}, ECE "
            f"{frozen_fig['ece']:.4f}; auto-accept >= {auto.get('threshold')} (precision {auto.get('precision')}, "
            f"coverage {auto.get('coverage')})\n"
        )
    if registry is not None:
        info = registry.add(result.model_path, checkpoint=result.model_path.parent / WEIGHTS_FILE)
        sys.stdout.write(registry.added_line(info) + "\n")
    return 0


def _resolve_base(args: argparse.Namespace) -> tuple[Path | None, Path | None, Registry | None]:
    """--base and --registry -> (base ONNX path, its checkpoint or None, the registry to add the result to)."""
    try:
        return resolve_base(args.base, args.registry, "classifier")
    except (InputError, ModelError) as exc:  # no such file or version, or a registered one that was changed
        raise SystemExit(str(exc)) from exc
