"""The learning loop (active learning, self-training) and a mini version of the experiment, on synthetic data."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from services.classifier.tracks import decide_track
from services.classifier.train.experiment import (
    ExperimentSettings,
    GtsrbSplit,
    SoftmaxHeadTrainer,
    decisions_to_reach,
    head_card,
    initial_tracks,
    markdown_report,
    run_experiment,
    write_report,
)
from services.classifier.train.learning_loop import (
    decide_tracks,
    group_tracks,
    run_active_learning,
    run_self_training,
    select_confident,
    select_uncertain,
    track_evaluator,
)
from services.common.errors import InputError
from services.common.modelcard import ModelCard

K = 44
CARD = head_card(np.zeros(1), 1.0, 64)


def _lp(class_id: int, confidence: float) -> np.ndarray:
    """One crop's log-probabilities with ``confidence`` on ``class_id`` and the rest spread evenly."""
    p = np.full(K, (1 - confidence) / (K - 1))
    p[class_id] = confidence
    return np.log(p).astype(np.float32)


@dataclass
class TablePredictor:
    """Fixed log-probabilities per item."""

    table: np.ndarray
    card: ModelCard = CARD

    def log_probs(self, items: np.ndarray) -> np.ndarray:
        return self.table[items]


@dataclass
class RecordingTrainer:
    """Returns a fixed predictor and remembers what each fit was given."""

    predictor: TablePredictor
    fits: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    def fit(self, items: np.ndarray, labels: np.ndarray, human: np.ndarray) -> TablePredictor:
        self.fits.append((items.copy(), labels.copy(), human.copy()))
        return self.predictor


def _pool(confidences: dict[str, tuple[int, list[float]]]) -> tuple[dict[str, np.ndarray], TablePredictor]:
    """Tracks with given per-crop (class, confidences) -> (tracks, predictor)."""
    rows, groups = [], []
    for track, (class_id, confs) in confidences.items():
        for c in confs:
            rows.append(_lp(class_id, c))
            groups.append(track)
    return group_tracks(groups), TablePredictor(np.stack(rows))


def _no_eval(_p: object) -> dict[str, float]:
    return {}


def test_uncertainty_selection_picks_the_lowest_review_priority_tracks() -> None:
    tracks, predictor = _pool(
        {
            "sure": (1, [0.99, 0.98, 0.99]),
            "torn": (2, [0.4, 0.45, 0.5]),
            "mixed": (3, [0.9, 0.9, 0.2]),
            "fair": (4, [0.8, 0.8, 0.8]),
        }
    )
    decisions = decide_tracks(predictor, tracks)
    # Independent check: each decision equals decide_track on that track's rows.
    for t, idx in tracks.items():
        assert decisions[t].priority == pytest.approx(decide_track(predictor.table[idx], CARD).priority)
    expected = sorted(tracks, key=lambda t: decisions[t].confidence * decisions[t].crop_agreement)[:2]
    assert select_uncertain(decisions, 2) == expected
    assert expected[0] == "torn"
    assert "sure" not in select_uncertain(decisions, 3)


def test_active_learning_reviews_k_doubtful_tracks_per_round_and_records_are_consistent() -> None:
    tracks, predictor = _pool(
        {f"t{i}": (i % 5, [0.3 + 0.06 * i] * (2 + i % 3)) for i in range(10)}  # t0 most doubtful ... t9 surest
    )
    trainer = RecordingTrainer(predictor)
    reviewed: list[str] = []

    def reviewer(t: str) -> int:
        reviewed.append(t)
        return int(t[1:]) % 5

    records = run_active_learning(
        tracks, {"t9": 4}, trainer, reviewer, strategy="uncertainty", k=3, rounds=5, evaluate=_no_eval
    )
    assert reviewed == [f"t{i}" for i in range(9)]  # lowest priority first, 3 per round, until the pool is empty
    assert [r.round for r in records] == [0, 1, 2, 3]  # stopped early: nothing left
    assert [r.human_decisions for r in records] == [1, 4, 7, 10]
    assert [r.unlabelled_tracks for r in records] == [9, 6, 3, 0]
    for record, (items, labels, human) in zip(records, trainer.fits, strict=True):
        assert record.labelled_crops == len(items) == len(set(items.tolist()))
        assert human.all()
        for t, idx in tracks.items():  # a reviewed track brings all its crops, with the reviewer's class
            if np.isin(idx, items).any():
                assert np.isin(idx, items).all()
                assert set(labels[np.isin(items, idx)].tolist()) == {int(t[1:]) % 5}
        assert record.pseudo_tracks == 0
        assert record.pseudo_precision is None


