"""The learning-loop experiment (``make experiment``): how many human decisions does uncertainty-first review save?

Setup, on GTSRB (tracks of ~10 crops of one physical sign):

* validation: the committed classifier's frozen validation tracks (``deploy/models/frozen/classifier.json``, or
  :func:`~services.classifier.train.data.split_tracks` seed 0, 15 % when it is absent); never trained on, never
  selected; the rest of the tracks is the pool;
* start: a stratified, seeded 10 % of the pool's tracks, labelled (human decisions);
* features: ImageNet MobileNetV2 fine-tuned ("warm-up") on the start tracks only, so no label of the rest of the
  pool shapes them; then penultimate features of every crop (and of augmented views of the pool crops) are cached
  once, reduced by PCA (unsupervised, pool crops) and each round trains only a softmax head: seconds per round;
* the head is calibrated with a temperature fitted on a held-out slice of the human-labelled tracks, at track
  level (the NLL of each held-out track's decision, combined as the pipeline combines crops), since the loops
  threshold track confidences;
* active learning: each round the model decides every unlabelled pool track (:func:`decide_track`); ``k`` of them
  go to a simulated reviewer (the ground truth): the lowest review priority first (``uncertainty``) or ``random``;
  full supervision (every pool track labelled) is the ceiling;
* self-training at thresholds 0.8 and 0.9 from the same start, human decisions constant.

Run ``python -m services.classifier.train.experiment`` (``make experiment``): writes results.json, a markdown table
and a PNG. Progress is reported as events; the command line draws a tqdm bar.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from services.classifier.frozen import load_manifest
from services.classifier.tracks import combine_crops
from services.classifier.train.data import BACKGROUND_CLASS, SignSample, scan_gtsrb, split_tracks
from services.classifier.train.learning_loop import (
    Predictor,
    RoundRecord,
    group_tracks,
    run_active_learning,
    run_self_training,
    track_evaluator,
)
from services.common.classes import GTSRB_CLASS_NAMES, NOT_A_SIGN
from services.common.errors import InputError
from services.common.modelcard import ModelCard, atomic_write_bytes

if TYPE_CHECKING:
    from services.backbones.mobilenet_v2 import MobileNetV2

__all__ = [
    "ExperimentSettings",
    "HeadPredictor",
    "SoftmaxHeadTrainer",
    "decisions_to_reach",
    "initial_tracks",
    "main",
    "run_experiment",
    "summarise",
    "write_report",
]

NUM_OUTPUTS = BACKGROUND_CLASS + 1
EventFn = Callable[[str, int, int], None]


@dataclass(frozen=True, slots=True)
class ExperimentSettings:
    """Knobs of the experiment; the defaults are what ``make experiment`` runs."""

    data: Path
    out: Path
    frozen_manifest: Path | None = None
    input_size: int = 64
    start_fraction: float = 0.10
    k: int = 50
    rounds: int = 12
    selftrain_rounds: int = 5
    thresholds: tuple[float, ...] = (0.8, 0.9)
    seeds: tuple[int, ...] = (0, 1)
    warmup_epochs: int = 30
    warmup_batch: int = 64
    warmup_lr: float = 2e-3
    aug_views: int = 2
    pca_dims: int = 128
    l2: float = 1e-3
    # 0: the head's own softmax (L2-regularised) is the confidence. A 10 % start has ~2.5 tracks per class; holding
    # out a slice of them to fit a temperature leaves classes unseen, gave T ~ 2 (so underconfident that tracks at
    # 0.5 were 99 % right) and no track ever reached the 0.8 / 0.9 self-training thresholds.
    calibration_fraction: float = 0.0
    val_fraction: float = 0.15
    val_seed: int = 0
    max_crops: int | None = None  # tests: keep only this many tracks' worth of crops per class (None: all)


# --------------------------------------------------------------------------------------------------------------------
# The cheap trainer: a softmax head on cached features (numpy + scipy, no torch).


def _softmax_fit(
    x: np.ndarray, y: np.ndarray, k: int, l2: float, init: np.ndarray | None = None, maxiter: int = 200
) -> np.ndarray:
    """Multinomial logistic regression by L-BFGS -> (d + 1, k) weights (last row: bias)."""
    from scipy.optimize import minimize  # type: ignore[import-untyped]  # noqa: PLC0415 - slow import

    n, d = x.shape
    xb = np.concatenate([x, np.ones((n, 1), x.dtype)], axis=1)
    onehot = np.zeros((n, k), x.dtype)
    onehot[np.arange(n), y] = 1
    reg = np.ones((d + 1, 1), x.dtype)
    reg[-1] = 0  # no weight decay on the bias

    def loss_grad(w_flat: np.ndarray) -> tuple[float, np.ndarray]:
        w = w_flat.reshape(d + 1, k).astype(x.dtype)
        z = xb @ w
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        loss = -float(np.log(p[np.arange(n), y] + 1e-12).mean()) + 0.5 * l2 * float(((w * reg) ** 2).sum())
        grad = xb.T @ ((p - onehot) / n) + l2 * w * reg
        return loss, grad.ravel().astype(np.float64)

    start = np.zeros((d + 1) * k) if init is None else init.ravel().astype(np.float64)
    result = minimize(loss_grad, start, jac=True, method="L-BFGS-B", options={"maxiter": maxiter})
    out: np.ndarray = result.x.reshape(d + 1, k)
    return out


@dataclass(frozen=True, slots=True, eq=False)
class HeadPredictor:
    """A fitted softmax head: calibrated log-probabilities of the cached clean features of the items."""

    features: np.ndarray  # (N, d) clean features of every item
    weights: np.ndarray  # (d + 1, K)
    temperature: float
    card: ModelCard

    def log_probs(self, items: np.ndarray) -> np.ndarray:
        x = self.features[np.asarray(items, np.int64)]
        z = (x @ self.weights[:-1] + self.weights[-1]) / self.temperature
        z = z - z.max(axis=1, keepdims=True)
        out: np.ndarray = (z - np.log(np.exp(z).sum(axis=1, keepdims=True))).astype(np.float32)
        return out


def fit_track_temperature(logits: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """The temperature that makes TRACK decisions calibrated: minimises the NLL of each held-out track's true class
    under :func:`combine_crops` of its crops' tempered log-probabilities (the loop thresholds track confidences).

    A temperature fitted on single crops leaves a track of ten agreeing crops underconfident (the combination is a
    geometric mean, which does not sharpen): a threshold such as 0.9 would then never be reached.
    """
    rows = [np.flatnonzero(groups == g) for g in sorted(set(groups.tolist()))]
    truth = np.array([labels[r[0]] for r in rows])
    best, best_nll = 1.0, math.inf
    for t in np.geomspace(0.05, 20.0, 121):
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        nll = -float(np.mean([combine_crops(lp[r])[y] for r, y in zip(rows, truth, strict=True)]))
        if nll < best_nll:
            best, best_nll = float(t), nll
    return best


def head_card(weights: np.ndarray, temperature: float, input_size: int) -> ModelCard:
    """The in-memory card :func:`decide_track` reads: 43 signs + not-a-sign, no reject threshold."""
    return ModelCard(
        name="learning-loop-experiment-head",
        version="experiment",
        task="classifier",
        architecture="softmax head on cached MobileNetV2 features",
        class_names=(*GTSRB_CLASS_NAMES, NOT_A_SIGN),
        input_hw=(input_size, input_size),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        background_class=BACKGROUND_CLASS,
        temperature=temperature,
        reject_threshold=0.0,
        # The hash of the head's weights: this card describes no ONNX file.
        onnx_sha256=hashlib.sha256(weights.tobytes()).hexdigest(),
    )


@dataclass(eq=False)
class SoftmaxHeadTrainer:
    """The experiment's :class:`~services.classifier.train.learning_loop.Trainer`: a softmax head on cached features.

    ``fit`` holds out ``calibration_fraction`` of the human-labelled tracks, trains on the rest (with augmented
    views), fits the temperature on the held-out tracks' clean features, then refits on everything (warm-started)
    and keeps that temperature.

    Attributes:
        features: (N, d) clean features of every item.
        groups: (N,) track id of every item.
        views: (V, N, d) features of augmented views (V may be 0).
    """

    features: np.ndarray
    groups: np.ndarray
    views: np.ndarray
    num_outputs: int = NUM_OUTPUTS
    l2: float = 1e-3
    calibration_fraction: float = 0.2
    seed: int = 0
    input_size: int = 64
    fits: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        n = self.features.shape[0]
        if self.features.ndim != 2 or self.groups.shape != (n,) or self.views.shape[1:] != self.features.shape:
            raise InputError(
                f"head trainer: expected features (N, d), groups (N,) and views (V, N, d), got "
                f"{self.features.shape}, {self.groups.shape}, {self.views.shape}"
            )

    def _rows(self, items: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = [self.features[items], *(v[items] for v in self.views)]
        return np.concatenate(x), np.tile(labels, len(x))

    def fit(self, items: np.ndarray, labels: np.ndarray, human: np.ndarray) -> Predictor:
        items = np.asarray(items, np.int64)
        labels = np.asarray(labels, np.int64)
        self.fits += 1
        rng = np.random.default_rng([self.seed, self.fits])
        human_tracks = sorted(set(self.groups[items[human]].tolist()))
        n_cal = int(round(len(human_tracks) * self.calibration_fraction))
        temperature = 1.0
        init = None
        if n_cal >= 1 and len(human_tracks) - n_cal >= 1:
            cal_tracks = set(rng.choice(human_tracks, n_cal, replace=False).tolist())
            is_cal = np.isin(self.groups[items], list(cal_tracks))
            x, y = self._rows(items[~is_cal], labels[~is_cal])
            init = _softmax_fit(x, y, self.num_outputs, self.l2)
            cal_x = self.features[items[is_cal]]
            logits = cal_x @ init[:-1] + init[-1]
            temperature = fit_track_temperature(logits, labels[is_cal], self.groups[items[is_cal]])
        x, y = self._rows(items, labels)
        weights = _softmax_fit(x, y, self.num_outputs, self.l2, init=init)
        return HeadPredictor(self.features, weights, temperature, head_card(weights, temperature, self.input_size))


# --------------------------------------------------------------------------------------------------------------------
# Data, warm-up and features (torch, imported lazily).


@dataclass(frozen=True, slots=True, eq=False)
class GtsrbSplit:
    """All GTSRB crops resized, with labels, track ids and the validation mask."""

    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64
    groups: np.ndarray  # (N,) str
    is_val: np.ndarray  # (N,) bool
    val_source: str


def frozen_val_tracks(manifest: Path) -> set[str]:
    """GTSRB track ids (``CC_TTTTT``) of a frozen classifier manifest (hash-checked by its loader)."""
    from services.classifier.frozen import load_manifest  # noqa: PLC0415 - optional: only when the file is there

    body = load_manifest(manifest, task="classifier").body
    out: set[str] = set()
    for track in body["tracks"]:
        name = Path(track["files"][0][0]).name
        out.add(f"{int(track['class_id']):02d}_{name.split('_')[0]}")
    return out


def load_split(settings: ExperimentSettings, on_event: EventFn) -> GtsrbSplit:
    """Decode every GTSRB crop at the serving size and mark the validation tracks."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    from services.classifier.preprocess import resize_crop  # noqa: PLC0415
    from services.common.images import load_image  # noqa: PLC0415

    samples: list[SignSample] = scan_gtsrb(settings.data)
    _, val_tracks = split_tracks(samples, settings.val_fraction, settings.val_seed)
    source = f"split_tracks(val_fraction={settings.val_fraction}, seed={settings.val_seed})"
    if settings.frozen_manifest is not None and settings.frozen_manifest.is_file():
        frozen = frozen_val_tracks(settings.frozen_manifest)
        if frozen != val_tracks:
            raise InputError(
                f"frozen set {settings.frozen_manifest}: expected the {len(val_tracks)} tracks of {source}, got "
                f"{len(frozen)} tracks ({len(frozen ^ val_tracks)} differ)"
            )
        manifest_sha = load_manifest(settings.frozen_manifest).sha256[:12]
        source = f"frozen set {settings.frozen_manifest.name}, manifest {manifest_sha} (= {source})"
    if settings.max_crops is not None:
        samples = samples[: settings.max_crops]
    hw = (settings.input_size, settings.input_size)
    images: list[np.ndarray] = []
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        for i, img in enumerate(pool.map(lambda s: resize_crop(load_image(s.path), hw), samples), 1):
            images.append(img)
            if i % 500 == 0 or i == len(samples):
                on_event("load", i, len(samples))
    groups = np.array([s.track for s in samples])
    return GtsrbSplit(
        np.stack(images),
        np.array([s.class_id for s in samples], np.int64),
        groups,
        np.isin(groups, sorted(val_tracks)),
        source,
    )


