"""The ``roadlabel`` command line.

``roadlabel classify PATH...`` names the sign in each image file; ``roadlabel train classifier ...`` trains the
classifier (needs the ``train`` extra). This is an entry point: it configures logging, reads the environment and
draws the progress bar; the services it calls do none of that.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

import numpy as np
from tqdm import tqdm

from services.classifier.api import Classifier, decide
from services.classifier.models import default_classifier_path
from services.classifier.onnx import OnnxClassifier
from services.classifier.preprocess import resize_crop
from services.common import log as logsetup
from services.common.errors import ConfigError, InputError, ModelError, UnreadableImage
from services.common.images import IMAGE_SUFFIXES, iter_image_files, load_image

__all__ = ["EXIT_INPUT_ERRORS", "EXIT_MODEL_ERROR", "EXIT_OK", "EXIT_USAGE", "MODEL_ENV_VAR", "main"]

log = logging.getLogger(__name__)

MODEL_ENV_VAR = "ROADLABEL_CLASSIFIER_MODEL"
"""Environment variable naming the classifier model, when ``--model`` is not given."""

EXIT_OK = 0
EXIT_INPUT_ERRORS = 1
EXIT_USAGE = 2
EXIT_MODEL_ERROR = 3

_EXIT_CODES_HELP = f"""\
exit status:
  {EXIT_OK}  every image was classified
  {EXIT_INPUT_ERRORS}  some input could not be read (a missing path, a folder without images, an unreadable or
     truncated file); each is named on stderr, and every other image is still classified and printed
  {EXIT_USAGE}  usage error (unknown option, bad value)
  {EXIT_MODEL_ERROR}  the model could not be loaded or run (missing file or card, sha256 or shape mismatch), or
     the training code could not be imported