def _reviewer(seen: list[str]):
    def review(t: str) -> int:
        seen.append(t)
        return 1

    return review


def test_random_selection_is_seeded_and_never_repeats_a_track() -> None:
    tracks, predictor = _pool({f"t{i:02d}": (1, [0.5]) for i in range(30)})
    runs = []
    for _ in range(2):
        reviewed: list[str] = []
        run_active_learning(
            tracks,
            {"t00": 1},
            RecordingTrainer(predictor),
            _reviewer(reviewed),
            strategy="random",
            k=4,
            rounds=3,
            evaluate=_no_eval,
            seed=7,
        )
        runs.append(reviewed)
    assert runs[0] == runs[1]
    assert len(runs[0]) == 12 == len(set(runs[0]))
    assert "t00" not in runs[0]


def test_self_training_adds_only_tracks_at_or_above_the_threshold_with_all_their_crops() -> None:
    tracks, predictor = _pool(
        {
            "labelled": (0, [0.99, 0.99]),
            "high": (7, [0.97, 0.95, 0.96]),  # accepted at 0.9, wrong: truth is 8
            "edge": (5, [0.93, 0.91]),  # just above: accepted
            "low": (6, [0.85, 0.88, 0.8]),  # below 0.9
            "bg": (43, [0.99, 0.99]),  # not a sign: never pseudo-labelled
        }
    )
    truth = {"labelled": 0, "high": 8, "edge": 5, "low": 6, "bg": 1}
    assert select_confident(decide_tracks(predictor, tracks), 0.9) == {"edge": 5, "high": 7, "labelled": 0}
    trainer = RecordingTrainer(predictor)
    records = run_self_training(
        tracks, {"labelled": 0}, trainer, threshold=0.9, rounds=4, evaluate=_no_eval, truth=truth.__getitem__
    )
    assert len(records) == 2  # round 1 adds high + edge; round 2 would add nothing: converged
    items, labels, human = trainer.fits[1]
    assert sorted(items.tolist()) == sorted([*tracks["labelled"], *tracks["high"], *tracks["edge"]])
    assert labels[np.isin(items, tracks["high"])].tolist() == [7, 7, 7]
    assert labels[np.isin(items, tracks["edge"])].tolist() == [5, 5]
    assert human.tolist() == np.isin(items, tracks["labelled"]).tolist()
    r1 = records[1]
    assert (r1.human_decisions, r1.pseudo_tracks, r1.new_pseudo_tracks, r1.unlabelled_tracks) == (1, 2, 2, 2)
    assert r1.new_pseudo_precision == r1.pseudo_precision == pytest.approx(0.5)
    assert records[0].new_pseudo_precision is None
    assert r1.labelled_crops == 7


def test_loops_refuse_bad_input() -> None:
    tracks, predictor = _pool({"a": (1, [0.5]), "b": (2, [0.5])})
    trainer = RecordingTrainer(predictor)
    with pytest.raises(InputError, match="expected 'uncertainty' or 'random', got 'greedy'"):
        run_active_learning(tracks, {"a": 1}, trainer, int, strategy="greedy", k=1, rounds=1, evaluate=_no_eval)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="unknown"):
        run_self_training(tracks, {"zz": 1}, trainer, threshold=0.9, rounds=1)
    with pytest.raises(InputError, match=r"expected a confidence in \[0, 1\], got 1.5"):
        select_confident({}, 1.5)
    with pytest.raises(InputError, match="expected at least one labelled track"):
        run_self_training(tracks, {}, trainer, threshold=0.9, rounds=1)