def initial_tracks(track_class: Mapping[str, int], fraction: float, rng: np.random.Generator) -> dict[str, int]:
    """A stratified ``fraction`` of the tracks (at least one per class): track id -> class."""
    by_class: dict[int, list[str]] = {}
    for t in sorted(track_class):
        by_class.setdefault(track_class[t], []).append(t)
    out: dict[str, int] = {}
    for c in sorted(by_class):
        tracks = by_class[c]
        take = max(1, round(len(tracks) * fraction))
        for i in sorted(rng.choice(len(tracks), size=take, replace=False).tolist()):
            out[tracks[i]] = c
    return out


def warm_up(images: np.ndarray, labels: np.ndarray, settings: ExperimentSettings, seed: int) -> MobileNetV2:
    """Fine-tune ImageNet MobileNetV2 on the start crops only, with the product's augmentation."""
    import torch  # noqa: PLC0415 - training-only dependency
    from torch import nn  # noqa: PLC0415

    from services.backbones.mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD  # noqa: PLC0415
    from services.classifier.train.augment import AugmentSettings, augment_batch  # noqa: PLC0415
    from services.classifier.train.loop import build_model  # noqa: PLC0415

    torch.manual_seed(seed)
    model: MobileNetV2 = build_model(NUM_OUTPUTS).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    x_all = torch.from_numpy(images)
    y_all = torch.from_numpy(labels)
    steps = math.ceil(len(x_all) / settings.warmup_batch) * settings.warmup_epochs
    opt = torch.optim.AdamW(model.parameters(), lr=settings.warmup_lr, weight_decay=0.02)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.warmup_lr, total_steps=steps, pct_start=0.2)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.05)
    gen = torch.Generator().manual_seed(seed)
    mean = torch.tensor(IMAGENET_MEAN)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD)[None, :, None, None]
    aug = AugmentSettings()
    model.train()
    for _ in range(settings.warmup_epochs):
        order = torch.randperm(len(x_all), generator=gen)
        for b in range(0, len(x_all), settings.warmup_batch):
            idx = order[b : b + settings.warmup_batch]
            x, y = augment_batch(x_all[idx], y_all[idx], aug, gen)
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            loss = criterion(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def extract_features(
    model: MobileNetV2, images: np.ndarray, views: int, augment_mask: np.ndarray, seed: int, batch: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate (pooled) features -> (N, 1280) clean, (views, N, 1280) augmented (zeros where not masked)."""
    import torch  # noqa: PLC0415

    from services.backbones.mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD  # noqa: PLC0415
    from services.classifier.train.augment import AugmentSettings, augment_batch  # noqa: PLC0415

    mean = torch.tensor(IMAGENET_MEAN)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD)[None, :, None, None]
    gen = torch.Generator().manual_seed(seed)
    aug = AugmentSettings()

    @torch.no_grad()
    def embed(x: torch.Tensor) -> np.ndarray:
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        out: np.ndarray = model.features(x).mean(dim=(2, 3)).numpy()
        return out

    model.eval()
    clean = np.concatenate(
        [
            embed(torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float().div_(255))
            for i in range(0, len(images), batch)
        ]
    )
    extra = np.zeros((views, *clean.shape), np.float32)
    where = np.flatnonzero(augment_mask)
    for v in range(views):
        for i in range(0, len(where), batch):
            idx = where[i : i + batch]
            x, _ = augment_batch(torch.from_numpy(images[idx]), torch.zeros(len(idx), dtype=torch.int64), aug, gen)
            extra[v, idx] = embed(x)
    return clean.astype(np.float32), extra


def pca_project(clean: np.ndarray, views: np.ndarray, fit_mask: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Standardise and project on the top ``dims`` principal axes of the ``fit_mask`` rows of ``clean``."""
    fit = clean[fit_mask].astype(np.float64)
    mu = fit.mean(axis=0)
    _, s, vt = np.linalg.svd(fit - mu, full_matrices=False)
    dims = min(dims, vt.shape[0])
    scale = s[0] / math.sqrt(len(fit))  # top axis at unit std: keeps the head's weight decay meaningful
    proj = vt[:dims].T / scale

    def apply(a: np.ndarray) -> np.ndarray:
        out: np.ndarray = ((a - mu) @ proj).astype(np.float32)
        return out

    return apply(clean), np.stack([apply(v) for v in views]) if len(views) else np.zeros((0, len(clean), dims))


# --------------------------------------------------------------------------------------------------------------------
# The experiment.


def run_experiment(
    split: GtsrbSplit,
    settings: ExperimentSettings,
    on_event: EventFn | None = None,
    features_fn: Callable[[GtsrbSplit, Mapping[str, int], int], tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Run every loop for every seed -> the results dict (records per seed, summary, timings).

    ``features_fn(split, start tracks, seed)`` gives (clean (N, d), views (V, N, d)) features; the default
    warms MobileNetV2 up on the start tracks and caches its features. Tests pass a cheap one.
    """
    emit = on_event or (lambda _s, _d, _t: None)
    started = time.perf_counter()
    pool_tracks = group_tracks(split.groups[~split.is_val], np.flatnonzero(~split.is_val))
    val_items = np.flatnonzero(split.is_val)
    evaluate = track_evaluator(val_items, split.labels[val_items], split.groups[val_items])
    track_class = {t: int(split.labels[idx[0]]) for t, idx in pool_tracks.items()}
    loops_per_seed = 3 + len(settings.thresholds)
    total = len(settings.seeds) * (
        1 + 2 * (settings.rounds + 1) + 1 + len(settings.thresholds) * (1 + settings.selftrain_rounds)
    )
    done = 0
    per_seed: list[dict[str, Any]] = []
    timings: dict[str, float] = {}

    def tick(_record: RoundRecord | None = None) -> None:
        nonlocal done
        done += 1
        emit("rounds", done, total)

    for seed in settings.seeds:
        rng = np.random.default_rng(seed)
        start = initial_tracks(track_class, settings.start_fraction, rng)
        t0 = time.perf_counter()
        if features_fn is None:
            clean, views = _default_features(split, start, pool_tracks, settings, seed)
        else:
            clean, views = features_fn(split, start, seed)
        timings[f"features_seed{seed}_s"] = round(time.perf_counter() - t0, 1)
        tick()
        trainer = SoftmaxHeadTrainer(
            clean,
            split.groups,
            views,
            l2=settings.l2,
            calibration_fraction=settings.calibration_fraction,
            seed=seed,
            input_size=settings.input_size,
        )
        t0 = time.perf_counter()
        records: dict[str, list[RoundRecord]] = {}
        for strategy in ("uncertainty", "random"):
            records[strategy] = run_active_learning(
                pool_tracks,
                start,
                trainer,
                track_class.__getitem__,
                strategy=strategy,
                k=settings.k,
                rounds=settings.rounds,
                evaluate=evaluate,
                seed=seed,
                on_round=tick,
            )
        records["full"] = run_active_learning(
            pool_tracks,
            track_class,
            trainer,
            track_class.__getitem__,
            strategy="random",
            k=1,
            rounds=0,
            evaluate=evaluate,
            seed=seed,
        )
        tick()
        for threshold in settings.thresholds:
            records[f"selftrain@{threshold:g}"] = run_self_training(
                pool_tracks,
                start,
                trainer,
                threshold=threshold,
                rounds=settings.selftrain_rounds,
                evaluate=evaluate,
                truth=track_class.__getitem__,
                on_round=tick,
            )
            # A loop that converged early skipped rounds: keep the bar's total honest.
            skipped = settings.selftrain_rounds + 1 - len(records[f"selftrain@{threshold:g}"])
            if skipped:
                done += skipped
                emit("rounds", done, total)
        timings[f"loops_seed{seed}_s"] = round(time.perf_counter() - t0, 1)
        per_seed.append(
            {
                "seed": seed,
                "start_tracks": len(start),
                "records": {k: [r.as_dict() for r in v] for k, v in records.items()},
            }
        )
        emit("seed", len(per_seed), len(settings.seeds))
    del loops_per_seed
    timings["total_s"] = round(time.perf_counter() - started, 1)
    results: dict[str, Any] = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in _settings_dict(settings).items()},
        "validation": {
            "source": split.val_source,
            "tracks": len(set(split.groups[split.is_val].tolist())),
            "crops": int(split.is_val.sum()),
        },
        "pool": {"tracks": len(pool_tracks), "crops": int((~split.is_val).sum())},
        "seeds": per_seed,
        "timings": timings,
    }
    results["summary"] = summarise(results)
    return results


def _settings_dict(settings: ExperimentSettings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in settings.__dataclass_fields__}


def _default_features(
    split: GtsrbSplit,
    start: Mapping[str, int],
    pool_tracks: Mapping[str, np.ndarray],
    settings: ExperimentSettings,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    # The warm-up and feature extraction take minutes; their result depends only on what is hashed here, so it is
    # kept in the output folder and a re-run (a change to the loops or the report) starts from it.
    key = hashlib.sha256(
        json.dumps(
            {
                "seed": seed,
                "start": sorted(start.items()),
                "images": hashlib.sha256(split.images.tobytes()).hexdigest(),
                "val": hashlib.sha256(split.is_val.tobytes()).hexdigest(),
                **{k: getattr(settings, k) for k in ("warmup_epochs", "warmup_batch", "warmup_lr", "aug_views")},
                **{k: getattr(settings, k) for k in ("pca_dims", "input_size")},
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    cache = settings.out / f"features-seed{seed}-{key}.npz"
    if cache.is_file():
        with np.load(cache) as saved:
            return saved["clean"], saved["views"]
    import torch  # noqa: PLC0415

    torch.set_num_threads(os.cpu_count() or 1)
    start_items = np.concatenate([pool_tracks[t] for t in start])
    model = warm_up(split.images[start_items], split.labels[start_items], settings, seed)
    clean, views = extract_features(model, split.images, settings.aug_views, ~split.is_val, seed)
    clean, views = pca_project(clean, views, ~split.is_val, settings.pca_dims)
    buf = io.BytesIO()
    np.savez(buf, clean=clean, views=views)
    atomic_write_bytes(cache, buf.getvalue())
    return clean, views


# --------------------------------------------------------------------------------------------------------------------
# Summary and report.


def decisions_to_reach(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """Human decisions at which a curve ((decisions, accuracy), increasing decisions) first reaches ``target``,
    interpolated linearly between rounds; None when it never does."""
    for i, (x, y) in enumerate(points):
        if y >= target:
            if i == 0:
                return float(x)
            x0, y0 = points[i - 1]
            return float(x0 + (x - x0) * (target - y0) / (y - y0))
    return None


def _curve(per_seed: list[dict[str, Any]], loop: str, metric: str) -> list[dict[str, float]]:
    runs = [s["records"][loop] for s in per_seed]
    n = min(len(r) for r in runs)
    out = []
    for i in range(n):
        values = np.array([r[i]["figures"][metric] for r in runs])
        row = {
            "round": float(i),
            "human_decisions": float(np.mean([r[i]["human_decisions"] for r in runs])),
            "mean": float(values.mean()),
            "std": float(values.std()),
        }
        if loop.startswith("selftrain"):
            row["pseudo_tracks"] = float(np.mean([r[i]["pseudo_tracks"] for r in runs]))
            precisions = [r[i]["new_pseudo_precision"] for r in runs if r[i]["new_pseudo_precision"] is not None]
            cumulative = [r[i]["pseudo_precision"] for r in runs if r[i]["pseudo_precision"] is not None]
            row["new_pseudo_precision"] = float(np.mean(precisions)) if precisions else math.nan
            row["pseudo_precision"] = float(np.mean(cumulative)) if cumulative else math.nan
        out.append(row)
    return out


def summarise(results: Mapping[str, Any]) -> dict[str, Any]:
    """Mean and spread over seeds per loop and round, and the decisions uncertainty-first saves against random."""
    per_seed = results["seeds"]
    loops = list(per_seed[0]["records"])
    curves = {m: {loop: _curve(per_seed, loop, m) for loop in loops} for m in ("crop_accuracy", "track_accuracy")}
    saved: dict[str, Any] = {}
    for metric, by_loop in curves.items():
        unc = [(p["human_decisions"], p["mean"]) for p in by_loop["uncertainty"]]
        rnd = [(p["human_decisions"], p["mean"]) for p in by_loop["random"]]
        full = by_loop["full"][0]["mean"]
        targets = {"random_final": rnd[-1][1], "99pct_of_full": 0.99 * full}
        saved[metric] = {}
        for name, target in targets.items():
            need_u, need_r = decisions_to_reach(unc, target), decisions_to_reach(rnd, target)
            saved[metric][name] = {
                "target_accuracy": target,
                "uncertainty_decisions": need_u,
                "random_decisions": need_r,
                "saved": None if need_u is None or need_r is None else need_r - need_u,
            }
    return {"curves": curves, "decisions_saved": saved}


def _fmt(mean: float, std: float) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _fmt_need(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.0f}"


def markdown_report(results: Mapping[str, Any]) -> str:
    """The tables: accuracy against human decisions, self-training per round, decisions saved."""
    s = results["summary"]
    crops, tracks = s["curves"]["crop_accuracy"], s["curves"]["track_accuracy"]
    seeds = len(results["seeds"])
    lines = [
        "# Learning-loop experiment",
        "",
        f"Validation: {results['validation']['tracks']} GTSRB tracks / {results['validation']['crops']} crops "
        f"({results['validation']['source']}); pool: {results['pool']['tracks']} tracks. Accuracy in %, "
        f"mean ± std over {seeds} seed(s) (each seed: its own 10 % start and warm-up). One human decision labels "
        "one whole track; the count includes the start tracks.",
        "",
        "## Active learning: validation accuracy against human decisions",
        "",
        "| round | decisions | uncertainty crop | random crop | uncertainty track | random track |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for u, r, ut, rt in zip(
        crops["uncertainty"], crops["random"], tracks["uncertainty"], tracks["random"], strict=False
    ):
        lines.append(
            f"| {int(u['round'])} | {u['human_decisions']:.0f} | {_fmt(u['mean'], u['std'])} | "
            f"{_fmt(r['mean'], r['std'])} | {_fmt(ut['mean'], ut['std'])} | {_fmt(rt['mean'], rt['std'])} |"
        )
    f, ft = crops["full"][0], tracks["full"][0]
    lines.append(
        f"| full | {f['human_decisions']:.0f} | {_fmt(f['mean'], f['std'])} | (all labelled) | "
        f"{_fmt(ft['mean'], ft['std'])} | (all labelled) |"
    )
    lines += ["", "## Decisions saved by uncertainty-first selection", ""]
    lines += [
        "| metric | target | target accuracy | uncertainty needs | random needs | saved |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for metric, by_target in s["decisions_saved"].items():
        for target, v in by_target.items():
            saved = "n/a" if v["saved"] is None else f"{v['saved']:.0f}"
            lines.append(
                f"| {metric} | {target} | {100 * v['target_accuracy']:.1f} | {_fmt_need(v['uncertainty_decisions'])} | "
                f"{_fmt_need(v['random_decisions'])} | {saved} |"
            )
    lines += [
        "",
        "## Self-training (human decisions constant)",
        "",
        "| loop | round | pseudo-labelled tracks | precision (new) | precision (all) | crop acc | track acc |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for loop in (name for name in crops if name.startswith("selftrain")):
        for c, t in zip(crops[loop], tracks[loop], strict=True):
            new_p = "" if math.isnan(c["new_pseudo_precision"]) else f"{100 * c['new_pseudo_precision']:.1f}"
            all_p = "" if math.isnan(c["pseudo_precision"]) else f"{100 * c['pseudo_precision']:.1f}"
            lines.append(
                f"| {loop} | {int(c['round'])} | {c['pseudo_tracks']:.0f} | {new_p} | {all_p} | "
                f"{_fmt(c['mean'], c['std'])} | {_fmt(t['mean'], t['std'])} |"
            )
    lines += ["", f"Timings (s): {json.dumps(results['timings'])}", ""]
    return "\n".join(lines)


def plot_png(results: Mapping[str, Any]) -> bytes:
    """Accuracy against human decisions (left) and self-training accuracy against round (right), as PNG bytes."""
    import matplotlib  # noqa: PLC0415 - plotting only here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    crops = results["summary"]["curves"]["crop_accuracy"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for loop, colour in (("uncertainty", "tab:red"), ("random", "tab:blue")):
        x = np.array([p["human_decisions"] for p in crops[loop]])
        m = np.array([p["mean"] for p in crops[loop]]) * 100
        sd = np.array([p["std"] for p in crops[loop]]) * 100
        left.plot(x, m, "o-", color=colour, label=f"{loop} selection", markersize=3)
        left.fill_between(x, m - sd, m + sd, color=colour, alpha=0.15)
    full = crops["full"][0]
    left.axhline(
        full["mean"] * 100, color="k", ls="--", lw=1, label=f"full supervision ({full['human_decisions']:.0f})"
    )
    left.set_xlabel("human decisions (tracks labelled)")
    left.set_ylabel("validation crop accuracy (%)")
    left.set_title("Active learning")
    left.grid(alpha=0.3)
    left.legend(loc="lower right", fontsize=8)
    for loop in (name for name in crops if name.startswith("selftrain")):
        r = np.array([p["round"] for p in crops[loop]])
        m = np.array([p["mean"] for p in crops[loop]]) * 100
        right.plot(r, m, "o-", label=loop, markersize=3)
    right.axhline(full["mean"] * 100, color="k", ls="--", lw=1, label="full supervision")
    right.set_xlabel("self-training round")
    right.set_ylabel("validation crop accuracy (%)")
    right.set_title("Self-training from the 10 % start")
    right.grid(alpha=0.3)
    right.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_report(results: Mapping[str, Any], json_path: Path, md_path: Path, png_path: Path) -> None:
    """Write results.json, the markdown tables and the PNG (each atomically)."""
    for p in (json_path, md_path, png_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(json_path, (json.dumps(results, indent=1) + "\n").encode())
    atomic_write_bytes(md_path, markdown_report(results).encode())
    atomic_write_bytes(png_path, plot_png(results))


def main(argv: list[str] | None = None) -> int:
    """``python -m services.classifier.train.experiment``: run the experiment with a tqdm bar; write the report."""
    from tqdm import tqdm  # noqa: PLC0415

    repo = Path(__file__).resolve().parents[3]
    parser = argparse.ArgumentParser(prog="experiment", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=repo.parent / "shared" / "data" / "gtsrb_train")
    parser.add_argument("--out", type=Path, default=repo / "runs" / "experiment")
    parser.add_argument("--docs", type=Path, default=repo / "docs", help="folder for experiment.md and experiment.png")
    parser.add_argument("--frozen", type=Path, default=repo / "deploy" / "models" / "frozen" / "classifier.json")
    parser.add_argument("--seeds", type=int, default=2, help="number of seeds (each: own start set and warm-up)")
    parser.add_argument("--k", type=int, default=50, help="tracks reviewed per round")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup-epochs", type=int, default=30)
    args = parser.parse_args(argv)
    settings = ExperimentSettings(
        data=args.data,
        out=args.out,
        frozen_manifest=args.frozen,
        seeds=tuple(range(args.seeds)),
        k=args.k,
        rounds=args.rounds,
        warmup_epochs=args.warmup_epochs,
    )
    bars: dict[str, tqdm[Any]] = {}

    def on_event(stage: str, done: int, total: int) -> None:
        if stage == "seed":
            tqdm.write(f"seed {done}/{total} done", file=sys.stderr)
            return
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr)
        bar.n = done
        bar.refresh()

    try:
        split = load_split(settings, on_event)
    except InputError as exc:
        sys.stderr.write(f"experiment: {exc}\n")
        return 2
    results = run_experiment(split, settings, on_event)
    for bar in bars.values():
        bar.close()
    write_report(results, args.out / "results.json", args.docs / "experiment.md", args.docs / "experiment.png")
    sys.stdout.write(markdown_report(results) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
