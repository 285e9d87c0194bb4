"""``roadlabel dataset build --from LABELS... -o DIR``: a training data set from reviewed label files.

This is an entry point: it parses the options, draws the progress bar and prints the summary; the build itself
(``gateway.dataset.build_dataset``) only reports progress events. ``gateway.cli`` registers it under
``roadlabel dataset build`` through ``add_arguments`` and ``run``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm

from gateway.cli import EXIT_OK, EXIT_USAGE
from gateway.dataset import LABELS_GLOB, DatasetSettings, build_dataset
from gateway.pipeline import Progress
from services.common.errors import InputError

__all__ = ["EPILOG", "add_arguments", "run"]

EPILOG = f"""\
exit status:
  {EXIT_OK}  the data set was written
  {EXIT_USAGE}  bad input or usage: a missing, unreadable or unreviewed label file, a missing or different video,
     a non-empty output folder without --overwrite, a bad option; nothing is written
"""

_DEFAULTS = DatasetSettings()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``dataset build`` options to ``parser``."""
    parser.add_argument(
        "--from",
        dest="label_files",
        type=Path,
        nargs="+",
        required=True,
        metavar="LABELS",
        help=f"reviewed label files, or folders searched recursively for {LABELS_GLOB}",
    )
    parser.add_argument("-o", "--out", type=Path, required=True, metavar="DIR", help="the data set folder to write")
    parser.add_argument(
        "--video-root",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="folder searched (recursively) for the recordings when they are not beside their label files; "
        "videos are matched by name and checked by sha256, or found by sha256 alone; repeatable",
    )
    parser.add_argument(
        "--include-pending",
        action="store_true",
        help="also use tracks nobody reviewed, with the machine's class (default: skip and count them)",
    )
    parser.add_argument(
        "--crops-per-track",
        type=int,
        default=_DEFAULTS.crops_per_track,
        metavar="N",
        help="crops per track, spread over its life and sizes (default: %(default)s)",
    )
    parser.add_argument(
        "--min-crop-px",
        type=float,
        default=_DEFAULTS.min_crop_px,
        metavar="PX",
        help="never crop boxes whose shorter side is below this (default: %(default)s)",
    )
    parser.add_argument(
        "--crop-margin",
        type=float,
        default=_DEFAULTS.crop_margin,
        metavar="F",
        help="grow each box by this fraction of its size on every side before cutting (default: %(default)s)",
    )
    parser.add_argument(
        "--frame-step",
        type=int,
        default=_DEFAULTS.frame_step,
        metavar="K",
        help="every K-th frame of each track's span goes into the detection set (default: %(default)s)",
    )
    parser.add_argument(
        "--max-gap-frames",
        type=int,
        default=_DEFAULTS.max_gap_frames,
        metavar="N",
        help="frames without a box that interpolation bridges inside a track (default: %(default)s)",
    )
    parser.add_argument(
        "--jpeg-quality",
        type=int,
        default=_DEFAULTS.jpeg_quality,
        metavar="Q",
        help="JPEG quality of the detection frames (default: %(default)s)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DIR when it is not empty")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Build the data set; print a summary to stderr; return the exit status."""
    try:
        settings = DatasetSettings(
            crops_per_track=args.crops_per_track,
            min_crop_px=args.min_crop_px,
            crop_margin=args.crop_margin,
            frame_step=args.frame_step,
            max_gap_frames=args.max_gap_frames,
            include_pending=args.include_pending,
            jpeg_quality=args.jpeg_quality,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        option = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "options"
        _say(f"roadlabel: {option}: {first['msg']}, got {first.get('input')!r}")
        return EXIT_USAGE
    show_bar = not args.no_progress and sys.stderr.isatty()
    started = time.perf_counter()
    with tqdm(total=None, file=sys.stderr, disable=not show_bar, dynamic_ncols=True, leave=False) as bar:
        current: tuple[str, str] = ("", "")

        def on_progress(event: Progress) -> None:
            nonlocal current
            if event.stage == "done":
                return
            if (event.recording_id, event.stage) != current:
                current = (event.recording_id, event.stage)
                unit = "B" if event.stage == "hash" else "frame"
                bar.reset(total=event.total)
                bar.unit, bar.unit_scale = unit, event.stage == "hash"
                bar.set_description(f"{event.stage} {event.recording_id}", refresh=False)
            bar.update(event.done - bar.n)

        try:
            summary = build_dataset(
                args.label_files,
                args.out,
                settings,
                on_progress,
                video_roots=args.video_root,
                overwrite=args.overwrite,
            )
        except InputError as exc:
            bar.close()
            _say(f"roadlabel: {exc}")
            return EXIT_USAGE
        except OSError as exc:
            bar.close()
            _say(f"roadlabel: expected readable inputs and a writable folder for -o {args.out}, got {exc}")
            return EXIT_USAGE
    seconds = time.perf_counter() - started
    skipped = []
    if summary.skipped_pending:
        skipped.append(f"{summary.skipped_pending} pending")
    if summary.skipped_unknown:
        skipped.append(f"{summary.skipped_unknown} of unknown class")
    _say(
        f"{summary.recordings} recording(s): {summary.sign_tracks} sign track(s) -> {summary.crops} crops in "
        f"{len(summary.crops_per_class)} class(es); {summary.rejected_tracks} rejected -> "
        f"{summary.background_crops} background crops; {summary.frames} frames with {summary.boxes} boxes "
        f"({summary.interpolated_boxes} interpolated), {summary.negative_frames} negative frames"
        + (f"; skipped tracks: {', '.join(skipped)}" if skipped else "")
        + (f"; {summary.frames_skipped} frames left out (unreviewed sign in view)" if summary.frames_skipped else "")
        + f"; {seconds:.1f} s -> {summary.out_dir}"
    )
    return EXIT_OK


def _say(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
