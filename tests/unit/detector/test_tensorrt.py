"""The TensorRT backend's parts that run without TensorRT: cache key, missing-package error, calibration batching.

The backend itself is UNVERIFIED (see services/detector/tensorrt.py): TensorRT cannot be installed here.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from services.common.errors import ModelError
from services.detector.postprocess import letterbox
from services.detector.tensorrt import (
    MISSING_TENSORRT,
    TensorRTDetector,
    calibration_batches,
    engine_cache_key,
    import_tensorrt,
    make_calibrator,
)

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
KEY_ARGS: tuple[Any, ...] = ("NVIDIA H100 80GB HBM3", "10.7.0", "a" * 64, "fp16", 8)


def test_cache_key_is_stable_hex():
    key = engine_cache_key(*KEY_ARGS)
    assert key == engine_cache_key(*KEY_ARGS)
    assert len(key) == 64
    assert int(key, 16) >= 0


@pytest.mark.parametrize("index", range(5))
def test_cache_key_changes_with_each_part(index):
    changed: list[Any] = list(KEY_ARGS)
    changed[index] = {0: "NVIDIA A10", 1: "10.8.0", 2: "b" * 64, 3: "int8", 4: 16}[index]
    assert engine_cache_key(*changed) != engine_cache_key(*KEY_ARGS)


def test_missing_tensorrt(monkeypatch, tiny_detector_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(ModelError) as info:
        TensorRTDetector(tiny_detector_path)
    assert str(info.value) == MISSING_TENSORRT
    assert "tensorrt package (NVIDIA's index), not installed" in str(info.value)


def test_too_old_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(ModelError, match="expected tensorrt >= 10, got 8.6.1"):
        import_tensorrt()


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (int(rng.integers(20, 90)), int(rng.integers(20, 90)), 3), np.uint8) for _ in range(n)]


def test_calibration_batches_are_full_letterboxed_batches():
    images = frames(7)
    batches = list(calibration_batches(iter(images), 3, (32, 48), MEAN, STD))
    assert [b.shape for b in batches] == [(3, 3, 32, 48)] * 2  # the 7th frame is dropped
    for i, batch in enumerate(batches):
        assert batch.dtype == np.float32
        assert batch.flags.c_contiguous
        expected, _ = letterbox(images[3 * i : 3 * i + 3], (32, 48), MEAN, STD)
        np.testing.assert_array_equal(batch, expected)
    assert not np.shares_memory(batches[0], batches[1])


class FakeMemory:
    """DeviceMemory that records copies; 'device' memory is a dict of numpy arrays."""

    def __init__(self):
        self.buffers: dict[int, np.ndarray] = {}
        self.copies = 0
        self.freed: list[int] = []

    def alloc(self, nbytes):
        ptr = 0x1000 * (len(self.buffers) + 1)
        self.buffers[ptr] = np.zeros(nbytes, np.uint8)
        return ptr

    def free(self, ptr):
        self.freed.append(ptr)

    def to_device(self, ptr, host):
        self.buffers[ptr][: host.nbytes] = host.view(np.uint8).ravel()
        self.copies += 1

    def to_host(self, host, ptr):
        host.view(np.uint8).ravel()[:] = self.buffers[ptr][: host.nbytes]

    @property
    def stream(self):
        return 0

    def synchronize(self):
        pass


class FakeCalibratorBase:
    """Stands in for trt.IInt8EntropyCalibrator2."""

    def __init__(self):
        pass


def test_calibrator_feeds_each_batch_then_signals_the_end(tmp_path):
    memory = FakeMemory()
    fake_trt = SimpleNamespace(IInt8EntropyCalibrator2=FakeCalibratorBase)
    images = frames(5, seed=1)
    batches = calibration_batches(iter(images), 2, (32, 48), MEAN, STD)
    calibrator = make_calibrator(fake_trt, batches, 2, memory, tmp_path / "table.calib")
    assert FakeCalibratorBase in type(calibrator).__mro__  # a subclass of TensorRT's base class
    assert calibrator.get_batch_size() == 2
    expected, _ = letterbox(images[:4], (32, 48), MEAN, STD)
    for i in range(2):
        pointers = calibrator.get_batch(["images"])
        assert len(pointers) == 1
        on_device = memory.buffers[pointers[0]].view(np.float32).reshape(2, 3, 32, 48)
        np.testing.assert_array_equal(on_device, expected[2 * i : 2 * i + 2])
    assert calibrator.get_batch(["images"]) is None
    assert calibrator.batches_fed == 2
    assert len(memory.buffers) == 1  # one device buffer, reused
    assert calibrator.read_calibration_cache() is None
    calibrator.write_calibration_cache(b"table")
    assert calibrator.read_calibration_cache() == b"table"
    calibrator.close()
    assert memory.freed == list(memory.buffers)


def test_calibrator_rejects_a_wrong_batch():
    calibrator = make_calibrator(
        SimpleNamespace(IInt8EntropyCalibrator2=FakeCalibratorBase),
        iter([np.zeros((1, 3, 4, 4), np.float32)]),
        2,
        FakeMemory(),
        None,
    )
    with pytest.raises(ModelError, match=r"expected batches \(2, 3, H, W\) float32, got \(1, 3, 4, 4\)"):
        calibrator.get_batch(["images"])
