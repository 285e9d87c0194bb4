"""``roadlabel detect`` and ``roadlabel eval detector``: the two-stage still-image commands.

``detect`` finds the signs in road images and names each one; ``eval detector`` measures both stages on a
GTSDB-format folder. ``gateway.cli`` registers them through ``add_commands``. This is an entry point: it reads the
environment, prints, and draws the progress bar; ``gateway.two_stage`` and the services do none of that.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from pydantic import ValidationError
from tqdm import tqdm

from gateway.cli import EXIT_INPUT_ERRORS, EXIT_MODEL_ERROR, EXIT_OK, MODEL_ENV_VAR
from gateway.two_stage import SIGN_CLASS_ID, SIGN_CONFIDENCE, TwoStageSettings, classify_detections
from services.classifier.api import Classifier
from services.classifier.models import default_classifier_path
from services.classifier.onnx import OnnxClassifier
from services.common.classes import UNKNOWN
from services.common.errors import ConfigError, InputError, ModelError, UnreadableImage
from services.common.images import IMAGE_SUFFIXES, iter_image_files, load_image
from services.common.modelcard import card_path_for, load_card
from services.common.registry import REGISTRY_ENV_VAR, Registry, default_models_dir
from services.common.types import Detections, Frame, FrameRef
from services.detector.api import DetectorSettings
from services.detector.metrics import DetectionEvaluator, DetectionReport, GroundTruth, read_gtsdb_gt
from services.detector.models import default_detector_path
from services.detector.onnx import OnnxDetector
from services.detector.postprocess import DetectorSpec

__all__ = ["DETECTOR_ENV_VAR", "add_commands"]

log = logging.getLogger(__name__)

DETECTOR_ENV_VAR = "ROADLABEL_DETECTOR_MODEL"
"""Environment variable naming the detector model, when ``--detector`` is not given."""

_EXIT_HELP = f"""\
exit status:
  {EXIT_OK}  every image was processed
  {EXIT_INPUT_ERRORS}  some input could not be read (a missing path, a folder without images, an unreadable,
     truncated or corrupt file); each is named on stderr, and every other image is still processed
  2  usage error (unknown option, bad value)
  {EXIT_MODEL_ERROR}  a model could not be loaded or run (missing file or card, sha256 or shape mismatch)
"""


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``detect`` and ``eval detector`` to the ``roadlabel`` sub-commands."""
    _add_detect(commands)
    _add_eval(commands)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _add_model_options(cmd: argparse.ArgumentParser, *, batch_size: int | None = 8, image_workers: bool = True) -> None:
    cmd.add_argument(
        "--detector",
        type=Path,
        metavar="PATH",
        help=f"detector .onnx file, with its .card.json beside it (default: ${DETECTOR_ENV_VAR}, else "
        f"{default_detector_path()})",
    )
    cmd.add_argument(
        "--classifier",
        type=Path,
        metavar="PATH",
        help=f"classifier .onnx file, with its .card.json beside it (default: ${MODEL_ENV_VAR}, else "
        f"{default_classifier_path()})",
    )
    cmd.add_argument(
        "--registry",
        type=Path,
        metavar="DIR",
        default=Path(os.environ[REGISTRY_ENV_VAR]) if os.environ.get(REGISTRY_ENV_VAR) else None,
        help=f"model registry (default: ${REGISTRY_ENV_VAR}); without --detector/--classifier its promoted versions "
        "are used, and --classifier classifier@VERSION names a registered one",
    )
    cmd.add_argument(
        "--batch-size",
        type=_positive_int,
        default=batch_size,
        metavar="N",
        help="images per detector call (default: "
        + (str(batch_size) if batch_size is not None else "the settings file's detect_batch, else 4")
        + ")",
    )
    cmd.add_argument(
        "--score-threshold",
        type=_unit_float,
        metavar="X",
        help="detector score threshold (default: the detector card's)",
    )
    cmd.add_argument(
        "--crop-margin",
        type=float,
        # With a settings file (batch_size None), only an explicit --crop-margin overrides the file's.
        default=TwoStageSettings().crop_margin if batch_size is not None else None,
        metavar="F",
        help="grow each box by this fraction of its size on every side before classifying it, as GTSRB crops "
        "are (default: "
        + ("%(default)s" if batch_size is not None else "the settings file's crop_margin, else 0.15")
        + ")",
    )
    cmd.add_argument(
        "--threads", type=_positive_int, metavar="N", help="ONNX Runtime threads per model (default: one per core)"
    )
    if image_workers:
        cmd.add_argument(
            "--workers",
            type=_positive_int,
            default=min(4, os.cpu_count() or 1),
            metavar="N",
            help="image decoding threads (default: %(default)s)",
        )


