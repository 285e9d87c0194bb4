"""Exports of a label file to the formats that reviewers' and dataset teams' tools import.

Three formats, each a pure function returning the file contents, plus :func:`export_labels`, which writes them
atomically:

* ``cvat-video``: CVAT for video 1.1 XML (:func:`to_cvat_video`), the lossless one for tracks; read back by
  :func:`read_cvat_video`.
* ``mot``: MOTChallenge text (:func:`to_mot`): ``gt/gt.txt`` and ``gt/labels.txt`` for CVAT's "MOT 1.1" import,
  and ``results.txt`` for TrackEval.
* ``label-studio``: one Label Studio task with predictions (:func:`to_label_studio`) and the labeling config that
  goes with it (:func:`label_studio_config`).

Rules shared by all three:
    * A track's class is the reviewer's when its review is ``relabelled``, the machine's otherwise; a ``rejected``
      track (not a sign) is left out.
    * The label file holds boxes only on frames the detector saw. Two consecutive boxes of a track with at most
      ``max_gap_frames`` decoded frames between them belong to one continuous segment: the tools interpolate across
      it (CVAT, Label Studio) or the export does (MOT). A longer gap ends the segment: the sign is marked as gone
      (CVAT ``outside``, Label Studio ``enabled: false``) or left without rows (MOT) until the next box.
    * CVAT and MOT count frames by decode index (CVAT 0-based, MOT 1-based). Label Studio counts frames through a
      constant frame rate, so its frames come from each box's time instead (:func:`to_label_studio`).
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

# Only ever parses our own exports (tests, round trips), never untrusted uploads: stdlib ElementTree is fine here;
# an upload path would need defusedxml.
from xml.etree import ElementTree as ET

from services.common.classes import GTSRB_CLASS_NAMES, UNKNOWN
from services.common.errors import InputError
from services.common.labelfile import Box, LabelFile, Track
from services.common.modelcard import atomic_write_bytes

__all__ = [
    "CVAT_LABEL",
    "DEFAULT_MAX_GAP_FRAMES",
    "FORMATS",
    "CvatBox",
    "CvatTrack",
    "ExportFormat",
    "export_labels",
    "label_file_json_schema",
    "label_studio_config",
    "read_cvat_video",
    "to_cvat_video",
    "to_label_studio",
    "to_mot",
]

ExportFormat = Literal["cvat-video", "mot", "label-studio"]
FORMATS: tuple[ExportFormat, ...] = ("cvat-video", "mot", "label-studio")
"""The names :func:`export_labels` accepts."""

DEFAULT_MAX_GAP_FRAMES = 30
"""Decoded frames without a box that a segment may span (1 s at 30 fps): the detector may skip frames or miss a
sign for a moment without the track being split."""

CVAT_LABEL = "traffic_sign"
"""The one CVAT label; the sign class is its ``sign_class`` attribute."""

REVIEW_STATUSES = ("pending", "accepted", "relabelled", "rejected")

MOT_FILES = ("gt/gt.txt", "gt/labels.txt", "results.txt")

# Characters XML 1.0 cannot hold at all, even escaped (control characters other than tab, newline, return).
_XML_ILLEGAL = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


# --------------------------------------------------------------------------------------------------------------------
# Shared rules


@dataclass(frozen=True, slots=True)
class _Exported:
    """A track as the exports see it: its class after review, and its boxes split into continuous segments."""

    track: Track
    class_id: int
    class_name: str
    segments: tuple[tuple[Box, ...], ...]


def _check_max_gap(max_gap_frames: int) -> None:
    if max_gap_frames < 0:
        raise InputError(f"max_gap_frames: expected an int >= 0, got {max_gap_frames}")


def _segments(boxes: Sequence[Box], max_gap_frames: int) -> tuple[tuple[Box, ...], ...]:
    """Split a track's boxes where more than ``max_gap_frames`` decoded frames lie between two of them."""
    segments: list[list[Box]] = [[boxes[0]]]
    for prev, box in zip(boxes, boxes[1:], strict=False):
        if box.frame - prev.frame - 1 > max_gap_frames:
            segments.append([box])
        else:
            segments[-1].append(box)
    return tuple(tuple(s) for s in segments)