def test_track_evaluator_counts_crops_and_tracks() -> None:
    table = np.stack([_lp(1, 0.9), _lp(1, 0.6), _lp(2, 0.7), _lp(3, 0.9), _lp(3, 0.9)])
    evaluate = track_evaluator(np.arange(5), np.array([1, 1, 1, 3, 3]), ["a", "a", "a", "b", "b"])
    figures = evaluate(TablePredictor(table))
    assert figures["crop_accuracy"] == pytest.approx(4 / 5)
    assert figures["track_accuracy"] == pytest.approx(1.0)  # the geometric mean outvotes the one wrong crop


def test_decisions_to_reach_interpolates_between_rounds() -> None:
    curve = [(10.0, 0.5), (20.0, 0.7), (30.0, 0.8)]
    assert decisions_to_reach(curve, 0.6) == pytest.approx(15.0)
    assert decisions_to_reach(curve, 0.4) == 10.0
    assert decisions_to_reach(curve, 0.9) is None


def _synthetic_split(rng: np.random.Generator, classes: int = 6, tracks_per_class: int = 12, crops: int = 4):
    labels, groups = [], []
    for c in range(classes):
        for t in range(tracks_per_class):
            labels += [c] * crops
            groups += [f"{c:02d}_{t:05d}"] * crops
    groups_a = np.array(groups)
    is_val = np.array([int(g[-5:]) < 3 for g in groups])  # 3 tracks per class for validation
    return GtsrbSplit(np.zeros((len(labels), 1, 1, 3), np.uint8), np.array(labels), groups_a, is_val, "synthetic")


def test_mini_experiment_runs_end_to_end_and_writes_the_report(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    split = _synthetic_split(rng)
    centres = rng.normal(0, 1, (6, 8))
    track_offset = {g: rng.normal(0, 0.6, 8) for g in sorted(set(split.groups.tolist()))}  # sorted: hash-seed free

    def features(s: GtsrbSplit, start: object, seed: int) -> tuple[np.ndarray, np.ndarray]:
        r = np.random.default_rng(seed)
        base = centres[s.labels] + np.stack([track_offset[g] for g in s.groups])
        clean = (base + r.normal(0, 0.5, base.shape)).astype(np.float32)
        return clean, (base + r.normal(0, 0.5, (1, *base.shape))).astype(np.float32)

    settings = ExperimentSettings(
        data=tmp_path, out=tmp_path, k=5, rounds=3, selftrain_rounds=2, seeds=(0,), start_fraction=0.1
    )
    events: list[tuple[str, int, int]] = []
    results = run_experiment(split, settings, lambda *e: events.append(e), features_fn=features)
    assert results["pool"] == {"tracks": 54, "crops": 216}
    assert results["validation"]["tracks"] == 18
    for seed in results["seeds"]:
        rec = seed["records"]
        assert seed["start_tracks"] == 6  # one per class (stratified, at least one)
        assert [r["human_decisions"] for r in rec["uncertainty"]] == [6, 11, 16, 21]
        assert [r["human_decisions"] for r in rec["random"]] == [6, 11, 16, 21]
        assert rec["full"][0]["human_decisions"] == 54
        for name in ("selftrain@0.8", "selftrain@0.9"):
            assert all(r["human_decisions"] == 6 for r in rec[name])
            assert all(0 <= r["figures"]["crop_accuracy"] <= 1 for r in rec[name])
    curves = results["summary"]["curves"]["crop_accuracy"]
    assert curves["full"][0]["mean"] > 0.8  # separable clusters: the cheap trainer learns them
    assert set(results["summary"]["decisions_saved"]["crop_accuracy"]) == {"random_final", "99pct_of_full"}
    assert events[-1] == ("seed", 1, 1)
    rounds_events = [e for e in events if e[0] == "rounds"]
    assert rounds_events[-1][1] == rounds_events[-1][2]
    write_report(results, tmp_path / "r.json", tmp_path / "e.md", tmp_path / "e.png")
    assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "e.md").read_text()
    assert md == markdown_report(results)
    assert "| full | 54 |" in md
    assert "selftrain@0.9" in md


