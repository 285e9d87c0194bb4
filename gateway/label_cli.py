"""``roadlabel label VIDEO -o OUT.json`` and ``roadlabel export LABELS.json --format F -o OUT``.

``label`` runs the video pipeline (``gateway.pipeline``) on one recording with a progress bar and writes its label
file atomically: a run that fails or is interrupted leaves no file behind (and an older file at ``OUT`` intact).
``export`` turns a label file into CVAT for video 1.1, MOTChallenge or Label Studio files. ``gateway.cli``
registers both through ``add_commands``. This is an entry point: it reads the environment, prints, and draws the
progress bar; the pipeline only reports progress events.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from tqdm import tqdm

from gateway.cli import EXIT_INPUT_ERRORS, EXIT_MODEL_ERROR, EXIT_OK, EXIT_USAGE
from gateway.detect_cli import _add_model_options, _load_models, _say
from gateway.exports import FORMATS, export_labels
from gateway.pipeline import PipelineSettings, Progress, label_recording
from services.common.errors import ConfigError, InputError, ModelError
from services.common.labelfile import load_label_file, save_label_file
from services.detector.api import DetectorSettings

__all__ = ["add_commands", "load_pipeline_settings"]

_LABEL_EXIT_HELP = f"""\
exit status:
  {EXIT_OK}  the label file was written
  {EXIT_INPUT_ERRORS}  the video could not be read (missing, empty, not a video, no video stream, too corrupt);
     no label file is written
  {EXIT_USAGE}  usage error (unknown option, bad value, bad settings file)
  {EXIT_MODEL_ERROR}  a model could not be loaded or run
