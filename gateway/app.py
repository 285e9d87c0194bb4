"""The HTTP gateway: upload recordings, follow their labelling jobs, fetch label files and exports.

``create_app(settings)`` builds the FastAPI app; ``roadlabel serve`` runs it with uvicorn. Uploads stream to disk
(never whole in memory), are hashed on the way, and are checked to be decodable video before they are accepted;
the same bytes uploaded twice are recognised. Jobs run in worker processes (``gateway.worker``), never in a request.
Every request needs an API key (``Authorization: Bearer rl_...``, created with ``roadlabel keys create``). Errors
are JSON ``{"error": {"code": "...", "message": "..."}}`` with a stable code.

No path from a client reaches the file system: stored files are named by server-made ids, the client's file name
is kept only as text, and models are chosen by name from the models directory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import numpy as np
from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.exports import export_labels
from gateway.pipeline import PipelineSettings, file_sha256
from gateway.review_cache import ReviewedCache
from gateway.store import ApiKey, DuplicateRecording, Job, Store, open_store
from gateway.worker import WorkerConfig, WorkerPool
from services.classifier.tracks import review_priority
from services.common.errors import InputError, ModelError, UnreadableVideo
from services.common.labelfile import CropRef, LabelFile, ReviewAction, Track, apply_review
from services.common.registry import Registry
from services.decode.reader import DecodeSettings, VideoReader, read_frame_at, read_frames_at

__all__ = ["ApiError", "GatewaySettings", "create_app"]

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".ts", ".mts")
_CHUNK = 1 << 20
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_REVIEW_ATTEMPTS = 5  # a decision is checked again this many times while others keep arriving


class GatewaySettings(BaseSettings):
    """The gateway's settings (environment variables ``ROADLABEL_*``, or arguments of ``roadlabel serve``).

    Attributes:
        data_dir: Recordings, label files and (by default) the SQLite database live here.
        database_url: ``sqlite:///...`` (default: ``data_dir/roadlabel.db``) or ``postgresql+psycopg://...``.
        workers: Labelling worker processes started with the server (0: none, another process runs them).
        max_upload_bytes: Largest recording accepted.
        models_dir: Where model names (``detector``, ``classifier`` or others) are looked up as ``NAME.onnx``.
        detector_model: Default detector name.
        classifier_model: Default classifier name.
        registry: Model registry folder (``ROADLABEL_REGISTRY``; default ``data_dir/models``), seeded from
            ``models_dir`` on first use. The default names (``detector``, ``classifier``) resolve to the promoted
            version when a job is created; ``TASK@VERSION`` names a registered version.
        use_registry: False: model names are only looked up in ``models_dir`` (the registry is not used).
        lease_s: How long a job stays a worker's without a heartbeat (a killed worker's job is retried after it).
        threads: ONNX Runtime threads per model in each worker (None: one per core).
        engine: ``local``: each worker loads the models; ``ray``: workers call the models as shared Ray actors.
        ray_address: Ray cluster for the ``ray`` engine (None: a local one).
        auto_accept: New jobs accept without review the tracks the classifier is sure of (its card's
            ``auto_accept_threshold``; see ``PipelineSettings.auto_accept``). ``ROADLABEL_AUTO_ACCEPT=0`` sends
            every track to a reviewer.
    """

    model_config = SettingsConfigDict(env_prefix="ROADLABEL_", extra="forbid", frozen=True)

    data_dir: Path = Path("data")
    database_url: str | None = None
    workers: int = Field(1, ge=0, le=64)
    max_upload_bytes: int = Field(64 << 30, ge=1)
    models_dir: Path = Path(__file__).resolve().parents[1] / "deploy" / "models"
    detector_model: str = "detector"
    classifier_model: str = "classifier"
    registry: Path | None = None
    use_registry: bool = True
    lease_s: float = Field(30.0, gt=0)
    threads: int | None = Field(None, ge=1)
    log_level: str = "WARNING"
    engine: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    auto_accept: bool = True

    def resolved_database_url(self) -> str:
        """The database URL, defaulting to SQLite in the data directory."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'roadlabel.db').resolve()}"


class ApiError(Exception):
    """An error answer: HTTP status, a stable machine-readable code, and a message for people."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


class ErrorBody(BaseModel):
    """The body of every error answer."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"error": {"code": "not_found", "message": "recording 'x1': no such recording"}}]
        }
    )

    error: dict[str, str]


class Progress(BaseModel):
    """A job's progress."""

    frames_done: int
    frames_total: int | None
    fps: float
    eta_s: float | None


class JobOut(BaseModel):
    """A labelling job."""

    id: int
    status: str
    attempts: int
    progress: Progress
    tracks: int | None
    error: str | None
    settings: dict[str, Any]
    models: dict[str, str]
    created_at: str
    started_at: str | None
    finished_at: str | None