def _add_detect(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    suffixes = "/".join(IMAGE_SUFFIXES)
    cmd = commands.add_parser(
        "detect",
        help="find and name the traffic signs in road images",
        description=(
            "Detect traffic signs in whole images, then classify each detection. Each PATH is an image file or a "
            f"folder, searched recursively for {suffixes} files (any case), in sorted order. One line per image "
            "goes to stdout, in input order; unreadable images are named on stderr and skipped."
        ),
        epilog=_EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmd.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files and folders")
    cmd.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object per image: {"path", "width", "height", "detections": [{"xyxy", "score", '
        '"class_id", "class_name", "class_confidence"}]}; xyxy in image pixels (far corners exclusive)',
    )
    cmd.add_argument(
        "--keep-rejected",
        action="store_true",
        help="keep detections the classifier calls no sign, with class_id -1; each detection then also has "
        '"rejected": true or false',
    )
    _add_model_options(cmd)
    cmd.set_defaults(run=_run_detect)


def _add_eval(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = commands.add_parser("eval", help="measure a model on labelled data")
    kinds = cmd.add_subparsers(dest="eval_kind", required=True, metavar="MODEL")
    det = kinds.add_parser(
        "detector",
        help="detector AP50, operating point and end-to-end naming on a GTSDB-format folder",
        description=(
            "Run detect + classify on the images of a GTSDB-format folder (gt.txt with name;x1;y1;x2;y2;class_id, "
            "inclusive corners) and print class-agnostic AP50 (VOC all-point), recall, precision and false "
            "positives per image at the operating threshold, and the share of signs both found (IoU >= 0.5) and "
            "correctly named."
        ),
        epilog=_EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    det.add_argument("--data", type=Path, required=True, metavar="DIR", help="folder with gt.txt and the images")
    det.add_argument(
        "--split",
        choices=["all", "val"],
        default="all",
        help="all images, or only the detector card's validation images (extra['val_images']) (default: all)",
    )
    det.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    det.add_argument(
        "--score-floor",
        type=_unit_float,
        default=0.05,
        metavar="X",
        help="lowest detector score scored for AP (default: %(default)s; the operating threshold is the card's)",
    )
    _add_model_options(det)
    det.set_defaults(run=_run_eval)


# --- shared plumbing -------------------------------------------------------------------------------------------------


def _model_path(
    given: Path | None, env_var: str, default: Path, option: str, registry: Path | None = None
) -> tuple[Path, str]:
    task = option.removeprefix("--")
    if given is not None:
        if registry is not None and str(given).startswith(f"{task}@") and not given.is_file():
            return _from_registry(registry, str(given)), f"{option} {given} in {registry}"
        return given, option
    if os.environ.get(env_var):
        return Path(os.environ[env_var]), f"${env_var}"
    if registry is not None:
        return _from_registry(registry, task), f"the promoted {task} of {registry}"
    return default, "the default path"


def _from_registry(registry: Path, spec: str) -> Path:
    """A registry model file (seeding the registry from deploy/models on first use).

    Raises:
        ModelError: no such version in the registry, or its files changed.
    """
    reg = Registry(registry)
    try:
        reg.seed(default_models_dir())
        return reg.resolve(spec)
    except InputError as exc:
        raise ModelError(str(exc)) from exc


def _load_models(
    args: argparse.Namespace, detector_settings: DetectorSettings
) -> tuple[OnnxDetector, OnnxClassifier] | None:
    """Both models, or None after naming the problem on stderr."""
    registry = getattr(args, "registry", None)
    try:
        det_path, det_source = _model_path(
            args.detector, DETECTOR_ENV_VAR, default_detector_path(), "--detector", registry
        )
        cls_path, cls_source = _model_path(
            args.classifier, MODEL_ENV_VAR, default_classifier_path(), "--classifier", registry
        )
    except ModelError as exc:
        _say(f"roadlabel: {exc}")
        return None
    try:
        detector = OnnxDetector(det_path, settings=detector_settings, intra_op_threads=args.threads)
    except (ModelError, ConfigError) as exc:
        _say(f"roadlabel: {exc} (detector from {det_source}; choose one with --detector or ${DETECTOR_ENV_VAR})")
        return None
    try:
        classifier = OnnxClassifier(cls_path, intra_op_threads=args.threads)
    except (ModelError, ConfigError) as exc:
        _say(f"roadlabel: {exc} (classifier from {cls_source}; choose one with --classifier or ${MODEL_ENV_VAR})")
        return None
    return detector, classifier


def _settings(args: argparse.Namespace, **overrides: Any) -> tuple[DetectorSettings, TwoStageSettings] | None:
    try:
        detector = DetectorSettings(batch_size=args.batch_size, score_threshold=args.score_threshold, **overrides)
        two_stage = TwoStageSettings(crop_margin=args.crop_margin, keep_rejected=getattr(args, "keep_rejected", False))
    except ValidationError as exc:
        _say(f"roadlabel: {ConfigError(str(exc))}")
        return None
    return detector, two_stage


def _decode_ahead(files: Sequence[Path], *, workers: int, ahead: int) -> Iterator[tuple[Path, np.ndarray | Exception]]:
    """Yield ``(path, RGB image)`` in the order of ``files``, or ``(path, UnreadableImage)`` for an unreadable one.

    Up to ``ahead`` files are decoded in ``workers`` threads while the caller runs the models (Pillow and
    onnxruntime both release the GIL). Any other exception is re-raised here, in the caller's thread.
    """
    pending: deque[tuple[Path, Future[np.ndarray]]] = deque()
    queue = iter(files)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
    try:
        for path in queue:
            pending.append((path, pool.submit(load_image, path)))
            if len(pending) >= ahead:
                break
        while pending:
            path, future = pending.popleft()
            following = next(queue, None)
            if following is not None:
                pending.append((following, pool.submit(load_image, following)))
            try:
                image = future.result()
            except UnreadableImage as exc:
                yield path, exc
            else:
                yield path, image
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _image_batches(
    files: Sequence[Path], batch_size: int, workers: int, report: Callable[[str], None]
) -> Iterator[tuple[list[Path], list[np.ndarray], int]]:
    """Decoded images in batches of ``batch_size``, in order: ``(paths, images, failures since last batch)``."""
    paths: list[Path] = []
    images: list[np.ndarray] = []
    failed = 0
    for path, image in _decode_ahead(files, workers=workers, ahead=2 * batch_size):
        if isinstance(image, Exception):
            report(f"roadlabel: {image}")
            failed += 1
            continue
        paths.append(path)
        images.append(image)
        if len(paths) == batch_size:
            yield paths, images, failed
            paths, images, failed = [], [], 0
    if paths or failed:
        yield paths, images, failed


def _frames(paths: Sequence[Path], images: Sequence[np.ndarray]) -> list[Frame]:
    return [Frame(FrameRef(str(path), 0, 0.0), image) for path, image in zip(paths, images, strict=True)]


def _say(message: str, stream: TextIO | None = None) -> None:
    stream = sys.stderr if stream is None else stream
    stream.write(message + "\n")
    stream.flush()


def _finite(value: float, digits: int) -> float | None:
    return round(value, digits) if math.isfinite(value) else None  # NaN is not JSON


# --- roadlabel detect ------------------------------------------------------------------------------------------------


def _run_detect(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings is None:
        return 2
    detector_settings, two_stage = settings
    models = _load_models(args, detector_settings)
    if models is None:
        return EXIT_MODEL_ERROR
    detector, classifier = models

    files: list[Path] = []
    failed = 0
    for path in args.paths:
        try:
            files.extend(iter_image_files([path]))
        except InputError as exc:
            _say(f"roadlabel: {exc}")
            failed += 1

    started = time.perf_counter()
    signs = 0
    # Seconds spent in each model stage; the rest of the run is waiting for decoding and writing.
    stage_s = {"detect": 0.0, "classify": 0.0}
    show_bar = not args.json and sys.stderr.isatty()
    with tqdm(total=len(files), unit="img", file=sys.stderr, disable=not show_bar, dynamic_ncols=True) as bar:

        def report(message: str) -> None:
            if show_bar:
                bar.write(message, file=sys.stderr)
            else:
                _say(message)

        try:
            for paths, images, batch_failed in _image_batches(files, args.batch_size, args.workers, report):
                failed += batch_failed
                tick = time.perf_counter()
                detections = detector.detect(_frames(paths, images))
                stage_s["detect"] += (tock := time.perf_counter()) - tick
                labelled = classify_detections(classifier, images, detections, two_stage)
                stage_s["classify"] += time.perf_counter() - tock
                lines = [
                    _format_image(path, image.shape[:2], dets, classifier, as_json=args.json, flag=args.keep_rejected)
                    for path, image, dets in zip(paths, images, labelled, strict=True)
                ]
                sys.stdout.write("".join(lines))
                sys.stdout.flush()
                signs += sum(len(d) for d in labelled)
                bar.update(len(paths) + batch_failed)
        except ModelError as exc:
            report(f"roadlabel: {exc}")
            return EXIT_MODEL_ERROR
    seconds = time.perf_counter() - started
    log.info(
        "detected",
        extra={
            "images": len(files),
            "failed": failed,
            "signs": signs,
            "seconds": round(seconds, 3),
            **{f"{stage}_seconds": round(value, 3) for stage, value in stage_s.items()},
        },
    )
    return EXIT_INPUT_ERRORS if failed else EXIT_OK


def _format_image(
    path: Path, hw: tuple[int, ...], dets: Detections, classifier: Classifier, *, as_json: bool, flag: bool
) -> str:
    class_id = dets.extra[SIGN_CLASS_ID]
    confidence = dets.extra[SIGN_CONFIDENCE]
    table = np.array([*classifier.card.class_names, UNKNOWN], dtype=object)
    names = [str(n) for n in table[class_id]]
    # One vectorised rounding for the whole image's boxes; tolist() gives plain floats for json.
    boxes = np.round(dets.xyxy.astype(np.float64), 1).tolist()
    scores = dets.score.tolist()
    if as_json:
        detections: list[dict[str, Any]] = []
        for box, score, cid, name, conf in zip(
            boxes, scores, class_id.tolist(), names, confidence.tolist(), strict=True
        ):
            row: dict[str, Any] = {
                "xyxy": box,
                "score": _finite(score, 4),
                "class_id": cid,
                "class_name": name,
                "class_confidence": _finite(conf, 4),
            }
            if flag:
                row["rejected"] = cid < 0
            detections.append(row)
        record = {"path": str(path), "width": int(hw[1]), "height": int(hw[0]), "detections": detections}
        return json.dumps(record, ensure_ascii=False) + "\n"
    parts = [
        f"{name} {conf:.2f} at {x1:.0f},{y1:.0f},{x2:.0f},{y2:.0f} (score {score:.2f})"
        for (x1, y1, x2, y2), score, name, conf in zip(boxes, scores, names, confidence.tolist(), strict=True)
    ]
    return f"{path}\t{len(parts)} sign{'s' if len(parts) != 1 else ''}" + "".join(f"\t{p}" for p in parts) + "\n"


# --- roadlabel eval detector -----------------------------------------------------------------------------------------


def _run_eval(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings is None:
        return 2
    operating, two_stage = settings
    det_source = "--registry"
    try:
        det_path, det_source = _model_path(
            args.detector, DETECTOR_ENV_VAR, default_detector_path(), "--detector", getattr(args, "registry", None)
        )
        threshold = DetectorSpec.from_card(load_card(card_path_for(det_path)), operating).score_threshold
    except ModelError as exc:
        _say(f"roadlabel: {exc} (detector from {det_source}; choose one with --detector or ${DETECTOR_ENV_VAR})")
        return EXIT_MODEL_ERROR
    # One run scores everything down to the floor, for AP; the operating point is read off the same run.
    floor = min(args.score_floor, threshold)
    models = _load_models(args, operating.model_copy(update={"score_threshold": floor}))
    if models is None:
        return EXIT_MODEL_ERROR
    detector, classifier = models
    # Only detections at the operating threshold are classified; rejected ones stay, with class -1.
    naming = two_stage.model_copy(update={"keep_rejected": True})
    try:
        truth = read_gtsdb_gt(args.data / "gt.txt")
        files = _eval_files(args.data, args.split, detector.card.extra.get("val_images"))
    except InputError as exc:
        _say(f"roadlabel: {exc}")
        return EXIT_INPUT_ERRORS
    except ModelError as exc:
        _say(f"roadlabel: {exc}")
        return EXIT_MODEL_ERROR

    evaluator = DetectionEvaluator(threshold=threshold)
    failed = 0
    started = time.perf_counter()
    show_bar = not args.json and sys.stderr.isatty()
    with tqdm(total=len(files), unit="img", file=sys.stderr, disable=not show_bar, dynamic_ncols=True) as bar:
        try:
            for paths, images, batch_failed in _image_batches(files, args.batch_size, args.workers, _say):
                failed += batch_failed
                bar.update(len(paths) + batch_failed)
                if not paths:
                    continue
                detections = detector.detect(_frames(paths, images))
                at_threshold = [np.flatnonzero(d.score >= threshold) for d in detections]
                named = classify_detections(
                    classifier, images, [d.take(rows) for d, rows in zip(detections, at_threshold, strict=True)], naming
                )
                for path, dets, rows, labelled in zip(paths, detections, at_threshold, named, strict=True):
                    pred_class = np.full(len(dets), -1, np.int16)
                    pred_class[rows] = labelled.extra[SIGN_CLASS_ID]
                    evaluator.add(dets.xyxy, dets.score, truth.get(path.name, GroundTruth.empty()), pred_class)
        except ModelError as exc:
            _say(f"roadlabel: {exc}")
            return EXIT_MODEL_ERROR
    report = evaluator.report()
    log.info("evaluated", extra={"images": report.images, "seconds": round(time.perf_counter() - started, 3)})
    sys.stdout.write(_format_report(report, args, floor))
    sys.stdout.flush()
    return EXIT_INPUT_ERRORS if failed else EXIT_OK


def _eval_files(data: Path, split: str, val_images: object) -> list[Path]:
    """The images of ``data`` (not recursive) to evaluate, sorted by name."""
    if not data.is_dir():
        raise InputError(f"--data: expected a GTSDB-format folder, got {data} (not a folder)")
    files = sorted(p for p in data.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
    if split == "val":
        if not isinstance(val_images, list) or not all(isinstance(v, str) for v in val_images):
            raise ModelError(
                "--split val: expected the detector card's extra['val_images'] to list image names, "
                f"got {type(val_images).__name__}; use --split all"
            )
        wanted = set(val_images)
        files = [p for p in files if p.name in wanted or p.stem in wanted]
    if not files:
        raise InputError(f"--data {data}: expected images ({'/'.join(IMAGE_SUFFIXES)}) for split {split!r}, found none")
    return files


def _format_report(report: DetectionReport, args: argparse.Namespace, floor: float) -> str:
    if args.json:
        record: dict[str, Any] = {
            key: (_finite(value, 4) if isinstance(value, float) else value)
            for key, value in dataclasses.asdict(report).items()
        }
        record |= {"split": args.split, "data": str(args.data), "score_floor": floor}
        return json.dumps(record) + "\n"

    def pct(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{100 * value:.1f} %"

    return (
        f"images {report.images}, signs {report.gt_signs}, detections {report.detections} (score >= {floor:g}), "
        f"split {args.split}\n"
        f"AP50 (class-agnostic, VOC all-point): {pct(report.ap50)}\n"
        f"at score >= {report.threshold:g}: recall {pct(report.recall)}, precision {pct(report.precision)}, "
        f"false positives per image {report.fp_per_image:.3f}\n"
        f"found (IoU >= 0.5) and correctly named: {pct(report.end_to_end)} of signs "
        f"({pct(report.named_when_found)} of those found and kept)\n"
    )
