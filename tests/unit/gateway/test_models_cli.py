"""The registry in the gateway and on the command line: promoted versions for new jobs, list, promote, eval."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.app import GatewaySettings, create_app
from gateway.cli import main
from gateway.store import Store
from gateway.worker import WorkerConfig, _Models, process_one
from services.common.modelcard import ModelCard, card_path_for, load_card
from services.common.registry import Registry
from tests.synthvideo import make_tiny_video

pytestmark = pytest.mark.usefixtures("restore_root_logger")

DEPLOY = Path(__file__).resolve().parents[3] / "deploy" / "models"


def _candidate(tmp_path: Path, version: str, track_delta: float) -> Path:
    """The committed classifier under another version, with its frozen track accuracy moved by ``track_delta``."""
    folder = tmp_path / version
    folder.mkdir()
    shutil.copy(DEPLOY / "classifier.onnx", folder / "classifier.onnx")
    card = load_card(DEPLOY / "classifier.card.json")
    frozen = dict(card.metrics["frozen"])
    frozen["track_accuracy"] += track_delta
    update = {
        "version": version,
        "parent_version": card.version,
        "metrics": card.metrics | {"frozen": frozen},
        "extra": card.extra | {"created": "2099-01-01T00:00:00+00:00"},
    }
    ModelCard.model_validate(card.model_dump() | update).save(folder / "classifier.card.json")
    return folder / "classifier.onnx"


def test_models_list_promote_and_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = tmp_path / "reg"
    seed_version = load_card(DEPLOY / "classifier.card.json").version
    assert main(["models", "add", str(_candidate(tmp_path, "worse-1", -0.01)), "--registry", str(reg)]) == 0
    assert main(["models", "add", str(_candidate(tmp_path, "better-1", 0.001)), "--registry", str(reg)]) == 0
    capsys.readouterr()
    assert main(["models", "list", "classifier", "--registry", str(reg)]) == 0
    out = capsys.readouterr().out
    assert f"* {seed_version}" in out
    assert "worse-1" in out
    assert "better-1" in out

    assert main(["models", "promote", "classifier", "worse-1", "--registry", str(reg)]) == 1
    err = capsys.readouterr().err
    assert "refused" in err
    assert "FAILS: track accuracy" in err
    assert Registry(reg).promoted("classifier") == seed_version

    assert main(["models", "promote", "classifier", "better-1", "--registry", str(reg)]) == 0
    assert "promoted classifier@better-1" in capsys.readouterr().out
    assert Registry(reg).promoted("classifier") == "better-1"

    assert main(["models", "promote", "classifier", "worse-1", "--force", "--registry", str(reg)]) == 1
    assert "needs --reason" in capsys.readouterr().err
    args = [
        "models",
        "promote",
        "classifier",
        "worse-1",
        "--force",
        "--reason",
        "rollback test",
        "--registry",
        str(reg),
    ]
    assert main(args) == 0
    assert "FORCED: rollback test" in capsys.readouterr().out
    history = Registry(reg).history("classifier")
    assert [(h["version"], h["forced"]) for h in history] == [
        (seed_version, False),
        ("better-1", False),
        ("worse-1", True),
    ]

    assert main(["models", "list", "--json", "--registry", str(reg)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["task"] for r in rows} == {"classifier", "detector"}
    assert [r["version"] for r in rows if r["promoted"] and r["task"] == "classifier"] == ["worse-1"]


def test_models_without_registry_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ROADLABEL_REGISTRY", raising=False)
    assert main(["models", "list"]) == 1
    assert "expected --registry DIR or $ROADLABEL_REGISTRY" in capsys.readouterr().err


def _run_jobs(client: TestClient, settings: GatewaySettings) -> None:
    store: Store = client.app.state.gateway.store  # type: ignore[attr-defined]
    config = WorkerConfig(settings.resolved_database_url(), settings.data_dir.resolve())
    models = _Models(None)
    while (job := store.claim_job("test-worker", 30)) is not None:
        process_one(store, config, "test-worker", job, models)


def test_new_jobs_use_the_promoted_version(tmp_path: Path) -> None:
    settings = GatewaySettings(data_dir=tmp_path / "data", workers=0, max_upload_bytes=200_000)
    make_tiny_video(tmp_path / "clip.mp4")
    clip = (tmp_path / "clip.mp4").read_bytes()
    seed_version = load_card(DEPLOY / "classifier.card.json").version
    with TestClient(create_app(settings, start_workers=False)) as client:
        store: Store = client.app.state.gateway.store  # type: ignore[attr-defined]
        headers = {"Authorization": f"Bearer {store.create_api_key('u', 'admin')}"}

        def labels_of(rec_id: str) -> dict[str, object]:
            res = client.get(f"/recordings/{rec_id}/labels", headers=headers)
            models: dict[str, object] = res.json()["models"]
            return models

        first = client.post(
            "/recordings",
            params={"filename": "a.mp4"},
            content=clip,
            headers=headers | {"Content-Type": "video/mp4"},
        ).json()
        _run_jobs(client, settings)
        assert labels_of(first["id"])["classifier"]["version"] == seed_version  # type: ignore[index]
        registry = Registry(settings.data_dir / "models")
        assert registry.promoted("classifier") == seed_version
        registry.add(_candidate(tmp_path, "better-2", 0.001))
        registry.promote("classifier", "better-2")
        # A queued job keeps the version it was created with; new jobs take the promoted one.
        rerun = client.post(f"/recordings/{first['id']}/jobs", json={}, headers=headers)
        assert rerun.status_code == 202, rerun.json()
        _run_jobs(client, settings)
        assert labels_of(first["id"])["classifier"]["version"] == "better-2"  # type: ignore[index]
        pinned = client.post(
            f"/recordings/{first['id']}/jobs", json={"classifier": f"classifier@{seed_version}"}, headers=headers
        )
        assert pinned.status_code == 202
        _run_jobs(client, settings)
        assert labels_of(first["id"])["classifier"]["version"] == seed_version  # type: ignore[index]
        missing = client.post(
            f"/recordings/{first['id']}/jobs", json={"classifier": "classifier@nope"}, headers=headers
        )
        assert missing.status_code == 422
        assert "nope" in missing.json()["error"]["message"]


def test_eval_never_writes_into_a_registered_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = Registry(tmp_path / "reg")
    registry.seed(DEPLOY)
    info = registry.get("classifier", "promoted")
    card_before = card_path_for(info.model_path).read_bytes()
    assert main(["models", "eval", str(info.model_path), "--write-card"]) == 1
    err = capsys.readouterr().err
    assert "a registered version (versions are immutable)" in err
    assert card_path_for(info.model_path).read_bytes() == card_before
    assert registry.get("classifier", info.version).version == info.version  # still verifies


@pytest.mark.parametrize("task", ["classifier", "detector"])
def test_train_base_naming_no_version_is_a_one_line_error(tmp_path: Path, task: str) -> None:
    Registry(tmp_path / "reg").seed(DEPLOY)
    argv = ["train", task, "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--registry", str(tmp_path / "reg")]
    with pytest.raises(SystemExit, match=f"registry .*: expected {task} version 'nope', found none"):
        main([*argv, "--base", f"{task}@nope"])
    assert not (tmp_path / "out").exists()


DATA = Path(__file__).resolve().parents[4] / "shared" / "data"


@pytest.mark.skipif(not (DATA / "gtsrb_train").is_dir(), reason="the shared data is not beside this checkout")
def test_eval_reproduces_the_committed_classifiers_frozen_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("classifier.onnx", "classifier.card.json"):
        shutil.copy(DEPLOY / name, tmp_path / name)
    committed = load_card(DEPLOY / "classifier.card.json")
    stripped = committed.model_dump() | {"metrics": {}, "auto_accept_threshold": None}
    ModelCard.model_validate(stripped).save(tmp_path / "classifier.card.json")
    args = ["models", "eval", str(tmp_path / "classifier.onnx"), "--write-card", "--data-root", str(DATA)]
    assert main(args) == 0
    written = load_card(tmp_path / "classifier.card.json")
    got, want = written.metrics["frozen"], committed.metrics["frozen"]
    assert got["manifest_sha256"] == want["manifest_sha256"]
    for key in ("track_accuracy", "sign_accuracy", "background_rejection", "nll", "ece"):
        assert got[key] == pytest.approx(want[key], abs=1e-4), key
    assert written.auto_accept_threshold == pytest.approx(committed.auto_accept_threshold, abs=1e-4)
    assert written.onnx_sha256 == committed.onnx_sha256
    assert json.loads(capsys.readouterr().out)["tracks"] == 195
