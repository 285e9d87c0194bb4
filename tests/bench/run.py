"""``make bench``: throughput figures, each next to a baseline measured in the same process.

Machines here are noisy, so every figure is the median of several timed rounds, and candidates and
baselines are interleaved round by round. Nothing here asserts a time; it prints ratios.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from services.classifier.models import default_classifier_path  # noqa: E402
from services.classifier.onnx import OnnxClassifier  # noqa: E402
from services.classifier.preprocess import normalize  # noqa: E402
from services.common.modelcard import card_path_for, load_card  # noqa: E402
from services.common.types import Frame, FrameRef  # noqa: E402
from services.detector.api import DetectorSettings  # noqa: E402
from services.detector.models import default_detector_path  # noqa: E402
from services.detector.onnx import OnnxDetector  # noqa: E402
from services.detector.postprocess import letterbox  # noqa: E402


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
    torch_note = ""
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
        torch_note = " (torch not installed: no torch baseline)"
    rates = _interleaved(cases, rounds, seconds)
    out = sys.stdout
    out.write(f"\n== classifier {card.name} {card.version}: {h}x{w} input, {os.cpu_count()} CPUs, ")
    out.write(f"median of {rounds} rounds, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}{torch_note}\n")
    out.write(f"{'case':<55} {'crops/s':>10} {'vs torch eager':>15}\n")
    for name, rate in rates.items():
        batch_label = name.split("b=")[1].split()[0]
        base = rates.get(f"torch eager b={batch_label}")
        ratio = f"{rate / base:.2f}x" if base else "-"
        out.write(f"{name:<55} {rate:>10.0f} {ratio:>15}\n")
    goal = rates["onnxruntime b=64"]
    out.write(f"goal: >= 2000 crops/s at batch 64 -> {goal:.0f} crops/s ({'met' if goal >= 2000 else 'NOT met'})\n")


def _road_like_frames(n: int, hw: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """(h, w, 3) uint8 frames with smooth gradients, some edges and noise: closer to JPEG-decoded scenes than noise."""
    rng = np.random.default_rng(seed)
    h, w = hw
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    frames = []
    for _ in range(n):
        base = 90 + 60 * np.sin(xx / rng.uniform(40, 200)) * np.cos(yy / rng.uniform(40, 200))
        image = np.stack([base + rng.uniform(-30, 30) for _ in range(3)], axis=2)
        for _ in range(12):  # a few sign-sized patches
            x, y, s = int(rng.integers(0, w - 64)), int(rng.integers(0, h - 64)), int(rng.integers(16, 64))
            image[y : y + s, x : x + s] = rng.uniform(0, 255, 3)
        image += rng.normal(0, 6, image.shape)
        frames.append(np.clip(image, 0, 255).astype(np.uint8))
    return frames


def bench_detector(rounds: int, seconds: float) -> None:
    """Frames/s of the ONNX Runtime detector on 1280x720 frames at batch 1 and 8, next to letterboxing alone.

    Each detector figure includes letterboxing (resize + normalise), the model and decoding; the letterbox-only
    figures show how much of that is preprocessing.
    """
    out = sys.stdout
    model_path = Path(os.environ.get("ROADLABEL_DETECTOR_MODEL", default_detector_path()))
    if not model_path.is_file():
        out.write(f"detector bench skipped: no trained model committed ({model_path} does not exist)\n")
        return
    card = load_card(card_path_for(model_path))
    images = _road_like_frames(8, (720, 1280))
    frames = [Frame(FrameRef("bench", i, i / 25), image) for i, image in enumerate(images)]
    jpegs = []
    for image in images:  # the cost of getting a frame from a compressed file: JPEG decode, then letterbox
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    cases: dict[str, Callable[[], int]] = {}
    for b in (1, 8):
        detector = OnnxDetector(model_path, settings=DetectorSettings(batch_size=b))
        buffer = np.empty((b, 3, *card.input_hw), np.float32)

        def run_detect(detector: OnnxDetector = detector, b: int = b) -> int:
            return len(detector.detect(frames[:b]))

        def run_letterbox(b: int = b, buffer: np.ndarray = buffer) -> int:
            batch, _ = letterbox(images[:b], card.input_hw, card.mean, card.std, out=buffer)
            return len(batch)

        def run_decode_letterbox(b: int = b, buffer: np.ndarray = buffer) -> int:
            decoded = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in jpegs[:b]]
            batch, _ = letterbox(decoded, card.input_hw, card.mean, card.std, out=buffer)
            return len(batch)

        cases[f"onnxruntime b={b} (letterbox + model + decode)"] = run_detect
        cases[f"letterbox only b={b}"] = run_letterbox
        cases[f"jpeg decode + letterbox b={b}"] = run_decode_letterbox
    rates = _interleaved(cases, rounds, seconds)
    h, w = card.input_hw
    out.write(f"detector {card.name} {card.version}: 1280x720 frames -> {w}x{h} input, median of {rounds} rounds\n")
    for b in (1, 8):
        full, pre = rates[f"onnxruntime b={b} (letterbox + model + decode)"], rates[f"letterbox only b={b}"]
        out.write(
            f"  b={b}: {full:7.1f} frames/s end to end; letterbox alone {pre:7.1f} frames/s "
            f"({100 * full / pre:.0f} % of each frame's time); JPEG decode + letterbox "
            f"{rates[f'jpeg decode + letterbox b={b}']:7.1f} frames/s\n"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="time per round per case")
    parser.add_argument(
        "--only",
        choices=["classifier", "detector", "video", "gateway", "review"],
        help="run one bench (default: all of them)",
    )
    parser.add_argument("--video-rounds", type=int, default=3, help="rounds per video case (each labels a clip)")
    parser.add_argument("--video-frames", type=int, default=150, help="frames per synthetic clip")
    parser.add_argument("--clients", type=int, default=20, help="gateway load test: concurrent clients")
    parser.add_argument("--uploads", type=int, default=100, help="gateway load test: uploads in all")
    parser.add_argument("--big-gb", type=float, default=2.0, help="gateway load test: size of the one big upload")
    args = parser.parse_args(argv)
    # torch's OpenMP workers busy-wait after each call by default; interleaved with ONNX Runtime on 2 cores they
    # would take the cores ONNX Runtime needs and make every figure meaningless. Set before torch loads libgomp.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.only in (None, "classifier"):
        bench_classifier(args.rounds, args.seconds)
    if args.only in (None, "detector"):
        bench_detector(args.rounds, args.seconds)
    if args.only in (None, "video"):
        from tests.bench.video import bench_video  # after the others: it writes temporary clips

        bench_video(args.video_rounds, args.video_frames)
    if args.only in (None, "gateway"):
        from tests.bench.gateway import bench_gateway

        bench_gateway(args.clients, args.uploads, args.big_gb)
    if args.only in (None, "review"):
        from tests.bench.review import bench_review

        bench_review()
    return 0


if __name__ == "__main__":
    sys.exit(main())
