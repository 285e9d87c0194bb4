"""Scale-out on Ray: the detector and the classifier as separately scalable Ray actors, recordings as Ray tasks.

Each model runs in its own pool of actors (replicas), with its own CPU/GPU resources, and batches requests across
the recordings that call it: an actor collects the frames (or crops) of every request that arrives while it is
busy, or within ``batch_wait_s``, and runs them through the model together, so one GPU detector can serve several
decoders. Recordings are labelled by Ray tasks that decode, track and write the label file where they run and call
the model actors through ``RayDetector`` / ``RayClassifier``, which implement the same ``Detector`` and
``Classifier`` protocols as the in-process backends: the pipeline does not know it runs on Ray, and the same
recording gives the same label file with either engine (the models' outputs do not depend on how frames are
batched; ``tests/integration/test_ray.py`` checks the label files).

Files must be reachable under the same path from every node (a shared file system) in a multi-node cluster; see
``deploy/ray/README.md``. Ray is imported only when an engine is made.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from services.classifier.onnx import OnnxClassifier
from services.common.errors import LabelingError, ServiceUnavailable
from services.common.modelcard import ModelCard
from services.common.types import Detections, Frame
from services.detector.api import DetectorSettings
from services.detector.onnx import OnnxDetector

__all__ = ["RayClassifier", "RayDetector", "RayEngine", "RaySettings"]

log = logging.getLogger(__name__)


class RaySettings(BaseModel):
    """How the models are deployed on Ray.

    Attributes:
        address: ``auto`` or ``ray://host:10001`` or ``host:6379`` of a running cluster; None starts a local one.
        namespace: Ray namespace of the named model actors (several drivers share them).
        detector_replicas: Detector actors.
        detector_num_cpus: CPUs each detector actor reserves.
        detector_num_gpus: GPUs each detector actor reserves (a fraction shares one GPU).
        classifier_replicas: Classifier actors.
        classifier_num_cpus: CPUs each classifier actor reserves.
        classifier_num_gpus: GPUs each classifier actor reserves.
        max_batch_frames: Most frames per detector call, across requests.
        max_batch_crops: Most crops per classifier call, across requests.
        batch_wait_s: How long an idle actor waits for more requests before it runs a batch.
        task_num_cpus: CPUs each recording task (decode, track, write) reserves.
        threads: ONNX Runtime threads per model actor (None: one per reserved CPU).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = None
    namespace: str = "roadlabel"
    detector_replicas: int = Field(1, ge=1)
    detector_num_cpus: float = Field(1.0, ge=0)
    detector_num_gpus: float = Field(0.0, ge=0)
    classifier_replicas: int = Field(1, ge=1)
    classifier_num_cpus: float = Field(0.5, ge=0)
    classifier_num_gpus: float = Field(0.0, ge=0)
    max_batch_frames: int = Field(8, ge=1)
    max_batch_crops: int = Field(256, ge=1)
    batch_wait_s: float = Field(0.005, ge=0)
    task_num_cpus: float = Field(0.5, ge=0)
    threads: int | None = Field(None, ge=1)


class _Batcher:
    """Runs ``fn`` on the concatenation of waiting requests, one batch at a time, off the actor's event loop."""

    def __init__(self, fn: Callable[[list[Any]], list[Any]], max_items: int, wait_s: float) -> None:
        self._fn = fn
        self._max = max_items
        self._wait_s = wait_s
        self._pending: list[tuple[list[Any], asyncio.Future[list[Any]]]] = []
        self._wake: asyncio.Event | None = None
        self._pool = ThreadPoolExecutor(1)
        self.batches: list[int] = []

    async def submit(self, items: list[Any]) -> list[Any]:
        loop = asyncio.get_running_loop()
        if self._wake is None:
            self._wake = asyncio.Event()
            loop.create_task(self._run())
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._pending.append((items, future))
        self._wake.set()
        return await future

    async def _run(self) -> None:
        assert self._wake is not None  # noqa: S101 - set before this task starts
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            if self._wait_s:
                await asyncio.sleep(self._wait_s)
            take: list[tuple[list[Any], asyncio.Future[list[Any]]]] = []
            count = 0
            while self._pending and (not take or count + len(self._pending[0][0]) <= self._max):
                items, future = self._pending.pop(0)
                take.append((items, future))
                count += len(items)
            if not self._pending:
                self._wake.clear()
            flat = [x for items, _ in take for x in items]
            self.batches.append(len(flat))
            try:
                results = await loop.run_in_executor(self._pool, self._fn, flat)
            except Exception as exc:  # noqa: BLE001 - handed to every caller of this batch
                for _, future in take:
                    future.set_exception(exc)
                continue
            start = 0
            for items, future in take:
                future.set_result(results[start : start + len(items)])
                start += len(items)


class _DetectorService:
    """A detector replica (a Ray actor)."""

    def __init__(self, model_path: str, batch_size: int, max_batch: int, wait_s: float, threads: int | None) -> None:
        self._model = OnnxDetector(
            Path(model_path), settings=DetectorSettings(batch_size=batch_size), intra_op_threads=threads
        )
        self._batcher = _Batcher(self._model.detect, max_batch, wait_s)

    def card(self) -> ModelCard:
        return self._model.card

    async def detect(self, frames: list[Frame]) -> list[Detections]:
        return await self._batcher.submit(frames)

    def batch_sizes(self) -> list[int]:
        return list(self._batcher.batches)