class RecordingOut(BaseModel):
    """A recording and its current job."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "3f9c2a1b7d4e8f60",
                    "source_name": "drive.mp4",
                    "sha256": "2d8e14b46fe89afbc8ad1f718685cf09b83e85a324095031c38186a9f0535417",
                    "size_bytes": 2641803,
                    "status": "running",
                    "created_by": "uploader-1",
                    "created_at": "2026-11-21T23:40:00+00:00",
                    "job": {
                        "id": 1,
                        "status": "running",
                        "attempts": 1,
                        "progress": {"frames_done": 120, "frames_total": 221, "fps": 13.5, "eta_s": 7.5},
                        "tracks": None,
                        "error": None,
                        "settings": {"detect_every": 1},
                        "models": {"detector": "detector", "classifier": "classifier"},
                        "created_at": "2026-11-21T23:40:00+00:00",
                        "started_at": "2026-11-21T23:40:01+00:00",
                        "finished_at": None,
                    },
                    "duplicate": False,
                }
            ]
        }
    )

    id: str
    source_name: str
    sha256: str
    size_bytes: int
    status: str
    created_by: str
    created_at: str
    job: JobOut | None
    duplicate: bool = False


class RecordingList(BaseModel):
    """A page of recordings, newest first."""

    total: int
    items: list[RecordingOut]


class RerunIn(BaseModel):
    """Label a stored recording again, with other settings or models."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"settings": {"detect_every": 3}, "detector": "detector"}]},
    )

    settings: dict[str, Any] = Field(default_factory=dict)
    detector: str | None = None
    classifier: str | None = None


class ReviewActionIn(BaseModel):
    """A reviewer decision (``services.common.labelfile.ReviewAction`` without who and when, which the server adds)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"action": "accept", "track_id": 3},
                {"action": "relabel", "track_id": 4, "class_id": 2},
                {"action": "merge", "track_id": 5, "other_track_id": 6},
                {"action": "split", "track_id": 7, "frame": 120},
                {"action": "accept_above", "threshold": 0.97},
            ]
        },
    )

    action: Literal["accept", "reject", "relabel", "merge", "split", "accept_above"]
    track_id: int | None = None
    other_track_id: int | None = None
    class_id: int | None = None
    frame: int | None = None
    threshold: float | None = None


class QueueItem(BaseModel):
    """A track as the review queue shows it."""

    track_id: int
    class_id: int
    class_name: str
    confidence: float
    crop_agreement: float
    uncertain: bool
    uncertainty: list[str]
    top_classes: list[dict[str, Any]]
    first_frame: int
    last_frame: int
    start_s: float
    end_s: float
    boxes: int
    review: dict[str, Any]


class ReviewState(BaseModel):
    """Where the review of a recording's current label file stands."""

    recording_id: str
    job_id: int
    tracks: int
    pending: int
    decided: int
    reviewed: bool
    model_right: int
    auto_accepted: int = Field(0, description="tracks accepted without review (the classifier's auto-accept threshold)")
    decisions: int
    time_spent_s: float
    accept_above_preview: dict[str, float | int] | None
    queue: list[QueueItem]


def _jpeg(image: Any, max_w: int) -> bytes:
    """An RGB image as JPEG, scaled down to ``max_w`` pixels wide at most."""
    import io

    from PIL import Image

    pil = Image.fromarray(image)
    if pil.width > max_w:
        pil = pil.resize((max_w, max(1, round(pil.height * max_w / pil.width))), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def review_order(track: Track) -> tuple[bool, float, float, int]:
    """The review queue's order: undecided first; among them the most doubtful first, where doubt combines a low
    calibrated confidence and crops that disagree (``confidence * crop_agreement``)."""
    priority = review_priority(track.confidence, track.crop_agreement)
    return (track.review.status != "pending", priority, track.confidence, track.track_id)


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat()


def _job_out(job: Job, model_names: dict[str, str] | None = None) -> JobOut:
    eta = None
    if job.status == "running" and job.frames_total and job.fps > 0:
        eta = max(job.frames_total - job.frames_done, 0) / job.fps
    return JobOut(
        id=job.id,
        status=job.status,
        attempts=job.attempts,
        progress=Progress(frames_done=job.frames_done, frames_total=job.frames_total, fps=job.fps, eta_s=eta),
        tracks=job.tracks,
        error=job.error,
        settings=job.settings,
        models=model_names or {k: Path(v).stem for k, v in job.models.items()},
        created_at=job.created_at.isoformat(),
        started_at=_iso(job.started_at),
        finished_at=_iso(job.finished_at),
    )


def _recording_out(rec: dict[str, Any], duplicate: bool = False) -> RecordingOut:
    job = rec.get("job")
    return RecordingOut(
        id=rec["id"],
        source_name=rec["source_name"],
        sha256=rec["sha256"],
        size_bytes=rec["size_bytes"],
        status=rec["status"],
        created_by=rec["created_by"],
        created_at=rec["created_at"].isoformat(),
        job=None if job is None else _job_out(job),
        duplicate=duplicate,
    )


def safe_source_name(raw: str | None) -> str:
    """A client's file name as text to show: its last path part, printable, at most 200 characters.

    It is never used to build a path; stored files are named by server-made ids.
    """
    name = unicodedata.normalize("NFC", raw or "")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable() and ch not in "\x00")
    name = name.strip().lstrip(".")
    return (name or "recording")[:200]


