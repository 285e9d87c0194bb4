"""``OnnxClassifier``: the classifier on ONNX Runtime, in process.

The model file is checked against its card when it loads (sha256, input and output names, shapes and the class
count), so a wrong or damaged model fails at startup with a ``ModelError`` rather than mislabelling signs later.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from services.classifier.api import calibrated_log_probs
from services.classifier.preprocess import normalize, resize_crops
from services.common.errors import ConfigError, ModelError
from services.common.modelcard import ModelCard, card_path_for, load_card
from services.runtime.onnx_session import check_image_input, dim_matches, format_shape, open_model

__all__ = ["OnnxClassifier"]


class OnnxClassifier:
    """A ``Classifier`` running one ONNX Runtime session, created once in the constructor.

    ``classify`` is safe to call from several threads at once (ONNX Runtime sessions are).

    Args:
        model_path: The ``.onnx`` file.
        card: Its card; by default read from beside the model (``name.onnx`` -> ``name.card.json``).
        intra_op_threads: ONNX Runtime threads per call; None lets ONNX Runtime pick (one per core).
        batch_size: Most crops per model call; larger inputs are run in chunks of this size.
        providers: ONNX Runtime execution providers, best first; by default CUDA where available, then CPU.

    Raises:
        ModelError: The card is missing or invalid, the file's sha256 is not the card's, ONNX Runtime cannot
            load the file, or its inputs/outputs do not match the card.
        ConfigError: ``batch_size`` or ``intra_op_threads`` is out of range.
    """

    def __init__(
        self,
        model_path: Path,
        card: ModelCard | None = None,
        *,
        intra_op_threads: int | None = None,
        batch_size: int = 64,
        providers: Sequence[str] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size: expected an integer >= 1, got {batch_size}")
        self._card = load_card(card_path_for(model_path)) if card is None else card
        self._path = model_path
        self._batch_size = batch_size
        _check_card(model_path, self._card)
        self._session = open_model(
            "classifier", model_path, self._card, providers=providers, intra_op_threads=intra_op_threads
        )
        self._check_io()

    @property
    def card(self) -> ModelCard:
        """The model's card."""
        return self._card

    def classify(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Classify crops of any size.

        Each crop is resized to ``card.input_hw`` and normalised with ``services.classifier.preprocess`` (the
        same code training uses), then the model runs on chunks of ``batch_size``.

        Args:
            crops: B crops, each (H, W, 3) uint8 RGB, at least 1x1.

        Returns:
            (B, K) float32 ``log_softmax(logits / card.temperature)``, row i for crop i.

        Raises:
            InputError: A crop is not (H, W, 3) uint8 or is empty.
            ModelError: The model fails to run or returns the wrong shape.
        """
        card = self._card
        out = np.empty((len(crops), card.num_outputs), np.float32)
        for start in range(0, len(crops), self._batch_size):
            chunk = crops[start : start + self._batch_size]
            images = normalize(resize_crops(chunk, card.input_hw), card.mean, card.std)
            out[start : start + len(chunk)] = calibrated_log_probs(self._run(images), card.temperature)
        return out

    def _run(self, images: np.ndarray) -> np.ndarray:
        """(n, 3, H, W) float32 -> (n, K) logits."""
        try:
            (logits,) = self._session.run([self._card.onnx_output], {self._card.onnx_input: images})
        except Exception as exc:  # onnxruntime's error classes are not a public hierarchy
            raise ModelError(f"{self._path}: model failed on a batch of shape {images.shape}: {exc}") from exc
        expected = (len(images), self._card.num_outputs)
        if logits.shape != expected:
            raise ModelError(f"{self._path}: expected output {expected} logits, got {logits.shape}")
        return np.asarray(logits)

    def _check_io(self) -> None:
        """Compare the session's input and output with the card; raise ModelError naming both if they differ."""
        card = self._card
        h, w = card.input_hw
        check_image_input(self._session, self._path, card.onnx_input, (h, w))
        outputs = {o.name: o for o in self._session.get_outputs()}
        if card.onnx_output not in outputs:
            raise ModelError(
                f"{self._path}: expected an output named {card.onnx_output!r} (from its card), "
                f"got outputs {list(outputs)}"
            )
        output = outputs[card.onnx_output]
        shape = list(output.shape)
        k = card.num_outputs
        if output.type != "tensor(float)" or len(shape) != 2 or not dim_matches(shape[1], k):
            raise ModelError(
                f"{self._path}: expected output {card.onnx_output!r} of shape (batch, {k}) tensor(float), "
                f"{k} = the card's class count, got {format_shape(shape)} {output.type}"
            )


def _check_card(model_path: Path, card: ModelCard) -> None:
    """The card describes a classifier whose background class, if any, is one of its classes."""
    if card.task != "classifier":
        raise ModelError(f"model card for {model_path}: expected task 'classifier', got {card.task!r}")
    bg = card.background_class
    if bg is not None and not 0 <= bg < card.num_outputs:
        raise ModelError(
            f"model card for {model_path}: expected background_class in 0..{card.num_outputs - 1}, got {bg}"
        )
