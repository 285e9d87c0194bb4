"""Video benchmark: decode only, decode + detect, and the full pipeline, on a real clip and synthetic 720p/1080p.

Every figure is frames per second, the median of interleaved rounds, printed with its ratio to decode-only on the
same clip in the same process. Peak memory is the process's peak resident set size during one full-pipeline run
(``VmHWM``, reset before the run through ``/proc/self/clear_refs``). The synthetic clips have ground truth, so the
recall cost of running the detector on every k-th frame is printed next to its speed.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gateway.pipeline import PipelineSettings, label_recording
from services.classifier.models import default_classifier_path
from services.classifier.onnx import OnnxClassifier
from services.common.labelfile import LabelFile
from services.decode.reader import open_video
from services.detector.api import DetectorSettings
from services.detector.models import default_detector_path
from services.detector.onnx import OnnxDetector
from services.detector.postprocess import box_iou
from tests.synthvideo import (
    SignSpec,
    SyntheticVideo,
    drawn_sign,
    load_background,
    load_gtsrb_signs,
    make_road_video,
    procedural_background,
)

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
REAL_CLIP = DATA / "video" / "udacity_solidWhiteRight.mp4"
CLASSES = (1, 14, 13, 38, 2, 25, 12, 17)


def out(line: str) -> None:
    """One line of the report on stdout (a bench is a command: its output is the point)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _peak_rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def proc_mb(field: str, pid: int | str = "self") -> float:
    """A memory figure of ``/proc/PID/status`` in MB (``VmHWM``: peak resident, ``VmRSS``: resident now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def synthetic_clip(path: Path, width: int, height: int, n_frames: int) -> SyntheticVideo:
    """A drive past eight signs (real GTSRB crops on a real GTSDB road when the shared data is there)."""
    if (DATA / "gtsrb_train").is_dir():
        sources = load_gtsrb_signs(DATA / "gtsrb_train", CLASSES, per_class=1, seed=3)
        background = load_background(DATA / "gtsdb_train", seed=0)
    else:
        sources = [(c, *drawn_sign(c)) for c in CLASSES]
        background = procedural_background(width, height)
    sides = ("right", "left", "right", "top", "right", "left", "right", "right")
    specs = [
        SignSpec(
            class_id=cid,
            crop=crop,
            roi_xyxy=roi,
            start_frame=i * n_frames // (2 * len(sources)),
            end_frame=min(n_frames, i * n_frames // (2 * len(sources)) + n_frames // 2),
            side=sides[i],  # type: ignore[arg-type]
        )
        for i, (cid, crop, roi) in enumerate(sources)
    ]
    return make_road_video(path, width=width, height=height, n_frames=n_frames, signs=specs, background=background)


def sign_recall(video: SyntheticVideo, labels: LabelFile) -> tuple[float, float]:
    """(signs found as a track with the right class / signs, predicted tracks per found sign)."""
    owner: dict[int, list[tuple[int, int, tuple[float, ...]]]] = defaultdict(list)
    for track in labels.tracks:
        for box in track.boxes:
            owner[box.frame].append((track.track_id, track.class_id, box.xyxy))
    found: dict[int, set[int]] = defaultdict(set)
    right: set[int] = set()
    for gt in video.boxes:
        for tid, cid, xyxy in owner.get(gt.frame, []):
            if box_iou(np.asarray([xyxy]), np.asarray([gt.xyxy]))[0, 0] >= 0.5:
                found[gt.track].add(tid)
                if cid == gt.class_id:
                    right.add(gt.track)
    n = len(video.signs)
    per_sign = sum(len(v) for v in found.values()) / max(len(found), 1)
    return len(right) / n, per_sign


def bench_video(rounds: int, n_frames: int) -> None:
    """Print the video figures (see the module docstring)."""
    detector = OnnxDetector(default_detector_path(), settings=DetectorSettings(batch_size=4))
    classifier = OnnxClassifier(default_classifier_path())
    with tempfile.TemporaryDirectory(prefix="roadlabel-bench-") as tmp:
        clips: list[tuple[str, Path, SyntheticVideo | None]] = []
        if REAL_CLIP.is_file():
            clips.append((f"real {REAL_CLIP.name} (960x540)", REAL_CLIP, None))
        for w, h in ((1280, 720), (1920, 1080)):
            tick = time.perf_counter()
            video = synthetic_clip(Path(tmp) / f"synthetic_{w}x{h}.mp4", w, h, n_frames)
            out(f"(generated the {w}x{h} synthetic clip, {n_frames} frames, in {time.perf_counter() - tick:.1f} s)")
            clips.append((f"synthetic {w}x{h} H.264", video.path, video))
        for name, path, clip in clips:
            _bench_clip(name, path, clip, detector, classifier, rounds)
        _bench_memory_growth(Path(tmp), detector, classifier, n_frames)


def _bench_memory_growth(tmp: Path, detector: OnnxDetector, classifier: OnnxClassifier, n_frames: int) -> None:
    """Peak memory labelling a 1280x720 clip and one four times as long: bounded means about the same."""
    peaks = []
    for n in (n_frames, 4 * n_frames):
        video = synthetic_clip(tmp / f"memory_{n}.mp4", 1280, 720, n)
        can_reset = _peak_rss_reset()
        labels = label_recording(video.path, detector, classifier, PipelineSettings())
        peaks.append(proc_mb("VmHWM"))
        out(
            f"memory: 1280x720, {n} frames, {len(labels.tracks)} tracks: peak RSS {peaks[-1]:.0f} MB"
            + ("" if can_reset else " (process peak)")
        )
    out(f"memory: {4 * n_frames} frames vs {n_frames} frames: peak RSS ratio {peaks[1] / peaks[0]:.3f}x")


def _bench_clip(
    name: str,
    path: Path,
    video: SyntheticVideo | None,
    detector: OnnxDetector,
    classifier: OnnxClassifier,
    rounds: int,
) -> None:
    def decode_only() -> int:
        with open_video(path, "bench") as reader:
            return sum(1 for _ in reader.frames())

    def decode_detect() -> int:
        n = 0
        with open_video(path, "bench") as reader:
            batch = []
            for frame in reader.frames():
                n += 1
                batch.append(frame)
                if len(batch) == 4:
                    detector.detect(batch)
                    batch = []
            if batch:
                detector.detect(batch)
        return n

    results: dict[str, LabelFile] = {}

    def pipeline(every: int) -> Callable[[], int]:
        def run() -> int:
            labels = label_recording(path, detector, classifier, PipelineSettings(detect_every=every))
            results[f"k={every}"] = labels
            return labels.recording.frame_count

        return run

    cases: dict[str, Callable[[], int]] = {
        "decode only": decode_only,
        "decode + detect (every frame)": decode_detect,
        "full pipeline, detector on every frame": pipeline(1),
        "full pipeline, detector on every 3rd frame": pipeline(3),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for case, fn in cases.items():
            tick = time.perf_counter()
            frames = fn()
            times[case].append(frames / (time.perf_counter() - tick))
    rates = {k: statistics.median(v) for k, v in times.items()}
    base = rates["decode only"]
    out(f"\nvideo: {name} ({rounds} rounds, median frames/s, ratio to decode only)")
    for case, rate in rates.items():
        out(f"  {case:<44} {rate:8.1f} frames/s  {rate / base:6.3f}x")
    can_reset = _peak_rss_reset()
    label_recording(path, detector, classifier, PipelineSettings())
    peak = proc_mb("VmHWM")
    out(f"  peak RSS during one full-pipeline run: {peak:.0f} MB" + ("" if can_reset else " (process peak)"))
    if video is not None:
        for key, labels in results.items():
            recall, per_sign = sign_recall(video, labels)
            out(
                f"  {key}: signs found as a track with the right class {recall:.1%} of {len(video.signs)}, "
                f"{per_sign:.2f} tracks per found sign, {len(labels.tracks)} tracks in all"
            )
