"""Reviewer page on a 2-hour recording against a 2-minute one, in a real browser, in the same process.

A long drive (a real H.264 file, 25 frames/s, one sign every ``sign_every_s`` seconds, 2 s per sign) and a short
one of the same density are stored in one gateway with their label files; the real server serves both and
Debian's Chromium (Playwright) opens each and:

- opens the recording view (timeline of every track, queue, first track's card);
- scrubs: clicks the timeline at random places, each time waiting until the boxes of the new time are drawn;
- steps frame by frame with the arrow key;
- makes decisions (accept) and waits for the saved state;

and reads the page's JavaScript heap. Each figure is printed for both recordings with the long/short ratio: the
goal is that a 2-hour recording scrubs as smoothly as a short one (ratio near 1).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from services.common.labelfile import (
    Box,
    CropRef,
    LabelFile,
    ModelRef,
    Recording,
    RunStats,
    ScoredClass,
    Track,
    save_label_file,
)
from services.common.modelcard import file_sha256

REPO = Path(__file__).resolve().parents[2]
FPS = 25
IDS = {"long": "a" * 32, "short": "b" * 32}  # recording ids are hex, as the gateway makes them
W, H = 640, 360


def encode_recording(path: Path, duration_s: float) -> Path:
    """A real H.264 MP4 of ``duration_s`` (640x360, 25 frames/s, a keyframe every 10 s); cached by path."""
    import av

    if path.is_file():
        return path
    n = round(duration_s * FPS)
    tmp = path.with_suffix(".tmp.mp4")
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"preset": "ultrafast", "g": str(10 * FPS), "tune": "zerolatency"}
        stream.time_base = Fraction(1, FPS)
        base = np.full((H, W, 3), 90, np.uint8)
        base[H // 2 :] = 60
        frames = []
        for i in range(50):
            img = base.copy()
            x = (i * 12) % (W - 16)
            img[H // 3 : H // 3 + 40, x : x + 16] = (200, 40, 40)
            frames.append(av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p"))
        for i in range(n):
            frame = frames[i % 50]
            frame.pts = i
            frame.time_base = Fraction(1, FPS)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    tmp.replace(path)
    return path


def label_file_for(recording_id: str, sha: str, duration_s: float, sign_every_s: float, seed: int) -> LabelFile:
    """Tracks of 2 s (50 boxes) every ``sign_every_s``, with crops and top classes, like the pipeline writes."""
    rng = np.random.default_rng(seed)
    n_frames = round(duration_s * FPS)
    tracks = []
    for i, start in enumerate(np.arange(1.0, duration_s - 3.0, sign_every_s)):
        f0 = round(start * FPS)
        class_id = int(rng.integers(0, 43))
        conf = float(rng.uniform(0.3, 1.0))
        boxes = tuple(
            Box(
                frame=f,
                t_s=f / FPS,
                xyxy=(300.0 + 4 * (f - f0), 100.0 - (f - f0), 320.0 + 5 * (f - f0), 120.0),
                score=0.9,
            )
            for f in range(f0, f0 + 2 * FPS)
        )
        crops = tuple(
            CropRef(frame=b.frame, t_s=b.t_s, xyxy=b.xyxy, class_id=class_id, p=conf, quality=1.0) for b in boxes[-3:]
        )
        tracks.append(
            Track(
                track_id=i + 1,
                class_id=class_id,
                class_name=f"class_{class_id}",
                confidence=round(conf, 4),
                first_frame=boxes[0].frame,
                last_frame=boxes[-1].frame,
                start_s=boxes[0].t_s,
                end_s=boxes[-1].t_s,
                top_classes=(ScoredClass(class_id=class_id, class_name=f"class_{class_id}", p=conf),),
                crop_agreement=1.0,
                uncertain=conf < 0.9,
                uncertainty=("low_confidence",) if conf < 0.9 else (),
                best_crops=crops,
                boxes=boxes,
            )
        )
    return LabelFile(
        recording=Recording(
            id=recording_id,
            source=f"{recording_id}.mp4",
            sha256=sha,
            width=W,
            height=H,
            fps=FPS,
            frame_count=n_frames,
            duration_s=n_frames / FPS,
        ),
        models={
            "detector": ModelRef(name="detector", version="bench", sha256="a" * 64),
            "classifier": ModelRef(name="classifier", version="bench", sha256="b" * 64),
        },
        settings={},
        code_version="bench",
        created_at="2026-01-01T00:00:00Z",
        stats=RunStats(
            frames_decoded=n_frames,
            frames_detected=n_frames,
            detections=sum(len(t.boxes) for t in tracks),
            tracks_dropped=0,
            elapsed_s=1.0,
        ),
        tracks=tuple(tracks),
    )


def store_labelled(data: Path, recording_id: str, video: Path, labels: LabelFile) -> None:
    """Put a recording and its finished job's label file into the gateway's data directory."""
    import shutil

    from gateway.app import GatewaySettings
    from gateway.store import migrate, open_store

    url = GatewaySettings(data_dir=data, workers=0).resolved_database_url()
    data.mkdir(parents=True, exist_ok=True)
    migrate(url)
    store = open_store(url)
    try:
        (data / "recordings").mkdir(exist_ok=True)
        shutil.copyfile(video, data / "recordings" / f"{recording_id}.mp4")
        store.add_recording(
            recording_id=recording_id,
            sha256=labels.recording.sha256,
            source_name=f"{recording_id}.mp4",
            size_bytes=video.stat().st_size,
            path=f"recordings/{recording_id}.mp4",
            created_by="bench",
            settings={},
            models={},
        )
        job = store.claim_job("bench", 30)
        assert job is not None
        rel = f"labels/{recording_id}/job-{job.id}.labels.json"
        (data / "labels" / recording_id).mkdir(parents=True)
        save_label_file(data / rel, labels)
        store.finish_job(
            job.id, "bench", label_path=rel, tracks=len(labels.tracks), frames=labels.recording.frame_count, error=None
        )
    finally:
        store.close()


def _drawn(page: Any) -> str:
    return str(page.get_attribute("#frame", "data-drawn") or "")


def measure(page: Any, base: str, recording_id: str, scrubs: int, steps: int, decisions: int) -> dict[str, Any]:
    """Open one recording in the page and time what a reviewer does (seconds per action)."""
    tick = time.perf_counter()
    page.goto(f"{base}/ui/#/r/{recording_id}")
    page.wait_for_selector("#queue li")
    page.wait_for_function("document.querySelector('#frame').dataset.drawn !== undefined")
    open_s = time.perf_counter() - tick

    rng = np.random.default_rng(0)
    box = page.locator("#timeline").bounding_box()
    scrub = []
    for _ in range(scrubs):
        before = _drawn(page)
        x = float(rng.uniform(0.02, 0.98)) * box["width"]
        tick = time.perf_counter()
        # Below the lanes: a click there seeks instead of selecting a track.
        page.mouse.click(box["x"] + x, box["y"] + box["height"] - 3)
        page.wait_for_function(f"document.querySelector('#frame').dataset.drawn !== {json.dumps(before)}")
        scrub.append(time.perf_counter() - tick)

    page.locator("#timeline").focus()
    step = []
    for _ in range(steps):
        before = _drawn(page)
        tick = time.perf_counter()
        page.keyboard.press("ArrowRight")
        page.wait_for_function(f"document.querySelector('#frame').dataset.drawn !== {json.dumps(before)}")
        step.append(time.perf_counter() - tick)

    decide = []
    for _ in range(decisions):
        before = page.inner_text("#queue-count")
        tick = time.perf_counter()
        page.keyboard.press("a")
        page.wait_for_function(f"document.querySelector('#queue-count').textContent !== {json.dumps(before)}")
        decide.append(time.perf_counter() - tick)

    heap = page.evaluate("performance.memory ? performance.memory.usedJSHeapSize : 0")
    return {
        "open_s": open_s,
        "scrub_ms": [1000 * s for s in scrub],
        "step_ms": [1000 * s for s in step],
        "decide_ms": [1000 * s for s in decide],
        "js_heap_mb": heap / 1e6,
    }


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def bench_review(long_s: float = 7200.0, short_s: float = 120.0, sign_every_s: float = 5.0) -> dict[str, Any]:
    """Run the comparison and print a table; returns the figures."""
    from tests.browser import browser_page, missing_reason
    from tests.integration.test_gateway_server import create_key, free_port, server

    reason = missing_reason()
    if reason:
        sys.stdout.write(f"review bench skipped: {reason}\n")
        return {}
    cache = REPO / "runs" / "bench-cache"
    cache.mkdir(parents=True, exist_ok=True)
    tick = time.perf_counter()
    long_video = encode_recording(cache / f"drive-{int(long_s)}s.mp4", long_s)
    short_video = encode_recording(cache / f"drive-{int(short_s)}s.mp4", short_s)
    made_s = time.perf_counter() - tick
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        sizes = {}
        for rid, video, dur in ((IDS["long"], long_video, long_s), (IDS["short"], short_video, short_s)):
            labels = label_file_for(rid, file_sha256(video), dur, sign_every_s, seed=1)
            store_labelled(data, rid, video, labels)
            path = next((data / "labels" / rid).glob("*.labels.json"))
            sizes["long" if rid == IDS["long"] else "short"] = {
                "tracks": len(labels.tracks),
                "boxes": sum(len(t.boxes) for t in labels.tracks),
                "label_mb": path.stat().st_size / 1e6,
                "video_mb": video.stat().st_size / 1e6,
            }
        reviewer = create_key(data, "bench-reviewer", role="reviewer")
        port = free_port()
        results: dict[str, Any] = {}
        with server(data, port, workers=0), browser_page((1280, 720)) as bp:
            page = bp.page
            base = f"http://127.0.0.1:{port}"
            page.goto(base + "/")
            page.fill("#key", reviewer)
            page.keyboard.press("Enter")
            page.wait_for_selector("#rows tr a")
            # Warm-up (server caches, browser JIT), then the measured rounds, short and long interleaved.
            measure(page, base, IDS["short"], 3, 3, 1)
            for rid in ("short", "long", "short", "long"):
                got = measure(page, base, IDS[rid], 30, 30, 5)
                prev = results.get(rid)
                if prev is None:
                    results[rid] = got
                else:
                    for k in ("scrub_ms", "step_ms", "decide_ms"):
                        prev[k] += got[k]
                    prev["open_s"] = min(prev["open_s"], got["open_s"])
                    prev["js_heap_mb"] = max(prev["js_heap_mb"], got["js_heap_mb"])
            if os.environ.get("ROADLABEL_DOCS_SCREENSHOTS") == "1":
                page.wait_for_function(
                    "[...document.querySelectorAll('.crops img')].every((i) => i.complete && i.naturalWidth > 0)"
                )
                page.screenshot(path=str(REPO / "docs" / "review-2h.png"))  # the long recording
            bp.assert_no_errors()

    rows = [
        ("open the recording view (s)", "open_s", None),
        ("scrub: click the timeline -> boxes drawn, p50 (ms)", "scrub_ms", 50),
        ("scrub p95 (ms)", "scrub_ms", 95),
        ("step one frame (ArrowRight), p50 (ms)", "step_ms", 50),
        ("step p95 (ms)", "step_ms", 95),
        ("accept a track -> saved state shown, p50 (ms)", "decide_ms", 50),
        ("JS heap after the session (MB)", "js_heap_mb", None),
    ]
    out = sys.stdout
    out.write(
        f"\nreviewer page: {long_s / 3600:.1f} h recording vs {short_s / 60:.0f} min recording "
        f"(videos made in {made_s:.0f} s)\n"
    )
    for rid in ("long", "short"):
        s = sizes[rid]
        out.write(
            f"  {rid:5s}: {s['tracks']:5d} tracks, {s['boxes']:7d} boxes, label file {s['label_mb']:.1f} MB, "
            f"video {s['video_mb']:.1f} MB\n"
        )
    out.write(f"  {'measure':52s} {'2 h':>9s} {'2 min':>9s} {'ratio':>7s}\n")
    summary: dict[str, Any] = {"sizes": sizes}
    for label, key, q in rows:
        a, b = results["long"][key], results["short"][key]
        va = _p(a, q) if q is not None else float(a)
        vb = _p(b, q) if q is not None else float(b)
        summary[label] = {"long": va, "short": vb, "ratio": va / vb if vb else float("nan")}
        out.write(f"  {label:52s} {va:9.1f} {vb:9.1f} {va / vb if vb else float('nan'):6.2f}x\n")
    n = len(results["long"]["scrub_ms"])
    out.write(f"  ({n} scrubs, {len(results['long']['step_ms'])} steps per recording; medians pooled over 2 rounds)\n")
    summary["median_scrub_ms_all"] = statistics.median(results["long"]["scrub_ms"])
    return summary