def _track_class(track: Track) -> tuple[int, str] | None:
    """A track's ``(class_id, class_name)`` after review: the reviewer's when relabelled, the machine's when pending
    or accepted, None when rejected (not a sign)."""
    review = track.review
    if review.status == "rejected":
        return None
    if review.status == "relabelled" and review.class_id is not None and review.class_name is not None:
        return review.class_id, review.class_name
    return track.class_id, track.class_name


def _exported_tracks(labels: LabelFile, max_gap_frames: int) -> list[_Exported]:
    """The tracks to export (rejected ones left out), in label-file order, with their reviewed class.

    The schema guarantees what the exports rely on: boxes in frame order with times that do not decrease, and every
    frame below ``recording.frame_count``.

    Raises:
        InputError: ``max_gap_frames`` is negative.
    """
    _check_max_gap(max_gap_frames)
    out: list[_Exported] = []
    for track in labels.tracks:
        cls = _track_class(track)
        if cls is None:
            continue
        out.append(_Exported(track, *cls, _segments(track.boxes, max_gap_frames)))
    return out


def _class_names_used(classes: Iterable[tuple[int, str]]) -> list[str]:
    """Class names of ``(class_id, class_name)`` pairs, without repeats, by class id (``unknown``, -1, first) then
    name."""
    names: list[str] = []
    for _, name in sorted(set(classes)):
        if name not in names:
            names.append(name)
    return names


def _all_class_names(labels: LabelFile) -> list[str]:
    """``unknown``, the 43 GTSRB classes, then any other class name an exported track uses (a reviewer's own)."""
    names = [UNKNOWN, *GTSRB_CLASS_NAMES]
    used = (cls for track in labels.tracks if (cls := _track_class(track)) is not None)
    names += [n for n in _class_names_used(used) if n not in names]
    return names


def _xml_text(value: str) -> str:
    """``value`` with the characters XML 1.0 cannot hold replaced by U+FFFD (ElementTree escapes the rest)."""
    return _XML_ILLEGAL.sub("\ufffd", value)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    element = ET.SubElement(parent, tag, {k: _xml_text(v) for k, v in attrib.items()})
    if text is not None:
        element.text = _xml_text(text)
    return element


def _xml_bytes(root: ET.Element) -> bytes:
    ET.indent(root, space=" ")
    document: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)  # typeshed: Any for this overload
    return document + b"\n"


# --------------------------------------------------------------------------------------------------------------------
# CVAT for video 1.1


class CvatBox(NamedTuple):
    """One ``<box>`` of a CVAT track.

    Attributes:
        frame: 0-based frame (decode index).
        xyxy: ``xtl, ytl, xbr, ybr`` in pixels.
        outside: Whether the sign is gone from this frame on (until the next keyframe).
        score: The ``score`` attribute (detector confidence), None when absent.
        keyframe: Whether CVAT keeps the box on import (it interpolates the others).
    """

    frame: int
    xyxy: tuple[float, float, float, float]
    outside: bool
    score: float | None
    keyframe: bool = True


@dataclass(frozen=True, slots=True)
class CvatTrack:
    """One ``<track>`` of a CVAT for video 1.1 file.

    Attributes:
        cvat_id: The ``id`` the XML gives it (ours on export; CVAT renumbers its own).
        label: The CVAT label (``traffic_sign`` for our exports).
        sign_class: The ``sign_class`` attribute of its first box (``unknown`` when absent).
        review: The ``review`` attribute, None when absent.
        track_id: The ``track_id`` attribute: the label file's track id, None when absent (a track made in CVAT).
        boxes: In file order.
    """

    cvat_id: int
    label: str
    sign_class: str
    review: str | None
    track_id: int | None
    boxes: tuple[CvatBox, ...]