class _ClassifierService:
    """A classifier replica (a Ray actor)."""

    def __init__(self, model_path: str, max_batch: int, wait_s: float, threads: int | None) -> None:
        self._model = OnnxClassifier(Path(model_path), intra_op_threads=threads)
        self._batcher = _Batcher(self._rows, max_batch, wait_s)

    def _rows(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        return list(self._model.classify(crops))

    def card(self) -> ModelCard:
        return self._model.card

    async def classify(self, crops: list[np.ndarray]) -> np.ndarray:
        rows = await self._batcher.submit(crops)
        return np.stack(rows) if rows else np.zeros((0, self._model.card.num_outputs), np.float32)

    def batch_sizes(self) -> list[int]:
        return list(self._batcher.batches)


def _call(ref: Any) -> Any:
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as exc:
        cause = exc.as_instanceof_cause()  # type: ignore[no-untyped-call]
        if isinstance(cause, LabelingError):
            raise cause from exc
        raise
    except (ActorDiedError, ActorUnavailableError) as exc:
        raise ServiceUnavailable(f"model actor: expected a live replica, got {type(exc).__name__}: {exc}") from exc


class _ReplicaPool:
    """A pool of model actors with the model's card, calling one replica (picklable: it travels into Ray tasks)."""

    def __init__(self, handles: Sequence[Any], card: ModelCard, replica: int = 0) -> None:
        self._handles = list(handles)
        self._card = card
        self._replica = replica

    @property
    def card(self) -> ModelCard:
        return self._card

    def pinned(self, replica: int) -> Self:
        """The same pool, calling replica ``replica % len(pool)`` (one recording sticks to one replica)."""
        return type(self)(self._handles, self._card, replica % len(self._handles))

    @property
    def _actor(self) -> Any:
        return self._handles[self._replica]


class RayDetector(_ReplicaPool):
    """The ``Detector`` protocol over a pool of detector actors."""

    def detect(self, frames: Sequence[Frame]) -> list[Detections]:
        result: list[Detections] = _call(self._actor.detect.remote(list(frames)))
        return result


class RayClassifier(_ReplicaPool):
    """The ``Classifier`` protocol over a pool of classifier actors."""

    def classify(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        result: np.ndarray = _call(self._actor.classify.remote(list(crops)))
        return result


class RayEngine:
    """Connects to (or starts) Ray, deploys the model actors once, and runs work as Ray tasks."""

    def __init__(self, settings: RaySettings, detector_path: Path, classifier_path: Path, detect_batch: int) -> None:
        import ray

        self.settings = settings
        if not ray.is_initialized():
            ray.init(
                address=settings.address,
                namespace=settings.namespace,
                include_dashboard=False,
                log_to_driver=False,
                ignore_reinit_error=True,
            )
        s = settings
        det_cls = ray.remote(_DetectorService)
        cls_cls = ray.remote(_ClassifierService)
        # Named actors, fetched if they exist: several drivers (batch commands, gateway workers) share one pool.
        tag = f"{detector_path.stem}-{detect_batch}"
        self._det_handles: list[Any] = [
            det_cls.options(
                name=f"detector-{tag}-{i}",
                get_if_exists=True,
                lifetime="detached" if s.address else None,
                num_cpus=s.detector_num_cpus,
                num_gpus=s.detector_num_gpus,
                max_concurrency=64,
            ).remote(str(detector_path), detect_batch, s.max_batch_frames, s.batch_wait_s, s.threads)
            for i in range(s.detector_replicas)
        ]
        self._cls_handles: list[Any] = [
            cls_cls.options(
                name=f"classifier-{classifier_path.stem}-{i}",
                get_if_exists=True,
                lifetime="detached" if s.address else None,
                num_cpus=s.classifier_num_cpus,
                num_gpus=s.classifier_num_gpus,
                max_concurrency=64,
            ).remote(str(classifier_path), s.max_batch_crops, s.batch_wait_s, s.threads)
            for i in range(s.classifier_replicas)
        ]
        self.detector = RayDetector(self._det_handles, _call(self._det_handles[0].card.remote()))
        self.classifier = RayClassifier(self._cls_handles, _call(self._cls_handles[0].card.remote()))
        self._remote_cache: dict[Any, Any] = {}
        self._counter = itertools.count()

    def batch_sizes(self) -> dict[str, list[int]]:
        """The batch sizes each model pool has run (for tests and benchmarks)."""
        return {
            "detector": [n for h in self._det_handles for n in _call(h.batch_sizes.remote())],
            "classifier": [n for h in self._cls_handles for n in _call(h.batch_sizes.remote())],
        }

    def map_unordered(self, fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]]) -> Iterator[tuple[int, Any]]:
        """Run ``fn(detector, classifier, *args)`` for each args tuple as a Ray task; yield (index, result) as they
        finish. Each task gets the model pools pinned to one replica each, round robin."""
        import ray

        remote = self._remote_cache.get(fn)
        if remote is None:
            remote = ray.remote(num_cpus=self.settings.task_num_cpus)(fn)
            self._remote_cache[fn] = remote
        refs = {}
        for index, args in enumerate(calls):
            n = next(self._counter)
            ref = remote.remote(self.detector.pinned(n), self.classifier.pinned(n), *args)
            refs[ref] = index
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield refs[done[0]], _call(done[0])

    def shutdown(self) -> None:
        """Leave the cluster (a local one started here stops; detached actors on a real cluster stay up)."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
