"""``roadlabel models list|add|eval|promote``: the model registry from the command line.

The registry folder is ``--registry DIR``, else ``$ROADLABEL_REGISTRY``; on first use it is seeded from
``deploy/models`` (the committed models become version 1 of each task, promoted). See
``services.common.registry`` for the layout and the promotion rule. No torch here.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.classifier.frozen import (
    default_data_root,
    default_manifest_path,
    evaluate_onnx_classifier,
    load_manifest,
)
from services.common.errors import InputError, ModelError
from services.common.modelcard import ModelCard, card_path_for, load_card
from services.common.registry import (
    REGISTRY_ENV_VAR,
    TASKS,
    PromotionRefused,
    Registry,
    Task,
    VersionInfo,
    is_registered,
    open_registry,
    parse_model_spec,
)
from services.detector.frozen import evaluate_onnx_detector, load_detector_manifest

__all__ = ["add_commands", "evaluate_frozen", "with_frozen_figures"]


def _require_registry(args: argparse.Namespace) -> Registry:
    registry = open_registry(args.registry)
    if registry is None:
        raise InputError(f"registry: expected --registry DIR or ${REGISTRY_ENV_VAR}, got neither")
    return registry


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``models`` and its actions."""
    models = commands.add_parser(
        "models",
        help="model versions: list, add, evaluate on the frozen set, promote",
        description="The model registry (--registry DIR or $ROADLABEL_REGISTRY; seeded from deploy/models on first "
        "use). A version is promoted only if it beats the promoted one on the frozen validation set: classifier: "
        "track accuracy strictly higher, crop sign accuracy not lower, background rejection not lower by more than "
        "0.5 pt; detector: AP50 strictly higher, recall at the operating point not lower.",
    )
    sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    lst = sub.add_parser("list", help="list versions (* = promoted)")
    lst.add_argument("task", nargs="?", choices=TASKS, help="one task (default: both)")
    lst.add_argument("--json", action="store_true", help="one JSON object per version")
    _registry_option(lst)
    lst.set_defaults(run=_guarded(_run_list))

    add = sub.add_parser("add", help="register a model (x.onnx with x.card.json beside it); it is not promoted")
    add.add_argument("model", type=Path, help="the .onnx file")
    add.add_argument("--checkpoint", type=Path, help="torch checkpoint to keep with it (default: checkpoint.pt beside)")
    _registry_option(add)
    add.set_defaults(run=_guarded(_run_add))

    ev = sub.add_parser(
        "eval",
        help="measure a model on the frozen validation set",
        description="MODEL is TASK@VERSION (a registry version: the figures are stored beside it) or a path to an "
        ".onnx with its card (with --write-card, the figures and the auto-accept threshold go into that card; "
        "the ONNX file is not touched).",
    )
    ev.add_argument("model", help="TASK@VERSION, TASK (the promoted one) or PATH.onnx")
    ev.add_argument("--frozen", type=Path, help="frozen manifest (default: deploy/models/frozen/TASK.json)")
    ev.add_argument(
        "--data-root",
        type=Path,
        help="folder holding the frozen files' source folders (default: $ROADLABEL_DATA or ../shared/data)",
    )
    ev.add_argument(
        "--auto-accept-precision",
        type=float,
        default=0.99,
        help="classifier: target precision of auto-accepted tracks (default: %(default)s)",
    )
    ev.add_argument("--write-card", action="store_true", help="PATH.onnx: write the figures into its card")
    _registry_option(ev)
    ev.set_defaults(run=_guarded(_run_eval))

    promote = sub.add_parser("promote", help="promote a version if it beats the promoted one on the frozen set")
    promote.add_argument("task", choices=TASKS)
    promote.add_argument("version")
    promote.add_argument("--force", action="store_true", help="promote even if not better (needs --reason)")
    promote.add_argument("--reason", help="why (recorded in the history)")
    _registry_option(promote)
    promote.set_defaults(run=_guarded(_run_promote))


