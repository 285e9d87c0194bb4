"""The gateway's metadata store: recordings, labelling jobs, API keys, uploads and an audit trail.

SQLAlchemy 2 Core over SQLite (the embedded default, WAL mode) or PostgreSQL (several gateway instances sharing one
store): the same code and the same alembic migrations for both. Files (uploads, label files) live under the data
directory, never in the database; a row only names them by a path relative to it.

Jobs are claimed with a lease: a worker takes a queued job (or one whose lease ran out because its worker died)
by one conditional UPDATE, and renews the lease while it works. A killed server therefore loses nothing: after a
restart its unfinished jobs are claimed again once their lease has expired.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.pool import QueuePool

from services.common.errors import ConfigError, InputError

__all__ = [
    "ApiKey",
    "DuplicateRecording",
    "Job",
    "Role",
    "Store",
    "api_key_hash",
    "metadata",
    "alembic_config",
    "migrate",
    "open_store",
]

Role = Literal["uploader", "reviewer", "admin"]
JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]

metadata = MetaData()

recordings = Table(
    "recordings",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("sha256", String(64), nullable=False, index=True),
    Column("source_name", String(255), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("path", String(512), nullable=False),  # relative to the data directory
    Column("status", String(16), nullable=False),  # queued | running | done | failed | deleted
    Column("current_job_id", Integer, nullable=True),
    Column("created_by", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("deleted_at", DateTime(timezone=True), nullable=True),
    # One live recording per content: concurrent uploads of the same bytes (to one gateway or to several sharing a
    # PostgreSQL store) cannot both be stored.
    Index(
        "ux_recordings_live_sha256",
        "sha256",
        unique=True,
        sqlite_where=text("status != 'deleted'"),
        postgresql_where=text("status != 'deleted'"),
    ),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("recording_id", String(32), ForeignKey("recordings.id"), nullable=False, index=True),
    Column("status", String(16), nullable=False),
    Column("settings", JSON, nullable=False),
    Column("models", JSON, nullable=False),  # {"detector": path, "classifier": path} as the job was queued
    Column("attempts", Integer, nullable=False, default=0),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_expires_at", DateTime(timezone=True), nullable=True),
    Column("frames_done", Integer, nullable=False, default=0),
    Column("frames_total", Integer, nullable=True),
    Column("fps", Float, nullable=False, default=0.0),
    Column("label_path", String(512), nullable=True),
    Column("tracks", Integer, nullable=True),
    Column("error", Text, nullable=True),
    Column("created_by", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Index("ix_jobs_status_id", "status", "id"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

uploads = Table(
    "uploads",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("length", BigInteger, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("source_name", String(255), nullable=False),
    Column("settings", JSON, nullable=False),
    Column("created_by", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("recording_id", String(32), nullable=True),
)

audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", String(64), nullable=False),
    Column("action", String(32), nullable=False),
    Column("recording_id", String(32), nullable=True, index=True),
    Column("detail", JSON, nullable=False),
)


review_actions = Table(
    "review_actions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("recording_id", String(32), ForeignKey("recordings.id"), nullable=False),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False),
    Column("action", JSON, nullable=False),  # a services.common.labelfile.ReviewAction
    Column("actor", String(64), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("undone_at", DateTime(timezone=True), nullable=True),
    Column("undone_by", String(64), nullable=True),
    Index("ix_review_actions_job", "job_id", "id"),
)


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; every time stored here is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def api_key_hash(key: str) -> str:
    """The sha256 stored for a key: the key itself is shown once, when it is created, and never stored."""
    return hashlib.sha256(key.encode()).hexdigest()


class DuplicateRecording(Exception):
    """A live recording with the same bytes exists; ``recording_id`` names it."""

    def __init__(self, recording_id: str) -> None:
        super().__init__(f"a live recording with these bytes exists: {recording_id}")
        self.recording_id = recording_id


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A valid key's owner."""

    name: str
    role: Role