def _cvat_attribute_spec(
    parent: ET.Element, name: str, *, mutable: bool, input_type: str, default: str, values: str
) -> None:
    attribute = _sub(parent, "attribute")
    _sub(attribute, "name", name)
    _sub(attribute, "mutable", str(mutable))
    _sub(attribute, "input_type", input_type)
    _sub(attribute, "default_value", default)
    _sub(attribute, "values", values)


def _cvat_box(
    parent: ET.Element, frame: int, xyxy: tuple[float, float, float, float], *, outside: bool, attrs: dict[str, str]
) -> None:
    x1, y1, x2, y2 = xyxy
    box = _sub(
        parent,
        "box",
        frame=str(frame),
        keyframe="1",
        outside="1" if outside else "0",
        occluded="0",
        xtl=f"{x1:.2f}",
        ytl=f"{y1:.2f}",
        xbr=f"{x2:.2f}",
        ybr=f"{y2:.2f}",
        z_order="0",
    )
    for name, value in attrs.items():
        _sub(box, "attribute", value, name=name)


def to_cvat_video(labels: LabelFile, *, max_gap_frames: int = DEFAULT_MAX_GAP_FRAMES) -> bytes:
    """The labels as a CVAT for video 1.1 XML file (UTF-8), to import into a task made from the same video.

    One ``traffic_sign`` track per exported track (module docstring). Every box of the label file becomes a keyframe
    on its decode index, with coordinates to 2 decimals; CVAT interpolates between keyframes. An ``outside``
    keyframe (with the last box's coordinates) follows each segment's last box, on the next frame: where a gap
    longer than ``max_gap_frames`` begins, and after the track's last box unless that is the video's last frame
    (CVAT refuses frames at or past the task's ``size``).

    Attributes of the label: ``sign_class`` (select, per track: ``unknown``, the GTSRB classes and any other class a
    track uses), ``review`` (select, per track), ``track_confidence`` (number 0..1, per track, the machine's
    confidence in its own class), ``track_id`` (text, per track: the label file's id, since CVAT renumbers tracks)
    and ``score`` (number 0..1, per box: the detector's confidence). Every box carries all of them.

    Args:
        labels: The label file.
        max_gap_frames: Decoded frames without a box that CVAT may interpolate across, >= 0.

    Returns:
        The XML document, with declaration and a trailing newline.

    Raises:
        InputError: ``max_gap_frames`` is negative.
    """
    tracks = _exported_tracks(labels, max_gap_frames)
    rec = labels.recording

    root = ET.Element("annotations")
    _sub(root, "version", "1.1")
    task = _sub(_sub(root, "meta"), "task")
    _sub(task, "name", rec.source)
    _sub(task, "size", str(rec.frame_count))
    _sub(task, "mode", "interpolation")
    label = _sub(_sub(task, "labels"), "label")
    _sub(label, "name", CVAT_LABEL)
    specs = _sub(label, "attributes")
    sign_classes = "\n".join(_all_class_names(labels))
    _cvat_attribute_spec(specs, "sign_class", mutable=False, input_type="select", default=UNKNOWN, values=sign_classes)
    _cvat_attribute_spec(specs, "score", mutable=True, input_type="number", default="0", values="0;1;0.01")
    _cvat_attribute_spec(
        specs, "review", mutable=False, input_type="select", default="pending", values="\n".join(REVIEW_STATUSES)
    )
    _cvat_attribute_spec(specs, "track_confidence", mutable=False, input_type="number", default="0", values="0;1;0.01")
    _cvat_attribute_spec(specs, "track_id", mutable=False, input_type="text", default="", values="")
    size = _sub(task, "original_size")
    _sub(size, "width", str(rec.width))
    _sub(size, "height", str(rec.height))

    for exported in tracks:
        track = exported.track
        element = _sub(root, "track", id=str(track.track_id), label=CVAT_LABEL, source="auto")
        per_track = {
            "sign_class": exported.class_name,
            "review": track.review.status,
            "track_confidence": f"{track.confidence:.2f}",
            "track_id": str(track.track_id),
        }
        for segment in exported.segments:
            for box in segment:
                attrs = {**per_track, "score": f"{box.score:.2f}"}
                _cvat_box(element, box.frame, box.xyxy, outside=False, attrs=attrs)
            end = segment[-1]
            if end.frame + 1 < rec.frame_count:
                attrs = {**per_track, "score": f"{end.score:.2f}"}
                _cvat_box(element, end.frame + 1, end.xyxy, outside=True, attrs=attrs)
    return _xml_bytes(root)


