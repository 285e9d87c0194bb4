"""``OnnxDetector``: the sign detector on ONNX Runtime, in process.

The model file is checked against its card when it loads (sha256, the card's detector contract, input and output
names and shapes), so a wrong or damaged model fails at startup with a ``ModelError`` rather than finding nothing
later. CUDA is used when the installed onnxruntime has it (the ``onnxruntime-gpu`` build), else the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from services.common.errors import ModelError
from services.common.modelcard import ModelCard, card_path_for, load_card
from services.common.types import Detections, Frame
from services.detector.api import DetectorSettings
from services.detector.postprocess import DetectorSpec, decode, letterbox
from services.runtime.onnx_session import check_image_input, dim_matches, format_shape, open_model

__all__ = ["OnnxDetector"]


class OnnxDetector:
    """A ``Detector`` running one ONNX Runtime session, created once in the constructor.

    ``detect`` is safe to call from several threads at once (ONNX Runtime sessions are, and each call letterboxes
    into its own buffer).

    Args:
        model_path: The ``.onnx`` file.
        card: Its card; by default read from beside the model (``name.onnx`` -> ``name.card.json``).
        settings: Batching and decoding; fields left None take the card's values.
        providers: ONNX Runtime execution providers, best first; by default CUDA where available, then CPU.
        intra_op_threads: ONNX Runtime threads per call; None lets ONNX Runtime pick (one per core).

    Raises:
        ModelError: The card is missing, invalid or not a detector's, the file's sha256 is not the card's, ONNX
            Runtime cannot load the file, or its inputs/outputs do not match the card.
        ConfigError: ``intra_op_threads`` is out of range.
    """

    def __init__(
        self,
        model_path: Path,
        card: ModelCard | None = None,
        *,
        settings: DetectorSettings | None = None,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
    ) -> None:
        self._card = load_card(card_path_for(model_path)) if card is None else card
        self._path = model_path
        self._spec = DetectorSpec.from_card(self._card, settings)
        self._session = open_model(
            "detector", model_path, self._card, providers=providers, intra_op_threads=intra_op_threads
        )
        self._check_io()

    @property
    def card(self) -> ModelCard:
        """The model's card."""
        return self._card

    @property
    def spec(self) -> DetectorSpec:
        """The card's contract with the settings resolved: thresholds in force, stride, output names."""
        return self._spec

    def detect(self, frames: Sequence[Frame]) -> list[Detections]:
        """Detect signs in frames of any size.

        Frames are letterboxed (``services.detector.postprocess.letterbox``) and run in chunks of
        ``settings.batch_size``; the outputs are decoded with the same module.

        Args:
            frames: B frames, each (H, W, 3) uint8 RGB.

        Returns:
            B ``Detections`` in the order of ``frames``; boxes (N, 4) float32 in frame pixels, score (N,) float32
            highest first, class_id (N,) int16 zeros.

        Raises:
            ModelError: The model fails to run or returns outputs of the wrong shape.
        """
        spec = self._spec
        results: list[Detections] = []
        buffer = np.empty((min(spec.batch_size, len(frames)), 3, *spec.input_hw), np.float32)
        for start in range(0, len(frames), spec.batch_size):
            chunk = frames[start : start + spec.batch_size]
            batch, scales = letterbox([f.image for f in chunk], spec.input_hw, spec.mean, spec.std, out=buffer)
            heatmap, boxes = self._run(batch)
            decoded = decode(heatmap, boxes, scales, [f.hw for f in chunk], spec)
            for frame, (xyxy, score) in zip(chunk, decoded, strict=True):
                results.append(Detections(frame.ref, xyxy, score, np.zeros(len(score), np.int16)))
        return results

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, 3, H, W) float32 -> heatmap, boxes as the model returns them (shapes checked by ``decode``)."""
        spec = self._spec
        try:
            heatmap, boxes = self._session.run([spec.heatmap_output, spec.box_output], {spec.input_name: batch})
        except Exception as exc:  # onnxruntime's error classes are not a public hierarchy
            raise ModelError(f"{self._path}: model failed on a batch of shape {batch.shape}: {exc}") from exc
        return np.asarray(heatmap), np.asarray(boxes)

    def _check_io(self) -> None:
        """Compare the session's input and outputs with the card; raise ModelError naming both if they differ."""
        spec = self._spec
        h, w = spec.input_hw
        check_image_input(self._session, self._path, spec.input_name, (h, w))
        outputs = {o.name: o for o in self._session.get_outputs()}
        oh, ow = spec.output_hw
        for name, channels in ((spec.heatmap_output, 1), (spec.box_output, 4)):
            if name not in outputs:
                raise ModelError(
                    f"{self._path}: expected an output named {name!r} (from its card), got outputs {list(outputs)}"
                )
            out_shape = list(outputs[name].shape)
            if (
                outputs[name].type != "tensor(float)"
                or len(out_shape) != 4
                or not dim_matches(out_shape[1], channels)
                or not dim_matches(out_shape[2], oh)
                or not dim_matches(out_shape[3], ow)
            ):
                raise ModelError(
                    f"{self._path}: expected output {name!r} of shape (batch, {channels}, {oh}, {ow}) tensor(float) "
                    f"(input {h}x{w} / stride {spec.stride}, from its card), "
                    f"got {format_shape(out_shape)} {outputs[name].type}"
                )
