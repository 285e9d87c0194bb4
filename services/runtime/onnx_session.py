"""One way to open an ONNX Runtime session for a model file, shared by the classifier and detector backends."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from services.common.errors import ConfigError, ModelError
from services.common.modelcard import ModelCard, verify_model_file

__all__ = ["DEFAULT_PROVIDERS", "check_image_input", "dim_matches", "format_shape", "open_model", "open_session"]

log = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
"""Execution providers tried by default, best first; those the installed onnxruntime build lacks are skipped."""


def open_session(
    model_path: Path, *, providers: Sequence[str] | None = None, intra_op_threads: int | None = None
) -> ort.InferenceSession:
    """Open ``model_path`` in ONNX Runtime.

    Args:
        model_path: The ``.onnx`` file (its sha256 should already be checked against its card).
        providers: Execution providers, best first; by default CUDA where the build has it (``onnxruntime-gpu``),
            then the CPU.
        intra_op_threads: Threads per call; None lets ONNX Runtime pick (one per core).

    Raises:
        ConfigError: ``intra_op_threads`` is below 1.
        ModelError: ONNX Runtime cannot load the file.
    """
    if intra_op_threads is not None and intra_op_threads < 1:
        raise ConfigError(f"intra_op_threads: expected an integer >= 1 or None, got {intra_op_threads}")
    if providers is None:
        available = ort.get_available_providers()
        providers = [name for name in DEFAULT_PROVIDERS if name in available]
    options = ort.SessionOptions()
    # ONNX Runtime's own logger writes straight to stderr, past our JSON logs: keep it to errors.
    options.log_severity_level = 3
    # Idle intra-op threads would otherwise spin between calls, taking the cores that the callers' decode threads
    # need (2x slower end to end on a 2-core machine); the wake-up cost is small next to a batch.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    try:
        return ort.InferenceSession(str(model_path), sess_options=options, providers=list(providers))
    except Exception as exc:  # onnxruntime's error classes are not a public hierarchy
        raise ModelError(f"{model_path}: expected an ONNX model onnxruntime can load, got an error: {exc}") from exc


def open_model(
    what: str,
    model_path: Path,
    card: ModelCard,
    *,
    providers: Sequence[str] | None = None,
    intra_op_threads: int | None = None,
) -> ort.InferenceSession:
    """Check ``model_path`` against its card's sha256, open it (see ``open_session``) and log it as ``what``.

    Raises:
        ModelError: The file is missing, is not the one its card describes, or ONNX Runtime cannot load it.
        ConfigError: ``intra_op_threads`` is below 1.
    """
    verify_model_file(model_path, card)
    session = open_session(model_path, providers=providers, intra_op_threads=intra_op_threads)
    log.info(
        f"{what} loaded",
        extra={
            "model": str(model_path),
            "model_name": card.name,
            "model_version": card.version,
            "providers": session.get_providers(),
        },
    )
    return session


def dim_matches(dim: int | str | None, expected: int) -> bool:
    """A fixed dim equals ``expected``; a symbolic (str) or unknown (None) one matches anything."""
    return not isinstance(dim, int) or dim == expected


def format_shape(shape: Sequence[int | str | None]) -> str:
    """An ONNX shape for messages: unknown dims as ``?``."""
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def check_image_input(session: ort.InferenceSession, model_path: Path, name: str, hw: tuple[int, int]) -> None:
    """Check that the session has one input ``name`` of shape (dynamic batch, 3, h, w) float.

    Raises:
        ModelError: naming what the card expects and what the file has.
    """
    h, w = hw
    inputs = session.get_inputs()
    if [i.name for i in inputs] != [name]:
        raise ModelError(
            f"{model_path}: expected one input named {name!r} (from its card), got inputs {[i.name for i in inputs]}"
        )
    shape = list(inputs[0].shape)
    if (
        inputs[0].type != "tensor(float)"
        or len(shape) != 4
        or isinstance(shape[0], int)
        or shape[1] != 3
        or not dim_matches(shape[2], h)
        or not dim_matches(shape[3], w)
    ):
        raise ModelError(
            f"{model_path}: expected input {name!r} of shape (batch, 3, {h}, {w}) tensor(float) "
            f"with a dynamic batch axis (from its card), got {format_shape(shape)} {inputs[0].type}"
        )
