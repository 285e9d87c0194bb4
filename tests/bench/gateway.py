"""Gateway load test (loopback only, bounded): concurrent uploads of a real clip, and one multi-gigabyte upload.

Starts ``roadlabel serve --workers 0`` (uploads only: no labelling competes for the CPU), uploads the real dashcam
clip from N clients at once (each copy made unique by a few trailing bytes, so every upload is hashed, checked and
stored, not recognised as a duplicate), and prints uploads/s, p50/p99 request latency and the server's peak
resident memory. The baseline, in the same run, is copying the same bytes on the local disk. Then one file of
``--big-gb`` gigabytes (the clip padded with zeros, still a valid video) is uploaded and the server's peak memory is
printed against the 300 MB goal.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2

from tests.bench.video import out, proc_mb

ROOT = Path(__file__).resolve().parents[2]
CLIP = ROOT.parent / "shared" / "data" / "video" / "udacity_solidWhiteRight.mp4"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_gateway(clients: int, uploads: int, big_gb: float) -> None:
    """Print the load-test figures (see the module docstring)."""
    if not CLIP.is_file():
        out(f"gateway: skipped, {CLIP} is absent")
        return
    with tempfile.TemporaryDirectory(prefix="roadlabel-gw-") as tmp:
        data = Path(tmp) / "data"
        key = subprocess.run(
            [sys.executable, "-m", "gateway", "keys", "create", "bench", "--role", "uploader", "--data-dir", str(data)],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout.strip()
        port = _free_port()
        log = (Path(tmp) / "server.log").open("wb")
        server = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--workers", "0", "--data-dir", str(data), "--port", str(port)],
            cwd=ROOT,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(200):
                try:
                    httpx2.get(f"{base}/healthz", timeout=1)
                    break
                except httpx2.TransportError:
                    time.sleep(0.1)
            _concurrent(base, key, server.pid, clients, uploads, Path(tmp))
            if big_gb > 0:
                _big(base, key, server.pid, big_gb, Path(tmp))
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
            log.close()


def _concurrent(base: str, key: str, pid: int, clients: int, uploads: int, tmp: Path) -> None:
    clip = CLIP.read_bytes()
    bodies = [clip + secrets.token_bytes(16) for _ in range(uploads)]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "video/mp4"}
    # Baseline: the same bytes written to the local disk, one file per upload.
    tick = time.perf_counter()
    for i, body in enumerate(bodies):
        (tmp / f"copy{i}.mp4").write_bytes(body)
    disk_s = time.perf_counter() - tick
    for i in range(uploads):
        (tmp / f"copy{i}.mp4").unlink()
    latencies: list[float] = []
    statuses: list[int] = []

    def send(body: bytes) -> None:
        t0 = time.perf_counter()
        r = httpx2.post(
            f"{base}/recordings", params={"filename": "drive.mp4"}, content=body, headers=headers, timeout=120
        )
        latencies.append(time.perf_counter() - t0)
        statuses.append(r.status_code)

    rss_before = proc_mb("VmRSS", pid)
    tick = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, bodies))
    wall = time.perf_counter() - tick
    lat = sorted(latencies)
    p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
    mb = len(clip) / 1e6
    ok = statuses.count(201)
    out(f"\ngateway: {uploads} uploads of {CLIP.name} ({mb:.1f} MB each) from {clients} concurrent clients, loopback")
    out(f"  accepted (201): {ok} of {uploads}; other statuses: {sorted(set(statuses) - {201}) or 'none'}")
    out(f"  uploads/s: {uploads / wall:.1f}  ({uploads * mb / wall:.0f} MB/s)")
    out(
        f"  baseline, the same bytes written to local disk: {uploads * mb / disk_s:.0f} MB/s "
        f"(upload path {disk_s / wall:.3f}x of it)"
    )
    out(f"  request latency p50 {statistics.median(lat) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    out(f"  server memory: {rss_before:.0f} MB before, peak {proc_mb('VmHWM', pid):.0f} MB")


def _big(base: str, key: str, pid: int, size_gb: float, tmp: Path) -> None:
    target = int(size_gb * (1 << 30))
    big = tmp / "big.mp4"
    with big.open("wb") as fh:
        fh.write(CLIP.read_bytes())
        fh.truncate(target)  # zeros after the clip: still a valid (padded) MP4
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "video/mp4", "Content-Length": str(target)}

    def chunks() -> Iterator[bytes]:
        with big.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                yield chunk

    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the server's peak RSS
    tick = time.perf_counter()
    r = httpx2.post(
        f"{base}/recordings", params={"filename": "big.mp4"}, content=chunks(), headers=headers, timeout=600
    )
    wall = time.perf_counter() - tick
    peak = proc_mb("VmHWM", pid)
    out(
        f"\ngateway: one upload of {target / (1 << 30):.1f} GiB: status {r.status_code}, {wall:.1f} s "
        f"({target / 1e6 / wall:.0f} MB/s)"
    )
    out(
        f"  server peak resident memory during it: {peak:.0f} MB (goal: under 300 MB) -> "
        f"{'met' if peak < 300 else 'NOT met'}"
    )
    big.unlink()
    shutil.rmtree(tmp / "data" / "recordings", ignore_errors=True)
