"""The metadata store on SQLite and on a real PostgreSQL server, through the same code and migrations."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text

import gateway.store
from gateway.store import DuplicateRecording, Store, alembic_config, make_engine, metadata, migrate, open_store
from services.common.errors import ConfigError, InputError

T = TypeVar("T")


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'meta.db'}"
        return
    base = request.getfixturevalue("postgres_url")
    # A database per test, so tests never see each other's rows.
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    yield base.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture
def store(url):
    s = open_store(url)
    yield s
    s.close()


def add(store: Store, rid: str) -> int:
    return store.add_recording(
        recording_id=rid,
        sha256=rid.ljust(64, "0"),
        source_name=f"{rid}.mp4",
        size_bytes=10,
        path=f"recordings/{rid}.mp4",
        created_by="alice",
        settings={"detect_every": 1},
        models={"detector": "d", "classifier": "c"},
    )


def test_migrations_match_the_tables_and_run_twice(url):
    migrate(url)
    migrate(url)  # idempotent
    engine = make_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    assert diff == []


def test_sqlite_uses_wal(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    engine.dispose()


def test_other_databases_are_refused():
    with pytest.raises(ConfigError, match="expected sqlite"):
        make_engine("mysql://x/y")


def test_api_keys(store):
    secret = store.create_api_key("alice", "uploader")
    assert store.check_api_key(secret).name == "alice"
    assert store.check_api_key(secret + "x") is None
    with pytest.raises(InputError, match="exists"):
        store.create_api_key("alice", "reviewer")
    with pytest.raises(InputError, match="role"):
        store.create_api_key("bob", "root")
    assert store.revoke_api_key("alice")
    assert store.check_api_key(secret) is None
    assert not store.revoke_api_key("alice")
    assert [k["name"] for k in store.list_api_keys()] == ["alice"]


def at_once(url: str, n: int, work: Callable[[Store, int], T]) -> list[T]:
    """``work(store, i)`` for i in 0..n-1, each in its own thread with its own connections (as n gateways sharing
    the database would have), started together; the results in the order they finished. A thread's error fails
    the test."""
    results: list[T] = []
    lock = threading.Lock()
    start = threading.Barrier(n)

    def run(i: int) -> None:
        own = Store(make_engine(url))
        start.wait()
        try:
            result = work(own, i)
        finally:
            own.close()
        with lock:
            results.append(result)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == n, "a thread failed"
    return results


def test_each_job_is_claimed_once_by_concurrent_workers(store, url):
    for i in range(12):
        add(store, f"r{i:02d}")

    def worker(own: Store, n: int) -> list[int]:
        claimed = []
        while (job := own.claim_job(f"w{n}", 30)) is not None:
            claimed.append(job.id)
        return claimed

    claimed = [job_id for ids in at_once(url, 4, worker) for job_id in ids]
    assert sorted(claimed) == list(range(1, 13))
    assert Counter(claimed).most_common(1)[0][1] == 1


def test_an_expired_lease_is_claimed_again(store, monkeypatch):
    add(store, "r1")
    job = store.claim_job("dead-worker", lease_s=60)
    assert job is not None
    assert store.claim_job("w2", 30) is None  # still leased
    later = gateway.store._now() + timedelta(seconds=61)
    monkeypatch.setattr(gateway.store, "_now", lambda: later)  # the lease ran out
    again = store.claim_job("w2", 30)
    assert again is not None
    assert again.id == job.id
    assert again.attempts == 2
    assert not store.heartbeat(job.id, "dead-worker", 30, 5, 10, 1.0)  # the old owner lost it
    assert not store.finish_job(job.id, "dead-worker", label_path="x", tracks=0, frames=1, error=None)
    assert store.heartbeat(job.id, "w2", 30, 5, 10, 1.0)
    assert store.finish_job(job.id, "w2", label_path="labels/r1/job-1.json", tracks=3, frames=10, error=None)
    rec = store.get_recording("r1")
    assert rec["status"] == "done"
    assert rec["job"].tracks == 3


def test_rerun_delete_and_audit(store):
    add(store, "r1")
    second = store.queue_job("r1", {"detect_every": 3}, {"detector": "d", "classifier": "c"}, "bob")
    assert store.get_recording("r1")["job"].id == second
    assert [j.status for j in store.jobs_of("r1")] == ["queued", "queued"]
    assert store.find_by_sha256("r1".ljust(64, "0"))["id"] == "r1"
    assert store.delete_recording("r1", "bob") is not None
    assert store.get_recording("r1") is None
    assert store.find_by_sha256("r1".ljust(64, "0")) is None
    assert store.claim_job("w", 30) is None  # both jobs cancelled
    assert [a["action"] for a in store.audit_of("r1")] == ["upload", "rerun", "delete"]
    items, total = store.list_recordings()
    assert (items, total) == ([], 0)


def add_same_bytes(store: Store, rid: str) -> int:
    return store.add_recording(
        recording_id=rid,
        sha256="ab" * 32,
        source_name=f"{rid}.mp4",
        size_bytes=10,
        path=f"recordings/{rid}.mp4",
        created_by="alice",
        settings={},
        models={"detector": "d", "classifier": "c"},
    )


def test_one_live_recording_per_content_even_from_concurrent_stores(store, url):
    # Eight stores (as eight gateways sharing the database would have) add the same bytes at once: one wins.
    def gateway(own: Store, n: int) -> str:
        try:
            add_same_bytes(own, f"g{n}")
        except DuplicateRecording as dup:
            return f"twin of {dup.recording_id}"
        return "stored"

    outcomes = at_once(url, 8, gateway)
    winner = store.find_by_sha256("ab" * 32)["id"]
    assert sorted(outcomes) == sorted(["stored", *[f"twin of {winner}"] * 7])
    assert store.list_recordings()[1] == 1
    assert len(store.jobs_of(winner)) == 1
    # Once deleted, the same bytes may be uploaded again.
    store.delete_recording(winner, "bob")
    add_same_bytes(store, "again")
    assert store.find_by_sha256("ab" * 32)["id"] == "again"


def test_migration_0003_names_live_duplicates_instead_of_failing_obscurely(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    command.upgrade(alembic_config(url), "0002")
    engine = make_engine(url)
    with engine.begin() as conn:
        for rid in ("a", "b"):
            conn.execute(
                text(
                    "INSERT INTO recordings (id, sha256, source_name, size_bytes, path, status, created_by, created_at)"
                    " VALUES (:id, :sha, 'x.mp4', 1, 'recordings/x.mp4', 'done', 'alice', '2026-11-22 00:00:00')"
                ),
                {"id": rid, "sha": "cd" * 32},
            )
    engine.dispose()
    with pytest.raises(RuntimeError, match="at most one live recording per sha256, got 1 duplicated: cdcdcdcdcdcd"):
        migrate(url)


def test_a_decision_is_stored_only_after_the_one_it_was_checked_against(store, url):
    add(store, "r1")
    job_id = store.claim_job("w", 30).id
    decide = {"action": "accept", "track_id": 1}
    first = store.add_review_action("r1", job_id, decide, "alice", after=None)
    assert first is not None
    assert store.add_review_action("r1", job_id, decide, "bob", after=None) is None  # checked before `first`
    second = store.add_review_action("r1", job_id, decide, "bob", after=first)
    assert second is not None
    assert store.undo_review_action("r1", job_id, "bob")["id"] == second
    assert store.add_review_action("r1", job_id, decide, "carol", after=second) is None  # second is undone
    # Eight reviewers (own connections, as several gateways would have) decide at once against the same state:
    # one decision is stored, none fails with a database error.
    outcomes = at_once(
        url, 8, lambda own, n: own.add_review_action("r1", job_id, decide, f"r{n}", after=first) is not None
    )
    assert sorted(outcomes) == [False] * 7 + [True]
    assert [a["actor"] for a in store.review_actions_of(job_id)][0] == "alice"
    assert len(store.review_actions_of(job_id)) == 2


def test_upload_offsets_move_only_from_where_they_are(store):
    uid = store.create_upload(100, "a.mp4", {}, "alice")
    assert store.advance_upload(uid, 0, 40)
    assert not store.advance_upload(uid, 0, 60)  # a racing request with a stale offset loses
    assert store.get_upload(uid)["offset"] == 40


def test_the_gateway_on_postgresql(url, tmp_path):
    from fastapi.testclient import TestClient

    from gateway.app import GatewaySettings, create_app
    from gateway.worker import WorkerConfig, _Models, process_one
    from tests.synthvideo import make_tiny_video

    settings = GatewaySettings(data_dir=tmp_path / "data", database_url=url, workers=0)
    clip = make_tiny_video(tmp_path / "t.mp4", 64, 48, n_frames=4).path.read_bytes()
    with TestClient(create_app(settings, start_workers=False)) as client:
        store = client.app.state.gateway.store  # type: ignore[attr-defined]
        headers = {"Authorization": f"Bearer {store.create_api_key('u', 'uploader')}", "Content-Type": "video/mp4"}
        rec = client.post("/recordings", content=clip, headers=headers).json()
        job = store.claim_job("w", 30)
        process_one(store, WorkerConfig(url, settings.data_dir.resolve()), "w", job, _Models(None))
        got = client.get(f"/recordings/{rec['id']}", headers=headers).json()
        assert got["status"] == "done"
        assert client.get(f"/recordings/{rec['id']}/labels", headers=headers).json()["recording"]["frame_count"] == 4