def _guarded(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad input -> exit 1, a model that cannot be used -> exit 3, each with one line on stderr."""

    @functools.wraps(run)
    def guarded(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except InputError as exc:
            sys.stderr.write(f"roadlabel models: {exc}\n")
            return 1
        except ModelError as exc:
            sys.stderr.write(f"roadlabel models: {exc}\n")
            return 3

    return guarded


def _registry_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--registry", type=Path, help=f"registry folder (default: ${REGISTRY_ENV_VAR}); seeded from deploy/models"
    )


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float) and not math.isnan(value):
        return f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def _summary(task: Task, figures: dict[str, Any] | None) -> str:
    if figures is None:
        return "no frozen figures"
    if task == "classifier":
        auto = figures.get("auto_accept") or {}
        return (
            f"track {_fmt(figures.get('track_accuracy'))} crop {_fmt(figures.get('sign_accuracy'))} "
            f"bg-rej {_fmt(figures.get('background_rejection'))} auto>={_fmt(auto.get('threshold'), 3)} "
            f"(cov {_fmt(auto.get('coverage'), 3)}) [{str(figures.get('manifest_sha256'))[:8]}]"
        )
    return (
        f"AP50 {_fmt(figures.get('ap50'))} recall {_fmt(figures.get('recall'))} "
        f"fp/img {_fmt(figures.get('fp_per_image'), 3)} [{str(figures.get('manifest_sha256'))[:8]}]"
    )


def _run_list(args: argparse.Namespace) -> int:
    registry = _require_registry(args)
    for task in (args.task,) if args.task else TASKS:
        promoted = registry.promoted(task)
        rows = registry.versions(task)
        if not args.json:
            sys.stdout.write(f"{task}:\n  {'':1} {'version':<20} {'parent':<20} {'created':<20} {'data':<12} frozen\n")
        for info in rows:
            figures = registry.frozen_figures(info)
            if args.json:
                sys.stdout.write(
                    json.dumps(
                        {
                            "task": task,
                            "version": info.version,
                            "promoted": info.version == promoted,
                            "parent": info.card.parent_version,
                            "created": info.card.extra.get("created"),
                            "training_data_sha256": info.card.training_data_sha256,
                            "frozen": figures,
                            "path": str(info.model_path),
                        }
                    )
                    + "\n"
                )
                continue
            mark = "*" if info.version == promoted else " "
            created = str(info.card.extra.get("created", "-"))[:19]
            data_hash = str(info.card.training_data_sha256 or "-")[:12]
            sys.stdout.write(
                f"  {mark} {info.version:<20} {str(info.card.parent_version or '-'):<20} {created:<20} {data_hash:<12} "
                f"{_summary(task, figures)}\n"
            )
    return 0


def _run_add(args: argparse.Namespace) -> int:
    registry = _require_registry(args)
    checkpoint = args.checkpoint
    if checkpoint is None and (args.model.parent / "checkpoint.pt").is_file():
        checkpoint = args.model.parent / "checkpoint.pt"
    info = registry.add(args.model, checkpoint=checkpoint)
    sys.stdout.write(f"registered {info.task}@{info.version} ({info.folder}); not promoted\n")
    return 0


def evaluate_frozen(
    model_path: Path,
    card: ModelCard,
    *,
    frozen: Path | None = None,
    data_root: Path | None = None,
    auto_accept_precision: float = 0.99,
) -> dict[str, Any]:
    """Frozen-set figures of an ONNX model (classifier or detector) with its card."""
    root = data_root or default_data_root()
    manifest_path = frozen or default_manifest_path(card.task)
    if card.task == "classifier":
        manifest = load_manifest(manifest_path, "classifier")
        return evaluate_onnx_classifier(
            model_path, manifest, root, card=card, auto_accept_precision=auto_accept_precision
        )
    return evaluate_onnx_detector(model_path, load_detector_manifest(manifest_path), root, card=card)


def with_frozen_figures(card: ModelCard, figures: dict[str, Any]) -> ModelCard:
    """The card with ``metrics['frozen']`` (and, for a classifier, ``auto_accept_threshold``) set."""
    update: dict[str, Any] = {"metrics": dict(card.metrics) | {"frozen": figures}}
    if card.task == "classifier":
        update["auto_accept_threshold"] = (figures.get("auto_accept") or {}).get("threshold")
    return ModelCard.model_validate(card.model_dump() | update)


def _run_eval(args: argparse.Namespace) -> int:
    if not 0 < args.auto_accept_precision <= 1:
        raise InputError(f"--auto-accept-precision: expected a number in (0, 1], got {args.auto_accept_precision}")
    info: VersionInfo | None = None
    if args.model.endswith(".onnx"):
        model_path = Path(args.model)
        if args.write_card and is_registered(model_path):
            raise InputError(
                f"--write-card: expected a model outside a registry, got {model_path}, a registered version (versions "
                "are immutable); evaluate it as TASK@VERSION with --registry to store its figures beside it"
            )
        card = load_card(card_path_for(model_path))
    else:
        task, version = parse_model_spec(args.model)
        info = _require_registry(args).get(task, version)
        model_path, card = info.model_path, info.card
    figures = evaluate_frozen(
        model_path,
        card,
        frozen=args.frozen,
        data_root=args.data_root,
        auto_accept_precision=args.auto_accept_precision,
    )
    sys.stdout.write(json.dumps(figures, indent=1) + "\n")
    if info is not None:
        path = _require_registry(args).record_eval(info, figures)
        sys.stderr.write(f"figures stored in {path}\n")
    elif args.write_card:
        card_path = card_path_for(model_path)
        with_frozen_figures(card, figures).save(card_path)
        sys.stderr.write(f"figures written into {card_path}\n")
    return 0


def _run_promote(args: argparse.Namespace) -> int:
    registry = _require_registry(args)
    try:
        record = registry.promote(args.task, args.version, force=args.force, reason=args.reason)
    except PromotionRefused as exc:
        sys.stderr.write(f"roadlabel models promote: refused: {exc}\n")
        return 1
    except ModelError as exc:
        sys.stderr.write(f"roadlabel models promote: {exc}\n")
        return 3
    forced = " (FORCED: " + str(record["reason"]) + ")" if record["forced"] else ""
    sys.stdout.write(f"promoted {args.task}@{record['version']} (was {record['previous']}){forced}\n")
    for line in record["rule"]:
        sys.stdout.write(f"  {line}\n")
    return 0