def read_cvat_video(xml: bytes) -> list[CvatTrack]:
    """Read the tracks of a CVAT for video 1.1 file (ours, or one CVAT exported).

    Args:
        xml: The document's bytes.

    Returns:
        Its tracks in file order; boxes of any other shape are ignored.

    Raises:
        InputError: The bytes are not XML of that form (not XML, another root, a box without a number where one is
            needed).
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise InputError(f"CVAT XML: expected a well-formed XML document, got {exc}") from exc
    if root.tag != "annotations":
        raise InputError(f"CVAT XML: expected an <annotations> root, got <{root.tag}>")
    tracks: list[CvatTrack] = []
    for element in root.iter("track"):
        where = f"CVAT XML: track {element.get('id')!r}"
        boxes: list[CvatBox] = []
        first_attrs: dict[str, str] | None = None
        for box in element.iter("box"):
            attrs = {a.get("name", ""): a.text or "" for a in box.iter("attribute")}
            if first_attrs is None:
                first_attrs = attrs
            try:
                frame = int(box.get("frame", ""))
                xyxy = (
                    float(box.get("xtl", "")),
                    float(box.get("ytl", "")),
                    float(box.get("xbr", "")),
                    float(box.get("ybr", "")),
                )
                score = float(attrs["score"]) if attrs.get("score") else None
            except ValueError as exc:
                raise InputError(f"{where}: expected a box with numeric frame, corners and score, got {exc}") from exc
            outside = box.get("outside", "0") == "1"
            keyframe = box.get("keyframe", "1") == "1"
            boxes.append(CvatBox(frame, xyxy, outside, score, keyframe))
        attrs = first_attrs or {}
        try:
            cvat_id = int(element.get("id", ""))
            track_id = int(attrs["track_id"]) if attrs.get("track_id") else None
        except ValueError as exc:
            raise InputError(f"{where}: expected integer id and track_id, got {exc}") from exc
        tracks.append(
            CvatTrack(
                cvat_id=cvat_id,
                label=element.get("label", ""),
                sign_class=attrs.get("sign_class") or UNKNOWN,
                review=attrs.get("review") or None,
                track_id=track_id,
                boxes=tuple(boxes),
            )
        )
    return tracks


# --------------------------------------------------------------------------------------------------------------------
# MOTChallenge


class _MotRow(NamedTuple):
    frame: int  # 0-based decode index
    xyxy: tuple[float, float, float, float]
    conf: float


def _dense_rows(segment: Sequence[Box]) -> Iterator[_MotRow]:
    """Every frame of a segment: its boxes, and linear interpolation on the frames between two of them.

    An interpolated row's confidence is the lower of its two neighbours' scores: the detector confirmed neither
    frame, so it is no surer than the weaker box it was drawn between.
    """
    for prev, nxt in zip(segment, segment[1:], strict=False):
        yield _MotRow(prev.frame, prev.xyxy, prev.score)
        span = nxt.frame - prev.frame
        conf = min(prev.score, nxt.score)
        for frame in range(prev.frame + 1, nxt.frame):
            a = (frame - prev.frame) / span
            x1, y1, x2, y2 = (p + a * (n - p) for p, n in zip(prev.xyxy, nxt.xyxy, strict=True))
            yield _MotRow(frame, (x1, y1, x2, y2), conf)
    last = segment[-1]
    yield _MotRow(last.frame, last.xyxy, last.score)


def _lines(lines: Sequence[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


def to_mot(labels: LabelFile, *, max_gap_frames: int = DEFAULT_MAX_GAP_FRAMES) -> dict[str, bytes]:
    """The labels as MOTChallenge text files, with the frames between boxes filled in.

    Files (relative path -> content, UTF-8, one line per row, sorted by frame then track id):
        * ``gt/gt.txt``: ``frame_id,track_id,x,y,w,h,not_ignored,class_id,visibility`` as CVAT's "MOT 1.1" import
          reads it: ``frame_id`` is the decode index + 1, ``x,y,w,h`` in pixels (2 decimals), ``not_ignored`` 1,
          ``class_id`` the 1-based line of the track's class in ``gt/labels.txt``, ``visibility`` 1 (the label file
          knows of no occlusion; CVAT would mark a box with visibility 0 as occluded).
        * ``gt/labels.txt``: the class names the tracks use, one a line, by class id (``unknown`` first).
        * ``results.txt``: ``frame,id,bb_left,bb_top,width,height,conf,-1,-1,-1`` as TrackEval reads tracker
          results: the same rows, ``conf`` the detector's score (4 decimals).

    MOT has no keyframes: every frame a track is visible on needs its own row, or CVAT ends the track there. So the
    frames between two boxes of a segment (module docstring) get linearly interpolated boxes, whose ``conf`` is the
    lower of the two neighbours' scores. Gaps longer than ``max_gap_frames`` get no rows.

    Args:
        labels: The label file.
        max_gap_frames: Longest run of frames without a box that is interpolated, >= 0.

    Returns:
        ``{"gt/gt.txt": ..., "gt/labels.txt": ..., "results.txt": ...}``; files are empty when there is no track.

    Raises:
        InputError: ``max_gap_frames`` is negative.
    """
    tracks = _exported_tracks(labels, max_gap_frames)
    names = _class_names_used((t.class_id, t.class_name) for t in tracks)
    class_index = {name: i + 1 for i, name in enumerate(names)}
    rows = sorted(
        (row.frame, t.track.track_id, row, class_index[t.class_name])
        for t in tracks
        for segment in t.segments
        for row in _dense_rows(segment)
    )
    gt: list[str] = []
    results: list[str] = []
    for frame, track_id, row, class_id in rows:
        x1, y1, x2, y2 = row.xyxy
        xywh = f"{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f}"
        gt.append(f"{frame + 1},{track_id},{xywh},1,{class_id},1")
        results.append(f"{frame + 1},{track_id},{xywh},{row.conf:.4f},-1,-1,-1")
    return {"gt/gt.txt": _lines(gt), "gt/labels.txt": _lines(names), "results.txt": _lines(results)}


def _zip_bytes(files: Mapping[str, bytes]) -> bytes:
    """A zip of ``files`` with fixed timestamps, so the same labels give the same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------------------------
