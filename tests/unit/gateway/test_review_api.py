"""The review API: queue order, decisions saved at once with who and when, undo, reviewed labels and exports."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from gateway.app import GatewaySettings, ReviewState, create_app
from gateway.exports import read_cvat_video
from gateway.store import Store
from services.common.labelfile import LabelFile, Review, save_label_file
from tests.unit.gateway.test_label_exports import label_file, track

pytestmark = pytest.mark.usefixtures("restore_root_logger")


@pytest.fixture
def settings(tmp_path) -> GatewaySettings:
    return GatewaySettings(data_dir=tmp_path / "data", workers=0)


def machine_labels() -> LabelFile:
    return label_file(
        track(1, [0, 1, 2, 3], confidence=0.99),
        track(2, [5, 6, 7], confidence=0.6),
        track(3, [9, 10, 11, 12, 13], confidence=0.95),
        track(4, [20, 21, 22], confidence=0.3),
    )


def start(settings: GatewaySettings):
    client = TestClient(create_app(settings, start_workers=False))
    client.__enter__()
    store = client.app.state.gateway.store  # type: ignore[attr-defined]
    return client, store


@pytest.fixture
def env(settings):
    client, store = start(settings)
    keys = {
        role: {"Authorization": f"Bearer {store.create_api_key(f'{role}-1', role)}"}
        for role in ("uploader", "reviewer")
    }
    store.add_recording(
        recording_id="rec1",
        sha256="0" * 64,
        source_name="rec.mp4",
        size_bytes=1,
        path="recordings/rec1.mp4",
        created_by="uploader-1",
        settings={},
        models={},
    )
    job = store.claim_job("w", 30)
    rel = "labels/rec1/job-1.labels.json"
    (settings.data_dir / "labels" / "rec1").mkdir(parents=True)
    save_label_file(settings.data_dir / rel, machine_labels())
    store.finish_job(job.id, "w", label_path=rel, tracks=4, frames=100, error=None)
    yield client, keys
    client.__exit__(None, None, None)


def do(client, keys, **body):
    return client.post("/recordings/rec1/review/actions", json=body, headers=keys["reviewer"])


def test_queue_is_least_confident_first_with_a_preview(env):
    client, keys = env
    res = client.get("/recordings/rec1/review", params={"preview_accept_above": 0.9}, headers=keys["reviewer"])
    state = res.json()
    ReviewState.model_validate(state)  # the answer, built as plain dicts for speed, keeps the documented schema
    assert [q["track_id"] for q in state["queue"]] == [4, 2, 3, 1]
    assert state["accept_above_preview"] == {"threshold": 0.9, "tracks": 2}
    assert (state["tracks"], state["pending"], state["reviewed"]) == (4, 4, False)


def test_a_full_review_saved_undone_and_exported(env, settings):
    client, keys = env
    assert do(client, keys, action="reject", track_id=4).status_code == 200
    assert do(client, keys, action="relabel", track_id=2, class_id=14).status_code == 200
    assert do(client, keys, action="accept", track_id=2).status_code == 200
    undone = client.post("/recordings/rec1/review/undo", headers=keys["reviewer"]).json()
    assert {q["track_id"]: q["review"]["status"] for q in undone["queue"]}[2] == "relabelled"
    state = do(client, keys, action="accept_above", threshold=0.9).json()
    assert state["reviewed"] is True
    assert (state["pending"], state["decided"], state["model_right"], state["decisions"]) == (0, 4, 2, 3)
    # Saved at once: a new app on the same data sees every decision.
    client2, _ = start(settings)
    labels = LabelFile.model_validate(client2.get("/recordings/rec1/labels", headers=keys["reviewer"]).json())
    client2.__exit__(None, None, None)
    reviews = {t.track_id: t.review for t in labels.tracks}
    assert reviews[4].status == "rejected"
    assert reviews[4].by == "reviewer-1"
    assert reviews[2].class_name == "stop"
    assert reviews[1].status == reviews[3].status == "accepted"
    machine = client.get("/recordings/rec1/labels", params={"view": "machine"}, headers=keys["reviewer"]).json()
    assert all(t["review"]["status"] == "pending" for t in machine["tracks"])
    xml = client.get("/recordings/rec1/export", params={"format": "cvat-video"}, headers=keys["reviewer"]).content
    cvat = read_cvat_video(xml)
    assert sorted(t.sign_class for t in cvat) == ["speed_limit_50", "speed_limit_50", "stop"]  # rejected left out


def test_merge_and_split_through_the_api(env):
    client, keys = env
    state = do(client, keys, action="merge", track_id=1, other_track_id=2).json()
    assert state["tracks"] == 3
    state = do(client, keys, action="split", track_id=3, frame=11).json()
    assert sorted(q["track_id"] for q in state["queue"]) == [1, 3, 4, 5]


def test_a_decision_made_stale_by_another_reviewer_is_checked_again(env, monkeypatch):
    # Reviewer 2's decision is stored after reviewer 1's was checked, before it is stored. Stored as it was checked,
    # an accept of a track merged away meanwhile could never be replayed: each decision is checked again.
    client, keys = env
    real = Store.add_review_action
    calls: list[int | None] = []
    other: list[dict[str, object]] = []

    def meanwhile(
        self: Store, recording_id: str, job_id: int, action: dict[str, object], actor: str, *, after: int | None
    ):
        calls.append(after)
        if other:
            decision = {**other.pop(), "by": "reviewer-2", "at": "2026-11-22T00:00:00+00:00"}
            assert real(self, recording_id, job_id, decision, "reviewer-2", after=after) is not None
        return real(self, recording_id, job_id, action, actor, after=after)

    monkeypatch.setattr(Store, "add_review_action", meanwhile)
    other.append({"action": "merge", "track_id": 1, "other_track_id": 2})
    res = do(client, keys, action="accept", track_id=2)
    assert calls == [None]  # refused by the store, then by the second check
    assert res.status_code == 422
    assert "got track 2" in res.json()["error"]["message"]
    state = client.get("/recordings/rec1/review", headers=keys["reviewer"]).json()
    assert (state["tracks"], state["decisions"]) == (3, 1)
    # A decision that still applies is stored after its second check.
    calls.clear()
    other.append({"action": "reject", "track_id": 4})
    state = do(client, keys, action="accept", track_id=3).json()
    assert len(calls) == 2
    assert (state["tracks"], state["decisions"]) == (3, 3)
    statuses = {q["track_id"]: q["review"]["status"] for q in state["queue"]}
    assert statuses == {1: "pending", 3: "accepted", 4: "rejected"}


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"action": "accept", "track_id": 99}, "bad_review_action"),
        ({"action": "relabel", "track_id": 1}, "bad_review_action"),
        ({"action": "split", "track_id": 1, "frame": 0}, "bad_review_action"),
        ({"action": "fly"}, "invalid_request"),
        ({"action": "accept", "track_id": 1, "by": "someone-else"}, "invalid_request"),
    ],
)
def test_bad_decisions_are_refused_and_not_stored(env, body, code):
    client, keys = env
    res = do(client, keys, **body)
    assert res.status_code == 422
    assert res.json()["error"]["code"] == code
    assert client.get("/recordings/rec1/review", headers=keys["reviewer"]).json()["decisions"] == 0


def test_who_may_decide(env):
    client, keys = env
    assert client.post("/recordings/rec1/review/actions", json={"action": "accept", "track_id": 1}).status_code == 401
    res = client.post(
        "/recordings/rec1/review/actions", json={"action": "accept", "track_id": 1}, headers=keys["uploader"]
    )
    assert res.status_code == 403
    assert client.post("/recordings/rec1/review/undo", headers=keys["reviewer"]).status_code == 409
    assert client.get("/recordings/nope/review", headers=keys["reviewer"]).status_code == 404


def test_disagreeing_crops_come_before_a_slightly_less_confident_track():
    from gateway.app import review_order

    sure = track(1, [0, 1], confidence=0.9)
    torn = track(2, [0, 1], confidence=0.95).model_copy(update={"crop_agreement": 0.6})
    decided = track(3, [0, 1], confidence=0.1, review=Review(status="accepted"))
    assert [t.track_id for t in sorted([sure, torn, decided], key=review_order)] == [2, 1, 3]
