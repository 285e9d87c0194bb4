"""``TensorRTDetector``: the sign detector as a TensorRT engine, built from the same ONNX file and card.

UNVERIFIED: this backend has never been run. TensorRT (NVIDIA's ``tensorrt`` wheels, >= 10) and a CUDA GPU cannot be
installed on our development and CI machines, so only the parts that need neither are tested (the engine cache key,
the missing-package error, the calibration batching, with fakes). It is written against TensorRT 10's Python API
(``Builder``, ``OnnxParser``, ``BuilderFlag.FP16``/``INT8``, ``IInt8EntropyCalibrator2``, an optimization profile,
``execute_async_v3`` with named tensor addresses) and must be checked on a GPU machine before anyone relies on it;
``OnnxDetector`` with the ``onnxruntime-gpu`` build is the supported GPU path until then.

Choices:

* Device memory and copies go through cuda-python's runtime bindings (``cuda.bindings.runtime``, or ``cuda.cudart``
  in cuda-python < 12.6), not torch CUDA tensors: the serving path must run without torch (STYLE.md section 1), and
  cuda-python is a small, pure binding of the CUDA runtime that TensorRT's own samples use.
* Buffers are allocated once for ``max_batch`` frames; a call runs in chunks of at most that many. Host buffers are
  ordinary (pageable) numpy arrays: simpler, and the copies are small next to the network at batch 8.
* Engines are built on first use and cached on disk, keyed by sha256 over the GPU name, the TensorRT version, the
  model's sha256, the precision and the maximum batch: an engine is only valid for the GPU model and TensorRT
  version that built it. The file is written atomically, so concurrent first starts at worst build twice.
* INT8 uses post-training calibration (``IInt8EntropyCalibrator2``) on letterboxed frames given by the caller,
  with FP16 also enabled for the layers INT8 does not cover. TensorRT 10.1+ deprecates implicit INT8 in favour of
  explicitly quantized (Q/DQ) ONNX graphs; this still works in TensorRT 10 and needs no change to the exported model.

Every TensorRT or CUDA failure is raised as a ``ModelError`` naming what was expected and what was got.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Final, Literal, Protocol

import numpy as np

from services.common.errors import ConfigError, ModelError
from services.common.modelcard import ModelCard, atomic_write_bytes, card_path_for, load_card, verify_model_file
from services.common.types import Detections, Frame
from services.detector.api import DetectorSettings
from services.detector.postprocess import DetectorSpec, decode, letterbox

__all__ = [
    "MISSING_TENSORRT",
    "DeviceMemory",
    "Precision",
    "TensorRTDetector",
    "calibration_batches",
    "engine_cache_key",
    "import_tensorrt",
    "make_calibrator",
]

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]
"""Engine precision: plain FP32, FP16 kernels allowed, or INT8 (with FP16) calibrated on sample frames."""

MISSING_TENSORRT: Final = "TensorRT backend: expected the tensorrt package (NVIDIA's index), not installed"
_MISSING_CUDA = "TensorRT backend: expected cuda-python (pip install cuda-python) for device memory, not installed"
_MIN_TRT_MAJOR = 10


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, imported now (never at module import).

    Raises:
        ModelError: tensorrt is not installed, or older than 10.
    """
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        raise ModelError(MISSING_TENSORRT) from exc
    version = str(getattr(trt, "__version__", "0"))
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    if major < _MIN_TRT_MAJOR:
        raise ModelError(f"TensorRT backend: expected tensorrt >= {_MIN_TRT_MAJOR}, got {version}")
    return trt


def engine_cache_key(gpu_name: str, trt_version: str, model_sha256: str, precision: Precision, max_batch: int) -> str:
    """sha256 hex digest naming a cached engine: an engine is valid only for exactly these five things."""
    text = "\n".join(["roadlabel-trt-engine-v1", gpu_name, trt_version, model_sha256, precision, str(max_batch)])
    return hashlib.sha256(text.encode()).hexdigest()


def calibration_batches(
    images: Iterable[np.ndarray],
    batch_size: int,
    input_hw: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
) -> Iterator[np.ndarray]:
    """Letterbox calibration frames into full batches, as the engine will see them at run time.

    Args:
        images: Frames, each (h, w, 3) uint8 RGB.
        batch_size: Frames per batch; a last incomplete batch is dropped (the calibrator's batch size is fixed).
        input_hw: Network input (H, W).
        mean: Per-channel RGB mean on 0..1 values.
        std: Per-channel RGB std on 0..1 values.

    Yields:
        (batch_size, 3, H, W) float32 C-contiguous normalised batches, each a new array.
    """
    pending: list[np.ndarray] = []
    for image in images:
        pending.append(image)
        if len(pending) == batch_size:
            batch, _ = letterbox(pending, input_hw, mean, std)
            yield batch
            pending = []