# Label Studio


def _model_version(labels: LabelFile) -> str:
    versions = [labels.models[name].version for name in ("detector", "classifier") if name in labels.models]
    return "+".join(versions) or labels.code_version


def _track_score(exported: _Exported) -> float:
    """A pending track's confidence; 1.0 once a person accepted or relabelled it (nothing left to review)."""
    return exported.track.confidence if exported.track.review.status == "pending" else 1.0


def _ls_sequence(exported: _Exported, labels: LabelFile) -> list[dict[str, Any]]:
    rec = labels.recording
    sequence: list[dict[str, Any]] = []
    for segment in exported.segments:
        for i, box in enumerate(segment):
            frame = math.floor(box.t_s * rec.fps + 0.5) + 1
            x1, y1, x2, y2 = box.xyxy
            item = {
                "frame": frame,
                "enabled": i < len(segment) - 1,
                "rotation": 0,
                "x": round(x1 / rec.width * 100, 4),
                "y": round(y1 / rec.height * 100, 4),
                "width": round((x2 - x1) / rec.width * 100, 4),
                "height": round((y2 - y1) / rec.height * 100, 4),
                "time": round(box.t_s, 6),
            }
            # Box times never decrease (the schema refuses it) and fps > 0, so frames never decrease either.
            if sequence and frame == sequence[-1]["frame"]:
                # Two boxes closer in time than the player's frame: it can show only one; keep the later, so a
                # segment's end (enabled: false) is never lost.
                sequence[-1] = item
            else:
                sequence.append(item)
    return sequence