def test_head_trainer_calibrates_on_held_out_human_tracks_only() -> None:
    rng = np.random.default_rng(1)
    groups = np.repeat([f"t{i}" for i in range(20)], 3)
    labels = np.repeat(np.arange(20) % 4, 3)
    feats = (np.eye(4)[labels] * 3 + rng.normal(0, 0.7, (60, 4))).astype(np.float32)
    trainer = SoftmaxHeadTrainer(feats, groups, np.zeros((0, 60, 4), np.float32), calibration_fraction=0.25)
    human = np.arange(60) < 30  # the other half carries (deliberately wrong) pseudo labels
    wrong = np.where(human, labels, (labels + 1) % 4)
    predictor = trainer.fit(np.arange(60), wrong, human)
    assert isinstance(predictor.card, ModelCard)
    lp = predictor.log_probs(np.arange(60))
    assert lp.shape == (60, K)
    assert np.allclose(np.exp(lp).sum(axis=1), 1, atol=1e-4)
    with pytest.raises(InputError, match="expected features"):
        SoftmaxHeadTrainer(feats, groups[:5], np.zeros((0, 60, 4), np.float32))


def test_initial_tracks_are_stratified_and_seeded() -> None:
    track_class = {f"{c}_{t}": c for c in range(3) for t in range(25)}
    a = initial_tracks(track_class, 0.1, np.random.default_rng(3))
    b = initial_tracks(track_class, 0.1, np.random.default_rng(3))
    assert a == b
    assert sorted(a.values()) == [0] * 2 + [1] * 2 + [2] * 2  # round(2.5) = 2 per class
    assert all(track_class[t] == c for t, c in a.items())


def test_selftrain_cli_runs_the_product_trainer_on_tiny_data(gtsrb_dir: Path, tmp_path: Path) -> None:
    from gateway.cli import main
    from services.classifier.train.selftrain import scan_unlabeled

    unlabeled = tmp_path / "crops"
    (unlabeled / "rec1").mkdir(parents=True)
    for i, src in enumerate(sorted((gtsrb_dir / "00014").glob("00000_*.png"))):
        (unlabeled / "rec1" / f"00007_{i:05d}.png").write_bytes(src.read_bytes())
    (unlabeled / "lone.png").write_bytes(next((gtsrb_dir / "00038").glob("*.png")).read_bytes())
    assert sorted({t for _, t in scan_unlabeled([unlabeled])}) == ["U0:./lone", "U0:rec1/00007"]
    out = tmp_path / "out"
    argv = ["selftrain", "--labeled", str(gtsrb_dir), "--unlabeled", str(unlabeled), "--threshold", "0.0"]
    argv += ["--rounds", "1", "--out", str(out), "--epochs", "1", "--max-steps", "1", "--input-size", "32"]
    assert main([*argv[:1], "--device", "cpu", *argv[1:]]) == 0
    report = json.loads((out / "selftrain.json").read_text())
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["pseudo_tracks"] == rounds[1]["new_pseudo_tracks"] <= 2
    assert rounds[0]["human_decisions"] == rounds[1]["human_decisions"] == 12
    assert (out / "round_00" / "model" / "classifier.onnx").is_file()
    assert (
        main(["selftrain", "--labeled", str(gtsrb_dir), "--unlabeled", str(tmp_path / "none"), "--out", str(out)]) == 2
    )


def test_selftrain_cli_bad_input_is_a_clear_error(
    gtsrb_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    unlabeled = tmp_path / "crops"
    unlabeled.mkdir()
    (unlabeled / "00001_00000.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # read only once round 0 trained
    out = tmp_path / "out"
    base = ["selftrain", "--device", "cpu", "--labeled", str(gtsrb_dir), "--unlabeled", str(unlabeled), "--out"]
    quick = ["--epochs", "1", "--max-steps", "1", "--input-size", "32"]
    assert main([*base, str(out), "--epochs", "0"]) == 2
    assert "expected --epochs >= 1 and --lr > 0, got 0, None" in capsys.readouterr().err
    assert main([*base, str(out), "--background", str(tmp_path / "nope"), *quick]) == 2
    assert f"--background: expected folders, got {tmp_path / 'nope'}" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written
    assert main([*base, str(out), *quick]) == 2
    err = capsys.readouterr().err
    assert "00001_00000.png" in err
    assert "rounds finished before it are in" in err
