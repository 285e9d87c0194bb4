"""The HTTP gateway in process (TestClient): auth, uploads, bad input, jobs run by a worker, exports, tus, delete."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.app import GatewaySettings, create_app, safe_source_name
from gateway.store import Store
from gateway.worker import WorkerConfig, _Models, process_one
from services.common.labelfile import LabelFile
from tests.synthvideo import make_tiny_video

pytestmark = pytest.mark.usefixtures("restore_root_logger")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> bytes:
    return make_tiny_video(tmp_path_factory.mktemp("v") / "tiny.mp4", 64, 48, n_frames=6).path.read_bytes()


@pytest.fixture
def settings(tmp_path) -> GatewaySettings:
    return GatewaySettings(data_dir=tmp_path / "data", workers=0, max_upload_bytes=200_000)


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings, start_workers=False)) as c:
        yield c


def store_of(client: TestClient) -> Store:
    return client.app.state.gateway.store  # type: ignore[attr-defined]


@pytest.fixture
def keys(client) -> dict[str, dict[str, str]]:
    store = store_of(client)
    return {
        role: {"Authorization": f"Bearer {store.create_api_key(f'{role}-1', role)}"}
        for role in ("uploader", "reviewer", "admin")
    }


def upload(client, headers, body: bytes, name="drive.mp4", ctype="video/mp4"):
    return client.post(
        "/recordings", params={"filename": name}, content=body, headers={**headers, "Content-Type": ctype}
    )


def run_jobs(client, settings) -> int:
    """Run every queued job in this process, as a worker would."""
    store = store_of(client)
    config = WorkerConfig(settings.resolved_database_url(), settings.data_dir.resolve())
    models = _Models(None)
    done = 0
    while (job := store.claim_job("test-worker", 30)) is not None:
        process_one(store, config, "test-worker", job, models)
        done += 1
    return done


def error_of(response) -> tuple[str, str]:
    body = response.json()["error"]
    return body["code"], body["message"]


def test_requests_need_a_valid_key(client, keys, clip):
    assert error_of(client.get("/recordings"))[0] == "unauthorized"
    assert client.get("/recordings").status_code == 401
    assert client.get("/recordings", headers={"Authorization": "Bearer rl_nope"}).status_code == 401
    assert client.get("/recordings", headers={"Authorization": "Basic abc"}).status_code == 401
    forbidden = upload(client, keys["reviewer"], clip)
    assert forbidden.status_code == 403
    assert error_of(forbidden)[0] == "forbidden"
    assert client.get("/recordings", headers=keys["reviewer"]).json() == {"total": 0, "items": []}


def test_upload_label_fetch_export(client, keys, settings, clip):
    created = upload(client, keys["uploader"], clip)
    assert created.status_code == 201
    rec = created.json()
    assert created.headers["Location"] == f"/recordings/{rec['id']}"
    assert rec["status"] == "queued"
    assert rec["created_by"] == "uploader-1"
    assert client.get(f"/recordings/{rec['id']}/labels", headers=keys["reviewer"]).status_code == 409
    assert run_jobs(client, settings) == 1
    got = client.get(f"/recordings/{rec['id']}", headers=keys["reviewer"]).json()
    assert got["status"] == "done"
    assert got["job"]["progress"]["frames_done"] == 6
    labels = LabelFile.model_validate(client.get(f"/recordings/{rec['id']}/labels", headers=keys["reviewer"]).json())
    assert labels.recording.id == rec["id"]
    assert labels.recording.source == "drive.mp4"
    assert labels.recording.frame_count == 6
    for fmt, ctype, start in (
        ("cvat-video", "application/xml", b"<?xml"),
        ("mot", "application/zip", b"PK"),
        ("label-studio", "application/json", b"["),
    ):
        res = client.get(f"/recordings/{rec['id']}/export", params={"format": fmt}, headers=keys["reviewer"])
        assert res.status_code == 200
        assert res.headers["content-type"].startswith(ctype)
        assert res.content.startswith(start)
    bad = client.get(f"/recordings/{rec['id']}/export", params={"format": "yolo"}, headers=keys["reviewer"])
    assert error_of(bad)[0] == "invalid_request"


def test_same_bytes_are_recognised(client, keys, clip):
    first = upload(client, keys["uploader"], clip).json()
    again = upload(client, keys["uploader"], clip, name="copy.mp4")
    assert again.status_code == 200
    assert again.json()["id"] == first["id"]
    assert again.json()["duplicate"] is True
    assert client.get("/recordings", headers=keys["reviewer"]).json()["total"] == 1


def test_same_bytes_stored_by_another_gateway_meanwhile(client, keys, clip, settings, monkeypatch):
    # Another gateway sharing the database stores the same bytes between this one's twin check and its insert:
    # the database's unique index refuses the second row, and this gateway answers with the twin.
    first = upload(client, keys["uploader"], clip).json()
    real = Store.find_by_sha256
    calls: list[str] = []

    def late_twin(self: Store, sha256: str) -> dict[str, object] | None:
        calls.append(sha256)
        return None if len(calls) == 1 else real(self, sha256)  # the gateway's own check misses it

    monkeypatch.setattr(Store, "find_by_sha256", late_twin)
    again = upload(client, keys["uploader"], clip, name="copy.mp4")
    assert again.status_code == 200
    assert again.json()["id"] == first["id"]
    assert again.json()["duplicate"] is True
    assert len(calls) == 2  # the check, then the store's lookup after the refused insert
    assert client.get("/recordings", headers=keys["reviewer"]).json()["total"] == 1
    assert [p.name for p in (settings.data_dir / "recordings").iterdir()] == [f"{first['id']}.mp4"]
    assert list((settings.data_dir / "tmp").iterdir()) == []


def test_a_damaged_model_refuses_the_upload_and_keeps_nothing(client, keys, clip, settings):
    first = upload(client, keys["uploader"], clip).json()  # seeds the registry in data/models
    (model,) = (settings.data_dir / "models" / "classifier" / "versions").glob("*/classifier.onnx")
    model.write_bytes(b"not the registered model")
    other = make_tiny_video(settings.data_dir.parent / "other.mp4", 48, 32, n_frames=4).path.read_bytes()
    res = upload(client, keys["uploader"], other, name="other.mp4")
    assert res.status_code == 422
    code, message = error_of(res)
    assert code == "unknown_model"
    assert "classifier" in message
    assert [p.name for p in (settings.data_dir / "recordings").iterdir()] == [f"{first['id']}.mp4"]
    assert list((settings.data_dir / "tmp").iterdir()) == []
    assert client.get("/recordings", headers=keys["reviewer"]).json()["total"] == 1


@pytest.mark.parametrize(
    ("body", "ctype", "status", "code"),
    [
        (b"", "video/mp4", 422, "empty"),
        (b"certainly not a video" * 10, "video/mp4", 422, "not_a_video"),
        (b"x" * 10, "text/plain", 415, "unsupported_media_type"),
        (b"x" * 300_000, "video/mp4", 413, "too_large"),
    ],
    ids=["empty", "not-video", "content-type", "too-large"],
)
def test_bad_uploads_are_refused_and_leave_nothing(client, keys, settings, body, ctype, status, code):
    res = upload(client, keys["uploader"], body, ctype=ctype)
    assert res.status_code == status
    assert error_of(res)[0] == code
    data = settings.data_dir
    assert list((data / "tmp").iterdir()) == []
    assert list((data / "recordings").iterdir()) == []
    assert client.get("/recordings", headers=keys["reviewer"]).json()["total"] == 0


def test_too_large_without_content_length(client, keys):
    def chunks():
        for _ in range(30):
            yield b"y" * 10_000

    res = client.post(
        "/recordings", content=chunks(), headers={**keys["uploader"], "Content-Type": "application/octet-stream"}
    )
    assert res.status_code == 413


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("../../etc/passwd", "passwd"),
        ("a\x00b.mp4", "ab.mp4"),
        ("C:\\Users\\x\\drive.mp4", "drive.mp4"),
        ("é" * 300 + ".mp4", "é" * 200),
        ("...", "recording"),
        (None, "recording"),
    ],
)
def test_hostile_names_are_text_only(raw, shown):
    assert safe_source_name(raw) == shown


def test_hostile_name_upload_stays_inside_the_data_dir(client, keys, settings, clip):
    rec = upload(client, keys["uploader"], clip, name="../../../../tmp/evil\x00.mp4").json()
    assert rec["source_name"] == "evil.mp4"
    stored = list((settings.data_dir / "recordings").iterdir())
    assert [p.name for p in stored] == [f"{rec['id']}.mp4"]


def test_rerun_with_other_settings_and_bad_models(client, keys, settings, clip):
    rec = upload(client, keys["uploader"], clip).json()
    run_jobs(client, settings)
    res = client.post(f"/recordings/{rec['id']}/jobs", json={"settings": {"detect_every": 2}}, headers=keys["uploader"])
    assert res.status_code == 202
    assert res.json()["job"]["settings"]["detect_every"] == 2
    assert res.json()["job"]["id"] == rec["job"]["id"] + 1
    run_jobs(client, settings)
    labels = client.get(f"/recordings/{rec['id']}/labels", headers=keys["reviewer"]).json()
    assert labels["settings"]["detect_every"] == 2
    assert len(client.get(f"/recordings/{rec['id']}/jobs", headers=keys["reviewer"]).json()) == 2
    for body, code in (
        ({"settings": {"detect_every": 0}}, "bad_settings"),
        ({"settings": {"no_such": 1}}, "bad_settings"),
        ({"detector": "../../etc/passwd"}, "bad_model"),
        ({"classifier": "nonexistent"}, "unknown_model"),
        ({"bogus": 1}, "invalid_request"),
    ):
        bad = client.post(f"/recordings/{rec['id']}/jobs", json=body, headers=keys["uploader"])
        assert bad.status_code == 422, body
        assert error_of(bad)[0] == code
    not_json = client.post(
        f"/recordings/{rec['id']}/jobs",
        content=b"{not json",
        headers={**keys["uploader"], "Content-Type": "application/json"},
    )
    assert error_of(not_json)[0] == "invalid_request"


def test_delete_removes_files_and_cancels_jobs(client, keys, settings, clip):
    rec = upload(client, keys["uploader"], clip).json()
    assert client.delete(f"/recordings/{rec['id']}", headers=keys["uploader"]).status_code == 204
    assert client.get(f"/recordings/{rec['id']}", headers=keys["reviewer"]).status_code == 404
    assert client.delete(f"/recordings/{rec['id']}", headers=keys["uploader"]).status_code == 404
    assert list((settings.data_dir / "recordings").iterdir()) == []
    assert run_jobs(client, settings) == 0  # its queued job was cancelled
    audit = store_of(client).audit_of(rec["id"])
    assert [(a["actor"], a["action"]) for a in audit] == [("uploader-1", "upload"), ("uploader-1", "delete")]


@pytest.mark.parametrize("rid", ["nope", "x" * 200, "..%2F..%2Fetc"])
def test_unknown_ids(client, keys, rid):
    res = client.get(f"/recordings/{rid}", headers=keys["reviewer"])
    assert res.status_code == 404
    assert error_of(res)[0] == "not_found"


def test_tus_resumable_upload(client, keys, settings, clip):
    tus = {**keys["uploader"], "Tus-Resumable": "1.0.0"}
    opts = client.options("/uploads")
    assert opts.headers["Tus-Version"] == "1.0.0"
    meta = "filename " + base64.b64encode(b"tus drive.mp4").decode()
    created = client.post("/uploads", headers={**tus, "Upload-Length": str(len(clip)), "Upload-Metadata": meta})
    assert created.status_code == 201
    url = created.headers["Location"]
    half = len(clip) // 2
    patch = {**tus, "Content-Type": "application/offset+octet-stream"}
    first = client.patch(url, content=clip[:half], headers={**patch, "Upload-Offset": "0"})
    assert first.status_code == 204
    assert first.headers["Upload-Offset"] == str(half)
    assert client.head(url, headers=tus).headers["Upload-Offset"] == str(half)
    stale = client.patch(url, content=clip[half:], headers={**patch, "Upload-Offset": "0"})
    assert stale.status_code == 409
    assert error_of(stale)[0] == "offset_mismatch"
    last = client.patch(url, content=clip[half:], headers={**patch, "Upload-Offset": str(half)})
    assert last.status_code == 204
    rid = last.headers["Recording-Id"]
    rec = client.get(f"/recordings/{rid}", headers=keys["reviewer"]).json()
    assert rec["source_name"] == "tus drive.mp4"
    assert rec["size_bytes"] == len(clip)
    assert client.patch(url, content=b"x", headers={**patch, "Upload-Offset": str(len(clip))}).status_code == 409
    assert client.post("/uploads", headers={**keys["uploader"], "Upload-Length": "5"}).status_code == 412
    assert client.head(url, headers={"Authorization": "Bearer rl_wrong", "Tus-Resumable": "1.0.0"}).status_code == 401
    stranger = {"Authorization": f"Bearer {store_of(client).create_api_key('uploader-2', 'uploader')}"}
    assert client.head(url, headers={**stranger, "Tus-Resumable": "1.0.0"}).status_code == 404  # not theirs


def test_openapi_lists_every_route_with_examples(client):
    schema = client.get("/openapi.json").json()
    paths = set(schema["paths"])
    assert {
        "/recordings",
        "/recordings/{recording_id}",
        "/recordings/{recording_id}/labels",
        "/recordings/{recording_id}/export",
        "/recordings/{recording_id}/jobs",
        "/uploads",
        "/uploads/{upload_id}",
    } <= paths
    assert "examples" in json.dumps(schema["components"]["schemas"]["RecordingOut"])


def test_settings_refuse_unknown_environment_keys(tmp_path):
    with pytest.raises(ValueError, match="extra"):
        GatewaySettings(data_dir=tmp_path, no_such_setting=1)  # type: ignore[call-arg]


def test_data_dir_keeps_paths_relative(settings):
    assert Path(settings.resolved_database_url().removeprefix("sqlite:///")).parent == settings.data_dir.resolve()


def test_what_the_reviewer_page_reads(client, keys, settings, clip):
    rec = upload(client, keys["uploader"], clip).json()
    run_jobs(client, settings)
    rid = rec["id"]
    timeline = client.get(f"/recordings/{rid}/timeline", headers=keys["reviewer"]).json()
    assert timeline["recording"]["frame_count"] == 6
    assert timeline["lanes"] == []
    frame = client.get(f"/recordings/{rid}/frame.jpg", params={"t_s": 0.1, "max_w": 32}, headers=keys["reviewer"])
    assert frame.status_code == 200
    assert frame.content[:2] == b"\xff\xd8"
    assert float(frame.headers["X-Frame-Time"]) >= 0.1 - 1e-3
    past = client.get(f"/recordings/{rid}/frame.jpg", params={"t_s": 999}, headers=keys["reviewer"])
    assert past.json()["error"]["code"] == "no_frame"
    window = client.get(f"/recordings/{rid}/boxes", params={"from_s": 0, "to_s": 1000}, headers=keys["reviewer"])
    assert window.json()["error"]["code"] == "bad_window"
    assert (
        client.get(f"/recordings/{rid}/boxes", params={"from_s": 0, "to_s": 5}, headers=keys["reviewer"]).json() == []
    )
    assert client.get(f"/recordings/{rid}/tracks/1/crops/0.jpg", headers=keys["reviewer"]).status_code == 404
    page = client.get("/ui/")
    assert page.status_code == 200
    assert '<script type="module" src="app.js">' in page.text
    assert client.get("/", follow_redirects=False).headers["location"] == "/ui/"


def test_video_urls_are_signed_and_support_ranges(client, keys, clip):
    rec = upload(client, keys["uploader"], clip).json()
    url = client.post(f"/recordings/{rec['id']}/video-url", headers=keys["reviewer"]).json()["url"]
    assert client.post(f"/recordings/{rec['id']}/video-url").status_code == 401
    whole = client.get(url)  # no Authorization header: the signature is the permission
    assert whole.status_code == 200
    assert whole.content == clip
    part = client.get(url, headers={"Range": "bytes=0-99"})
    assert part.status_code == 206
    assert part.content == clip[:100]
    forged = url.split("sig=")[0] + "sig=" + "0" * 64
    assert client.get(forged).json()["error"]["code"] == "bad_signature"
    expired = url.split("?")[0] + "?expires=1&sig=" + url.split("sig=")[1]
    assert client.get(expired).status_code == 403
    other = client.get(url.replace(rec["id"], "0" * 16))
    assert other.status_code == 403
