"""Label an archive of recordings: find them, skip those already done, label the rest, journal every outcome.

The core is engine-agnostic. ``process_recording`` is the unit of work: one recording in, one ``FileRow`` out
(hash, skip when already labelled, label, write the label file atomically). It touches nothing but its recording
and its own label file, so any engine can run it: ``run_batch`` runs it in this process, one recording after
another; a distributed engine (Ray) would run it on workers with the models loaded there, and do the journal and
the summary on the driver as ``run_batch`` does.

Outcomes of one recording:
    * ``labelled``: labelled now; its label file was written.
    * ``skipped``: its label file exists, loads, and was made from the same bytes with the same models (sha256 and
      version) and the same settings. The comparison key (``job_key``) is recomputed from the label file's own
      ``recording.sha256``, ``models`` and ``settings``: nothing new is stored in it, and changing the models or
      the settings relabels.
    * ``failed``: the recording could not be labelled (missing, empty, not a video, too corrupt; ``reason`` says
      which), or it failed in an earlier run with the same key and ``retry_failed`` is off (``earlier`` is set),
      or its existing label file holds reviewed tracks from other models or settings (never overwritten).

What stops the batch instead (raised by ``process_recording`` and ``run_batch``): ``ModelError`` (a model cannot
run: every later file would fail the same way), ``ServiceUnavailable`` (a remote stage is down), ``ConfigError``,
an ``OSError`` while writing into ``out_dir`` (full disk, no permission: not the recording's fault) and
``KeyboardInterrupt``. Any other exception is a bug and stops it too. In all these cases the file in hand is not
journaled, ``batch-summary.json`` is written with ``complete`` false, and a rerun resumes where it stopped.

The journal, ``out_dir/.roadlabel-batch.jsonl``, gets one JSON object per line, appended, flushed and fsync-ed as
each recording is done::

    {"kind": "run", "at": "...", "files": 120, "models": {...}, "pid": 4242}        one per run
    {"kind": "file", "at": "...", <every FileRow field>}                           one per changed outcome

Later lines win. A line cut off by a crash is ignored on reading. A rerun skips the labelled recordings through
their label files (the journal is not needed for that); the journal adds the failures of earlier runs (skipped
unless ``retry_failed``), the file's sha256 (reused while the file's size and modification time are unchanged,
so that a rerun over a large archive does not read every recording again), and the history of the runs. While a
batch runs it holds an exclusive lock on the journal, so two batches cannot write into the same ``out_dir``.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.pipeline import PipelineSettings, Progress, file_sha256, label_recording
from services.classifier.api import Classifier
from services.common.errors import ConfigError, InputError, ModelError, ServiceUnavailable
from services.common.labelfile import LabelFile, ModelRef, load_label_file, save_label_file
from services.common.modelcard import ModelCard, atomic_write_bytes
from services.detector.api import Detector

__all__ = [
    "JOURNAL_NAME",
    "LABELS_SUFFIX",
    "SUMMARY_NAME",
    "VIDEO_SUFFIXES",
    "BatchEvent",
    "BatchSummary",
    "EventKind",
    "Failure",
    "FileRow",
    "FoundRecording",
    "MapEngine",
    "Outcome",
    "find_recordings",
    "job_key",
    "label_file_key",
    "output_path_for",
    "process_recording",
    "read_journal",
    "run_batch",
]

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".ts", ".mts"})
"""File suffixes a folder is searched for (compared in lower case)."""
LABELS_SUFFIX = ".labels.json"
"""Appended to a recording's file name to name its label file."""
JOURNAL_NAME = ".roadlabel-batch.jsonl"
"""The journal, in ``out_dir``."""
SUMMARY_NAME = "batch-summary.json"
"""The summary of the latest run, in ``out_dir``."""

Outcome = Literal["labelled", "skipped", "failed"]
EventKind = Literal["started", "file_started", "progress", "file_done", "finished"]