def to_label_studio(
    labels: LabelFile, video_url: str | None = None, *, max_gap_frames: int = DEFAULT_MAX_GAP_FRAMES
) -> bytes:
    """The labels as Label Studio tasks JSON: a list with one task, whose predictions hold one track per result.

    Import it together with :func:`label_studio_config`. The task's ``data`` is ``{"video": ..., "fps": ...}``;
    its one prediction has ``model_version`` ``"<detector version>+<classifier version>"`` and, as ``score``, the
    lowest score of its tracks, so that the Data Manager, sorted by prediction score, shows the recordings most in
    need of review first (1.0 when there is no track). A track's ``score`` is its confidence while its review is
    pending, and 1.0 once a person accepted or relabelled it.

    Each track is a ``videorectangle`` result (id ``trk<track_id>``) whose ``sequence`` holds one item per box:
    ``x, y, width, height`` in percent of the recording's width and height, ``enabled: false`` on the last box of
    each segment (module docstring), which stops Label Studio's interpolation there.

    Frames and times: Label Studio's player maps frame numbers to times through the constant ``fps`` of the task
    (its own results store ``time = frame / fps``). Under a variable frame rate the decode index drifts away from
    that mapping, so an item's ``time`` is the box's own presentation time ``t_s`` (already relative to the first
    decoded frame, so a non-zero stream start time does not shift it either) and its ``frame`` is
    ``round(t_s * fps) + 1``, NOT the decode index + 1: the box then shows on the video frame it was detected on. Two
    boxes of a track that round to the same frame keep the later one.

    Args:
        labels: The label file.
        video_url: What Label Studio loads the video from; the recording's file name when None.
        max_gap_frames: Decoded frames without a box that Label Studio may interpolate across, >= 0.

    Returns:
        The JSON document (UTF-8).

    Raises:
        InputError: ``max_gap_frames`` is negative, or the recording has tracks but no frame rate.
    """
    tracks = _exported_tracks(labels, max_gap_frames)
    rec = labels.recording
    if tracks and rec.fps <= 0:
        raise InputError(f"recording.fps: expected > 0 to place boxes on Label Studio frames, got {rec.fps}")
    sequences = [_ls_sequence(t, labels) for t in tracks]
    frames_count = max([rec.frame_count, *(s[-1]["frame"] for s in sequences)])
    results = [
        {
            "id": f"trk{t.track.track_id}",
            "from_name": "box",
            "to_name": "video",
            "type": "videorectangle",
            "score": _track_score(t),
            "value": {
                "framesCount": frames_count,
                "duration": rec.duration_s,
                "labels": [t.class_name],
                "sequence": sequence,
            },
        }
        for t, sequence in zip(tracks, sequences, strict=True)
    ]
    prediction = {
        "model_version": _model_version(labels),
        "score": min((_track_score(t) for t in tracks), default=1.0),
        "result": results,
    }
    task = {"data": {"video": video_url or rec.source, "fps": rec.fps}, "predictions": [prediction]}
    return (json.dumps([task], ensure_ascii=False) + "\n").encode()


