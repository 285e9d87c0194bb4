"""The model registry: seeding, immutable versions, the promotion rule, forced promotions, history."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from services.common.errors import InputError, ModelError
from services.common.registry import PromotionRefused, Registry, compare_frozen, parse_model_spec, resolve_base
from tests.unit.registry.helpers import classifier_figures, make_model


def _seeded(tmp_path: Path, figures: dict[str, object] | None = None) -> Registry:
    seed = tmp_path / "deploy"
    make_model(seed, "classifier", "v1", classifier_figures(0.95, 0.97, 1.0) if figures is None else figures)
    make_model(seed, "detector", "d1", {"manifest_sha256": "b" * 64, "ap50": 0.9, "recall": 0.9})
    registry = Registry(tmp_path / "reg")
    assert registry.seed(seed) == ["classifier", "detector"]
    assert registry.seed(seed) == []  # only on first use
    return registry


def test_seed_registers_and_promotes_the_committed_models(tmp_path: Path) -> None:
    registry = _seeded(tmp_path)
    assert registry.promoted("classifier") == "v1"
    assert registry.promoted("detector") == "d1"
    path = registry.resolve("classifier")
    assert path == tmp_path / "reg" / "classifier" / "versions" / "v1" / "classifier.onnx"
    assert registry.resolve("classifier@v1") == path
    info = registry.get("classifier", "v1")
    assert registry.added_line(info) == (
        f"registered classifier@v1 in {registry.root} (parent {info.card.parent_version}); "
        f"promote with: roadlabel models promote classifier v1 --registry {registry.root}"
    )
    history = registry.history("classifier")
    assert len(history) == 1
    assert history[0]["forced"] is False
    assert "seeded" in history[0]["reason"]


def test_versions_are_immutable(tmp_path: Path) -> None:
    registry = _seeded(tmp_path)
    other = make_model(tmp_path / "other", "classifier", "v1", payload=b"another model")
    with pytest.raises(InputError, match="already registered with another model"):
        registry.add(other)
    info = registry.get("classifier", "v1")
    info.model_path.chmod(0o644)
    info.model_path.write_bytes(b"tampered")
    with pytest.raises(ModelError, match="immutable"):
        registry.resolve("classifier@v1")


def test_adding_is_atomic_and_idempotent(tmp_path: Path) -> None:
    registry = _seeded(tmp_path)
    model = make_model(tmp_path / "new", "classifier", "v2", classifier_figures(0.96, 0.97, 1.0), parent="v1")
    first = registry.add(model)
    assert registry.add(model) == first
    assert first.card.parent_version == "v1"
    leftovers = [p.name for p in (tmp_path / "reg" / "classifier" / "versions").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert registry.promoted("classifier") == "v1"  # adding does not promote
    with pytest.raises(ModelError, match="expected classifier version 'nope'"):
        registry.get("classifier", "nope")


@pytest.mark.parametrize(
    ("figures", "ok"),
    [
        (classifier_figures(0.96, 0.97, 1.0), True),  # track accuracy up, the rest equal
        (classifier_figures(0.95, 0.98, 1.0), False),  # track accuracy only equal
        (classifier_figures(0.96, 0.969, 1.0), False),  # crop accuracy lower
        (classifier_figures(0.96, 0.97, 0.996), True),  # background rejection down by 0.4 pt
        (classifier_figures(0.96, 0.97, 0.994), False),  # background rejection down by 0.6 pt
    ],
)
def test_classifier_promotion_rule(tmp_path: Path, figures: dict[str, object], ok: bool) -> None:
    registry = _seeded(tmp_path)
    registry.add(make_model(tmp_path / "new", "classifier", "v2", figures))
    if ok:
        record = registry.promote("classifier", "v2", who="tester")
        assert record["forced"] is False
        assert registry.promoted("classifier") == "v2"
    else:
        with pytest.raises(PromotionRefused, match="not better"):
            registry.promote("classifier", "v2")
        assert registry.promoted("classifier") == "v1"


def test_detector_promotion_rule() -> None:
    old = {"manifest_sha256": "b" * 64, "ap50": 0.9, "recall": 0.9}
    assert compare_frozen("detector", old | {"ap50": 0.91}, old)[0]
    assert not compare_frozen("detector", old | {"ap50": 0.91, "recall": 0.89}, old)[0]
    assert not compare_frozen("detector", old, old)[0]


def test_different_frozen_sets_are_not_compared(tmp_path: Path) -> None:
    registry = _seeded(tmp_path)
    registry.add(make_model(tmp_path / "new", "classifier", "v2", classifier_figures(0.99, 0.99, 1.0, "c" * 64)))
    with pytest.raises(PromotionRefused, match="same frozen set"):
        registry.promote("classifier", "v2")


def test_eval_record_makes_a_version_comparable(tmp_path: Path) -> None:
    registry = _seeded(tmp_path)
    info = registry.add(make_model(tmp_path / "new", "classifier", "v2"))
    with pytest.raises(PromotionRefused, match="expected figures of version v2 on the same frozen set"):
        registry.promote("classifier", "v2")
    registry.record_eval(info, classifier_figures(0.99, 0.99, 1.0))
    assert registry.promote("classifier", "v2")["version"] == "v2"


def test_forced_promotion_needs_a_reason_and_is_recorded(tmp_path: Path) -> None:
    registry = _seeded(tmp_path)
    registry.add(make_model(tmp_path / "new", "classifier", "v2", classifier_figures(0.5, 0.5, 0.5)))
    with pytest.raises(PromotionRefused, match="needs --reason"):
        registry.promote("classifier", "v2", force=True)
    record = registry.promote("classifier", "v2", force=True, reason="hotfix for a new sign design", who="ann")
    assert record["forced"] is True
    assert registry.promoted("classifier") == "v2"
    last = registry.history("classifier")[-1]
    assert (last["version"], last["previous"], last["by"], last["forced"]) == ("v2", "v1", "ann", True)
    assert last["reason"] == "hotfix for a new sign design"
    assert any("FAILS" in line for line in last["rule"])
    promoted = json.loads((tmp_path / "reg" / "classifier" / "promoted.json").read_text())
    assert promoted["version"] == "v2"


def test_concurrent_promotions_keep_one_consistent_history(tmp_path: Path) -> None:
    registry = _seeded(tmp_path)
    for n, track in enumerate((0.96, 0.97, 0.98), 2):
        registry.add(make_model(tmp_path / f"m{n}", "classifier", f"v{n}", classifier_figures(track, 0.97, 1.0)))
    errors: list[Exception] = []

    def promote(version: str) -> None:
        try:
            registry.promote("classifier", version)
        except PromotionRefused as exc:
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(f"v{n}",)) for n in (2, 3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    history = registry.history("classifier")
    # Each promotion saw the state the previous one left: the chain of 'previous' is unbroken.
    for before, after in zip(history, history[1:], strict=False):
        assert after["previous"] == before["version"]
    assert len(history) == 1 + 3 - len(errors)
    assert registry.promoted("classifier") == history[-1]["version"]


def test_model_specs() -> None:
    assert parse_model_spec("classifier") == ("classifier", "promoted")
    assert parse_model_spec("detector@20261121-032368ac") == ("detector", "20261121-032368ac")
    for bad in ("tracker@v1", "classifier@../x", "classifier@"):
        if bad == "classifier@":
            assert parse_model_spec(bad) == ("classifier", "promoted")
            continue
        with pytest.raises(InputError, match="expected 'classifier'"):
            parse_model_spec(bad)


def test_a_training_base_is_a_file_or_a_registry_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROADLABEL_REGISTRY", raising=False)
    registry = _seeded(tmp_path)
    path, checkpoint, reg = resolve_base("classifier@v1", tmp_path / "reg", "classifier")
    assert path == registry.resolve("classifier@v1")
    assert checkpoint is None
    assert reg is not None
    assert reg.root == registry.root
    onnx = registry.resolve("detector")
    assert resolve_base(str(onnx), None, "detector")[:2] == (onnx, None)
    assert resolve_base(None, None, "classifier") == (None, None, None)
    with pytest.raises(InputError, match="expected a classifier version"):
        resolve_base("detector@d1", tmp_path / "reg", "classifier")
    with pytest.raises(InputError, match="expected --registry DIR"):
        resolve_base("classifier@v1", None, "classifier")
    with pytest.raises(InputError, match="no such file"):
        resolve_base(str(tmp_path / "gone.onnx"), None, "classifier")