_NAME_MAX_BYTES = 255  # a file name's limit on every common file system
_PARENT_PART = "_parent_"  # stands for ".." in an output path, so that nothing lands outside out_dir


# --- finding recordings ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FoundRecording:
    """A recording and the source root its label file's place under ``out_dir`` is taken from.

    Attributes:
        path: The video file (may not exist when a list file names it: the batch then reports it).
        root: The folder given as a source, the list file's folder, or a lone video's folder.
    """

    path: Path
    root: Path

    @property
    def relative(self) -> str:
        """``path`` relative to ``root``, with ``/`` separators, for messages and patterns (may hold ``..``)."""
        return os.path.relpath(os.path.abspath(self.path), os.path.abspath(self.root)).replace(os.sep, "/")


def find_recordings(
    sources: Sequence[Path], include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[FoundRecording]:
    """The recordings named by ``sources``, each once, in a stable order.

    Each source is one of:
        * a folder: searched recursively for ``VIDEO_SUFFIXES`` files (any case); hidden files and folders (names
          starting with ``.``) are left out; symbolic links are followed, each real folder visited once (so link
          loops end); files in sorted order of their relative path.
        * a video file (a name ending in one of ``VIDEO_SUFFIXES``): itself.
        * any other file: a UTF-8 list of recordings, one path per line; blank lines and lines starting with ``#``
          are skipped, surrounding white space is stripped, relative paths are relative to the list file's folder
          (its root for the output layout), a folder named in it is searched as above. Entries are kept even when
          the file is missing, hidden or has another suffix: the batch reports what is wrong with them.

    A file found through several sources (or links) is kept once, where it was found first.

    Args:
        sources: Folders, video files and list files.
        include: Glob patterns (``fnmatch``, case-sensitive; ``*`` also matches ``/``); when given, only files whose
            path relative to their root, or whose name, matches one of them are kept.
        exclude: Glob patterns; files whose relative path or name matches one, or that lie in a folder whose
            relative path or name matches one, are left out.

    Raises:
        InputError: A source is missing, or a list file is unreadable or not UTF-8 text.
    """
    found: list[FoundRecording] = []
    seen: set[str] = set()
    for source in sources:
        for item in _expand(Path(source), exclude):
            if not _wanted(item.relative, include, exclude):
                continue
            real = os.path.realpath(item.path)
            if real in seen:
                continue
            seen.add(real)
            found.append(item)
    return found


def _expand(source: Path, exclude: Sequence[str]) -> list[FoundRecording]:
    if source.is_dir():
        return _walk(source, source, exclude)
    if not source.exists():
        what = "a broken symbolic link" if source.is_symlink() else "no such file or folder"
        raise InputError(f"{_printable(str(source))}: expected a folder, a video or a list file, got {what}")
    if source.suffix.lower() in VIDEO_SUFFIXES:
        return [FoundRecording(source, source.parent)]
    return _read_list(source, exclude)


def _read_list(list_file: Path, exclude: Sequence[str]) -> list[FoundRecording]:
    name = _printable(str(list_file))
    expected = f"{name}: expected a folder, a video ({' '.join(sorted(VIDEO_SUFFIXES))}) or a UTF-8 list of recordings"
    try:
        with list_file.open("rb") as fh:
            head = fh.read(4096)
            if b"\0" in head:  # a video with another suffix, say: do not read gigabytes to find out
                raise InputError(f"{expected}, got a binary file")
            raw = head + fh.read()
    except OSError as exc:
        raise InputError(f"{name}: expected a readable list of recordings, got {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{expected}, got bytes that are not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    root = list_file.parent
    items: list[FoundRecording] = []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry) if os.path.isabs(entry) else root / entry
        if path.is_dir():
            items.extend(_walk(path, root, exclude))
        else:
            items.append(FoundRecording(path, root))
    return items


def _walk(top: Path, root: Path, exclude: Sequence[str]) -> list[FoundRecording]:
    items: list[FoundRecording] = []
    visited: set[tuple[int, int]] = set()

    def on_error(exc: OSError) -> None:
        log.warning("folder skipped", extra={"path": _printable(str(exc.filename)), "reason": exc.strerror or str(exc)})

    for dirpath, dirnames, filenames in os.walk(top, onerror=on_error, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError as exc:
            on_error(exc)
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in visited:  # a link back to a folder already searched
            dirnames[:] = []
            continue
        visited.add((st.st_dev, st.st_ino))
        here = Path(dirpath)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and not _matches(FoundRecording(here / d, root).relative, d, exclude)
        )
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in VIDEO_SUFFIXES:
                items.append(FoundRecording(here / name, root))
    items.sort(key=lambda item: PurePosixPath(item.relative).parts)
    return items


def _matches(relative: str, name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(relative, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _wanted(relative: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    parts = PurePosixPath(relative).parts
    if include and not _matches(relative, parts[-1], include):
        return False
    # A folder's pattern (``--exclude tmp``) leaves out what is in it, also for list entries.
    return not any(_matches("/".join(parts[: i + 1]), parts[i], exclude) for i in range(len(parts)))


# --- where label files go ------------------------------------------------------------------------------------------


def output_path_for(recording: Path, source_root: Path, out_dir: Path) -> Path:
    """The label file of ``recording``: ``out_dir/<folders under source_root>/<name>.labels.json``.

    Every part is made safe, so the result always lies inside ``out_dir``: ``..`` becomes ``_parent_`` (a list
    entry outside the list's folder), ``.`` and empty parts are dropped, control characters and ``\\`` become
    ``_``, bytes that are not UTF-8 are spelt ``\\xNN`` (then ``_xNN``), and a name longer than 255 bytes is cut
    and given a hash of the whole name, so that different long names stay different.
    """
    relative = os.path.relpath(os.path.abspath(recording), os.path.abspath(source_root))
    parts = [_safe_part(p) for p in Path(relative).parts if p not in ("", ".", os.sep)]
    if not parts:  # recording == source_root: cannot happen for files found here, but stay inside out_dir
        parts = [_safe_part(recording.name or "recording")]
    *folders, name = parts
    return out_dir.joinpath(*folders, _fit(name, LABELS_SUFFIX))


def _safe_part(part: str) -> str:
    if part == "..":
        return _PARENT_PART
    text = _printable(part)
    text = "".join("_" if ord(c) < 32 or ord(c) == 127 or c in "\\/" else c for c in text)
    return _fit(text, "")


def _fit(name: str, suffix: str) -> str:
    """``name + suffix``, with ``name`` cut (and a hash of it added) so the whole fits in 255 UTF-8 bytes."""
    whole = name + suffix
    if len(whole.encode()) <= _NAME_MAX_BYTES:
        return whole
    tag = "~" + hashlib.sha256(name.encode()).hexdigest()[:16]
    room = _NAME_MAX_BYTES - len((tag + suffix).encode())
    cut = name.encode()[:room].decode("utf-8", "ignore")  # never half a character
    return cut + tag + suffix


def _printable(text: str) -> str:
    """``text`` as valid Unicode: file-name bytes that are not UTF-8 (surrogate escapes) are spelt ``\\xNN``."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


# --- what "already labelled" means -----------------------------------------------------------------------------------


def job_key(sha256: str, detector_card: ModelCard, classifier_card: ModelCard, settings: PipelineSettings) -> str:
    """What a label file depends on, as one hex sha256: the recording's bytes, both models and the settings.

    Args:
        sha256: The recording file's sha256.
        detector_card: The detector's card (its ``onnx_sha256`` and ``version`` count).
        classifier_card: The classifier's card (likewise).
        settings: The pipeline settings (all of them, as JSON with sorted keys).
    """
    return _key(
        sha256,
        ModelRef(name=detector_card.name, version=detector_card.version, sha256=detector_card.onnx_sha256),
        ModelRef(name=classifier_card.name, version=classifier_card.version, sha256=classifier_card.onnx_sha256),
        settings,
    )


def label_file_key(labels: LabelFile) -> str | None:
    """``job_key`` recomputed from a label file's own ``recording.sha256``, ``models`` and ``settings``.

    None when the file lacks a model or its settings are not valid ``PipelineSettings`` (older or newer code): such
    a file never counts as done. Settings are validated first, so a file written before a setting existed (it
    takes its default) matches a run with that default.
    """
    detector, classifier = labels.models.get("detector"), labels.models.get("classifier")
    if detector is None or classifier is None:
        return None
    try:
        settings = PipelineSettings.model_validate(labels.settings)
    except ValidationError:
        return None
    return _key(labels.recording.sha256, detector, classifier, settings)


def _key(sha256: str, detector: ModelRef, classifier: ModelRef, settings: PipelineSettings) -> str:
    payload = {
        "recording_sha256": sha256,
        "detector": {"sha256": detector.sha256, "version": detector.version},
        "classifier": {"sha256": classifier.sha256, "version": classifier.version},
        "settings": settings.model_dump(mode="json"),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


# --- results and events ----------------------------------------------------------------------------------------------


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileRow(_Record):
    """What happened to one recording (a row of the summary, a line of the journal).

    Attributes:
        path: The recording, absolute (file-name bytes that are not UTF-8 spelt ``\\xNN``).
        source: Its path relative to its source root, for messages.
        output: Its label file, relative to ``out_dir`` (``/`` separators).
        outcome: ``labelled``, ``skipped`` or ``failed`` (module docstring).
        reason: Why it was skipped or failed; None when labelled.
        earlier: The failure was recorded by an earlier run and not retried.
        sha256: The file's sha256, when it could be read.
        key: ``job_key`` of the label file written or found (of the attempt, for a failure), when known.
        size_bytes: The file's size when it was looked at (None if it could not be).
        mtime_ns: Its modification time, ns (with ``size_bytes``, tells a rerun whether ``sha256`` still holds).
        frames: Frames in its label file (0 without one).
        tracks: Tracks in its label file.
        elapsed_s: Wall time spent on it in this run.
    """

    path: str
    source: str
    output: str
    outcome: Outcome
    reason: str | None = None
    earlier: bool = False
    sha256: str | None = None
    key: str | None = None
    size_bytes: int | None = None
    mtime_ns: int | None = None
    frames: int = 0
    tracks: int = 0
    elapsed_s: float = 0.0


class Failure(_Record):
    """A recording that was not labelled, and why."""

    path: str
    reason: str


class BatchSummary(_Record):
    """The result of one batch run, written to ``out_dir/batch-summary.json``.

    Attributes:
        files: Recordings in the batch.
        labelled: Labelled in this run.
        skipped: Already labelled with the same models and settings.
        failed: Not labelled (``failures`` says why).
        frames: Frames in the label files of the labelled and skipped recordings.
        tracks: Tracks in those label files.
        frames_labelled: Frames decoded in this run (for the throughput).
        elapsed_s: Wall time of the run.
        complete: False when the run stopped early (``stopped`` says why); the rows then cover the files done.
        stopped: Why the run stopped early, else None.
        started_at: ISO 8601 UTC.
        models: The detector and classifier used.
        settings: The resolved pipeline settings.
        failures: One per failed recording, in batch order.
        rows: One per recording done, in batch order.
    """

    files: int
    labelled: int
    skipped: int
    failed: int
    frames: int
    tracks: int
    frames_labelled: int
    elapsed_s: float
    complete: bool
    stopped: str | None = None
    started_at: str
    models: dict[str, ModelRef]
    settings: dict[str, Any]
    failures: list[Failure] = Field(default_factory=list)
    rows: list[FileRow] = Field(default_factory=list)


@dataclass(frozen=True, slots=True)
class BatchEvent:
    """A progress event of a batch run.

    Attributes:
        kind: ``started`` (before the first file), ``file_started``, ``progress`` (the pipeline's events for the
            current file, passed through), ``file_done``, ``finished``.
        path: The current recording (None for ``started`` and ``finished``).
        index: Its 0-based position in the batch (``files`` done so far for ``finished``).
        total: Recordings in the batch.
        outcome: ``file_done`` only.
        reason: ``file_done`` only: why it was skipped or failed.
        frames_done: Frames processed so far (``progress`` while labelling; ``file_done``: frames in its labels).
        frames_total: Frames the container says it has, or None when unknown.
        progress: The pipeline's event (``hash``, ``label`` or ``done`` stage), for ``progress`` events.
        row: ``file_done`` only: the full row.
        summary: ``finished`` only.
    """

    kind: EventKind
    path: Path | None
    index: int
    total: int
    outcome: Outcome | None = None
    reason: str | None = None
    frames_done: int = 0
    frames_total: int | None = None
    progress: Progress | None = None
    row: FileRow | None = None
    summary: BatchSummary | None = None


# --- one recording ---------------------------------------------------------------------------------------------------

_StopErrors = (ModelError, ServiceUnavailable, ConfigError)


def process_recording(
    item: FoundRecording,
    out_dir: Path,
    detector: Detector,
    classifier: Classifier,
    settings: PipelineSettings,
    *,
    previous: FileRow | None = None,
    retry_failed: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
) -> FileRow:
    """Label one recording unless it is done: the unit of work of every engine.

    Args:
        item: The recording.
        out_dir: Where label files go (``output_path_for``).
        detector: Finds signs.
        classifier: Names tracks.
        settings: Pipeline settings.
        previous: This recording's latest journal row, if any: its sha256 is reused while the file's size and
            modification time are unchanged, and a failure with the same key is not tried again.
        retry_failed: Try again a recording that failed before with the same key.
        on_progress: The pipeline's progress events (hashing, then labelling).

    Returns:
        The outcome; a recording that cannot be labelled is a ``failed`` row, never an exception.

    Raises:
        ModelError: A model failed to run (the batch should stop: every file would fail).
        ServiceUnavailable: A remote stage is down.
        ConfigError: The settings are invalid.
        OSError: The label file could not be written (``out_dir`` is full or not writable).
    """
    started = time.perf_counter()
    output = output_path_for(item.path, item.root, out_dir)
    row = FileRow(
        path=_printable(os.path.abspath(item.path)),
        source=_printable(item.relative),
        output=_printable(output.relative_to(out_dir).as_posix()),
        outcome="failed",
    )

    def done(**fields: Any) -> FileRow:
        return row.model_copy(update={"elapsed_s": round(time.perf_counter() - started, 3), **fields})

    try:
        st = os.stat(item.path)
    except OSError as exc:
        return done(reason=f"expected a readable video file, got {exc.strerror or exc}")
    if not stat.S_ISREG(st.st_mode):  # a pipe or a device would hang the hashing
        return done(reason="expected a video file, got a folder, pipe or device")
    row = row.model_copy(update={"size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    same_file = (
        previous is not None
        and previous.sha256 is not None
        and previous.path == row.path
        and (previous.size_bytes, previous.mtime_ns) == (st.st_size, st.st_mtime_ns)
    )
    known_sha = previous.sha256 if same_file and previous is not None else None
    failed_before = previous is not None and previous.outcome == "failed" and previous.key is not None
    if output.exists() or (failed_before and not retry_failed):
        try:
            sha = known_sha or file_sha256(item.path, on_progress, item.relative)
        except OSError as exc:
            return done(reason=f"expected a readable video file, got {exc.strerror or exc}")
        key = job_key(sha, detector.card, classifier.card, settings)
        row = row.model_copy(update={"sha256": sha, "key": key})
        existing = _load_existing(output)
        if existing is not None and label_file_key(existing) == key:
            return done(
                outcome="skipped",
                reason="already labelled with these models and settings",
                frames=existing.recording.frame_count,
                tracks=len(existing.tracks),
            )
        reviewed = 0 if existing is None else sum(t.review.status != "pending" for t in existing.tracks)
        if reviewed:
            return done(
                reason=f"its label file {row.output} holds {reviewed} reviewed track(s) made with other models, "
                "settings or bytes; not overwritten (move it away to relabel)"
            )
        if failed_before and not retry_failed and previous is not None and previous.key == key:
            return done(reason=previous.reason, earlier=True)
    try:
        labels = label_recording(
            item.path,
            detector,
            classifier,
            settings,
            source_name=_printable(item.path.name),
            on_progress=on_progress,
        )
    except _StopErrors:
        raise
    except (InputError, OSError) as exc:  # the recording's fault: report it, go on with the next one
        read_sha = row.sha256 or _try_sha256(item.path)
        attempt = job_key(read_sha, detector.card, classifier.card, settings) if read_sha else None
        return done(reason=_printable(str(exc)), sha256=read_sha, key=attempt)
    # Not the recording's fault when this fails (full disk, no permission): the OSError stops the batch.
    save_label_file(output, labels)
    return done(
        outcome="labelled",
        sha256=labels.recording.sha256,
        key=label_file_key(labels),
        frames=labels.recording.frame_count,
        tracks=len(labels.tracks),
    )


def _load_existing(output: Path) -> LabelFile | None:
    if not output.exists():
        return None
    try:
        return load_label_file(output)
    except InputError as exc:
        log.warning("existing label file unreadable; relabelling", extra={"path": str(output), "reason": str(exc)})
        return None


def _try_sha256(path: Path) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None


# --- the journal ---------------------------------------------------------------------------------------------------


def read_journal(out_dir: Path) -> dict[str, FileRow]:
    """The latest journal row of each label file (by ``FileRow.output``); empty when there is no journal.

    Lines that are not whole JSON objects of a known kind (a crash cut the last one off) are skipped.
    """
    path = out_dir / JOURNAL_NAME
    rows: dict[str, FileRow] = {}
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return rows
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            doc = json.loads(line)
            if not isinstance(doc, dict) or doc.get("kind") != "file":
                continue
            fields = {k: v for k, v in doc.items() if k not in ("kind", "at")}
            row = FileRow.model_validate(fields)
        except (json.JSONDecodeError, UnicodeDecodeError, ValidationError):
            log.warning("journal line skipped", extra={"path": str(path), "line": number})
            continue
        rows[row.output] = row
    return rows


class _Journal:
    """The append-only journal, locked for the run."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / JOURNAL_NAME
        self._fh: IO[bytes] = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._fh.close()
            raise InputError(
                f"{out_dir}: expected no other batch writing into it, got one holding {JOURNAL_NAME}"
            ) from exc
        except BaseException:
            self._fh.close()
            raise
        # A crash may have cut the last line off: start on a new line so the next one stays whole.
        if self._fh.tell() > 0:
            with open(self.path, "rb") as reader:
                reader.seek(-1, os.SEEK_END)
                if reader.read(1) != b"\n":
                    self._fh.write(b"\n")

    def append(self, kind: str, fields: dict[str, Any]) -> None:
        line = json.dumps({"kind": kind, "at": _now(), **fields}, ensure_ascii=False, separators=(",", ":"))
        self._fh.write(line.encode() + b"\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()  # also releases the lock


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- the sequential engine -----------------------------------------------------------------------------------------


def run_batch(
    recordings: Sequence[FoundRecording],
    out_dir: Path,
    detector: Detector,
    classifier: Classifier,
    settings: PipelineSettings,
    *,
    retry_failed: bool = False,
    on_event: Callable[[BatchEvent], None] | None = None,
    engine: MapEngine | None = None,
) -> BatchSummary:
    """Label every recording not yet labelled with these models and settings, one at a time in this process, or
    all at once as tasks of ``engine`` (Ray).

    Every recording gets a row; a recording that cannot be labelled is a ``failed`` row and the batch goes on. Each
    outcome is journaled as soon as it is known, and ``out_dir/batch-summary.json`` is written at the end (also,
    with ``complete`` false, when the run stops early), so a rerun after a crash picks up where this one stopped.
    Two recordings whose label files would be the same file (same relative path under two sources) are not both
    labelled: the later one fails.

    Args:
        recordings: From ``find_recordings``.
        out_dir: Where the label files, the journal and the summary go (created if missing).
        detector: Finds signs.
        classifier: Names tracks.
        settings: Pipeline settings, recorded in every label file.
        retry_failed: Try again recordings that failed in an earlier run with the same file, models and settings.
        on_event: Called with a ``BatchEvent`` before and after each recording and while it is labelled (with an
            engine: when each recording starts being submitted and when it is done, no frame progress).
        engine: Runs ``process_recording`` as remote tasks (``gateway.ray_engine.RayEngine``); the journal and the
            summary stay here. ``detector`` and ``classifier`` are then the engine's (they name the models).

    Returns:
        The summary (also written to ``out_dir/batch-summary.json``).

    Raises:
        InputError: Another batch is writing into ``out_dir``.
        ModelError: A model failed (the batch stops; see the module docstring).
        ServiceUnavailable: A remote stage is down.
        ConfigError: The settings are invalid.
        OSError: ``out_dir`` cannot be written.
    """
    started = time.perf_counter()
    started_at = _now()
    total = len(recordings)
    emit = on_event or (lambda _event: None)
    models = {"detector": _ref(detector.card), "classifier": _ref(classifier.card)}
    out_dir.mkdir(parents=True, exist_ok=True)
    journal = _Journal(out_dir)
    rows: list[FileRow] = []
    try:
        previous = read_journal(out_dir)
        journal.append(
            "run", {"files": total, "models": {k: v.model_dump() for k, v in models.items()}, "pid": os.getpid()}
        )
        emit(BatchEvent("started", None, 0, total))

        def done(item: FoundRecording, index: int, row: FileRow) -> None:
            rows.append(row)
            emit(
                BatchEvent(
                    "file_done", item.path, index, total, row.outcome, row.reason, row.frames, row.frames, row=row
                )
            )

        claimed: dict[Path, FoundRecording] = {}
        remote_calls: list[tuple[int, tuple[Any, ...]]] = []
        for index, item in enumerate(recordings):
            emit(BatchEvent("file_started", item.path, index, total))
            output = output_path_for(item.path, item.root, out_dir)
            first = claimed.setdefault(output, item)
            if first is not item:
                row = _collision(item, out_dir, output, first)
            elif engine is not None:
                before = previous.get(_printable(output.relative_to(out_dir).as_posix()))
                remote_calls.append((index, (item, out_dir, settings, before, retry_failed)))
                continue
            else:
                before = previous.get(_printable(output.relative_to(out_dir).as_posix()))
                row = process_recording(
                    item,
                    out_dir,
                    detector,
                    classifier,
                    settings,
                    previous=before,
                    retry_failed=retry_failed,
                    on_progress=_forward(emit, item.path, index, total),
                )
                if _changed(row, before):
                    journal.append("file", row.model_dump(mode="json"))
            done(item, index, row)
        if engine is not None and remote_calls:
            for k, row in engine.map_unordered(_process_remote, [args for _, args in remote_calls]):
                index, (item, _out, _settings, before, _retry) = remote_calls[k]
                if _changed(row, before):
                    journal.append("file", row.model_dump(mode="json"))
                done(item, index, row)
    except BaseException as exc:
        stopped = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        _write_summary_quietly(out_dir, _summary(rows, total, started, started_at, models, settings, stopped))
        raise
    finally:
        journal.close()
    summary = _summary(rows, total, started, started_at, models, settings, None)
    atomic_write_bytes(out_dir / SUMMARY_NAME, summary.model_dump_json(indent=1).encode() + b"\n")
    log.info(
        "batch finished",
        extra={
            "files": summary.files,
            "labelled": summary.labelled,
            "skipped": summary.skipped,
            "failed": summary.failed,
            "elapsed_s": summary.elapsed_s,
        },
    )
    emit(BatchEvent("finished", None, total, total, frames_done=summary.frames_labelled, summary=summary))
    return summary


class MapEngine(Protocol):
    """Runs calls as remote tasks (``gateway.ray_engine.RayEngine`` is one)."""

    def map_unordered(self, fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]]) -> Iterator[tuple[int, Any]]:
        """``fn(detector, classifier, *args)`` per args tuple; (index, result) pairs as they finish."""
        ...


def _process_remote(
    detector: Detector,
    classifier: Classifier,
    item: FoundRecording,
    out_dir: Path,
    settings: PipelineSettings,
    previous: FileRow | None,
    retry_failed: bool,
) -> FileRow:
    """``process_recording`` as a remote task runs it (models first, as ``MapEngine`` passes them)."""
    return process_recording(
        item, out_dir, detector, classifier, settings, previous=previous, retry_failed=retry_failed
    )


def _collision(item: FoundRecording, out_dir: Path, output: Path, first: FoundRecording) -> FileRow:
    return FileRow(
        path=_printable(os.path.abspath(item.path)),
        source=_printable(item.relative),
        output=_printable(output.relative_to(out_dir).as_posix()),
        outcome="failed",
        reason=f"its label file would be the same as {_printable(first.relative)}'s ({_printable(output.name)}); "
        "label the two in separate batches",
    )


def _changed(row: FileRow, before: FileRow | None) -> bool:
    """Whether the journal needs a line for ``row``: a rerun that changes nothing appends none.

    ``labelled`` then ``skipped`` is no change (both mean the label file is there); timings are not compared.
    """
    if before is None:
        return True
    done = ("labelled", "skipped")
    if (row.outcome in done) != (before.outcome in done):
        return True
    fields = ["path", "sha256", "key", "size_bytes", "mtime_ns", "frames", "tracks"]
    if row.outcome == "failed":
        fields.append("reason")
    return any(getattr(row, name) != getattr(before, name) for name in fields)


def _forward(emit: Callable[[BatchEvent], None], path: Path, index: int, total: int) -> Callable[[Progress], None]:
    def on_progress(event: Progress) -> None:
        frames = event.stage in ("label", "done")
        emit(
            BatchEvent(
                "progress",
                path,
                index,
                total,
                frames_done=event.done if frames else 0,
                frames_total=event.total if frames else None,
                progress=event,
            )
        )

    return on_progress


def _ref(card: ModelCard) -> ModelRef:
    return ModelRef(name=card.name, version=card.version, sha256=card.onnx_sha256)


def _summary(
    rows: Sequence[FileRow],
    total: int,
    started: float,
    started_at: str,
    models: dict[str, ModelRef],
    settings: PipelineSettings,
    stopped: str | None,
) -> BatchSummary:
    by = {kind: [r for r in rows if r.outcome == kind] for kind in ("labelled", "skipped", "failed")}
    kept = by["labelled"] + by["skipped"]
    return BatchSummary(
        files=total,
        labelled=len(by["labelled"]),
        skipped=len(by["skipped"]),
        failed=len(by["failed"]),
        frames=sum(r.frames for r in kept),
        tracks=sum(r.tracks for r in kept),
        frames_labelled=sum(r.frames for r in by["labelled"]),
        elapsed_s=round(time.perf_counter() - started, 3),
        complete=stopped is None,
        stopped=stopped,
        started_at=started_at,
        models=models,
        settings=settings.model_dump(mode="json"),
        failures=[Failure(path=r.path, reason=r.reason or "") for r in by["failed"]],
        rows=list(rows),
    )


def _write_summary_quietly(out_dir: Path, summary: BatchSummary) -> None:
    """Write the summary of a run that is stopping; a failure here must not hide why it stops."""
    try:
        atomic_write_bytes(out_dir / SUMMARY_NAME, summary.model_dump_json(indent=1).encode() + b"\n")
    except OSError as exc:
        log.warning("batch summary not written", extra={"path": str(out_dir / SUMMARY_NAME), "reason": str(exc)})