@dataclass(frozen=True, slots=True)
class Job:
    """One labelling job as stored."""

    id: int
    recording_id: str
    status: JobStatus
    settings: dict[str, Any]
    models: dict[str, str]
    attempts: int
    frames_done: int
    frames_total: int | None
    fps: float
    label_path: str | None
    tracks: int | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: Row[Any]) -> Job:
        m = row._mapping
        return cls(
            id=m["id"],
            recording_id=m["recording_id"],
            status=m["status"],
            settings=dict(m["settings"]),
            models=dict(m["models"]),
            attempts=m["attempts"],
            frames_done=m["frames_done"],
            frames_total=m["frames_total"],
            fps=m["fps"],
            label_path=m["label_path"],
            tracks=m["tracks"],
            error=m["error"],
            created_at=_aware(m["created_at"]) or _now(),
            started_at=_aware(m["started_at"]),
            finished_at=_aware(m["finished_at"]),
        )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url`` (``sqlite:///path`` or ``postgresql+psycopg://...``), WAL mode for SQLite.

    Raises:
        ConfigError: The URL names another database, or cannot be parsed.
    """
    if url.startswith("sqlite"):
        # Each process (server, workers) keeps a few connections of its own; WAL lets the processes share the file.
        # Pooled, not one connection per use: closing the last connection of a WAL database checkpoints it, which
        # cost ~1 ms on every query and made each review decision wait several of them.
        engine = create_engine(
            url,
            poolclass=QueuePool,
            pool_size=4,
            max_overflow=8,
            connect_args={"timeout": 10, "check_same_thread": False},
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if url.startswith("postgresql"):
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
    raise ConfigError(f"database URL: expected sqlite:///PATH or postgresql+psycopg://..., got {url.split(':')[0]!r}")


def alembic_config(url: str) -> Any:  # alembic.config.Config
    """Alembic's configuration for the database at ``url`` with this package's migrations."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(url: str) -> None:
    """Bring the database at ``url`` to the newest schema with alembic (idempotent)."""
    from alembic import command

    command.upgrade(alembic_config(url), "head")


def open_store(url: str) -> Store:
    """Migrate the database at ``url`` and return a ``Store`` on it."""
    migrate(url)
    return Store(make_engine(url))


class Store:
    """All reads and writes of the metadata, each in its own short transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    def close(self) -> None:
        """Release the connections."""
        self.engine.dispose()

    # -- API keys ---------------------------------------------------------------------------------------------------

    def create_api_key(self, name: str, role: Role) -> str:
        """Create a key; returns the secret, which is stored only as a hash.

        Raises:
            InputError: Bad name or role, or the name is taken.
        """
        if not name or len(name) > 64 or not name.isprintable():
            raise InputError(f"key name: expected 1-64 printable characters, got {name!r}")
        if role not in ("uploader", "reviewer", "admin"):
            raise InputError(f"role: expected uploader, reviewer or admin, got {role!r}")
        secret = "rl_" + secrets.token_urlsafe(32)
        with self._tx() as conn:
            if conn.execute(select(api_keys.c.id).where(api_keys.c.name == name)).first():
                raise InputError(f"key name: expected a new name, got {name!r}, which exists")
            conn.execute(
                insert(api_keys).values(name=name, role=role, key_hash=api_key_hash(secret), created_at=_now())
            )
        return secret

    def check_api_key(self, secret: str) -> ApiKey | None:
        """The key's owner, or None when the key is unknown or revoked."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(api_keys.c.name, api_keys.c.role).where(
                    api_keys.c.key_hash == api_key_hash(secret), api_keys.c.revoked_at.is_(None)
                )
            ).first()
        return None if row is None else ApiKey(row.name, row.role)

    def revoke_api_key(self, name: str) -> bool:
        """Revoke a key by name; False when there is no such live key."""
        with self._tx() as conn:
            result = conn.execute(
                update(api_keys)
                .where(api_keys.c.name == name, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=_now())
            )
        return bool(result.rowcount)

    def list_api_keys(self) -> list[dict[str, Any]]:
        """Names, roles and dates of every key (never the secret)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.id)).all()
        return [
            {"name": r.name, "role": r.role, "created_at": _aware(r.created_at), "revoked_at": _aware(r.revoked_at)}
            for r in rows
        ]

    # -- recordings and jobs ----------------------------------------------------------------------------------------

    def add_recording(
        self,
        *,
        recording_id: str,
        sha256: str,
        source_name: str,
        size_bytes: int,
        path: str,
        created_by: str,
        settings: dict[str, Any],
        models: dict[str, str],
    ) -> int:
        """Store a new recording and queue its first job; returns the job id.

        Raises:
            DuplicateRecording: A live recording with these bytes was stored first (by this process or another
                one sharing the database); nothing was written.
        """
        now = _now()
        try:
            with self._tx() as conn:
                conn.execute(
                    insert(recordings).values(
                        id=recording_id,
                        sha256=sha256,
                        source_name=source_name,
                        size_bytes=size_bytes,
                        path=path,
                        status="queued",
                        created_by=created_by,
                        created_at=now,
                    )
                )
                job_id = self._queue(conn, recording_id, settings, models, created_by, now)
                self._audit(conn, created_by, "upload", recording_id, {"sha256": sha256, "size_bytes": size_bytes})
        except IntegrityError:
            twin = self.find_by_sha256(sha256)
            if twin is None:
                raise
            raise DuplicateRecording(twin["id"]) from None
        return job_id

    def _queue(
        self,
        conn: Connection,
        recording_id: str,
        settings: dict[str, Any],
        models: dict[str, str],
        created_by: str,
        now: datetime,
    ) -> int:
        result = conn.execute(
            insert(jobs).values(
                recording_id=recording_id,
                status="queued",
                settings=settings,
                models=models,
                attempts=0,
                frames_done=0,
                fps=0.0,
                created_by=created_by,
                created_at=now,
            )
        )
        job_id = int(result.inserted_primary_key[0])  # type: ignore[index]
        conn.execute(
            update(recordings).where(recordings.c.id == recording_id).values(current_job_id=job_id, status="queued")
        )
        return job_id

    def queue_job(self, recording_id: str, settings: dict[str, Any], models: dict[str, str], actor: str) -> int:
        """Queue another job for a stored recording (other models or settings); returns its id."""
        with self._tx() as conn:
            job_id = self._queue(conn, recording_id, settings, models, actor, _now())
            self._audit(conn, actor, "rerun", recording_id, {"job_id": job_id, "settings": settings})
        return job_id

    def find_by_sha256(self, sha256: str) -> dict[str, Any] | None:
        """A live recording with these bytes, if one was uploaded before."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(recordings).where(recordings.c.sha256 == sha256, recordings.c.status != "deleted")
            ).first()
        return None if row is None else self._recording_dict(row)

    @staticmethod
    def _recording_dict(row: Row[Any]) -> dict[str, Any]:
        m = dict(row._mapping)
        m["created_at"] = _aware(m["created_at"])
        m["deleted_at"] = _aware(m["deleted_at"])
        return m

    def get_recording(self, recording_id: str) -> dict[str, Any] | None:
        """The recording row with its current job (``job``), or None (also when deleted)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(recordings).where(recordings.c.id == recording_id, recordings.c.status != "deleted")
            ).first()
            if row is None:
                return None
            out = self._recording_dict(row)
            job = None
            if row.current_job_id is not None:
                job_row = conn.execute(select(jobs).where(jobs.c.id == row.current_job_id)).first()
                job = Job.from_row(job_row) if job_row is not None else None
        out["job"] = job
        return out

    def list_recordings(self, *, limit: int = 100, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Live recordings, newest first, with their current jobs; and the total count."""
        with self.engine.connect() as conn:
            total = conn.execute(
                select(func.count()).select_from(recordings).where(recordings.c.status != "deleted")
            ).scalar_one()
            rows = conn.execute(
                select(recordings, jobs)
                .join(jobs, jobs.c.id == recordings.c.current_job_id, isouter=True)
                .where(recordings.c.status != "deleted")
                .order_by(recordings.c.created_at.desc(), recordings.c.id)
                .limit(limit)
                .offset(offset)
            ).all()
        out = []
        for row in rows:
            rec = self._recording_dict(select_row(row, recordings))
            job_row = select_row(row, jobs)
            rec["job"] = Job.from_row(job_row) if job_row._mapping["id"] is not None else None
            out.append(rec)
        return out, int(total)

    def delete_recording(self, recording_id: str, actor: str) -> dict[str, Any] | None:
        """Mark deleted (its files are removed by the caller); returns the row as it was, or None."""
        with self._tx() as conn:
            row = conn.execute(
                select(recordings).where(recordings.c.id == recording_id, recordings.c.status != "deleted")
            ).first()
            if row is None:
                return None
            conn.execute(
                update(recordings).where(recordings.c.id == recording_id).values(status="deleted", deleted_at=_now())
            )
            conn.execute(
                update(jobs)
                .where(jobs.c.recording_id == recording_id, jobs.c.status.in_(("queued", "running")))
                .values(status="cancelled", finished_at=_now())
            )
            self._audit(conn, actor, "delete", recording_id, {})
        return self._recording_dict(row)

    def claim_job(self, owner: str, lease_s: float) -> Job | None:
        """Take the oldest queued job, or a running one whose lease expired (its worker died).

        One conditional UPDATE per candidate, so two workers (or two gateways on one PostgreSQL) never take the same
        job: the loser's UPDATE matches no row and it tries the next candidate.
        """
        now = _now()
        claimable = (jobs.c.status == "queued") | ((jobs.c.status == "running") & (jobs.c.lease_expires_at < now))
        with self._tx() as conn:
            candidates = conn.execute(select(jobs.c.id).where(claimable).order_by(jobs.c.id).limit(8)).scalars().all()
            for job_id in candidates:
                result = conn.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id, claimable)
                    .values(
                        status="running",
                        lease_owner=owner,
                        lease_expires_at=now + timedelta(seconds=lease_s),
                        attempts=jobs.c.attempts + 1,
                        started_at=now,
                    )
                )
                if result.rowcount == 1:
                    row = conn.execute(select(jobs).where(jobs.c.id == job_id)).one()
                    conn.execute(
                        update(recordings)
                        .where(recordings.c.id == row.recording_id, recordings.c.current_job_id == job_id)
                        .values(status="running")
                    )
                    return Job.from_row(row)
        return None

    def heartbeat(
        self, job_id: int, owner: str, lease_s: float, frames_done: int, frames_total: int | None, fps: float
    ) -> bool:
        """Renew a lease and record progress; False when the job is no longer this worker's (cancelled, taken)."""
        with self._tx() as conn:
            result = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.lease_owner == owner, jobs.c.status == "running")
                .values(
                    lease_expires_at=_now() + timedelta(seconds=lease_s),
                    frames_done=frames_done,
                    frames_total=frames_total,
                    fps=fps,
                )
            )
        return bool(result.rowcount)

    def finish_job(
        self,
        job_id: int,
        owner: str,
        *,
        label_path: str | None,
        tracks: int | None,
        frames: int | None,
        error: str | None,
    ) -> bool:
        """Mark a job done (label file written) or failed; False when the job was no longer this worker's."""
        status: JobStatus = "failed" if error else "done"
        with self._tx() as conn:
            values: dict[str, Any] = {
                "status": status,
                "label_path": label_path,
                "tracks": tracks,
                "error": error,
                "finished_at": _now(),
                "lease_owner": None,
                "lease_expires_at": None,
            }
            if frames is not None:
                values["frames_done"] = frames
            result = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.lease_owner == owner, jobs.c.status == "running")
                .values(**values)
            )
            if not result.rowcount:
                return False
            row = conn.execute(select(jobs.c.recording_id).where(jobs.c.id == job_id)).one()
            conn.execute(
                update(recordings)
                .where(
                    recordings.c.id == row.recording_id,
                    recordings.c.current_job_id == job_id,
                    recordings.c.status != "deleted",
                )
                .values(status=status)
            )
        return True

    def get_job(self, job_id: int) -> Job | None:
        """A job by id."""
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        return None if row is None else Job.from_row(row)

    def jobs_of(self, recording_id: str) -> list[Job]:
        """Every job of a recording, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs).where(jobs.c.recording_id == recording_id).order_by(jobs.c.id)).all()
        return [Job.from_row(r) for r in rows]

    # -- resumable uploads ------------------------------------------------------------------------------------------

    def create_upload(self, length: int, source_name: str, settings: dict[str, Any], actor: str) -> str:
        """Start a resumable upload of ``length`` bytes; returns its id."""
        upload_id = secrets.token_hex(16)
        with self._tx() as conn:
            conn.execute(
                insert(uploads).values(
                    id=upload_id,
                    length=length,
                    offset=0,
                    source_name=source_name,
                    settings=settings,
                    created_by=actor,
                    created_at=_now(),
                )
            )
        return upload_id

    def get_upload(self, upload_id: str) -> dict[str, Any] | None:
        """The upload's row, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(uploads).where(uploads.c.id == upload_id)).first()
        return None if row is None else dict(row._mapping)

    def advance_upload(self, upload_id: str, old_offset: int, new_offset: int) -> bool:
        """Move an upload's offset forward, only from ``old_offset`` (two clients racing cannot both win)."""
        with self._tx() as conn:
            result = conn.execute(
                update(uploads)
                .where(uploads.c.id == upload_id, uploads.c.offset == old_offset)
                .values(offset=new_offset)
            )
        return bool(result.rowcount)

    def finish_upload(self, upload_id: str, recording_id: str) -> None:
        """Remember which recording a completed upload became."""
        with self._tx() as conn:
            conn.execute(update(uploads).where(uploads.c.id == upload_id).values(recording_id=recording_id))

    # -- review -------------------------------------------------------------------------------------------------------

    def add_review_action(
        self, recording_id: str, job_id: int, action: dict[str, Any], actor: str, *, after: int | None
    ) -> int | None:
        """Store one reviewer decision on a job's label file (and audit it); returns its id.

        ``after`` is the id of the latest decision (not undone) that the new one was checked against, None when
        there was none. When another decision was stored or undone since, nothing is stored and None is returned:
        the caller checks the decision again, so that replaying the stored decisions never meets one that cannot
        apply (an accept of a track another reviewer merged away meanwhile, say).
        """
        with self._tx() as conn:
            self._lock_reviews(conn, job_id)
            if self._latest_review_id(conn, job_id) != after:
                return None
            result = conn.execute(
                insert(review_actions).values(
                    recording_id=recording_id, job_id=job_id, action=action, actor=actor, at=_now()
                )
            )
            self._audit(conn, actor, f"review:{action['action']}", recording_id, {"job_id": job_id, **action})
        return int(result.inserted_primary_key[0])  # type: ignore[index]

    @staticmethod
    def _lock_reviews(conn: Connection, job_id: int) -> None:
        """Serialise the writers of one job's decisions until the transaction ends.

        A write first: it takes SQLite's write lock before anything is read (a read first would let a concurrent
        writer make this transaction's snapshot stale, and its write fail), and the job row's lock on PostgreSQL,
        so the reads that follow see every decision committed before.
        """
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(attempts=jobs.c.attempts))

    @staticmethod
    def _latest_review_id(conn: Connection, job_id: int) -> int | None:
        latest = conn.execute(
            select(func.max(review_actions.c.id)).where(
                review_actions.c.job_id == job_id, review_actions.c.undone_at.is_(None)
            )
        ).scalar()
        return None if latest is None else int(latest)

    def review_actions_of(self, job_id: int) -> list[dict[str, Any]]:
        """A job's decisions not undone, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(review_actions)
                .where(review_actions.c.job_id == job_id, review_actions.c.undone_at.is_(None))
                .order_by(review_actions.c.id)
            ).all()
        return [{**dict(r._mapping), "at": _aware(r.at)} for r in rows]

    def undo_review_action(self, recording_id: str, job_id: int, actor: str) -> dict[str, Any] | None:
        """Undo the job's latest decision not yet undone; returns it, or None when there is none."""
        with self._tx() as conn:
            self._lock_reviews(conn, job_id)
            row = conn.execute(
                select(review_actions)
                .where(review_actions.c.job_id == job_id, review_actions.c.undone_at.is_(None))
                .order_by(review_actions.c.id.desc())
                .limit(1)
            ).first()
            if row is None:
                return None
            conn.execute(
                update(review_actions)
                .where(review_actions.c.id == row.id, review_actions.c.undone_at.is_(None))
                .values(undone_at=_now(), undone_by=actor)
            )
            self._audit(conn, actor, "review:undo", recording_id, {"job_id": job_id, "undid": row.id})
        return dict(row._mapping)

    # -- audit --------------------------------------------------------------------------------------------------------

    @staticmethod
    def _audit(conn: Connection, actor: str, action: str, recording_id: str | None, detail: dict[str, Any]) -> None:
        conn.execute(
            insert(audit).values(
                at=_now(), actor=actor, action=action, recording_id=recording_id, detail=json.loads(json.dumps(detail))
            )
        )

    def record(self, actor: str, action: str, recording_id: str | None, detail: dict[str, Any]) -> None:
        """Append to the audit trail."""
        with self._tx() as conn:
            self._audit(conn, actor, action, recording_id, detail)

    def audit_of(self, recording_id: str) -> list[dict[str, Any]]:
        """A recording's audit trail, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(audit).where(audit.c.recording_id == recording_id).order_by(audit.c.id)).all()
        return [{**dict(r._mapping), "at": _aware(r.at)} for r in rows]


def select_row(row: Row[Any], table: Table) -> Row[Any]:
    """The columns of ``table`` out of a joined row (by column object, so equal names do not collide)."""
    values = tuple(row._mapping[c] for c in table.c)
    keys = [c.name for c in table.c]
    return _RowView(dict(zip(keys, values, strict=True)))  # type: ignore[return-value]


class _RowView:
    """The small part of ``Row`` that ``from_row`` and ``_recording_dict`` use."""

    def __init__(self, mapping: dict[str, Any]) -> None:
        self._mapping = mapping

    def __getattr__(self, name: str) -> Any:
        try:
            return self._mapping[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


def database_error(exc: SQLAlchemyError) -> str:
    """A one-line description of a database failure for logs and 503 answers."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
