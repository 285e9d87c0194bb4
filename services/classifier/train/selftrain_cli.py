"""``roadlabel selftrain``: arguments and the run; per-round lines on stderr and a JSON report in ``--out``.

No torch at import time: the trainer imports it when the first round trains.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from services.common.modelcard import atomic_write_bytes

if TYPE_CHECKING:
    from services.classifier.train.learning_loop import RoundRecord

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the self-training options to ``parser``."""
    parser.add_argument(
        "--labeled",
        type=Path,
        nargs="+",
        required=True,
        metavar="DIR",
        help="GTSRB-layout folders (000NN/GT-000NN.csv), or dataset folders with classification/ inside",
    )
    parser.add_argument(
        "--unlabeled",
        type=Path,
        nargs="+",
        required=True,
        metavar="DIR",
        help="folders of crop images (PNG/JPEG, recursive); files sharing a TTTTT_ prefix in a folder form a track",
    )
    parser.add_argument("--threshold", type=float, default=0.9, help="track confidence to accept a pseudo label")
    parser.add_argument("--rounds", type=int, default=3, help="self-training rounds after the first training")
    parser.add_argument("--out", type=Path, required=True, help="output folder: round_NN/ and selftrain.json")
    parser.add_argument("--background", type=Path, action="append", default=[], help="not-a-sign data; repeatable")
    parser.add_argument(
        "--base",
        type=Path,
        metavar="MODEL.onnx",
        help="fine-tune every round from this model (card beside it) instead of ImageNet; implies --frozen",
    )
    parser.add_argument(
        "--frozen",
        type=Path,
        metavar="MANIFEST",
        help="frozen validation manifest (default with --base: deploy/models/frozen/classifier.json): never trained "
        "on, calibrates each round's model and gives its figures",
    )
    parser.add_argument(
        "--data-root", type=Path, help="folder holding the frozen set's files (default: ../shared/data)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="default: 24; with --base: 3")
    parser.add_argument("--lr", type=float, default=None, help="default: 2e-3; with --base: 3e-4")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--max-steps", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Self-train; return the exit code (2 on bad input)."""
    from services.classifier.train.learning_loop import group_tracks, run_self_training  # noqa: PLC0415
    from services.classifier.train.selftrain import ProductTrainer, load_items  # noqa: PLC0415
    from services.common.errors import InputError, ModelError  # noqa: PLC0415

    if not 0.0 <= args.threshold <= 1.0 or args.rounds < 0:
        sys.stderr.write(
            f"selftrain: expected --threshold in [0, 1] and --rounds >= 0, got {args.threshold}, {args.rounds}\n"
        )
        return 2
    if (args.epochs is not None and args.epochs < 1) or (args.lr is not None and not args.lr > 0):
        sys.stderr.write(f"selftrain: expected --epochs >= 1 and --lr > 0, got {args.epochs}, {args.lr}\n")
        return 2
    missing = [str(p) for p in args.background if not p.is_dir()]
    if missing:
        sys.stderr.write(f"selftrain: --background: expected folders, got {', '.join(missing)} (no such folder)\n")
        return 2
    try:
        items = load_items(args.labeled, args.unlabeled)
    except InputError as exc:
        sys.stderr.write(f"selftrain: {exc}\n")
        return 2
    tracks = group_tracks(items.tracks)
    labelled = {t: int(items.labels[idx[0]]) for t, idx in tracks.items() if items.labels[idx[0]] >= 0}
    sys.stderr.write(
        f"selftrain: {len(labelled)} labelled tracks, {len(tracks) - len(labelled)} unlabelled tracks "
        f"({len(items.paths)} crops); threshold {args.threshold}, up to {args.rounds} rounds\n"
    )
    frozen = args.frozen
    if frozen is None and args.base is not None:
        from services.classifier.frozen import default_manifest_path  # noqa: PLC0415

        frozen = default_manifest_path("classifier")
    if args.base is not None and not args.base.is_file():
        sys.stderr.write(f"selftrain: --base: expected an .onnx file with its card beside it, got {args.base}\n")
        return 2
    trainer = ProductTrainer(
        items,
        args.out,
        tuple(args.background),
        args.epochs or (3 if args.base is not None else 24),
        args.input_size,
        args.seed,
        args.device,
        args.max_steps,
        base=args.base,
        frozen=frozen,
        data_root=args.data_root,
        lr=args.lr or (3e-4 if args.base is not None else None),
    )
    records: list[RoundRecord] = []
    frozen_by_round: list[dict[str, object]] = []

    def on_round(r: RoundRecord) -> None:
        records.append(r)
        card = trainer.last_card
        frozen_fig = card.metrics.get("frozen") if card is not None else None
        if frozen_fig is not None:
            frozen_by_round.append({"round": r.round, "version": card.version if card else None, **frozen_fig})
        on_frozen = f", frozen track accuracy {frozen_fig['track_accuracy']:.4f}" if frozen_fig else ""
        sys.stderr.write(
            f"round {r.round}: {r.pseudo_tracks} pseudo-labelled tracks (+{r.new_pseudo_tracks}), "
            f"{r.unlabelled_tracks} left, {r.labelled_crops} training crops{on_frozen}, {r.seconds:.0f} s\n"
        )
        sys.stderr.flush()
        body = {
            "threshold": args.threshold,
            "base": str(args.base) if args.base else None,
            "rounds": [x.as_dict() for x in records],
            "frozen": frozen_by_round,
        }
        atomic_write_bytes(args.out / "selftrain.json", (json.dumps(body, indent=1) + "\n").encode())

    args.out.mkdir(parents=True, exist_ok=True)
    try:
        run_self_training(tracks, labelled, trainer, threshold=args.threshold, rounds=args.rounds, on_round=on_round)
    except (InputError, ModelError) as exc:  # found while training: an unreadable crop, a base without its card
        sys.stderr.write(f"selftrain: {exc} (rounds finished before it are in {args.out / 'selftrain.json'})\n")
        return 2
    sys.stdout.write(f"wrote {args.out / 'selftrain.json'} ({len(records)} rounds)\n")
    return 0
