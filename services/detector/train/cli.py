"""``roadlabel train detector``: arguments and the run, with a tqdm bar and per-epoch validation lines.

This module imports no torch at import time, so ``roadlabel --help`` works on a serving install.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.backbones.training import WEIGHTS_FILE, TrainBars, TrainEvent, wants_gpu
from services.common.errors import InputError, ModelError
from services.common.registry import Registry, resolve_base
from services.detector.frozen import default_manifest_path
from services.detector.train.data import gtsdb_folder

__all__ = ["add_arguments", "run"]


def _hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 576x1024, got {text!r}") from None
    return h, w


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the detector training options to ``parser``."""
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="GTSDB training folder (gt.txt + scenes), or a 'roadlabel dataset build' folder (its detection/images/)",
    )
    parser.add_argument(
        "--base",
        help="fine-tune from this model: detector@VERSION / detector@promoted (registry) or PATH.onnx with its card "
        "(its checkpoint.pt when stored beside it, else the ONNX weights converted back). Implies --frozen",
    )
    parser.add_argument(
        "--frozen",
        type=Path,
        help="frozen validation manifest: its scenes are never trained on and are the validation set "
        "(default with --base: deploy/models/frozen/detector.json)",
    )
    parser.add_argument("--data-root", type=Path, help="folder holding the frozen set's source folder")
    parser.add_argument("--registry", type=Path, help="register the new version here (not promoted)")
    parser.add_argument(
        "--gtsrb", type=Path, default=None, help="GTSRB training folder (000NN/GT-000NN.csv): signs to copy-paste"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder for detector.onnx and its card")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="default: 100 on a GPU, 50 on a CPU (about 70 minutes on 2 cores); with --base: 10 (GPU), 5 (CPU)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="default: 2e-3; with --base: 5e-4")
    parser.add_argument(
        "--input-hw",
        type=_hw,
        default=None,
        metavar="HxW",
        help="inference input size, multiples of 32 (default: 576x1024; with --export-only, the checkpoint's)",
    )
    parser.add_argument("--crop-size", type=int, default=384, help="square training crops (pixels)")
    parser.add_argument("--val-images", type=int, default=90)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: one per core)")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="training arithmetic (default: bf16 on CUDA and on CPUs with native bf16, else fp32)",
    )
    parser.add_argument(
        "--export-only",
        type=Path,
        default=None,
        metavar="CHECKPOINT",
        help="do not train: export this checkpoint.pt at --input-hw, with threshold and metrics measured on its "
        "validation split of --data",
    )
    parser.add_argument("--max-steps", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Train and print per-epoch validation figures; return the exit code."""
    from services.detector.train.loop import (  # noqa: PLC0415 - torch, kept out of the serving import path
        TrainSettings,
        export_checkpoint,
        train_detector,
    )

    on_gpu = wants_gpu(args.device)
    data = gtsdb_folder(args.data)
    base_path, base_checkpoint, registry = _resolve_base(args)
    frozen = args.frozen or (default_manifest_path() if base_path is not None else None)
    fine_tune = base_path is not None
    settings = (
        None
        if args.export_only
        else TrainSettings(
            data=data,
            gtsrb=args.gtsrb,
            base=base_path,
            base_checkpoint=base_checkpoint,
            frozen=frozen,
            data_root=args.data_root,
            out=args.out,
            input_hw=args.input_hw or (576, 1024),
            crop_size=args.crop_size,
            epochs=args.epochs or ((10 if on_gpu else 5) if fine_tune else (100 if on_gpu else 50)),
            batch_size=args.batch_size,
            lr=args.lr or (5e-4 if fine_tune else 2e-3),
            val_images=args.val_images,
            seed=args.seed,
            device=args.device,
            threads=args.threads,
            precision=args.precision,
            max_steps=args.max_steps,
        )
    )

    def epoch_line(event: TrainEvent) -> str:
        f = event.figures
        return (
            f"epoch {event.done}/{event.total}: loss {f['train_total']:.3f} (heat {f['train_heat']:.3f} "
            f"size {f['train_size']:.3f} giou {f['train_giou']:.3f}) | val AP50 {f['val_ap50']:.4f} "
            f"best F1 {f['val_best_f1']:.3f} at {f['val_threshold']:.2f}: recall {f['val_recall']:.3f}, "
            f"{f['val_fp_per_image']:.3f} FP/img | {f['seconds']:.0f} s"
        )

    with TrainBars(epoch_line, "choosing the threshold on val, exporting ONNX and checking it against torch") as bars:
        if settings is None:
            result = export_checkpoint(
                args.export_only, data=args.data, out=args.out, input_hw=args.input_hw, on_event=bars
            )
        else:
            result = train_detector(settings, bars)
    m = result.card.metrics
    sys.stdout.write(
        f"wrote {result.model_path} ({result.card.version}): val AP50 {m['val_ap50']:.4f} on {m['val_images']} "
        f"images / {m['val_boxes']} signs; at score >= {result.card.extra['score_threshold']:.3f}: recall "
        f"{m['val_recall']:.4f}, {m['val_fp_per_image']:.3f} FP/image; {m['train_seconds']:.0f} s\n"
    )
    frozen_fig = m.get("frozen")
    if frozen_fig is not None:
        sys.stdout.write(
            f"frozen set {frozen_fig['manifest_sha256'][:12]}: AP50 {frozen_fig['ap50']:.4f}, recall "
            f"{frozen_fig['recall']:.4f} at score >= {frozen_fig['threshold']:.3f} ({frozen_fig['images']} images)\n"
        )
    if registry is not None:
        info = registry.add(result.model_path, checkpoint=result.model_path.parent / WEIGHTS_FILE)
        sys.stdout.write(registry.added_line(info) + "\n")
    return 0


def _resolve_base(args: argparse.Namespace) -> tuple[Path | None, Path | None, Registry | None]:
    """--base and --registry -> (base ONNX path, its checkpoint or None, the registry to add the result to)."""
    try:
        return resolve_base(args.base, args.registry, "detector")
    except (InputError, ModelError) as exc:  # no such file or version, or a registered one that was changed
        raise SystemExit(str(exc)) from exc
