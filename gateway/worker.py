"""Labelling workers: processes that claim jobs from the store and run the pipeline, outside any request.

Each worker loads the models once, then loops: claim a job (a lease in the store), label the recording with
progress written back every second (which also renews the lease), write the label file atomically, mark the job
done or failed. A worker that dies leaves its job ``running`` with a lease that runs out; any worker, in this
server or in a restarted one, then claims it again. A job whose recording was deleted meanwhile is dropped.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.synchronize
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.pipeline import PipelineSettings, Progress, label_recording
from gateway.store import Job, Store, make_engine
from services.classifier.api import Classifier
from services.common import log as logsetup
from services.common.errors import LabelingError, ModelError
from services.common.labelfile import save_label_file
from services.detector.api import Detector, DetectorSettings

if TYPE_CHECKING:
    from services.classifier.onnx import OnnxClassifier
    from services.detector.onnx import OnnxDetector

__all__ = ["WorkerConfig", "WorkerPool", "label_path_for", "process_one", "run_worker"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """What a worker process needs (picklable: it crosses into a spawned process).

    Attributes:
        database_url: The store.
        data_dir: Where recordings and label files live.
        lease_s: How long a claimed job stays this worker's without a heartbeat.
        poll_s: How long to sleep when no job is waiting.
        threads: ONNX Runtime threads per model (None: one per core).
        log_level: Level for the worker's JSON log lines.
        engine: ``local`` (models in the worker process) or ``ray`` (the models as shared Ray actors, so many
            workers, on many machines, feed one detector pool).
        ray_address: The Ray cluster for ``ray`` (None: a local one).
    """

    database_url: str
    data_dir: Path
    lease_s: float = 30.0
    poll_s: float = 0.5
    threads: int | None = None
    log_level: str = "WARNING"
    engine: str = "local"
    ray_address: str | None = None


def label_path_for(recording_id: str, job_id: int) -> str:
    """Where a job's label file goes, relative to the data directory."""
    return f"labels/{recording_id}/job-{job_id}.labels.json"


class _Models:
    """Models by path, loaded once per worker process (or, with the Ray engine, actors found or started once)."""

    def __init__(self, threads: int | None, engine: str = "local", ray_address: str | None = None) -> None:
        self.threads = threads
        self.engine = engine
        self.ray_address = ray_address
        self._detectors: dict[tuple[str, int], OnnxDetector] = {}
        self._classifiers: dict[str, OnnxClassifier] = {}
        self._ray: dict[tuple[str, str, int], Any] = {}

    def get(self, paths: dict[str, str], settings: PipelineSettings) -> tuple[Detector, Classifier]:
        if self.engine == "ray":
            from gateway.ray_engine import RayEngine, RaySettings

            rkey = (paths["detector"], paths["classifier"], settings.detect_batch)
            if rkey not in self._ray:
                self._ray[rkey] = RayEngine(
                    RaySettings(address=self.ray_address, threads=self.threads),
                    Path(paths["detector"]),
                    Path(paths["classifier"]),
                    settings.detect_batch,
                )
            engine = self._ray[rkey]
            return engine.detector, engine.classifier
        # Imported here: the server process (which only holds the pool) never loads ONNX Runtime.
        from services.classifier.onnx import OnnxClassifier
        from services.detector.onnx import OnnxDetector

        key = (paths["detector"], settings.detect_batch)
        if key not in self._detectors:
            self._detectors[key] = OnnxDetector(
                Path(paths["detector"]),
                settings=DetectorSettings(batch_size=settings.detect_batch),
                intra_op_threads=self.threads,
            )
        if paths["classifier"] not in self._classifiers:
            self._classifiers[paths["classifier"]] = OnnxClassifier(
                Path(paths["classifier"]), intra_op_threads=self.threads
            )
        return self._detectors[key], self._classifiers[paths["classifier"]]


class _Cancelled(Exception):
    """The job stopped being this worker's (deleted, or its lease was lost)."""


def process_one(store: Store, config: WorkerConfig, owner: str, job: Job, models: _Models) -> None:
    """Run one claimed job to the end: label file written and job marked, or job marked failed."""
    rec = store.get_recording(job.recording_id)
    if rec is None:
        store.finish_job(job.id, owner, label_path=None, tracks=None, frames=None, error="recording deleted")
        return
    last_beat = 0.0

    def on_progress(event: Progress) -> None:
        nonlocal last_beat
        now = time.monotonic()
        if event.stage != "label" or now - last_beat < 1.0:
            return
        last_beat = now
        if not store.heartbeat(job.id, owner, config.lease_s, event.done, event.total, event.fps):
            raise _Cancelled(f"job {job.id} is no longer this worker's")

    try:
        settings = PipelineSettings.model_validate(job.settings)
        detector, classifier = models.get(job.models, settings)
        labels = label_recording(
            config.data_dir / rec["path"],
            detector,
            classifier,
            settings,
            recording_id=job.recording_id,
            source_name=rec["source_name"],
            on_progress=on_progress,
        )
    except _Cancelled:
        log.warning("job dropped", extra={"job_id": job.id, "recording_id": job.recording_id})
        return
    except (LabelingError, OSError, ValueError) as exc:
        log.warning("job failed", extra={"job_id": job.id, "recording_id": job.recording_id, "error": str(exc)})
        store.finish_job(job.id, owner, label_path=None, tracks=None, frames=None, error=str(exc))
        return
    rel = label_path_for(job.recording_id, job.id)
    target = config.data_dir / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    save_label_file(target, labels)
    if not store.finish_job(
        job.id, owner, label_path=rel, tracks=len(labels.tracks), frames=labels.recording.frame_count, error=None
    ):
        target.unlink(missing_ok=True)  # deleted meanwhile, or another worker took the job over


def run_worker(config: WorkerConfig, stop: threading.Event | multiprocessing.synchronize.Event, name: str) -> None:
    """Claim and run jobs until ``stop`` is set (the body of a worker process)."""
    store = Store(make_engine(config.database_url))
    owner = f"{name}-{os.getpid()}"
    models = _Models(config.threads, config.engine, config.ray_address)
    try:
        while not stop.is_set():
            job = store.claim_job(owner, config.lease_s)
            if job is None:
                stop.wait(config.poll_s)
                continue
            try:
                process_one(store, config, owner, job, models)
            except ModelError as exc:
                store.finish_job(job.id, owner, label_path=None, tracks=None, frames=None, error=str(exc))
    finally:
        store.close()


def _worker_main(config: WorkerConfig, stop: multiprocessing.synchronize.Event, name: str) -> None:
    logsetup.setup(config.log_level)
    run_worker(config, stop, name)


class WorkerPool:
    """N worker processes (spawned, so they share nothing with the server but the store and the data dir)."""

    def __init__(self, config: WorkerConfig, workers: int) -> None:
        self.config = config
        self.workers = workers
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._procs = [
            ctx.Process(target=_worker_main, args=(config, self._stop, f"worker{i}"), daemon=True, name=f"worker{i}")
            for i in range(workers)
        ]

    def start(self) -> None:
        """Start the processes."""
        for proc in self._procs:
            proc.start()

    def alive(self) -> int:
        """How many worker processes are running."""
        return sum(p.is_alive() for p in self._procs)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the workers to stop after their current job's next progress step; kill them after ``timeout_s``."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