def _suffix(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return suffix if suffix in VIDEO_SUFFIXES else ".video"


class _Gateway:
    """What the routes share: settings, store, directories."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.resolve()
        for sub in ("recordings", "labels", "tmp", "uploads"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        self.store: Store = open_store(settings.resolved_database_url())
        self.default_settings = PipelineSettings(auto_accept=settings.auto_accept)
        self.url_secret = _url_secret(self.data_dir / "url-secret")
        self.reviewed = ReviewedCache()
        self._crops: OrderedDict[tuple[int, int, tuple[float, ...]], Future[list[bytes]]] = OrderedDict()
        self._crops_lock = threading.Lock()

    def track_crops(
        self, key: tuple[int, int, tuple[float, ...]], video: Path, crops: tuple[CropRef, ...], margin: float
    ) -> list[bytes]:
        """JPEGs of a track's best crops, cut from the video once per track and kept for the latest tracks."""
        with self._crops_lock:
            pending = self._crops.get(key)
            if pending is None:
                pending = self._crops[key] = Future()
                owner = True
                while len(self._crops) > 64:
                    self._crops.popitem(last=False)
            else:
                owner = False
                self._crops.move_to_end(key)
        if owner:
            try:
                from gateway.two_stage import crop_boxes

                frames = read_frames_at(video, [c.t_s for c in crops])
                out = []
                for crop, (_when, image) in zip(crops, frames, strict=True):
                    x1, y1, x2, y2 = crop_boxes(np.asarray([crop.xyxy]), margin, image.shape[:2])[0].tolist()
                    out.append(_jpeg(image[y1:y2, x1:x2], 256))
                pending.set_result(out)
            except BaseException as exc:  # noqa: BLE001 - handed to every waiter, re-raised below
                pending.set_exception(exc)
                with self._crops_lock:
                    self._crops.pop(key, None)
        try:
            return pending.result()
        except UnreadableVideo as exc:
            raise ApiError(404, "no_frame", f"crop: {exc}") from exc

    def sign(self, recording_id: str, expires: int) -> str:
        """A signature for a video URL: a ``<video>`` element cannot send the Authorization header."""
        import hmac

        message = f"{recording_id}:{expires}".encode()
        return hmac.new(self.url_secret, message, hashlib.sha256).hexdigest()

    def model_path(self, name: str, kind: str) -> str:
        if self.settings.use_registry and (name == kind or name.startswith(f"{kind}@")):
            # The registry: the promoted version for the default name, or the named version. Resolved now, so a
            # later promotion affects new jobs only.
            try:
                registry = Registry(self.settings.registry or self.data_dir / "models")
                registry.seed(self.settings.models_dir)
                return str(registry.resolve(name))
            except (InputError, ModelError) as exc:
                raise ApiError(422, "unknown_model", f"{kind}: {exc}") from exc
        if not _MODEL_NAME.fullmatch(name):
            raise ApiError(422, "bad_model", f"{kind}: expected a model name (letters, digits, _ . -), got {name!r}")
        path = (self.settings.models_dir / f"{name}.onnx").resolve()
        if path.parent != self.settings.models_dir.resolve() or not path.is_file():
            raise ApiError(422, "unknown_model", f"{kind}: expected a model in the models directory, got {name!r}")
        return str(path)

    def models(self, detector: str | None = None, classifier: str | None = None) -> dict[str, str]:
        return {
            "detector": self.model_path(detector or self.settings.detector_model, "detector"),
            "classifier": self.model_path(classifier or self.settings.classifier_model, "classifier"),
        }

    def recording(self, recording_id: str) -> dict[str, Any]:
        rec = self.store.get_recording(recording_id) if len(recording_id) <= 32 else None
        if rec is None:
            raise ApiError(404, "not_found", f"recording {recording_id[:40]!r}: no such recording")
        return rec

    async def accept(self, part: Path, source_name: str, sha256: str, size: int, key: ApiKey) -> RecordingOut:
        """Check a fully received file is video, then store it and queue its job (or find its twin)."""
        try:
            await anyio.to_thread.run_sync(_probe, part)
        except UnreadableVideo as exc:
            part.unlink(missing_ok=True)
            message = str(exc).replace(str(part), source_name).replace(part.name, source_name)
            raise ApiError(422, "not_a_video", message) from exc
        twin = self.store.find_by_sha256(sha256)
        if twin is not None:
            part.unlink(missing_ok=True)
            return _recording_out(self.store.get_recording(twin["id"]) or twin, duplicate=True)
        # Resolving the models checks their files' sha256 (tens of ms): off the event loop, and before the upload
        # moves, so that a model error leaves nothing behind.
        models = await anyio.to_thread.run_sync(self.models)
        recording_id = secrets.token_hex(8)
        rel = f"recordings/{recording_id}{_suffix(source_name)}"
        os.replace(part, self.data_dir / rel)
        try:
            self.store.add_recording(
                recording_id=recording_id,
                sha256=sha256,
                source_name=source_name,
                size_bytes=size,
                path=rel,
                created_by=key.name,
                settings=self.default_settings.model_dump(mode="json"),
                models=models,
            )
        except BaseException as exc:
            (self.data_dir / rel).unlink(missing_ok=True)  # no row names the file: it is not stored
            if not isinstance(exc, DuplicateRecording):
                raise
            # The same bytes, stored by another gateway sharing the database.
            twin = self.store.get_recording(exc.recording_id)
            if twin is None:
                raise ApiError(409, "conflict", "these bytes were stored and deleted meanwhile; upload again") from exc
            return _recording_out(twin, duplicate=True)
        rec = self.store.get_recording(recording_id)
        assert rec is not None  # noqa: S101 - just written
        return _recording_out(rec)


def _url_secret(path: Path) -> bytes:
    """This data directory's key for signed URLs (made once, readable by the server's user only)."""
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        secret = secrets.token_bytes(32)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secret.hex())
        os.replace(tmp, path)
        return secret


def _probe(path: Path) -> None:
    with VideoReader(path, "probe", DecodeSettings()):
        pass


