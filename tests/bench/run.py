"""``make bench``: throughput figures, each next to a baseline measured in the same process.

Machines here are noisy, so every figure is the median of several timed rounds, and candidates and
baselines are interleaved round by round. Nothing here asserts a time; it prints ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from services.classifier.models import default_classifier_path  # noqa: E402
from services.classifier.onnx import OnnxClassifier  # noqa: E402
from services.classifier.preprocess import normalize  # noqa: E402


def _rate(fn: Callable[[], int], min_seconds: float) -> float:
    """Items per second of ``fn`` (returns items done), run repeatedly for at least ``min_seconds``."""
    fn()  # warm-up
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds:
        done += fn()
    return done / elapsed


def _interleaved(cases: dict[str, Callable[[], int]], rounds: int, seconds: float) -> dict[str, float]:
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            rates[name].append(_rate(fn, seconds))
    return {name: statistics.median(r) for name, r in rates.items()}


def bench_classifier(rounds: int, seconds: float) -> None:
    """Crops/s of the ONNX Runtime classifier at batch 1 and 64, against torch eager with the same weights."""
    model_path = Path(os.environ.get("ROADLABEL_CLASSIFIER_MODEL", default_classifier_path()))
    onnx = OnnxClassifier(model_path)
    card = onnx.card
    h, w = card.input_hw
    rng = np.random.default_rng(0)
    crops = {b: rng.integers(0, 255, (b, h, w, 3), dtype=np.uint8) for b in (1, 64)}
    varied = [rng.integers(0, 255, (int(s), int(s), 3), dtype=np.uint8) for s in rng.integers(20, 120, 64)]
    cases: dict[str, Callable[[], int]] = {}
    for b, batch in crops.items():

        def run_onnx(batch: np.ndarray = batch) -> int:
            return len(onnx.classify(list(batch)))

        cases[f"onnxruntime b={b}"] = run_onnx
    cases["onnxruntime b=64 (crops 20-120 px, resize included)"] = lambda: len(onnx.classify(varied))
    try:
        import torch

        from services.backbones.mobilenet_v2 import MobileNetV2

        torch.set_num_threads(os.cpu_count() or 1)
        model = MobileNetV2(card.num_outputs).eval()
        checkpoint = model_path.with_name("checkpoint.pt")
        if checkpoint.is_file():
            model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
        for b, batch in crops.items():
            x = torch.from_numpy(normalize(batch, card.mean, card.std))

            def run_torch(x: torch.Tensor = x) -> int:
                with torch.inference_mode():
                    return int(torch.log_softmax(model(x) / card.temperature, dim=1).shape[0])

            cases[f"torch eager b={b}"] = run_torch
    except ImportError:
        pass
    rates = _interleaved(cases, rounds, seconds)
    for name, rate in rates.items():
        batch_label = name.split("b=")[1].split()[0]
        base = rates.get(f"torch eager b={batch_label}")
        f"{rate / base:.2f}x" if base else "-"
    rates["onnxruntime b=64"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="time per round per case")
    args = parser.parse_args(argv)
    bench_classifier(args.rounds, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
