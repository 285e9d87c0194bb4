"""A real ``roadlabel serve`` on loopback: 20 clients uploading at once, and SIGKILL in the middle of a job.

After the kill and a restart the job completes (its lease runs out and a worker claims it again) with a label file
equal to an uninterrupted run's (same recording, models, settings and tracks; only the run's timestamps and
timings differ).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx2
import pytest

from gateway.pipeline import PipelineSettings, label_recording
from services.classifier.models import default_classifier_path
from services.classifier.onnx import OnnxClassifier
from services.common.labelfile import LabelFile
from services.detector.api import DetectorSettings
from services.detector.models import default_detector_path
from services.detector.onnx import OnnxDetector
from tests.synthvideo import SignSpec, drawn_sign, make_road_video, make_tiny_video

REPO = Path(__file__).resolve().parents[2]


def group_gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_key(data_dir: Path, name: str, role: str = "uploader") -> str:
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "keys", "create", name, "--role", role, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    return out.stdout.strip()


@contextmanager
def server(
    data_dir: Path, port: int, workers: int, lease_s: float = 30.0, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "ROADLABEL_LEASE_S": str(lease_s), "ROADLABEL_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "gateway", "serve", "--data-dir", str(data_dir), "--port", str(port)]
    cmd += ["--workers", str(workers)]
    log_path = data_dir.parent / f"server-{port}-{time.monotonic_ns()}.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stderr=log, stdout=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx2.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def test_twenty_clients_upload_at_once(tmp_path):
    data = tmp_path / "data"
    key = create_key(data, "loader")
    port = free_port()
    clips = [make_tiny_video(tmp_path / f"c{i}.mp4", 32 + 2 * i, 32, n_frames=3).path.read_bytes() for i in range(16)]
    bodies = [*clips, b"not a video" * 100, b"", clips[0], b"\x00" * 5000]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "video/mp4"}
    with server(data, port, workers=0) as proc:

        def send(i_body: tuple[int, bytes]) -> int:
            i, body = i_body
            r = httpx2.post(
                f"http://127.0.0.1:{port}/recordings",
                params={"filename": f"../{i}\u00e9.mp4"},
                content=body,
                headers=headers,
                timeout=60,
            )
            assert "error" in r.json() or "id" in r.json()
            return r.status_code

        with ThreadPoolExecutor(20) as pool:
            codes = list(pool.map(send, enumerate(bodies)))
        assert proc.poll() is None
        # Bodies 0 and 18 are the same bytes, sent at once: whichever is stored first gets 201, the other its twin.
        assert sorted([codes[0], codes[18]]) == [200, 201]
        assert codes[1:16] == [201] * 15
        assert [codes[16], codes[17], codes[19]] == [422, 422, 422]
        listed = httpx2.get(f"http://127.0.0.1:{port}/recordings", headers=headers).json()
        assert listed["total"] == 16
    assert len(list((data / "recordings").iterdir())) == 16
    assert list((data / "tmp").iterdir()) == []


def comparable(labels: LabelFile) -> dict[str, object]:
    doc = labels.model_dump(mode="json")
    for volatile in ("created_at", "stats"):
        doc.pop(volatile)
    return doc


def test_sigkill_mid_job_then_restart_completes_the_same_labels(tmp_path):
    crop, roi = drawn_sign(14)
    video = make_road_video(
        tmp_path / "drive.mp4",
        width=640,
        height=360,
        n_frames=90,
        signs=[SignSpec(class_id=14, crop=crop, roi_xyxy=roi, start_frame=0, end_frame=60)],
    )
    data = tmp_path / "data"
    key = create_key(data, "uploader")
    headers = {"Authorization": f"Bearer {key}"}
    port = free_port()
    with server(data, port, workers=1, lease_s=3) as proc:
        rec = httpx2.post(
            f"http://127.0.0.1:{port}/recordings",
            params={"filename": "drive.mp4"},
            content=video.path.read_bytes(),
            headers={**headers, "Content-Type": "video/mp4"},
        ).json()
        url = f"http://127.0.0.1:{port}/recordings/{rec['id']}"
        deadline = time.monotonic() + 90
        while (job := httpx2.get(url, headers=headers).json()["job"])["progress"]["frames_done"] < 10:
            assert job["status"] in ("queued", "running"), job
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its worker, mid-job
        proc.wait()
    assert not (data / "labels" / rec["id"]).exists() or not any((data / "labels" / rec["id"]).iterdir())
    with server(data, port, workers=1, lease_s=3):
        deadline = time.monotonic() + 180
        while (job := httpx2.get(url, headers=headers).json()["job"])["status"] != "done":
            assert job["status"] in ("queued", "running"), job
            assert time.monotonic() < deadline, "the job was not resumed"
            time.sleep(0.5)
        assert job["attempts"] == 2
        served = LabelFile.model_validate(httpx2.get(f"{url}/labels", headers=headers).json())
    settings = PipelineSettings.model_validate(job["settings"])
    direct = label_recording(
        video.path,
        OnnxDetector(default_detector_path(), settings=DetectorSettings(batch_size=settings.detect_batch)),
        OnnxClassifier(default_classifier_path()),
        settings,
        recording_id=rec["id"],
        source_name="drive.mp4",
    )
    assert comparable(served) == comparable(direct)
    assert served.recording.frame_count == 90


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_graceful_stop_takes_the_workers_down(tmp_path, signal_name):
    data = tmp_path / "data"
    create_key(data, "x")
    port = free_port()
    with server(data, port, workers=2) as proc:
        os.kill(proc.pid, getattr(signal, signal_name))  # the server only: it must stop its workers itself
        # uvicorn shuts down, then re-raises the signal it caught, so the exit status names the signal
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM, -signal.SIGINT, 130)
        assert group_gone(proc.pid, timeout_s=15)  # nothing of its process group is left


def test_an_upload_cut_off_mid_way_leaves_nothing_and_the_server_up(tmp_path):
    data = tmp_path / "data"
    key = create_key(data, "cutter")
    port = free_port()
    with server(data, port, workers=0) as proc:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            head = (
                f"POST /recordings?filename=cut.mp4 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                "Content-Type: video/mp4\r\nContent-Length: 1000000\r\n\r\n"
            )
            sock.sendall(head.encode() + b"\x00" * 50_000)  # then the client goes away
        deadline = time.monotonic() + 10
        while any((data / "tmp").iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list((data / "tmp").iterdir()) == []
        assert proc.poll() is None
        listed = httpx2.get(f"http://127.0.0.1:{port}/recordings", headers={"Authorization": f"Bearer {key}"})
        assert listed.json()["total"] == 0
