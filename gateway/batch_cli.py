"""``roadlabel batch SOURCES... -o OUT_DIR``: label every recording of an archive, resumably.

``gateway.batch`` does the work and reports events; this entry point finds the recordings, loads the models,
draws the progress bars (files, and frames of the current file), writes one status line per recording and a
summary line, and picks the exit status. ``gateway.cli`` registers it through ``add_commands``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError
from tqdm import tqdm

from gateway.batch import (
    JOURNAL_NAME,
    SUMMARY_NAME,
    VIDEO_SUFFIXES,
    BatchEvent,
    BatchSummary,
    FileRow,
    find_recordings,
    run_batch,
)
from gateway.cli import EXIT_INPUT_ERRORS, EXIT_MODEL_ERROR, EXIT_OK, EXIT_USAGE, MODEL_ENV_VAR
from gateway.detect_cli import DETECTOR_ENV_VAR, _add_model_options, _load_models, _model_path, _say
from gateway.label_cli import load_pipeline_settings
from gateway.pipeline import PipelineSettings
from services.classifier.api import Classifier
from services.classifier.models import default_classifier_path
from services.common.errors import ConfigError, InputError, ModelError, ServiceUnavailable
from services.detector.api import Detector, DetectorSettings
from services.detector.models import default_detector_path

if TYPE_CHECKING:  # Ray is imported only for --engine ray
    from gateway.ray_engine import RayEngine

__all__ = ["add_commands"]

_EXIT_HELP = f"""\
exit status:
  {EXIT_OK}  every recording is labelled (now, or earlier with the same models and settings)
  {EXIT_INPUT_ERRORS}  some recording could not be labelled (each is named on stderr and in {SUMMARY_NAME}; the
     others were labelled), a SOURCE is missing, or no recording was found (then nothing is labelled)
  {EXIT_USAGE}  usage error (unknown option, bad value, bad settings file, OUT_DIR not writable or in use)
  {EXIT_MODEL_ERROR}  a model could not be loaded or run: the batch stops (rerun to resume)
  130  interrupted (rerun the same command to resume)

Rerunning the same command skips every recording already labelled with the same models and settings (and,
unless --retry-failed, those that failed before), so a batch that crashed or was stopped resumes where it was.
Changing the models or the settings relabels. A label file with reviewed tracks is never overwritten.
"""


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``batch`` on the ``roadlabel`` parser."""
    suffixes = " ".join(sorted(VIDEO_SUFFIXES))
    cmd = commands.add_parser(
        "batch",
        help="label every recording of a folder or a list, resumably",
        description=(
            "Label every recording of an archive: one label file per recording under OUT_DIR, mirroring the\n"
            "folders under each source. A SOURCE is a folder (searched recursively for\n"
            f"{suffixes}, any case; hidden files skipped), a video file, or a text\n"
            "file listing one path per line (# comments; relative paths are relative to the list file).\n"
            f"Each outcome is journaled in OUT_DIR/{JOURNAL_NAME}; the summary of the run goes to\n"
            f"OUT_DIR/{SUMMARY_NAME}."
        ),
        epilog=_EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmd.add_argument("sources", nargs="+", type=Path, metavar="SOURCE", help="folders, video files and list files")
    cmd.add_argument("-o", "--out", type=Path, required=True, metavar="OUT_DIR", help="folder for the label files")
    cmd.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PATTERN",
        help="only recordings whose path (relative to its source) or name matches this glob; repeatable",
    )
    cmd.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave out recordings, or folders, whose relative path or name matches this glob; repeatable",
    )
    cmd.add_argument("--settings", type=Path, metavar="FILE", help="pipeline settings, YAML or JSON (see README)")
    cmd.add_argument(
        "--retry-failed", action="store_true", help="try again the recordings that failed in an earlier run"
    )
    cmd.add_argument("--no-progress", action="store_true", help="no progress bars (status lines only)")
    _add_model_options(cmd, batch_size=None, image_workers=False)
    cmd.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: one recording after another in this process; ray: recordings as Ray tasks, the models as "
        "Ray actors with their own replicas and batching (default: %(default)s)",
    )
    cmd.add_argument(
        "--address",
        metavar="ADDR",
        help="Ray cluster to join (auto, HOST:6379 or ray://HOST:10001; default: start one)",
    )
    cmd.add_argument("--detector-replicas", type=int, default=1, metavar="N", help="Ray: detector actors (default 1)")
    cmd.add_argument("--classifier-replicas", type=int, default=1, metavar="N", help="Ray: classifier actors")
    cmd.add_argument("--detector-gpus", type=float, default=0.0, metavar="G", help="Ray: GPUs per detector actor")
    cmd.set_defaults(run=_run_batch)


def _ray_engine(args: argparse.Namespace, settings: PipelineSettings) -> RayEngine | None:
    from gateway.ray_engine import RayEngine, RaySettings

    try:
        det_path, _ = _model_path(args.detector, DETECTOR_ENV_VAR, default_detector_path(), "--detector", args.registry)
        cls_path, _ = _model_path(
            args.classifier, MODEL_ENV_VAR, default_classifier_path(), "--classifier", args.registry
        )
        ray_settings = RaySettings(
            address=args.address,
            detector_replicas=args.detector_replicas,
            classifier_replicas=args.classifier_replicas,
            detector_num_gpus=args.detector_gpus,
            threads=args.threads,
        )
        return RayEngine(ray_settings, det_path, cls_path, settings.detect_batch)
    except (ModelError, ServiceUnavailable, ValidationError, ConnectionError) as exc:
        _say(f"roadlabel: ray: {exc}")
        return None