"""


def main(argv: list[str] | None = None) -> int:
    """Run the ``roadlabel`` command line.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        The exit status (see ``roadlabel --help``). Usage errors exit through ``SystemExit(2)`` from argparse.
    """
    if argv is None:
        argv = sys.argv[1:]
    args = _build_parser(argv).parse_args(argv)
    logsetup.setup(args.log_level)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`roadlabel classify ... | head`). Point stdout at devnull so that the
        # interpreter's final flush does not raise a second time, and stop quietly with the status of a
        # process killed by SIGPIPE, as other Unix tools do.
        with contextlib.suppress(OSError, ValueError):  # stdout is no real file (tests): nothing flushes it at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roadlabel",
        description="Label traffic signs in road videos and images.",
        epilog=_EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log records at this level and above go to stderr as JSON lines (default: %(default)s)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_classify(commands)
    # Here, not at the top: these modules import this module's exit codes.
    from gateway import batch_cli, detect_cli, label_cli, models_cli, serve_cli

    detect_cli.add_commands(commands)  # detect, eval detector
    label_cli.add_commands(commands)  # label, export
    batch_cli.add_commands(commands)  # batch
    serve_cli.add_commands(commands)  # serve, keys
    models_cli.add_commands(commands)  # models list|add|eval|promote
    _add_dataset(commands)  # dataset build
    # The training code is imported only for a train command: classify must not depend on it (nor on torch).
    _add_train(commands, load="train" in argv)
    selftrain = commands.add_parser("selftrain", help="self-train the classifier on unlabeled crops (train extra)")
    if "selftrain" in argv:
        # Imports no torch itself (the trainer does, per round), but only this command needs it.
        from services.classifier.train import selftrain_cli

        selftrain_cli.add_arguments(selftrain)
        selftrain.set_defaults(run=selftrain_cli.run)
    return parser


def _add_classify(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    suffixes = "/".join(IMAGE_SUFFIXES)
    cmd = commands.add_parser(
        "classify",
        help="name the traffic sign in each image file",
        description=(
            f"Classify sign crops. Each PATH is an image file or a folder, searched recursively for {suffixes} "
            "files (any case), in sorted order. One line per image goes to stdout, in input order; unreadable "
            "images are named on stderr and skipped."
        ),
        epilog=_EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmd.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files and folders")
    cmd.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object per line: {"path", "class_id", "class_name", "confidence", "unknown"}; '
        "class_id is -1 and class_name is 'unknown' for a crop that is no sign or below the card's threshold",
    )
    cmd.add_argument(
        "--model",
        type=Path,
        metavar="PATH",
        help=f"classifier .onnx file, with its .card.json beside it (default: ${MODEL_ENV_VAR}, else "
        f"{default_classifier_path()})",
    )
    cmd.add_argument(
        "--batch-size", type=_positive_int, default=64, metavar="N", help="crops per model call (default: 64)"
    )
    cmd.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="ONNX Runtime threads (default: one per core, as onnxruntime picks)",
    )
    cmd.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        default=min(4, os.cpu_count() or 1),
        help="image decoding threads (default: %(default)s)",
    )
    cmd.set_defaults(run=_run_classify)


def _add_dataset(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from gateway import dataset_cli  # here, not at the top: it imports this module's exit codes

    dataset = commands.add_parser("dataset", help="make training data sets from reviewed label files")
    actions = dataset.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    build = actions.add_parser(
        "build",
        help="sign crops (GTSRB layout) and boxed frames (GTSDB, YOLO, COCO) from reviewed label files",
        description="Cut crops of reviewed tracks (several per track, chosen for diversity) and write frames with "
        "their reviewed boxes, with a manifest naming the recording, track and frame of every item. Rejected "
        "tracks become hard negatives. See README.md, 'Dataset from reviewed labels'.",
        epilog=dataset_cli.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dataset_cli.add_arguments(build)
    build.set_defaults(run=dataset_cli.run)


def _add_train(commands: argparse._SubParsersAction[argparse.ArgumentParser], *, load: bool) -> None:
    train = commands.add_parser("train", help="train a model (needs the train extra: pip install roadlabel[train])")
    models = train.add_subparsers(dest="model_kind", required=True, metavar="MODEL")
    classifier = models.add_parser("classifier", help="train the sign classifier")
    detector = models.add_parser("detector", help="train the sign detector")
    if not load:
        return
    try:
        # Imported here, not at the top: its module imports no torch itself, but classify must work without it.
        from services.classifier.train import cli as train_cli
    except ImportError as exc:
        classifier.add_argument("train_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        classifier.set_defaults(run=functools.partial(_training_unavailable, exc))
    else:
        train_cli.add_arguments(classifier)
        classifier.set_defaults(run=train_cli.run)
    try:
        from services.detector.train import cli as detector_cli
    except ImportError as exc:
        detector.add_argument("train_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        detector.set_defaults(run=functools.partial(_training_unavailable, exc))
    else:
        detector_cli.add_arguments(detector)
        detector.set_defaults(run=detector_cli.run)


def _training_unavailable(exc: ImportError, _args: argparse.Namespace) -> int:
    _say(sys.stderr, f"roadlabel: training is not available in this install ({exc}); install roadlabel[train]")
    return EXIT_MODEL_ERROR


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _run_classify(args: argparse.Namespace) -> int:
    model_path: Path
    if args.model is not None:
        model_path, source = args.model, "--model"
    elif os.environ.get(MODEL_ENV_VAR):
        model_path, source = Path(os.environ[MODEL_ENV_VAR]), f"${MODEL_ENV_VAR}"
    else:
        model_path, source = default_classifier_path(), "the default path"
    try:
        classifier = OnnxClassifier(model_path, intra_op_threads=args.threads, batch_size=args.batch_size)
    except (ModelError, ConfigError) as exc:
        _say(sys.stderr, f"roadlabel: {exc} (model from {source}; choose one with --model or ${MODEL_ENV_VAR})")
        return EXIT_MODEL_ERROR

    files: list[Path] = []
    failed = 0
    for path in args.paths:
        try:
            files.extend(iter_image_files([path]))
        except InputError as exc:
            _say(sys.stderr, f"roadlabel: {exc}")
            failed += 1

    started = time.perf_counter()
    show_bar = not args.json and sys.stderr.isatty()
    with tqdm(total=len(files), unit="img", file=sys.stderr, disable=not show_bar, dynamic_ncols=True) as bar:

        def report(message: str) -> None:
            if show_bar:
                bar.write(message, file=sys.stderr)
            else:
                _say(sys.stderr, message)

        try:
            failed += _classify_files(
                classifier,
                files,
                batch_size=args.batch_size,
                workers=args.workers,
                as_json=args.json,
                report=report,
                advance=bar.update,
            )
        except ModelError as exc:
            report(f"roadlabel: {exc}")
            return EXIT_MODEL_ERROR
    seconds = time.perf_counter() - started
    log.info(
        "classified",
        extra={"images": len(files), "failed": failed, "seconds": round(seconds, 3), "model": str(model_path)},
    )
    return EXIT_INPUT_ERRORS if failed else EXIT_OK


def _classify_files(
    classifier: Classifier,
    files: Sequence[Path],
    *,
    batch_size: int,
    workers: int,
    as_json: bool,
    report: Callable[[str], None],
    advance: Callable[[int], object],
) -> int:
    """Decode ``files`` in a thread pool, classify them in batches, print one line each; return the failure count.

    ``report`` gets one message per unreadable file; ``advance`` the number of files done, for a progress bar.
    """
    card = classifier.card
    batch_paths: list[Path] = []
    batch_crops: list[np.ndarray] = []
    failed = 0

    def flush() -> None:
        decisions = decide(classifier.classify(batch_crops), card)
        names = decisions.class_names(card)
        lines = [
            _format_line(path, int(class_id), name, float(confidence), bool(unknown), as_json=as_json)
            for path, class_id, name, confidence, unknown in zip(
                batch_paths, decisions.class_id, names, decisions.confidence, decisions.unknown, strict=True
            )
        ]
        sys.stdout.write("".join(lines))
        sys.stdout.flush()
        advance(len(batch_paths))
        batch_paths.clear()
        batch_crops.clear()

    for path, crop in _decode_in_order(files, card.input_hw, workers=workers, ahead=2 * batch_size):
        if isinstance(crop, UnreadableImage):
            report(f"roadlabel: {crop}")
            failed += 1
            advance(1)
            continue
        batch_paths.append(path)
        batch_crops.append(crop)
        if len(batch_crops) == batch_size:
            flush()
    if batch_crops:
        flush()
    return failed


def _decode_in_order(
    files: Sequence[Path], hw: tuple[int, int], *, workers: int, ahead: int
) -> Iterator[tuple[Path, np.ndarray | UnreadableImage]]:
    """Yield ``(path, crop resized to hw)`` in the order of ``files``, or ``(path, error)`` for an unreadable one.

    Up to ``ahead`` files are decoded in ``workers`` threads while the caller runs the model (Pillow and
    onnxruntime both release the GIL). Any exception other than ``UnreadableImage`` is re-raised here, in the
    caller's thread.
    """
    pending: deque[tuple[Path, Future[np.ndarray]]] = deque()
    queue = iter(files)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
    try:
        for path in queue:
            pending.append((path, pool.submit(_load_crop, path, hw)))
            if len(pending) >= ahead:
                break
        while pending:
            path, future = pending.popleft()
            following = next(queue, None)
            if following is not None:
                pending.append((following, pool.submit(_load_crop, following, hw)))
            try:
                crop = future.result()
            except UnreadableImage as exc:
                yield path, exc
            else:
                yield path, crop
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _load_crop(path: Path, hw: tuple[int, int]) -> np.ndarray:
    # Resizing here, in the worker, moves that Pillow work off the model's thread and keeps the queue small;
    # the classifier skips resizing crops that already have its input size, so the pixels are the same.
    return resize_crop(load_image(path), hw)


def _format_line(path: Path, class_id: int, name: str, confidence: float, unknown: bool, *, as_json: bool) -> str:
    if as_json:
        record = {
            "path": str(path),
            "class_id": class_id,
            "class_name": name,
            "confidence": round(confidence, 4) if math.isfinite(confidence) else None,  # NaN is not JSON
            "unknown": unknown,
        }
        return json.dumps(record, ensure_ascii=False) + "\n"
    return f"{path}\t{name}\t{confidence:.3f}\n"


def _say(stream: TextIO, message: str) -> None:
    stream.write(message + "\n")
    stream.flush()