"""


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``label`` and ``export`` on the ``roadlabel`` parser."""
    cmd = commands.add_parser(
        "label",
        help="label the traffic signs of a video: one track per sign, one label file",
        description="Decode a video, detect signs, track them, name each track once from its best crops, and "
        "write one label file (JSON, docs/label-file.schema.json).",
        epilog=_LABEL_EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmd.add_argument("video", type=Path, metavar="VIDEO", help="the recording (MP4, MOV, MKV, AVI, WebM ...)")
    cmd.add_argument(
        "-o", "--out", type=Path, metavar="OUT.json", help="label file to write (default: VIDEO's name + .labels.json)"
    )
    cmd.add_argument("--settings", type=Path, metavar="FILE", help="pipeline settings, YAML or JSON (see README)")
    cmd.add_argument(
        "--detect-every", type=int, metavar="K", help="run the detector on every K-th frame only (default: 1)"
    )
    cmd.add_argument(
        "--roi", metavar="X1,Y1,X2,Y2", help="region of interest, fractions of the frame (e.g. 0.3,0,1,0.8)"
    )
    cmd.add_argument("--min-sign-px", type=float, metavar="PX", help="ignore signs smaller than this")
    cmd.add_argument("--recording-id", metavar="ID", help="id to write (default: the first 16 digits of the sha256)")
    cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_options(cmd, batch_size=None, image_workers=False)
    cmd.set_defaults(run=_run_label)

    exp = commands.add_parser(
        "export",
        help="convert a label file to CVAT for video 1.1, MOTChallenge or Label Studio",
        description="Convert a label file for another tool. Rejected tracks are left out; relabelled ones carry "
        "the reviewer's class.",
    )
    exp.add_argument("labels", type=Path, metavar="LABELS.json")
    exp.add_argument("--format", "-f", required=True, choices=FORMATS, help="export format")
    exp.add_argument(
        "-o", "--out", type=Path, required=True, metavar="OUT", help="file to write (MOT: a folder or a .zip)"
    )
    exp.add_argument("--video-url", metavar="URL", help="Label Studio: the video's URL as Label Studio serves it")
    exp.set_defaults(run=_run_export)


def load_pipeline_settings(path: Path | None, **overrides: Any) -> PipelineSettings:
    """Pipeline settings from a YAML/JSON file (or defaults) with command-line overrides on top.

    Raises:
        ConfigError: The file is unreadable, not a mapping, or has unknown keys or bad values.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"settings {path}: expected a readable YAML or JSON file, got {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"settings {path}: expected a mapping of settings, got {type(loaded).__name__}")
        data = dict(loaded or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return PipelineSettings.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise ConfigError(f"settings: {where}: {first['msg']}") from exc


def _parse_roi(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"--roi: expected four numbers X1,Y1,X2,Y2 in [0, 1], got {text!r}") from exc
    if len(values) != 4:
        raise ConfigError(f"--roi: expected four numbers X1,Y1,X2,Y2 in [0, 1], got {text!r}")
    return values


def _run_label(args: argparse.Namespace) -> int:
    out: Path = args.out or Path(args.video.name + ".labels.json")
    try:
        settings = load_pipeline_settings(
            args.settings,
            detect_every=args.detect_every,
            roi_xyxy=_parse_roi(args.roi),
            min_sign_px=args.min_sign_px,
            detect_batch=args.batch_size,
            crop_margin=args.crop_margin,
        )
        detector_settings = DetectorSettings(batch_size=settings.detect_batch, score_threshold=args.score_threshold)
    except (ConfigError, ValidationError) as exc:
        _say(f"roadlabel: {exc}")
        return EXIT_USAGE
    if not args.video.is_file():
        what = "a directory" if args.video.is_dir() else "no such file"
        _say(f"roadlabel: {args.video}: expected a video file, got {what}")
        return EXIT_INPUT_ERRORS
    if out.is_dir():
        _say(f"roadlabel: -o {out}: expected a file path for the label file, got a directory")
        return EXIT_USAGE
    models = _load_models(args, detector_settings)
    if models is None:
        return EXIT_MODEL_ERROR
    detector, classifier = models
    show_bar = not args.no_progress and sys.stderr.isatty()
    started = time.perf_counter()
    with tqdm(
        total=None, unit="frame", file=sys.stderr, disable=not show_bar, dynamic_ncols=True, desc=args.video.name
    ) as bar:

        def on_progress(event: Progress) -> None:
            if event.stage != "label":
                return
            if event.total is not None and bar.total != event.total:
                bar.total = max(event.total, event.done)
                bar.refresh()
            bar.update(event.done - bar.n)

        try:
            labels = label_recording(
                args.video,
                detector,
                classifier,
                settings,
                recording_id=args.recording_id,
                on_progress=on_progress,
            )
        except InputError as exc:
            bar.close()
            _say(f"roadlabel: {exc}")
            return EXIT_INPUT_ERRORS
        except ModelError as exc:
            bar.close()
            _say(f"roadlabel: {exc}")
            return EXIT_MODEL_ERROR
    try:
        save_label_file(out, labels)
    except OSError as exc:
        _say(f"roadlabel: -o {out}: expected a writable path, got {exc.strerror or exc}")
        return EXIT_USAGE
    seconds = time.perf_counter() - started
    frames = labels.recording.frame_count
    uncertain = sum(t.uncertain for t in labels.tracks)
    gaps = len(labels.recording.gaps)
    _say(
        f"{args.video.name}: {len(labels.tracks)} tracks ({uncertain} to review), {frames} frames in {seconds:.1f} s "
        f"({frames / max(seconds, 1e-9):.1f} frames/s)" + (f", {gaps} gap(s) recorded" if gaps else "") + f" -> {out}"
    )
    return EXIT_OK


def _run_export(args: argparse.Namespace) -> int:
    try:
        labels = load_label_file(args.labels)
        written = export_labels(labels, args.format, args.out, video_url=args.video_url)
    except InputError as exc:
        _say(f"roadlabel: {exc}")
        return EXIT_INPUT_ERRORS
    except OSError as exc:
        _say(f"roadlabel: -o {args.out}: expected a writable path, got {exc.strerror or exc}")
        return EXIT_USAGE
    _say(json.dumps({"format": args.format, "written": [str(p) for p in written]}))
    return EXIT_OK