async def _receive(
    request: Request, target: Path, digest: Any, limit: int, append: bool = False
) -> int:  # hashlib object
    """Stream the request body to ``target`` (appending when asked), hashing it; returns the bytes written.

    Raises:
        ApiError: 413 when more than ``limit`` bytes arrive.
    """
    written = 0
    buffer = bytearray()
    with target.open("ab" if append else "wb") as fh:
        async for chunk in request.stream():
            buffer += chunk
            written += len(chunk)
            if written > limit:
                raise ApiError(413, "too_large", f"upload: expected at most {limit} bytes, got more")
            if len(buffer) >= _CHUNK:
                data = bytes(buffer)
                buffer.clear()
                await anyio.to_thread.run_sync(_write, fh, digest, data)
        if buffer:
            await anyio.to_thread.run_sync(_write, fh, digest, bytes(buffer))
        fh.flush()
        os.fsync(fh.fileno())
    return written


def _write(fh: Any, digest: Any, data: bytes) -> None:
    fh.write(data)
    if digest is not None:
        digest.update(data)


async def _auth(request: Request, authorization: Annotated[str | None, Header()] = None) -> ApiKey:
    if not authorization or not authorization.startswith("Bearer "):
        raise ApiError(
            401, "unauthorized", "expected an Authorization: Bearer <key> header", {"WWW-Authenticate": "Bearer"}
        )
    gw: _Gateway = request.app.state.gateway
    key = await anyio.to_thread.run_sync(gw.store.check_api_key, authorization[7:].strip())
    if key is None:
        raise ApiError(401, "unauthorized", "API key not valid (unknown or revoked)", {"WWW-Authenticate": "Bearer"})
    return key


def _role(*allowed: str) -> Callable[[ApiKey], Awaitable[ApiKey]]:
    async def check(key: Annotated[ApiKey, Depends(_auth)]) -> ApiKey:
        if key.role not in allowed and key.role != "admin":
            raise ApiError(403, "forbidden", f"this needs a {' or '.join(allowed)} key; {key.name!r} is a {key.role}")
        return key

    return check


UploaderKey = Annotated[ApiKey, Depends(_role("uploader"))]
"""An uploader's (or admin's) key."""
ReaderKey = Annotated[ApiKey, Depends(_role("uploader", "reviewer"))]
"""Any valid key."""
ReviewerKey = Annotated[ApiKey, Depends(_role("reviewer"))]
"""A reviewer's (or admin's) key."""


