"""``roadlabel selftrain``: self-training with the product's own trainer, through the learning-loop core.

Labelled data: GTSRB-layout folders (``000NN/GT-000NN.csv`` + images), or dataset folders with such a
``classification/`` folder inside. Unlabelled data: folders of crop images (PNG/JPEG, searched recursively); files
in one folder sharing a ``TTTTT_`` prefix are one track, any other image is a track of its own.

Each round :class:`ProductTrainer` writes the human and pseudo labels as one GTSRB-layout folder (hard links where
possible, copies otherwise) and calls :func:`services.classifier.train.loop.train_classifier` on it; the exported
ONNX model then decides the unlabelled tracks (:func:`services.classifier.tracks.decide_track`), and
:func:`services.classifier.train.learning_loop.run_self_training` keeps those at or above the threshold.

With ``base`` (``--base``) each round fine-tunes the current model, and with ``frozen`` (implied by ``--base``)
the frozen validation set is the validation set: the temperature is fitted there and each round reports its
frozen figures. Without them ``train_classifier`` carves its own validation split (by track) from the folder it is
given, so the temperature is fitted on human and pseudo-labelled tracks alike. torch is imported by the trainer
only.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.classifier.onnx import OnnxClassifier
from services.classifier.train.data import scan_gtsrb
from services.common.errors import InputError
from services.common.images import IMAGE_SUFFIXES, load_image
from services.common.modelcard import ModelCard

__all__ = ["CropItems", "OnnxPredictor", "ProductTrainer", "load_items", "scan_labeled", "scan_unlabeled"]

_TRACK_PREFIX = re.compile(r"^(\d{5})_")


@dataclass(frozen=True, slots=True)
class CropItems:
    """Every crop of a self-training run: ``paths[i]``, ``tracks[i]``; ``labels[i]`` is -1 when unlabelled."""

    paths: tuple[Path, ...]
    tracks: np.ndarray  # (N,) str
    labels: np.ndarray  # (N,) int64


def scan_labeled(folders: Sequence[Path]) -> list[tuple[Path, str, int]]:
    """(path, track, class) of every crop of GTSRB-layout folders (or of their ``classification/`` subfolder)."""
    out: list[tuple[Path, str, int]] = []
    for i, folder in enumerate(folders):
        root = folder / "classification" if (folder / "classification").is_dir() else folder
        out += [(s.path, f"L{i}:{s.track}", s.class_id) for s in scan_gtsrb(root)]
    return out


def scan_unlabeled(folders: Sequence[Path]) -> list[tuple[Path, str]]:
    """(path, track) of every crop image under the folders; ``TTTTT_`` files in one folder share a track."""
    out: list[tuple[Path, str]] = []
    for i, folder in enumerate(folders):
        if not folder.is_dir():
            raise InputError(f"unlabeled data: expected a folder of crop images, got {folder}")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"unlabeled data: expected {'/'.join(IMAGE_SUFFIXES)} files under {folder}, found none")
        for path in files:
            match = _TRACK_PREFIX.match(path.name)
            rel = path.parent.relative_to(folder)
            out.append((path, f"U{i}:{rel}/{match.group(1) if match else path.stem}"))
    return out


def load_items(labeled: Sequence[Path], unlabeled: Sequence[Path]) -> CropItems:
    """Labelled crops first, then unlabelled ones."""
    lab = scan_labeled(labeled)
    unl = scan_unlabeled(unlabeled)
    return CropItems(
        tuple([p for p, _, _ in lab] + [p for p, _ in unl]),
        np.array([t for _, t, _ in lab] + [t for _, t in unl]),
        np.array([c for _, _, c in lab] + [-1] * len(unl), np.int64),
    )


@dataclass(frozen=True, slots=True, eq=False)
class OnnxPredictor:
    """The exported model of one round, classifying the items' image files."""

    items: CropItems
    model_path: Path
    batch_size: int = 256

    classifier: OnnxClassifier = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classifier", OnnxClassifier(self.model_path))

    @property
    def card(self) -> ModelCard:
        return self.classifier.card

    def log_probs(self, items: np.ndarray) -> np.ndarray:
        classifier = self.classifier
        out = []
        for i in range(0, len(items), self.batch_size):
            crops = [load_image(self.items.paths[j]) for j in items[i : i + self.batch_size].tolist()]
            out.append(classifier.classify(crops))
        return np.concatenate(out).astype(np.float32)


@dataclass(eq=False)
class ProductTrainer:
    """A learning-loop ``Trainer`` around :func:`~services.classifier.train.loop.train_classifier` (kept thin)."""

    items: CropItems
    out: Path
    background: tuple[Path, ...] = ()
    epochs: int = 24
    input_size: int = 64
    seed: int = 0
    device: str = "auto"
    max_steps: int | None = None
    on_event: Callable[[object], None] | None = None
    base: Path | None = None  # fine-tune every round from this model (ONNX + card), not from ImageNet
    frozen: Path | None = None  # frozen validation manifest: calibration and figures on it, never trained on
    data_root: Path | None = None
    lr: float | None = None
    rounds_done: int = field(default=0, init=False)
    last_card: ModelCard | None = field(default=None, init=False)

    def write_dataset(self, root: Path, items: np.ndarray, labels: np.ndarray) -> None:
        """The labelled items as a GTSRB-layout folder: one ``TTTTT`` prefix per source track and class."""
        if root.exists():
            shutil.rmtree(root)
        rows: dict[int, list[str]] = {}
        track_no: dict[tuple[int, str], int] = {}
        for item, label in zip(items.tolist(), labels.tolist(), strict=True):
            src = self.items.paths[item]
            key = (label, str(self.items.tracks[item]))
            number = track_no.setdefault(key, sum(1 for k in track_no if k[0] == label))
            frame = len(rows.setdefault(label, []))
            name = f"{number:05d}_{frame:05d}{src.suffix.lower()}"
            folder = root / f"{label:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, folder / name)
            except OSError:
                shutil.copyfile(src, folder / name)
            rows[label].append(f"{name};0;0;0;0;0;0;{label}")
        for label, lines in rows.items():
            header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"
            (root / f"{label:05d}" / f"GT-{label:05d}.csv").write_text("\n".join([header, *lines]) + "\n")

    def fit(self, items: np.ndarray, labels: np.ndarray, human: np.ndarray) -> OnnxPredictor:
        from services.classifier.train.loop import TrainSettings, train_classifier  # noqa: PLC0415 - torch

        round_dir = self.out / f"round_{self.rounds_done:02d}"
        self.rounds_done += 1
        self.write_dataset(round_dir / "data", items, labels)
        settings = TrainSettings(
            data=round_dir / "data",
            background=self.background,
            out=round_dir / "model",
            epochs=self.epochs,
            input_size=self.input_size,
            seed=self.seed,
            device=self.device,  # checked by TrainSettings
            max_steps=self.max_steps,
            base=self.base,
            frozen=self.frozen,
            data_root=self.data_root,
            **({"lr": self.lr} if self.lr is not None else {}),
        )
        result = train_classifier(settings, self.on_event)
        self.last_card = result.card
        return OnnxPredictor(self.items, result.model_path)