class DeviceMemory(Protocol):
    """The CUDA runtime calls this backend needs (cuda-python in production, a fake in tests)."""

    def alloc(self, nbytes: int) -> int:
        """Allocate device memory; return its address."""
        ...

    def free(self, ptr: int) -> None:
        """Release memory from ``alloc``."""
        ...

    def to_device(self, ptr: int, host: np.ndarray) -> None:
        """Copy a C-contiguous host array to ``ptr`` (asynchronously on the stream)."""
        ...

    def to_host(self, host: np.ndarray, ptr: int) -> None:
        """Copy from ``ptr`` into a C-contiguous host array (asynchronously on the stream)."""
        ...

    @property
    def stream(self) -> int:
        """The CUDA stream handle the copies and the engine run on."""
        ...

    def synchronize(self) -> None:
        """Wait for everything queued on the stream."""
        ...


def make_calibrator(
    trt: Any, batches: Iterator[np.ndarray], batch_size: int, memory: DeviceMemory, cache_path: Path | None
) -> Any:
    """An ``IInt8EntropyCalibrator2`` that feeds ``batches`` to TensorRT through one device buffer.

    The class is created here because its base class comes from the lazily imported ``trt`` module.

    Args:
        trt: The ``tensorrt`` module (or a stand-in with an ``IInt8EntropyCalibrator2`` class).
        batches: (batch_size, 3, H, W) float32 batches, as ``calibration_batches`` yields them.
        batch_size: Frames per batch.
        memory: Device memory for the input buffer.
        cache_path: Where TensorRT's calibration table is read from and written to; None keeps none.

    Returns:
        The calibrator; its ``close()`` frees the device buffer.
    """

    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self._ptr: int | None = None
            self.batches_fed = 0

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str], p_str: str | None = None) -> list[int] | None:
            batch = next(batches, None)
            if batch is None:
                return None  # TensorRT's signal that calibration data is exhausted
            if batch.shape[0] != batch_size or batch.dtype != np.float32:
                raise ModelError(
                    f"INT8 calibration: expected batches ({batch_size}, 3, H, W) float32, "
                    f"got {batch.shape} {batch.dtype}"
                )
            batch = np.ascontiguousarray(batch)
            if self._ptr is None:
                self._ptr = memory.alloc(batch.nbytes)
            memory.to_device(self._ptr, batch)
            memory.synchronize()
            self.batches_fed += 1
            return [self._ptr] * len(names)

        def read_calibration_cache(self) -> bytes | None:
            if cache_path is not None and cache_path.is_file():
                return cache_path.read_bytes()
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            if cache_path is not None:
                atomic_write_bytes(cache_path, bytes(cache))

        def close(self) -> None:
            if self._ptr is not None:
                memory.free(self._ptr)
                self._ptr = None

    return _EntropyCalibrator()