def create_app(settings: GatewaySettings, *, start_workers: bool = True) -> FastAPI:  # noqa: C901 - the route table
    """The gateway app; ``start_workers`` False leaves the jobs to workers started elsewhere (tests, Ray)."""
    gw = _Gateway(settings)
    pool: WorkerPool | None = None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        nonlocal pool
        if start_workers and settings.workers:
            pool = WorkerPool(
                WorkerConfig(
                    database_url=settings.resolved_database_url(),
                    data_dir=gw.data_dir,
                    lease_s=settings.lease_s,
                    threads=settings.threads,
                    log_level=settings.log_level,
                    engine=settings.engine,
                    ray_address=settings.ray_address,
                ),
                settings.workers,
            )
            pool.start()
        try:
            yield
        finally:
            if pool is not None:
                await anyio.to_thread.run_sync(pool.stop)
            gw.store.close()

    app = FastAPI(
        title="roadlabel gateway",
        version="1",
        description=__doc__,
        lifespan=lifespan,
        responses={401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 422: {"model": ErrorBody}},
    )
    app.state.gateway = gw

    def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(InputError)
    async def _input_error(_request: Request, exc: InputError) -> JSONResponse:
        return error(422, "bad_input", str(exc))

    @app.exception_handler(SQLAlchemyError)
    async def _db_error(_request: Request, exc: SQLAlchemyError) -> JSONResponse:
        log.error("database error", extra={"error": str(exc).splitlines()[0]})
        return error(503, "store_unavailable", "the metadata store is unavailable; retry later")

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(422, "invalid_request", f"{where}: {first.get('msg')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))

    from fastapi.responses import RedirectResponse
    from fastapi.staticfiles import StaticFiles

    from gateway.review import STATIC_DIR

    app.mount("/ui", StaticFiles(directory=STATIC_DIR, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        """The reviewer page."""
        return RedirectResponse("/ui/")

    @app.get("/healthz", tags=["meta"])
    async def healthz() -> dict[str, Any]:
        """Liveness: the server answers and how many workers it runs."""
        return {"ok": True, "workers": pool.alive() if pool is not None else 0}

    @app.post(
        "/recordings",
        status_code=201,
        response_model=RecordingOut,
        tags=["recordings"],
        responses={
            200: {"model": RecordingOut, "description": "the same bytes were uploaded before"},
            413: {},
            415: {},
        },
    )
    async def upload(
        request: Request,
        response: Response,
        key: UploaderKey,
        filename: Annotated[str | None, Query(max_length=1024, description="the recording's file name")] = None,
        content_type: Annotated[str | None, Header()] = None,
        content_length: Annotated[int | None, Header()] = None,
        x_filename: Annotated[str | None, Header()] = None,
    ) -> RecordingOut:
        """Upload a recording as the raw request body (``curl --data-binary @drive.mp4``); it is labelled in the
        background. For large files over unreliable links use the resumable ``/uploads`` (tus 1.0.0)."""
        ctype = (content_type or "").split(";")[0].strip().lower()
        if not (ctype.startswith("video/") or ctype == "application/octet-stream"):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"Content-Type: expected video/* or application/octet-stream, got {ctype or 'none'!r}",
            )
        limit = settings.max_upload_bytes
        if content_length is not None and content_length > limit:
            raise ApiError(413, "too_large", f"upload: expected at most {limit} bytes, got {content_length}")
        source = safe_source_name(filename or x_filename)
        part = gw.data_dir / "tmp" / f"{secrets.token_hex(8)}.part"
        digest = hashlib.sha256()
        try:
            size = await _receive(request, part, digest, limit)
            if size == 0:
                raise ApiError(422, "empty", "upload: expected a video file, got 0 bytes")
            if content_length is not None and size != content_length:
                raise ApiError(400, "incomplete", f"upload: expected {content_length} bytes, got {size}")
            out = await gw.accept(part, source, digest.hexdigest(), size, key)
        finally:
            part.unlink(missing_ok=True)
        if out.duplicate:
            response.status_code = 200
        response.headers["Location"] = f"/recordings/{out.id}"
        return out

    @app.get("/recordings", response_model=RecordingList, tags=["recordings"])
    async def list_recordings(
        _key: ReaderKey,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> RecordingList:
        """Recordings, newest first, with their status and progress."""
        items, total = await anyio.to_thread.run_sync(lambda: gw.store.list_recordings(limit=limit, offset=offset))
        return RecordingList(total=total, items=[_recording_out(r) for r in items])

    @app.get("/recordings/{recording_id}", response_model=RecordingOut, tags=["recordings"])
    async def get_recording(recording_id: str, _key: ReaderKey) -> RecordingOut:
        """Status and progress (frames done/total, frames/s, ETA) and errors of a recording's current job."""
        return _recording_out(gw.recording(recording_id))

    @app.get("/recordings/{recording_id}/jobs", response_model=list[JobOut], tags=["recordings"])
    async def list_jobs(recording_id: str, _key: ReaderKey) -> list[JobOut]:
        """Every labelling job of a recording, oldest first."""
        gw.recording(recording_id)
        return [_job_out(j) for j in gw.store.jobs_of(recording_id)]

    def labelled(recording_id: str) -> tuple[dict[str, Any], Job, Path]:
        """The recording, its current (finished) job and that job's label file; 409 when not labelled yet."""
        rec = gw.recording(recording_id)
        job: Job | None = rec["job"]
        if job is None or job.status != "done" or job.label_path is None:
            status = rec["status"]
            detail = f" ({job.error})" if job is not None and job.error else ""
            raise ApiError(
                409, "not_labelled", f"recording {recording_id!r}: not labelled yet, status {status}{detail}"
            )
        return rec, job, gw.data_dir / job.label_path

    @app.get(
        "/recordings/{recording_id}/labels",
        tags=["recordings"],
        responses={
            200: {"content": {"application/json": {}}, "description": "the label file (docs/label-file.schema.json)"},
            409: {"model": ErrorBody},
        },
    )
    async def get_labels(
        recording_id: str, _key: ReaderKey, view: Annotated[Literal["reviewed", "machine"], Query()] = "reviewed"
    ) -> Response:
        """The label file of the recording's current job: with the reviewers' decisions applied (``reviewed``, the
        default), or as the machine wrote it (``machine``)."""
        if view == "machine":
            return FileResponse(labelled(recording_id)[2], media_type="application/json")
        _rec, _job, labels, _actions = await anyio.to_thread.run_sync(reviewed, recording_id)
        return Response(labels.model_dump_json(indent=1), media_type="application/json")

    @app.get("/recordings/{recording_id}/export", tags=["recordings"], responses={409: {"model": ErrorBody}})
    async def export(
        recording_id: str,
        _key: ReaderKey,
        format: Annotated[Literal["cvat-video", "mot", "label-studio"], Query()],  # noqa: A002 - the API's name
    ) -> Response:
        """The labels, with the reviewers' decisions, as CVAT for video 1.1 XML, MOTChallenge (zip) or Label Studio
        predictions JSON."""
        _rec, _job, labels, _actions = await anyio.to_thread.run_sync(reviewed, recording_id)
        with tempfile.TemporaryDirectory(dir=gw.data_dir / "tmp") as tmp:
            name = {"cvat-video": "labels.xml", "mot": "labels.zip", "label-studio": "labels.json"}[format]
            await anyio.to_thread.run_sync(lambda: export_labels(labels, format, Path(tmp) / name))
            body = (Path(tmp) / name).read_bytes()
        media = {"cvat-video": "application/xml", "mot": "application/zip", "label-studio": "application/json"}[format]
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(labels.recording.source).stem)[:80] or recording_id
        ext = Path(name).suffix
        return Response(
            body, media_type=media, headers={"Content-Disposition": f'attachment; filename="{stem}.{format}{ext}"'}
        )

    @app.delete("/recordings/{recording_id}", status_code=204, tags=["recordings"])
    async def delete(recording_id: str, key: UploaderKey) -> Response:
        """Delete a recording, its label files and exports; its jobs are cancelled."""
        if len(recording_id) > 32:
            raise ApiError(404, "not_found", f"recording {recording_id[:40]!r}: no such recording")
        rec = gw.store.delete_recording(recording_id, key.name)
        if rec is None:
            raise ApiError(404, "not_found", f"recording {recording_id!r}: no such recording")
        (gw.data_dir / rec["path"]).unlink(missing_ok=True)
        shutil.rmtree(gw.data_dir / "labels" / recording_id, ignore_errors=True)
        return Response(status_code=204)

    @app.post("/recordings/{recording_id}/jobs", status_code=202, response_model=RecordingOut, tags=["recordings"])
    async def rerun(recording_id: str, body: RerunIn, key: UploaderKey) -> RecordingOut:
        """Label a stored recording again with other settings or models; the new job becomes its current one."""
        gw.recording(recording_id)
        try:
            merged = PipelineSettings.model_validate({**gw.default_settings.model_dump(mode="json"), **body.settings})
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ApiError(422, "bad_settings", f"settings.{'.'.join(map(str, first['loc']))}: {first['msg']}") from exc
        models = await anyio.to_thread.run_sync(gw.models, body.detector, body.classifier)
        gw.store.queue_job(recording_id, merged.model_dump(mode="json"), models, key.name)
        return _recording_out(gw.recording(recording_id))

    # -- review ---------------------------------------------------------------------------------------------------

    def reviewed(recording_id: str) -> tuple[dict[str, Any], Job, LabelFile, list[dict[str, Any]]]:
        rec, job, path = labelled(recording_id)
        actions = gw.store.review_actions_of(job.id)
        return rec, job, gw.reviewed.reviewed(path, actions), actions

    def state(recording_id: str, preview: float | None = None) -> Response:
        """The review state as JSON (the ``ReviewState`` schema). Built as plain dicts: on a 2-hour recording the
        queue holds thousands of tracks, and validating each as a model again on every decision costs more than
        the decision itself; the unit tests check the output against ``ReviewState``."""
        _rec, job, labels, actions = reviewed(recording_id)
        tracks = labels.tracks
        pending = sum(t.review.status == "pending" for t in tracks)
        spent = (actions[-1]["at"] - actions[0]["at"]).total_seconds() if len(actions) > 1 else 0.0
        preview_out = None
        if preview is not None:
            n = sum(t.review.status == "pending" and t.class_id >= 0 and t.confidence >= preview for t in tracks)
            preview_out = {"threshold": preview, "tracks": n}
        body = {
            "recording_id": recording_id,
            "job_id": job.id,
            "tracks": len(tracks),
            "pending": pending,
            "decided": len(tracks) - pending,
            "reviewed": bool(tracks) and pending == 0,
            "model_right": sum(t.review.status == "accepted" for t in tracks),
            "auto_accepted": sum(
                t.review.status == "accepted" and (t.review.by or "").startswith("auto:") for t in tracks
            ),
            "decisions": len(actions),
            "time_spent_s": spent,
            "accept_above_preview": preview_out,
            "queue": [
                {
                    "track_id": t.track_id,
                    "class_id": t.class_id,
                    "class_name": t.class_name,
                    "confidence": t.confidence,
                    "crop_agreement": t.crop_agreement,
                    "uncertain": t.uncertain,
                    "uncertainty": list(t.uncertainty),
                    "top_classes": [
                        {"class_id": c.class_id, "class_name": c.class_name, "p": c.p} for c in t.top_classes
                    ],
                    "first_frame": t.first_frame,
                    "last_frame": t.last_frame,
                    "start_s": t.start_s,
                    "end_s": t.end_s,
                    "boxes": len(t.boxes),
                    "review": t.review.model_dump(mode="json"),
                }
                for t in sorted(tracks, key=review_order)
            ],
        }
        return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")

    @app.get("/recordings/{recording_id}/review", response_model=ReviewState, tags=["review"])
    async def get_review(
        recording_id: str,
        _key: ReaderKey,
        preview_accept_above: Annotated[float | None, Query(ge=0, le=1)] = None,
    ) -> Response:
        """The review queue (undecided and least confident first), counts, and optionally how many tracks
        "accept all above X" would accept."""
        return await anyio.to_thread.run_sync(lambda: state(recording_id, preview_accept_above))

    @app.post("/recordings/{recording_id}/review/actions", response_model=ReviewState, tags=["review"])
    async def review_action(recording_id: str, body: ReviewActionIn, key: ReviewerKey) -> Response:
        """Record one decision (saved at once, with who and when); answers the new state."""

        def record() -> Response:
            try:
                action = ReviewAction(**body.model_dump(), by=key.name, at=datetime.now(UTC).isoformat())
            except ValidationError as exc:
                first = exc.errors()[0]
                raise ApiError(422, "bad_review_action", str(first["msg"]).removeprefix("Value error, ")) from exc
            for _attempt in range(_REVIEW_ATTEMPTS):
                _rec, job, labels, actions = reviewed(recording_id)
                try:
                    apply_review(labels, [action])  # refuse what cannot apply before storing it
                except InputError as exc:
                    raise ApiError(422, "bad_review_action", str(exc)) from exc
                after = int(actions[-1]["id"]) if actions else None
                stored = gw.store.add_review_action(
                    recording_id, job.id, action.model_dump(mode="json"), key.name, after=after
                )
                if stored is not None:
                    return state(recording_id)
                # Another decision was saved or undone meanwhile: check this one again against the new state.
            raise ApiError(
                409,
                "review_conflict",
                f"recording {recording_id!r}: other decisions kept arriving while this one was checked; send it again",
            )

        return await anyio.to_thread.run_sync(record)

    @app.post("/recordings/{recording_id}/review/undo", response_model=ReviewState, tags=["review"])
    async def review_undo(recording_id: str, key: ReviewerKey) -> Response:
        """Undo the latest decision (anyone's); 409 when there is none."""

        def undo() -> Response:
            _rec, job, _path = labelled(recording_id)  # 409 when not labelled
            if gw.store.undo_review_action(recording_id, job.id, key.name) is None:
                raise ApiError(409, "nothing_to_undo", f"recording {recording_id!r}: no decision to undo")
            return state(recording_id)

        return await anyio.to_thread.run_sync(undo)

    # -- what the reviewer page shows ------------------------------------------------------------------------------

    @app.get("/recordings/{recording_id}/timeline", tags=["review"])
    async def timeline(recording_id: str, _key: ReaderKey) -> dict[str, Any]:
        """One lane per track (times, class, confidence, decision) without boxes: small for any recording length."""
        _rec, _job, labels, _actions = await anyio.to_thread.run_sync(reviewed, recording_id)
        rec = labels.recording
        return {
            "recording": {
                "id": rec.id,
                "source": rec.source,
                "width": rec.width,
                "height": rec.height,
                "fps": rec.fps,
                "frame_count": rec.frame_count,
                "duration_s": rec.duration_s,
                "gaps": [g.model_dump() for g in rec.gaps],
            },
            "models": {k: v.model_dump() for k, v in labels.models.items()},
            "lanes": [
                {
                    "track_id": t.track_id,
                    "class_id": t.review.class_id if t.review.status == "relabelled" else t.class_id,
                    "class_name": t.review.class_name if t.review.status == "relabelled" else t.class_name,
                    "confidence": t.confidence,
                    "start_s": t.start_s,
                    "end_s": t.end_s,
                    "status": t.review.status,
                    "uncertainty": list(t.uncertainty),
                    "crops": len(t.best_crops),
                }
                for t in labels.tracks
            ],
        }

    @app.get("/recordings/{recording_id}/boxes", tags=["review"])
    async def boxes_between(
        recording_id: str,
        _key: ReaderKey,
        from_s: Annotated[float, Query(ge=0)],
        to_s: Annotated[float, Query(ge=0)],
    ) -> list[dict[str, Any]]:
        """The boxes shown between two times (at most 10 minutes of them): the page loads only what it draws."""
        if not to_s >= from_s or to_s - from_s > 600:
            raise ApiError(422, "bad_window", f"from_s/to_s: expected a window of at most 600 s, got {from_s}..{to_s}")

        def window() -> list[dict[str, Any]]:
            _rec, job, path = labelled(recording_id)
            return gw.reviewed.boxes(path, gw.store.review_actions_of(job.id)).between(from_s, to_s)

        return await anyio.to_thread.run_sync(window)

    @app.post("/recordings/{recording_id}/video-url", tags=["review"])
    async def video_url(recording_id: str, _key: ReaderKey) -> dict[str, str]:
        """A URL of the recording's video, signed for an hour, for the page's ``<video>`` element."""
        gw.recording(recording_id)
        import time as _time

        expires = int(_time.time()) + 3600
        return {"url": f"/recordings/{recording_id}/video?expires={expires}&sig={gw.sign(recording_id, expires)}"}

    @app.get("/recordings/{recording_id}/video", tags=["review"], response_class=FileResponse)
    async def video(
        recording_id: str,
        expires: Annotated[int, Query()],
        sig: Annotated[str, Query(max_length=64)],
    ) -> FileResponse:
        """The recording's file (byte ranges supported), with a signature from ``POST .../video-url``."""
        import hmac
        import time as _time

        if expires < _time.time() or not hmac.compare_digest(sig, gw.sign(recording_id[:32], expires)):
            raise ApiError(403, "bad_signature", "video URL: expected a valid, unexpired signature (POST video-url)")
        rec = gw.recording(recording_id)
        return FileResponse(
            gw.data_dir / rec["path"],
            media_type="video/mp4" if rec["path"].endswith((".mp4", ".m4v", ".mov")) else "application/octet-stream",
        )

    @app.get("/recordings/{recording_id}/frame.jpg", tags=["review"], response_class=Response)
    async def frame_jpeg(
        recording_id: str,
        _key: ReaderKey,
        t_s: Annotated[float, Query(ge=0)],
        max_w: Annotated[int, Query(ge=16, le=7680)] = 1280,
    ) -> Response:
        """The frame shown at ``t_s`` (the first at or after it) as JPEG; its time in ``X-Frame-Time``."""
        rec = gw.recording(recording_id)
        try:
            when, image = await anyio.to_thread.run_sync(read_frame_at, gw.data_dir / rec["path"], t_s)
        except UnreadableVideo as exc:
            raise ApiError(404, "no_frame", f"recording {recording_id!r}: no frame at {t_s:.3f} s") from exc
        body = await anyio.to_thread.run_sync(_jpeg, image, max_w)
        return Response(
            body,
            media_type="image/jpeg",
            headers={"X-Frame-Time": f"{when:.6f}", "Cache-Control": "private, max-age=3600"},
        )

    @app.get("/recordings/{recording_id}/tracks/{track_id}/crops/{n}.jpg", tags=["review"], response_class=Response)
    async def crop_jpeg(recording_id: str, track_id: int, n: int, _key: ReaderKey) -> Response:
        """One of a track's best crops (``n`` from 0, best first), cut again from the video."""
        rec, job, labels, _actions = await anyio.to_thread.run_sync(reviewed, recording_id)
        track = next((t for t in labels.tracks if t.track_id == track_id), None)
        if track is None or not 0 <= n < len(track.best_crops):
            raise ApiError(404, "not_found", f"track {track_id} of {recording_id!r}: no crop {n}")
        # All of a track's crops are cut in one pass over the video (the page asks for them together) and kept.
        key = (job.id, track_id, tuple(c.t_s for c in track.best_crops))
        margin = float(labels.settings.get("crop_margin", 0.15))
        video = gw.data_dir / rec["path"]
        body = (await anyio.to_thread.run_sync(gw.track_crops, key, video, track.best_crops, margin))[n]
        return Response(body, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    # -- tus 1.0.0 resumable uploads (core protocol + creation) -----------------------------------------------------

    tus_headers = {"Tus-Resumable": "1.0.0"}

    def tus_check(version: str | None) -> None:
        if version != "1.0.0":
            raise ApiError(
                412, "tus_version", f"Tus-Resumable: expected 1.0.0, got {version!r}", {"Tus-Version": "1.0.0"}
            )

    @app.options("/uploads", tags=["uploads"])
    async def tus_options() -> Response:
        """tus discovery: version, extensions, size limit."""
        return Response(
            status_code=204,
            headers={
                **tus_headers,
                "Tus-Version": "1.0.0",
                "Tus-Extension": "creation",
                "Tus-Max-Size": str(settings.max_upload_bytes),
            },
        )

    @app.post("/uploads", status_code=201, tags=["uploads"])
    async def tus_create(
        key: UploaderKey,
        upload_length: Annotated[int, Header(ge=1)],
        tus_resumable: Annotated[str | None, Header()] = None,
        upload_metadata: Annotated[str | None, Header()] = None,
    ) -> Response:
        """Start a resumable upload of ``Upload-Length`` bytes (``Upload-Metadata: filename <base64>``)."""
        tus_check(tus_resumable)
        if upload_length > settings.max_upload_bytes:
            raise ApiError(
                413, "too_large", f"Upload-Length: expected at most {settings.max_upload_bytes}, got {upload_length}"
            )
        meta: dict[str, str] = {}
        for item in (upload_metadata or "").split(","):
            parts = item.strip().split(" ", 1)
            if len(parts) == 2 and parts[0]:
                try:
                    meta[parts[0]] = base64.b64decode(parts[1], validate=True).decode("utf-8", "replace")
                except ValueError as exc:
                    raise ApiError(
                        400, "bad_metadata", f"Upload-Metadata: expected base64 values, got {parts[1][:40]!r}"
                    ) from exc
        upload_id = gw.store.create_upload(upload_length, safe_source_name(meta.get("filename")), {}, key.name)
        (gw.data_dir / "uploads" / f"{upload_id}.part").touch()
        return Response(status_code=201, headers={**tus_headers, "Location": f"/uploads/{upload_id}"})

    def upload_row(upload_id: str, key: ApiKey) -> dict[str, Any]:
        row = gw.store.get_upload(upload_id) if re.fullmatch(r"[0-9a-f]{32}", upload_id) else None
        if row is None or (row["created_by"] != key.name and key.role != "admin"):
            raise ApiError(404, "not_found", f"upload {upload_id[:40]!r}: no such upload")
        return row

    @app.head("/uploads/{upload_id}", tags=["uploads"])
    async def tus_head(
        upload_id: str, key: UploaderKey, tus_resumable: Annotated[str | None, Header()] = None
    ) -> Response:
        """How many bytes of the upload the server has (resume from there)."""
        tus_check(tus_resumable)
        row = upload_row(upload_id, key)
        headers = {
            **tus_headers,
            "Upload-Offset": str(row["offset"]),
            "Upload-Length": str(row["length"]),
            "Cache-Control": "no-store",
        }
        if row["recording_id"]:
            headers["Recording-Id"] = row["recording_id"]
        return Response(status_code=200, headers=headers)

    @app.patch("/uploads/{upload_id}", tags=["uploads"])
    async def tus_patch(
        upload_id: str,
        request: Request,
        key: UploaderKey,
        upload_offset: Annotated[int, Header(ge=0)],
        content_type: Annotated[str | None, Header()] = None,
        tus_resumable: Annotated[str | None, Header()] = None,
    ) -> Response:
        """Append bytes at ``Upload-Offset``; the last chunk completes the upload and queues the recording."""
        tus_check(tus_resumable)
        if (content_type or "").split(";")[0].strip() != "application/offset+octet-stream":
            raise ApiError(
                415,
                "unsupported_media_type",
                f"Content-Type: expected application/offset+octet-stream, got {content_type!r}",
            )
        row = upload_row(upload_id, key)
        if row["recording_id"]:
            raise ApiError(409, "upload_complete", f"upload {upload_id}: already complete")
        if upload_offset != row["offset"]:
            raise ApiError(
                409,
                "offset_mismatch",
                f"Upload-Offset: expected {row['offset']}, got {upload_offset}",
                {"Upload-Offset": str(row["offset"])},
            )
        part = gw.data_dir / "uploads" / f"{upload_id}.part"
        # Drop anything past the recorded offset (a chunk interrupted before its offset was stored).
        with part.open("ab") as fh:
            fh.truncate(row["offset"])
        remaining = row["length"] - row["offset"]
        try:
            got = await _receive(request, part, None, remaining, append=True)
        except ApiError:
            with part.open("ab") as fh:
                fh.truncate(row["offset"])
            raise
        except OSError:
            raise
        new_offset = row["offset"] + got
        if not gw.store.advance_upload(upload_id, row["offset"], new_offset):
            raise ApiError(409, "offset_mismatch", "another request moved this upload meanwhile; HEAD and resume")
        headers = {**tus_headers, "Upload-Offset": str(new_offset)}
        if new_offset == row["length"]:
            sha256 = await anyio.to_thread.run_sync(file_sha256, part)
            final = gw.data_dir / "tmp" / f"{upload_id}.part"
            os.replace(part, final)
            try:
                out = await gw.accept(final, row["source_name"], sha256, row["length"], key)
            finally:
                final.unlink(missing_ok=True)
            gw.store.finish_upload(upload_id, out.id)
            headers["Recording-Id"] = out.id
            headers["Location"] = f"/recordings/{out.id}"
        return Response(status_code=204, headers=headers)

    return app
