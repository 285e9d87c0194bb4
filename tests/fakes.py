"""Test doubles for the model seams: a detector that replays ground truth, a classifier with a fixed answer.

Both follow the ``Detector`` / ``Classifier`` protocols exactly (batch in, batch out, same order), so the pipeline
under test cannot tell them from the ONNX backends.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

import numpy as np

from services.common.classes import GTSRB_CLASS_NAMES, NOT_A_SIGN
from services.common.errors import ModelError
from services.common.modelcard import ModelCard
from services.common.types import Detections, Frame
from tests.synthvideo import SyntheticVideo

FAKE_CLASS_NAMES = (*GTSRB_CLASS_NAMES, NOT_A_SIGN)


def fake_card(task: Literal["classifier", "detector"], class_names: Sequence[str], **extra: object) -> ModelCard:
    return ModelCard(
        name=f"fake-{task}",
        version="test",
        task=task,  # "classifier" or "detector"
        architecture="fake",
        class_names=tuple(class_names),
        input_hw=(64, 64),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        background_class=len(class_names) - 1 if task == "classifier" else None,
        reject_threshold=0.5 if task == "classifier" else 0.0,
        onnx_sha256="0" * 64,
        onnx_input="images",
        onnx_output="out",
        extra=dict(extra),
    )


class FakeDetector:
    """Returns the synthetic clip's ground-truth boxes for each frame (by decode index), score 0.9.

    Args:
        video: The clip whose ground truth to replay.
        miss_every: Drop each sign's box on every n-th frame (0: never), as a real detector misses some.
        fail_at: Raise ``ModelError`` when asked for this frame (None: never).
        blind_frames: Frames on which it finds nothing at all.
    """

    def __init__(
        self,
        video: SyntheticVideo,
        *,
        miss_every: int = 0,
        fail_at: int | None = None,
        blind_frames: frozenset[int] = frozenset(),
    ) -> None:
        self._by_frame: dict[int, list[tuple[float, float, float, float]]] = defaultdict(list)
        for box in video.boxes:
            if box.frame in blind_frames or (miss_every and box.frame % miss_every == miss_every - 1):
                continue
            self._by_frame[box.frame].append(box.xyxy)
        self._fail_at = fail_at
        self.calls: list[list[int]] = []
        self.shapes: list[tuple[int, ...]] = []
        self._card = fake_card("detector", ("traffic_sign",))

    @property
    def card(self) -> ModelCard:
        return self._card

    def detect(self, frames: Sequence[Frame]) -> list[Detections]:
        self.calls.append([f.ref.index for f in frames])
        self.shapes.extend(f.image.shape for f in frames)
        out = []
        for frame in frames:
            if frame.ref.index == self._fail_at:
                raise ModelError(f"fake detector failed on frame {frame.ref.index}")
            boxes = np.asarray(self._by_frame.get(frame.ref.index, []), np.float32).reshape(-1, 4)
            n = len(boxes)
            out.append(Detections(frame.ref, boxes, np.full(n, 0.9, np.float32), np.zeros(n, np.int16)))
        return out


class FakeClassifier:
    """Calls every crop ``class_id`` with probability ``p`` (the rest spread evenly), in calibrated log-probs."""

    def __init__(self, class_id: int = 14, p: float = 0.95) -> None:
        self.class_id = class_id
        self.p = p
        self.batches: list[int] = []
        self._card = fake_card("classifier", FAKE_CLASS_NAMES)

    @property
    def card(self) -> ModelCard:
        return self._card

    def classify(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        self.batches.append(len(crops))
        k = len(FAKE_CLASS_NAMES)
        probs = np.full((len(crops), k), (1 - self.p) / (k - 1), np.float64)
        probs[:, self.class_id] = self.p
        for crop in crops:
            if crop.ndim != 3 or crop.shape[2] != 3 or min(crop.shape[:2]) < 1:
                raise ValueError(f"crop: expected (H, W, 3), got {crop.shape}")
        return np.log(probs).astype(np.float32)