class _CudaRuntime:
    """``DeviceMemory`` on cuda-python's runtime bindings, with one stream."""

    def __init__(self) -> None:
        try:
            self._rt = importlib.import_module("cuda.bindings.runtime")
        except ImportError:
            try:
                self._rt = importlib.import_module("cuda.cudart")
            except ImportError as exc:
                raise ModelError(_MISSING_CUDA) from exc
        self._stream = int(self._check("cudaStreamCreate", self._rt.cudaStreamCreate()))

    def _check(self, what: str, result: Any) -> Any:
        """cuda-python returns ``(error, value...)``; raise on an error, return the value."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise ModelError(f"CUDA {what}: expected cudaSuccess, got {err}")
        return values[0] if len(values) == 1 else tuple(values)

    def gpu_name(self) -> str:
        device = self._check("cudaGetDevice", self._rt.cudaGetDevice())
        props = self._check("cudaGetDeviceProperties", self._rt.cudaGetDeviceProperties(device))
        name = props.name
        return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00")

    def alloc(self, nbytes: int) -> int:
        return int(self._check("cudaMalloc", self._rt.cudaMalloc(nbytes)))

    def free(self, ptr: int) -> None:
        self._check("cudaFree", self._rt.cudaFree(ptr))

    def to_device(self, ptr: int, host: np.ndarray) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check("cudaMemcpyAsync", self._rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, self._stream))

    def to_host(self, host: np.ndarray, ptr: int) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check("cudaMemcpyAsync", self._rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, self._stream))

    @property
    def stream(self) -> int:
        return self._stream

    def synchronize(self) -> None:
        self._check("cudaStreamSynchronize", self._rt.cudaStreamSynchronize(self._stream))


class TensorRTDetector:
    """A ``Detector`` running a TensorRT engine built from the ONNX model (UNVERIFIED, see the module docstring).

    One engine, one execution context and one set of device buffers per instance; ``detect`` holds a lock, so
    concurrent callers take turns.

    Args:
        model_path: The ``.onnx`` file the engine is built from.
        card: Its card; by default read from beside the model.
        settings: Batching and decoding; fields left None take the card's values. Chunks are at most
            ``min(settings.batch_size, max_batch)`` frames.
        precision: "fp32", "fp16" (default) or "int8".
        max_batch: Largest batch the engine's optimization profile accepts (its optimum is this too).
        cache_dir: Folder for built engines (and INT8 calibration tables); by default ``engines/`` beside the model.
        calibration_images: (h, w, 3) uint8 RGB frames to calibrate INT8 on (a few hundred varied road scenes);
            required for "int8" unless a calibration table is cached.
        workspace_bytes: Builder workspace memory limit.

    Raises:
        ModelError: tensorrt or cuda-python is missing, the card or file is wrong (as for ``OnnxDetector``), the
            parser or builder fails, or the engine's inputs/outputs do not match the card.
        ConfigError: ``max_batch`` is below 1, or "int8" without calibration frames nor a cached table.
    """

    def __init__(
        self,
        model_path: Path,
        card: ModelCard | None = None,
        *,
        settings: DetectorSettings | None = None,
        precision: Precision = "fp16",
        max_batch: int = 8,
        cache_dir: Path | None = None,
        calibration_images: Iterable[np.ndarray] | None = None,
        workspace_bytes: int = 1 << 30,
    ) -> None:
        trt = import_tensorrt()
        if max_batch < 1:
            raise ConfigError(f"max_batch: expected an integer >= 1, got {max_batch}")
        self._trt = trt
        self._card = load_card(card_path_for(model_path)) if card is None else card
        self._path = model_path
        self._spec = DetectorSpec.from_card(self._card, settings)
        self._max_batch = max_batch
        verify_model_file(model_path, self._card)
        self._cuda = _CudaRuntime()
        self._logger = trt.Logger(trt.Logger.WARNING)
        cache_dir = model_path.parent / "engines" if cache_dir is None else cache_dir
        key = engine_cache_key(self._cuda.gpu_name(), trt.__version__, self._card.onnx_sha256, precision, max_batch)
        engine_path = cache_dir / f"{model_path.stem}-{key[:16]}.engine"
        if engine_path.is_file():
            serialized = engine_path.read_bytes()
            log.info("tensorrt engine from cache", extra={"engine": str(engine_path)})
        else:
            table = cache_dir / f"{model_path.stem}-{key[:16]}.calib"
            serialized = self._build(precision, workspace_bytes, calibration_images, table)
            atomic_write_bytes(engine_path, serialized)
            log.info("tensorrt engine built", extra={"engine": str(engine_path), "precision": precision})
        runtime = trt.Runtime(self._logger)
        self._engine = runtime.deserialize_cuda_engine(serialized)
        if self._engine is None:
            raise ModelError(f"{engine_path}: expected a TensorRT engine this GPU and version can load, got none")
        self._context = self._engine.create_execution_context()
        self._check_io()
        spec = self._spec
        oh, ow = spec.output_hw
        self._host_in = np.empty((max_batch, 3, *spec.input_hw), np.float32)
        self._host_heatmap = np.empty((max_batch, 1, oh, ow), np.float32)
        self._host_boxes = np.empty((max_batch, 4, oh, ow), np.float32)
        self._device = {
            spec.input_name: self._cuda.alloc(self._host_in.nbytes),
            spec.heatmap_output: self._cuda.alloc(self._host_heatmap.nbytes),
            spec.box_output: self._cuda.alloc(self._host_boxes.nbytes),
        }
        for name, ptr in self._device.items():
            self._context.set_tensor_address(name, ptr)
        self._lock = threading.Lock()

    @property
    def card(self) -> ModelCard:
        """The model's card."""
        return self._card

    def detect(self, frames: Sequence[Frame]) -> list[Detections]:
        """Detect signs in frames of any size; see ``Detector.detect``.

        Raises:
            ModelError: The engine fails to run.
        """
        spec = self._spec
        step = min(spec.batch_size, self._max_batch)
        results: list[Detections] = []
        with self._lock:
            for start in range(0, len(frames), step):
                chunk = frames[start : start + step]
                n = len(chunk)
                _, scales = letterbox([f.image for f in chunk], spec.input_hw, spec.mean, spec.std, out=self._host_in)
                heatmap, boxes = self._run(n)
                for frame, (xyxy, score) in zip(
                    chunk, decode(heatmap, boxes, scales, [f.hw for f in chunk], spec), strict=True
                ):
                    results.append(Detections(frame.ref, xyxy, score, np.zeros(len(score), np.int16)))
        return results

    def close(self) -> None:
        """Free the device buffers; the detector cannot be used afterwards."""
        for ptr in self._device.values():
            self._cuda.free(ptr)
        self._device = {}

    def _run(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        spec = self._spec
        cuda = self._cuda
        cuda.to_device(self._device[spec.input_name], self._host_in[:n])
        if not self._context.set_input_shape(spec.input_name, (n, 3, *spec.input_hw)):
            raise ModelError(f"{self._path}: TensorRT rejected input shape ({n}, 3, {spec.input_hw})")
        if not self._context.execute_async_v3(cuda.stream):
            raise ModelError(f"{self._path}: TensorRT engine failed on a batch of {n}")
        heatmap, boxes = self._host_heatmap[:n], self._host_boxes[:n]
        cuda.to_host(heatmap, self._device[spec.heatmap_output])
        cuda.to_host(boxes, self._device[spec.box_output])
        cuda.synchronize()
        return heatmap.copy(), boxes.copy()

    def _build(
        self, precision: Precision, workspace_bytes: int, calibration_images: Iterable[np.ndarray] | None, table: Path
    ) -> bytes:
        """Parse the ONNX file and build a serialized engine with a dynamic-batch profile 1..max_batch."""
        trt, spec = self._trt, self._spec
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(self._path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelError(f"{self._path}: expected an ONNX model TensorRT can parse, got: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
        profile = builder.create_optimization_profile()
        h, w = spec.input_hw
        profile.set_shape(spec.input_name, (1, 3, h, w), (self._max_batch, 3, h, w), (self._max_batch, 3, h, w))
        config.add_optimization_profile(profile)
        calibrator = None
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            if calibration_images is None and not table.is_file():
                raise ConfigError("precision 'int8': expected calibration_images or a cached calibration table")
            batches = calibration_batches(
                calibration_images if calibration_images is not None else [],
                self._max_batch,
                spec.input_hw,
                spec.mean,
                spec.std,
            )
            calibrator = make_calibrator(trt, batches, self._max_batch, self._cuda, table)
            config.set_flag(trt.BuilderFlag.INT8)
            config.int8_calibrator = calibrator
            config.set_calibration_profile(profile)
        try:
            serialized = builder.build_serialized_network(network, config)
        finally:
            if calibrator is not None:
                calibrator.close()
        if serialized is None:
            raise ModelError(f"{self._path}: TensorRT failed to build a {precision} engine (see its log above)")
        return bytes(serialized)

    def _check_io(self) -> None:
        """The engine's tensors are the card's: one input, the heatmap and box outputs, with the card's shapes."""
        trt, spec, engine = self._trt, self._spec, self._engine
        tensors = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        inputs = {name for name in tensors if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT}
        wanted: dict[str, tuple[int, ...]] = {
            spec.input_name: (-1, 3, *spec.input_hw),
            spec.heatmap_output: (-1, 1, *spec.output_hw),
            spec.box_output: (-1, 4, *spec.output_hw),
        }
        if inputs != {spec.input_name} or not set(wanted) <= tensors:
            raise ModelError(
                f"{self._path}: expected engine input {spec.input_name!r} and outputs {spec.heatmap_output!r}, "
                f"{spec.box_output!r} (from its card), got inputs {sorted(inputs)}, outputs {sorted(tensors - inputs)}"
            )
        for name, want in wanted.items():
            got = tuple(engine.get_tensor_shape(name))
            if len(got) != 4 or got[1:] != want[1:]:
                raise ModelError(f"{self._path}: expected engine tensor {name!r} of shape {want}, got {got}")
