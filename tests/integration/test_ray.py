"""Scale-out on a real local Ray cluster: a small batch and a gateway job through the model actors.

The same recordings must give the same label files with either engine (only the run's timestamps and timings
differ), and every frame must have gone through the shared detector actor.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.batch import find_recordings, run_batch
from gateway.cli import EXIT_OK, main
from gateway.pipeline import PipelineSettings
from gateway.ray_engine import RayEngine, RaySettings
from gateway.store import open_store
from gateway.worker import WorkerConfig, _Models, process_one
from services.classifier.models import default_classifier_path
from services.classifier.onnx import OnnxClassifier
from services.detector.api import DetectorSettings
from services.detector.models import default_detector_path
from services.detector.onnx import OnnxDetector
from tests.synthvideo import SignSpec, drawn_sign, make_road_video

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.usefixtures("restore_root_logger")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="roadlabel-test")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("archive")
    crop, roi = drawn_sign(14)
    for i in range(2):
        make_road_video(
            folder / f"drive{i}.mp4",
            width=320,
            height=180,
            n_frames=30,
            signs=[SignSpec(class_id=14, crop=crop, roi_xyxy=roi, start_frame=0, end_frame=24)],
            seed=i,
        )
    return folder


def comparable(path: Path) -> dict[str, object]:
    doc = json.loads(path.read_text())
    doc.pop("created_at")
    doc.pop("stats")
    return doc


@pytest.fixture(scope="module")
def local_labels(clips, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local")
    settings = PipelineSettings()
    run_batch(
        find_recordings([clips]),
        out,
        OnnxDetector(default_detector_path(), settings=DetectorSettings(batch_size=settings.detect_batch)),
        OnnxClassifier(default_classifier_path()),
        settings,
    )
    return out


def test_batch_on_ray_gives_the_same_label_files(cluster, clips, local_labels, tmp_path):
    settings = PipelineSettings()
    engine = RayEngine(RaySettings(), default_detector_path(), default_classifier_path(), settings.detect_batch)
    summary = run_batch(find_recordings([clips]), tmp_path, engine.detector, engine.classifier, settings, engine=engine)
    assert (summary.labelled, summary.failed) == (2, 0)
    for name in ("drive0.mp4.labels.json", "drive1.mp4.labels.json"):
        assert comparable(tmp_path / name) == comparable(local_labels / name)
    batches = engine.batch_sizes()
    assert sum(batches["detector"]) >= 60  # both recordings' frames went through the shared detector actor
    assert max(batches["detector"]) <= RaySettings().max_batch_frames


def test_batch_cli_with_the_ray_engine(cluster, clips, local_labels, tmp_path):
    out = tmp_path / "out"
    assert main(["batch", str(clips), "-o", str(out), "--engine", "ray", "--no-progress"]) == EXIT_OK
    assert comparable(out / "drive0.mp4.labels.json") == comparable(local_labels / "drive0.mp4.labels.json")
    assert json.loads((out / "batch-summary.json").read_text())["labelled"] == 2


def test_gateway_worker_with_the_ray_engine(cluster, clips, local_labels, tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'meta.db'}")
    data = tmp_path / "data"
    (data / "recordings").mkdir(parents=True)
    (data / "recordings" / "r1.mp4").write_bytes((clips / "drive0.mp4").read_bytes())
    store.add_recording(
        recording_id="r1",
        sha256="0" * 64,
        source_name="drive0.mp4",
        size_bytes=1,
        path="recordings/r1.mp4",
        created_by="t",
        settings=PipelineSettings().model_dump(mode="json"),
        models={"detector": str(default_detector_path()), "classifier": str(default_classifier_path())},
    )
    job = store.claim_job("w", 60)
    assert job is not None
    process_one(store, WorkerConfig("unused", data, engine="ray"), "w", job, _Models(None, "ray"))
    done = store.get_job(job.id)
    assert done is not None
    assert done.status == "done", done.error
    served = comparable(data / done.label_path)
    local = comparable(local_labels / "drive0.mp4.labels.json")
    served["recording"].pop("id")  # type: ignore[attr-defined]
    local["recording"].pop("id")  # type: ignore[attr-defined]
    assert served == local
    store.close()