def label_studio_config(labels: LabelFile) -> str:
    """The Label Studio labeling config that :func:`to_label_studio`'s tasks go with (XML).

    A ``Video`` named ``video`` playing ``$video`` at ``$fps``, a ``VideoRectangle`` named ``box`` and a ``Labels``
    with one ``Label`` per class: ``unknown``, the 43 GTSRB classes and any other class a track uses, so that a
    reviewer can relabel a track to any class, not only to those the machine found.
    """
    root = ET.Element("View")
    _sub(root, "Video", name="video", value="$video", framerate="$fps")
    _sub(root, "VideoRectangle", name="box", toName="video")
    choices = _sub(root, "Labels", name="videoLabels", toName="video")
    for name in _all_class_names(labels):
        _sub(choices, "Label", value=name)
    ET.indent(root, space=" ")
    return ET.tostring(root, encoding="unicode") + "\n"


# --------------------------------------------------------------------------------------------------------------------
# Writing


def _refuse_directory(out: Path, what: str) -> None:
    if out.is_dir():
        raise InputError(f"out: expected a file path for {what}, got the directory {out}")


def export_labels(
    labels: LabelFile,
    fmt: ExportFormat,
    out: Path,
    *,
    video_url: str | None = None,
    max_gap_frames: int = DEFAULT_MAX_GAP_FRAMES,
) -> list[Path]:
    """Write ``labels`` in format ``fmt``; every file is written atomically (old or new, never half).

    Where the files go:
        * ``cvat-video``: the XML file ``out``.
        * ``mot``: ``out/gt/gt.txt``, ``out/gt/labels.txt`` and ``out/results.txt``; or, when ``out`` ends in
          ``.zip``, one zip file holding those three entries.
        * ``label-studio``: the tasks JSON ``out`` and its labeling config beside it, ``<stem>.config.xml``.

    Everything is rendered before anything is written, so an invalid label file writes nothing.

    Args:
        labels: The label file.
        fmt: One of :data:`FORMATS`.
        out: Where to write (above).
        video_url: Label Studio only: the URL its task loads the video from (the recording's file name when None).
        max_gap_frames: Decoded frames without a box that a segment may span (module docstring), >= 0.

    Returns:
        The paths written.

    Raises:
        InputError: Unknown ``fmt``; ``out`` is a directory where a file is needed (or a file where a directory
            is); or the label file cannot be exported (see the ``to_*`` functions).
    """
    name: str = fmt  # a caller past the type checker (CLI, HTTP) may pass any string
    if name not in FORMATS:
        raise InputError(f"format: expected one of {', '.join(FORMATS)}, got {name!r}")
    files: dict[Path, bytes]
    if fmt == "cvat-video":
        _refuse_directory(out, "a CVAT XML file")
        files = {out: to_cvat_video(labels, max_gap_frames=max_gap_frames)}
    elif fmt == "mot":
        mot = to_mot(labels, max_gap_frames=max_gap_frames)
        if out.suffix.lower() == ".zip":
            _refuse_directory(out, "a zip file")
            files = {out: _zip_bytes(mot)}
        else:
            if out.exists() and not out.is_dir():
                raise InputError(f"out: expected a directory (or a .zip path) for MOT files, got the file {out}")
            files = {out / rel: data for rel, data in mot.items()}
    else:
        _refuse_directory(out, "a Label Studio JSON file")
        files = {
            out: to_label_studio(labels, video_url, max_gap_frames=max_gap_frames),
            out.with_name(out.stem + ".config.xml"): label_studio_config(labels).encode(),
        }
    for path, data in files.items():
        atomic_write_bytes(path, data)
    return list(files)


# --------------------------------------------------------------------------------------------------------------------
# Schema


def label_file_json_schema() -> str:
    """The JSON Schema of the label file, as committed at ``docs/label-file.schema.json``.

    Regenerate the committed file after a schema change with::

        .venv/bin/python -c "from pathlib import Path; from gateway.exports import label_file_json_schema; \\
            Path('docs/label-file.schema.json').write_text(label_file_json_schema())"
    """
    return json.dumps(LabelFile.model_json_schema(), indent=1, sort_keys=False) + "\n"