def _run_batch(args: argparse.Namespace) -> int:
    try:
        settings = load_pipeline_settings(args.settings, detect_batch=args.batch_size, crop_margin=args.crop_margin)
        detector_settings = DetectorSettings(batch_size=settings.detect_batch, score_threshold=args.score_threshold)
    except (ConfigError, ValidationError) as exc:
        _say(f"roadlabel: {exc}")
        return EXIT_USAGE
    out_dir: Path = args.out
    if out_dir.exists() and not out_dir.is_dir():
        _say(f"roadlabel: -o {out_dir}: expected a folder for the label files, got a file")
        return EXIT_USAGE
    try:
        recordings = find_recordings(args.sources, args.include, args.exclude)
    except InputError as exc:
        _say(f"roadlabel: {exc}")
        return EXIT_INPUT_ERRORS
    if not recordings:
        _say(
            "roadlabel: expected recordings in "
            + ", ".join(str(s) for s in args.sources)
            + f" ({' '.join(sorted(VIDEO_SUFFIXES))}, after --include/--exclude), got none"
        )
        return EXIT_INPUT_ERRORS
    engine = None
    detector: Detector
    classifier: Classifier
    if args.engine == "ray":
        engine = _ray_engine(args, settings)
        if engine is None:
            return EXIT_MODEL_ERROR
        detector, classifier = engine.detector, engine.classifier
    else:
        models = _load_models(args, detector_settings)
        if models is None:
            return EXIT_MODEL_ERROR
        detector, classifier = models
    if args.score_threshold is not None:
        _say(
            "roadlabel: note: --score-threshold is not recorded in label files, so a later batch with another "
            "threshold will not relabel these recordings"
        )
    show_bars = not args.no_progress and sys.stderr.isatty()
    started = time.perf_counter()
    with (
        tqdm(
            total=len(recordings),
            unit="file",
            file=sys.stderr,
            disable=not show_bars,
            dynamic_ncols=True,
            desc="batch",
            position=0,
        ) as files_bar,
        tqdm(
            total=None,
            unit="frame",
            file=sys.stderr,
            disable=not show_bars,
            dynamic_ncols=True,
            position=1,
            leave=False,
        ) as frames_bar,
    ):

        def on_event(event: BatchEvent) -> None:
            if event.kind == "file_started" and event.path is not None:
                frames_bar.set_description_str(_short(event.path.name), refresh=False)
                frames_bar.reset(total=None)
            elif event.kind == "progress" and event.progress is not None and event.progress.stage == "label":
                if event.frames_total is not None and frames_bar.total != event.frames_total:
                    frames_bar.total = max(event.frames_total, event.frames_done)
                frames_bar.update(event.frames_done - frames_bar.n)
            elif event.kind == "file_done" and event.row is not None:
                tqdm.write(_status_line(event.row), file=sys.stderr)
                files_bar.update(1)

        try:
            summary = run_batch(
                recordings,
                out_dir,
                detector,
                classifier,
                settings,
                retry_failed=args.retry_failed,
                on_event=on_event,
                engine=engine,
            )
        except (ModelError, ServiceUnavailable, ConfigError) as exc:
            frames_bar.close()
            files_bar.close()
            _say(f"roadlabel: {exc}; the batch stopped (rerun the same command to resume)")
            return EXIT_MODEL_ERROR
        except InputError as exc:  # another batch holds OUT_DIR
            frames_bar.close()
            files_bar.close()
            _say(f"roadlabel: -o {exc}")
            return EXIT_USAGE
        except OSError as exc:
            frames_bar.close()
            files_bar.close()
            _say(f"roadlabel: -o {out_dir}: expected a writable folder, got {exc.strerror or exc}")
            return EXIT_USAGE
        except KeyboardInterrupt:
            frames_bar.close()
            files_bar.close()
            _say("roadlabel: interrupted; rerun the same command to resume")
            raise
    _say(_summary_line(summary, time.perf_counter() - started, out_dir / SUMMARY_NAME))
    return EXIT_INPUT_ERRORS if summary.failed else EXIT_OK


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def _status_line(row: FileRow) -> str:
    if row.outcome == "labelled":
        fps = row.frames / row.elapsed_s if row.elapsed_s > 0 else 0.0
        return f"labelled {row.source}: {row.tracks} tracks, {row.frames} frames, {fps:.1f} fps"
    if row.outcome == "skipped":
        return f"skipped {row.source}: {row.reason}"
    hint = " (failed in an earlier run; --retry-failed to try again)" if row.earlier else ""
    reason = row.reason or ""
    name = row.source.rsplit("/", 1)[-1]
    reason = reason.removeprefix(f"{name}: ")  # the decoder's messages start with the file name
    return f"FAILED {row.source}: {reason}{hint}"


def _summary_line(summary: BatchSummary, seconds: float, path: Path) -> str:
    fps = summary.frames_labelled / seconds if seconds > 0 else 0.0
    return (
        f"batch: {summary.files} recordings: {summary.labelled} labelled, {summary.skipped} skipped, "
        f"{summary.failed} failed; {summary.frames} frames, {summary.tracks} tracks; {seconds:.1f} s "
        f"({fps:.1f} frames/s labelled) -> {path}"
    )
