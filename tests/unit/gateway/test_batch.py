"""``gateway.batch`` (finding, skipping, resuming, journaling) and ``roadlabel batch`` through gateway.cli.main."""

from __future__ import annotations

import ast
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from gateway import batch
from gateway.batch import (
    JOURNAL_NAME,
    SUMMARY_NAME,
    BatchEvent,
    BatchSummary,
    FoundRecording,
    find_recordings,
    job_key,
    label_file_key,
    output_path_for,
    read_journal,
    run_batch,
)
from gateway.cli import EXIT_INPUT_ERRORS, EXIT_OK, main
from gateway.pipeline import PipelineSettings, file_sha256
from services.common.errors import InputError, ModelError
from services.common.labelfile import Review, load_label_file, save_label_file
from services.common.modelcard import ModelCard
from services.common.types import Detections, Frame
from tests.fakes import FakeClassifier, FakeDetector, fake_card
from tests.synthvideo import SignSpec, SyntheticVideo, drawn_sign, make_road_video, make_tiny_video

pytestmark = pytest.mark.usefixtures("restore_root_logger")


# --- helpers ---------------------------------------------------------------------------------------------------------


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def rel(items: Sequence[FoundRecording]) -> list[str]:
    return [item.relative for item in items]


class ReplayDetector:
    """Replays each clip's ground truth, told apart by recording id (the first 16 hex digits of its sha256).

    Recordings it does not know get no detections. ``interrupt_at`` / ``fail_at``: raise ``KeyboardInterrupt`` /
    ``ModelError`` on the first frame of the n-th (1-based) recording it sees.
    """

    def __init__(
        self,
        clips: Sequence[SyntheticVideo] = (),
        *,
        card: ModelCard | None = None,
        interrupt_at: int | None = None,
        fail_at: int | None = None,
    ) -> None:
        self._fakes = {file_sha256(c.path)[:16]: FakeDetector(c) for c in clips}
        self._card = card or fake_card("detector", ("traffic_sign",))
        self._interrupt_at = interrupt_at
        self._fail_at = fail_at
        self.seen: list[str] = []

    @property
    def card(self) -> ModelCard:
        return self._card

    def detect(self, frames: Sequence[Frame]) -> list[Detections]:
        out = []
        for frame in frames:
            rid = frame.ref.recording_id
            if rid not in self.seen:
                self.seen.append(rid)
                if len(self.seen) == self._interrupt_at:
                    raise KeyboardInterrupt
                if len(self.seen) == self._fail_at:
                    raise ModelError("fake detector: out of GPU memory")
            fake = self._fakes.get(rid)
            if fake is not None:
                out.extend(fake.detect([frame]))
            else:
                empty = np.zeros((0, 4), np.float32)
                out.append(Detections(frame.ref, empty, np.zeros(0, np.float32), np.zeros(0, np.int16)))
        return out


def sign(start: int, end: int, class_id: int = 14) -> SignSpec:
    crop, roi = drawn_sign(class_id)
    return SignSpec(class_id=class_id, crop=crop, roi_xyxy=roi, start_frame=start, end_frame=end)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[SyntheticVideo]:
    """Three different small clips with one sign each (different seeds: different bytes, different ids)."""
    folder = tmp_path_factory.mktemp("clips")
    return [
        make_road_video(folder / f"clip{i}.mp4", width=96, height=64, n_frames=8, signs=[sign(0, 8)], seed=i)
        for i in range(3)
    ]


@pytest.fixture
def archive(tmp_path, clips) -> Path:
    """``archive/day1/a.mp4, archive/day1/sub/b.mp4, archive/day2/c.mp4`` plus a corrupt and an empty file."""
    root = tmp_path / "archive"
    for clip, name in zip(clips, ["day1/a.mp4", "day1/sub/b.mp4", "day2/c.mp4"], strict=True):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(clip.path, root / name)
    touch(root / "day1" / "corrupt.mp4", b"not a video" * 20)
    touch(root / "day2" / "empty.mov", b"")
    return root


def run(archive: Path, out: Path, clips, settings: PipelineSettings | None = None, events=None, **kwargs):
    detector = kwargs.pop("detector", None) or ReplayDetector(clips)
    return run_batch(
        find_recordings([archive], (), ()),
        out,
        detector,
        FakeClassifier(),
        settings or PipelineSettings(),
        on_event=events.append if events is not None else None,
        **kwargs,
    )


def outcomes(summary: BatchSummary) -> dict[str, str]:
    return {row.source: row.outcome for row in summary.rows}


# --- finding recordings ----------------------------------------------------------------------------------------------


def test_folders_are_searched_recursively_in_sorted_order(tmp_path):
    root = tmp_path / "src"
    for name in ["z.mp4", "a/x.MOV", "a/b/y.mkv", "a/c.avi", "m.webm", "n.M4V", "o.ts", "p.mts"]:
        touch(root / name)
    for name in ["notes.txt", "a/frame.jpg", ".hidden.mp4", "a/._mac.mp4", ".trash/t.mp4", "a/noext"]:
        touch(root / name)
    os.symlink(root / "a", root / "a" / "b" / "loop")  # a link loop: each real folder is searched once
    os.symlink(root / "z.mp4", root / "a" / "same-as-z.mp4")  # the same file twice: kept once, where found first
    found = find_recordings([root])
    assert rel(found) == ["a/b/y.mkv", "a/c.avi", "a/same-as-z.mp4", "a/x.MOV", "m.webm", "n.M4V", "o.ts", "p.mts"]
    assert all(item.root == root for item in found)


def test_a_list_file_names_recordings_relative_to_itself(tmp_path):
    lists = tmp_path / "lists"
    touch(lists / "rel" / "one.mp4")
    touch(lists / "folder" / "deep" / "two.mkv")
    absolute = touch(tmp_path / "elsewhere" / "three.avi")
    outside = touch(tmp_path / "outside.mp4")
    listing = lists / "batch.txt"
    listing.write_text(
        "\ufeff# recordings of Monday\n\n"
        "rel/one.mp4\n"
        f"  {absolute}  \n"
        "../outside.mp4\r\n"
        "folder\n"
        "missing.mp4\n"
        "# rel/commented-out.mp4\n",
        encoding="utf-8",
    )
    found = find_recordings([listing])
    assert [item.path for item in found] == [
        lists / "rel" / "one.mp4",
        absolute,
        lists / ".." / "outside.mp4",
        lists / "folder" / "deep" / "two.mkv",
        lists / "missing.mp4",  # kept: the batch reports it
    ]
    assert {item.root for item in found} == {lists}
    assert found[2].path.resolve() == outside


def test_a_video_source_is_itself(tmp_path):
    video = touch(tmp_path / "cam" / "x.MP4")
    assert find_recordings([video]) == [FoundRecording(video, video.parent)]


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        ((), (), ["2024/jan/a.mp4", "2024/jan/b.mkv", "2024/tmp/c.mp4", "d.mp4"]),
        (("*.mp4",), (), ["2024/jan/a.mp4", "2024/tmp/c.mp4", "d.mp4"]),
        (("2024/*",), (), ["2024/jan/a.mp4", "2024/jan/b.mkv", "2024/tmp/c.mp4"]),
        (("b.mkv",), (), ["2024/jan/b.mkv"]),
        ((), ("tmp",), ["2024/jan/a.mp4", "2024/jan/b.mkv", "d.mp4"]),
        ((), ("2024/jan",), ["2024/tmp/c.mp4", "d.mp4"]),
        ((), ("*.mkv", "d.*"), ["2024/jan/a.mp4", "2024/tmp/c.mp4"]),
        (("*.mp4",), ("*/tmp/*",), ["2024/jan/a.mp4", "d.mp4"]),
        (("*.MP4",), (), []),  # case-sensitive patterns
    ],
)
def test_include_and_exclude(tmp_path, include, exclude, expected):
    for name in ["2024/jan/a.mp4", "2024/jan/b.mkv", "2024/tmp/c.mp4", "d.mp4"]:
        touch(tmp_path / "src" / name)
    assert rel(find_recordings([tmp_path / "src"], include, exclude)) == expected


def test_include_and_exclude_apply_to_list_entries(tmp_path):
    touch(tmp_path / "tmp" / "a.mp4")
    touch(tmp_path / "b.mp4")
    (tmp_path / "l.txt").write_text("tmp/a.mp4\nb.mp4\n")
    assert rel(find_recordings([tmp_path / "l.txt"], (), ("tmp",))) == ["b.mp4"]


def test_bad_sources_raise_input_errors(tmp_path):
    with pytest.raises(InputError, match="expected a folder, a video or a list file, got no such file or folder"):
        find_recordings([tmp_path / "nope"])
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    with pytest.raises(InputError, match="got a broken symbolic link"):
        find_recordings([tmp_path / "dangling"])
    binary = touch(tmp_path / "video.mxf", bytes(range(256)))
    with pytest.raises(InputError, match="expected a folder, a video .* or a UTF-8 list of recordings, got a binary"):
        find_recordings([binary])
    latin1 = touch(tmp_path / "list.txt", "café.mp4\n".encode("latin-1"))
    with pytest.raises(InputError, match="got bytes that are not UTF-8 text"):
        find_recordings([latin1])


# --- output paths and keys -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relative", "expected"),
    [
        ("a.mp4", "a.mp4.labels.json"),
        ("day/1/a.mp4", "day/1/a.mp4.labels.json"),
        ("../../etc/passwd.mp4", "_parent_/_parent_/etc/passwd.mp4.labels.json"),
        ("ström/Straße 🚗.mp4", "ström/Straße 🚗.mp4.labels.json"),
        ("new\nline/tab\t.mp4", "new_line/tab_.mp4.labels.json"),
        ("back\\slash.mp4", "back_slash.mp4.labels.json"),
    ],
)
def test_output_paths_mirror_the_source_and_stay_inside(tmp_path, relative, expected):
    root = tmp_path / "lists"
    out = tmp_path / "out"
    path = output_path_for(root / relative, root, out)
    assert path.relative_to(out).as_posix() == expected


def test_output_paths_for_odd_names_stay_inside_and_fit(tmp_path):
    root, out = tmp_path / "src", tmp_path / "out"
    long_a, long_b = "é" * 200 + "a.mp4", "é" * 200 + "b.mp4"
    path_a, path_b = output_path_for(root / long_a, root, out), output_path_for(root / long_b, root, out)
    assert path_a != path_b
    assert all(len(p.name.encode()) <= 255 and p.name.endswith(".labels.json") for p in (path_a, path_b))
    undecodable = root / os.fsdecode(b"caf\xe9.mp4")
    assert output_path_for(undecodable, root, out).name == "caf_xe9.mp4.labels.json"
    for hostile in ["/etc/passwd.mp4", str(root / ".." / ".." / "x.mp4"), "../../../.."]:
        path = output_path_for(Path(hostile), root, out)
        assert path.resolve().is_relative_to(out.resolve()), hostile


def test_job_key_changes_with_each_input(tmp_path):
    det, cls = fake_card("detector", ("sign",)), FakeClassifier().card
    settings = PipelineSettings()
    base = job_key("a" * 64, det, cls, settings)
    assert base == job_key("a" * 64, det, cls, PipelineSettings.model_validate(settings.model_dump(mode="json")))
    others = [
        job_key("b" * 64, det, cls, settings),
        job_key("a" * 64, det.model_copy(update={"version": "v2"}), cls, settings),
        job_key("a" * 64, det.model_copy(update={"onnx_sha256": "1" * 64}), cls, settings),
        job_key("a" * 64, det, cls.model_copy(update={"version": "v2"}), settings),
        job_key("a" * 64, det, cls, PipelineSettings(detect_every=2)),
        job_key("a" * 64, det, cls, PipelineSettings(tracker={"hit_counter_max": 20})),  # a nested setting
    ]
    assert len({base, *others}) == len(others) + 1


# --- running a batch -------------------------------------------------------------------------------------------------


def test_batch_labels_the_good_reports_the_bad_and_skips_on_rerun(archive, tmp_path, clips):
    out = tmp_path / "out"
    events: list[BatchEvent] = []
    summary = run(archive, out, clips, events=events)
    assert outcomes(summary) == {
        "day1/a.mp4": "labelled",
        "day1/corrupt.mp4": "failed",
        "day1/sub/b.mp4": "labelled",
        "day2/c.mp4": "labelled",
        "day2/empty.mov": "failed",
    }
    assert (summary.files, summary.labelled, summary.skipped, summary.failed) == (5, 3, 0, 2)
    assert summary.complete
    assert summary.stopped is None
    reasons = {f.path.rsplit("/", 1)[-1]: f.reason for f in summary.failures}
    assert "cannot open" in reasons["corrupt.mp4"]
    assert "got 0 bytes" in reasons["empty.mov"]
    for name in ["day1/a.mp4", "day1/sub/b.mp4", "day2/c.mp4"]:
        labels = load_label_file(out / f"{name}.labels.json")
        assert labels.recording.sha256 == file_sha256(archive / name)
        assert labels.recording.source == Path(name).name
        assert label_file_key(labels) == job_key(
            labels.recording.sha256, ReplayDetector().card, FakeClassifier().card, PipelineSettings()
        )
    assert summary.frames == 24
    assert summary.tracks == sum(len(load_label_file(p).tracks) for p in out.rglob("*.labels.json")) >= 3
    assert not (out / "day1" / "corrupt.mp4.labels.json").exists()
    # The summary on disk is the one returned.
    assert BatchSummary.model_validate_json((out / SUMMARY_NAME).read_text()) == summary

    # Events: started, then per file started .. progress .. done, then finished.
    kinds = [e.kind for e in events]
    assert kinds[0] == "started"
    assert kinds[-1] == "finished"
    assert kinds.count("file_started") == kinds.count("file_done") == 5
    progress = [e for e in events if e.kind == "progress" and e.progress and e.progress.stage == "label"]
    assert progress
    assert all(e.path is not None and e.total == 5 for e in progress)
    assert max(e.frames_done for e in progress) == 8
    done = [e for e in events if e.kind == "file_done"]
    assert [e.index for e in done] == [0, 1, 2, 3, 4]
    assert [e.outcome for e in done] == [r.outcome for r in summary.rows]

    # Rerun: every labelled file is skipped without being labelled again; failures are not tried again.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.labels.json")}
    detector = ReplayDetector(clips)
    again = run(archive, out, clips, detector=detector)
    assert (again.labelled, again.skipped, again.failed) == (0, 3, 2)
    assert all(row.earlier for row in again.rows if row.outcome == "failed")
    assert detector.seen == []  # nothing was decoded
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.labels.json")} == before
    assert (again.frames, again.tracks) == (summary.frames, summary.tracks)
    assert again.frames_labelled == 0


def test_journal_records_each_outcome_once(archive, tmp_path, clips):
    out = tmp_path / "out"
    run(archive, out, clips)
    run(archive, out, clips)  # nothing changed: only a run line is added
    lines = [json.loads(line) for line in (out / JOURNAL_NAME).read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["run"] + ["file"] * 5 + ["run"]
    assert lines[0]["files"] == 5
    assert lines[0]["models"]["detector"]["name"] == "fake-detector"
    journal = read_journal(out)
    assert sorted(journal) == [
        "day1/a.mp4.labels.json",
        "day1/corrupt.mp4.labels.json",
        "day1/sub/b.mp4.labels.json",
        "day2/c.mp4.labels.json",
        "day2/empty.mov.labels.json",
    ]
    row = journal["day1/a.mp4.labels.json"]
    assert row.outcome == "labelled"
    assert row.sha256 == file_sha256(archive / "day1" / "a.mp4")
    assert row.size_bytes == (archive / "day1" / "a.mp4").stat().st_size


def test_a_rerun_reads_only_the_files_that_changed(archive, tmp_path, clips, monkeypatch):
    out = tmp_path / "out"
    run(archive, out, clips)
    hashed: list[Path] = []

    def counting_sha256(path, *args, **kwargs):
        hashed.append(path)
        return file_sha256(path, *args, **kwargs)

    monkeypatch.setattr(batch, "file_sha256", counting_sha256)
    assert run(archive, out, clips).skipped == 3
    assert hashed == []  # size and modification time unchanged: the journal's sha256 holds
    touched = archive / "day2" / "c.mp4"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 1_000_000_000))
    summary = run(archive, out, clips)
    assert hashed == [touched]
    assert outcomes(summary)["day2/c.mp4"] == "skipped"  # same bytes: still done
    assert read_journal(out)["day2/c.mp4.labels.json"].mtime_ns == touched.stat().st_mtime_ns


def test_changed_settings_or_models_relabel(archive, tmp_path, clips):
    out = tmp_path / "out"
    run(archive, out, clips)
    changed = run(archive, out, clips, PipelineSettings(min_track_frames=4))
    assert (changed.labelled, changed.skipped) == (3, 0)
    assert load_label_file(out / "day1" / "a.mp4.labels.json").settings["min_track_frames"] == 4
    assert run(archive, out, clips, PipelineSettings(min_track_frames=4)).skipped == 3
    new_model = fake_card("detector", ("traffic_sign",)).model_copy(update={"version": "test-2"})
    relabelled = run(
        archive, out, clips, PipelineSettings(min_track_frames=4), detector=ReplayDetector(clips, card=new_model)
    )
    assert (relabelled.labelled, relabelled.skipped) == (3, 0)
    assert load_label_file(out / "day1" / "a.mp4.labels.json").models["detector"].version == "test-2"


def test_a_crash_resumes_without_relabelling(archive, tmp_path, clips):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(archive, out, clips, detector=ReplayDetector(clips, interrupt_at=2))
    first = out / "day1" / "a.mp4.labels.json"
    created = load_label_file(first).created_at
    mtime = first.stat().st_mtime_ns
    assert not (out / "day1" / "sub" / "b.mp4.labels.json").exists()
    partial = BatchSummary.model_validate_json((out / SUMMARY_NAME).read_text())
    assert not partial.complete
    assert partial.stopped == "interrupted"
    # The corrupt file (sorted before sub/b.mp4) was done too; the file being labelled was not journaled.
    assert outcomes(partial) == {"day1/a.mp4": "labelled", "day1/corrupt.mp4": "failed"}
    assert sorted(read_journal(out)) == ["day1/a.mp4.labels.json", "day1/corrupt.mp4.labels.json"]

    detector = ReplayDetector(clips)
    resumed = run(archive, out, clips, detector=detector)
    assert outcomes(resumed) == {
        "day1/a.mp4": "skipped",
        "day1/corrupt.mp4": "failed",
        "day1/sub/b.mp4": "labelled",
        "day2/c.mp4": "labelled",
        "day2/empty.mov": "failed",
    }
    assert resumed.complete
    assert first.stat().st_mtime_ns == mtime
    assert load_label_file(first).created_at == created
    assert file_sha256(archive / "day1" / "a.mp4")[:16] not in detector.seen


def test_a_model_error_stops_the_batch_and_a_rerun_resumes(archive, tmp_path, clips):
    out = tmp_path / "out"
    with pytest.raises(ModelError, match="out of GPU memory"):
        run(archive, out, clips, detector=ReplayDetector(clips, fail_at=2))
    partial = BatchSummary.model_validate_json((out / SUMMARY_NAME).read_text())
    assert not partial.complete
    assert partial.stopped == "ModelError: fake detector: out of GPU memory"
    assert "day1/sub/b.mp4.labels.json" not in read_journal(out)  # not the file's fault: not a failure
    resumed = run(archive, out, clips)
    assert outcomes(resumed)["day1/sub/b.mp4"] == "labelled"
    assert (resumed.labelled, resumed.skipped, resumed.failed) == (2, 1, 2)


def test_failures_are_retried_when_asked_or_when_the_file_changes(archive, tmp_path, clips):
    out = tmp_path / "out"
    run(archive, out, clips)
    retried = run(archive, out, clips, retry_failed=True)
    assert [r.earlier for r in retried.rows if r.outcome == "failed"] == [False, False]
    shutil.copy(clips[0].path, archive / "day1" / "corrupt.mp4")  # the file was copied again, whole this time
    fixed = run(archive, out, clips)
    assert outcomes(fixed)["day1/corrupt.mp4"] == "labelled"
    assert outcomes(fixed)["day2/empty.mov"] == "failed"


def test_missing_and_special_list_entries_are_reported(tmp_path, clips):
    shutil.copy(clips[0].path, tmp_path / "ok.mp4")
    listing = tmp_path / "list.txt"
    os.mkfifo(tmp_path / "pipe.mp4")
    listing.write_text("ok.mp4\ngone.mp4\npipe.mp4\n")
    summary = run_batch(
        find_recordings([listing]), tmp_path / "out", ReplayDetector(clips), FakeClassifier(), PipelineSettings()
    )
    assert outcomes(summary) == {"ok.mp4": "labelled", "gone.mp4": "failed", "pipe.mp4": "failed"}
    assert [f.reason for f in summary.failures] == [
        "expected a readable video file, got No such file or directory",
        "expected a video file, got a folder, pipe or device",
    ]


def test_hostile_names_stay_inside_out_dir(tmp_path, clips):
    lists = tmp_path / "lists"
    lists.mkdir()
    shutil.copy(clips[0].path, tmp_path / "outside.mp4")
    unicode_name = lists / "Straße 🚗 ström.mp4"
    shutil.copy(clips[1].path, unicode_name)
    undecodable = lists / os.fsdecode(b"caf\xe9.mkv")
    shutil.copy(clips[2].path, undecodable)
    listing = lists / "list.txt"
    listing.write_text(f"../outside.mp4\n{unicode_name.name}\n{tmp_path / 'lists' / '..' / 'outside.mp4'}\n")
    items = find_recordings([listing]) + find_recordings([lists], ("*.mkv",))
    out = tmp_path / "out"
    summary = run_batch(items, out, ReplayDetector(clips), FakeClassifier(), PipelineSettings())
    assert summary.labelled == 3
    assert summary.failed == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.labels.json"))
    assert written == ["Straße 🚗 ström.mp4.labels.json", "_parent_/outside.mp4.labels.json", "caf_xe9.mkv.labels.json"]
    assert all(p.resolve().is_relative_to(out.resolve()) for p in out.rglob("*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lists", "out", "outside.mp4"]
    assert load_label_file(out / "caf_xe9.mkv.labels.json").recording.source == "caf\\xe9.mkv"
    doc = json.loads((out / SUMMARY_NAME).read_text(encoding="utf-8"))
    assert "caf\\xe9.mkv" in {row["source"] for row in doc["rows"]}


def test_two_recordings_with_one_label_file_are_not_both_labelled(tmp_path, clips):
    for cam, clip in (("cam1", clips[0]), ("cam2", clips[1])):
        (tmp_path / cam).mkdir()
        shutil.copy(clip.path, tmp_path / cam / "0001.mp4")
    items = find_recordings([tmp_path / "cam1", tmp_path / "cam2"])
    out = tmp_path / "out"
    summary = run_batch(items, out, ReplayDetector(clips), FakeClassifier(), PipelineSettings())
    assert [r.outcome for r in summary.rows] == ["labelled", "failed"]
    assert "would be the same as 0001.mp4's" in summary.failures[0].reason
    assert load_label_file(out / "0001.mp4.labels.json").recording.sha256 == file_sha256(tmp_path / "cam1" / "0001.mp4")


def test_reviewed_labels_are_never_overwritten(archive, tmp_path, clips):
    out = tmp_path / "out"
    run(archive, out, clips)
    path = out / "day1" / "a.mp4.labels.json"
    labels = load_label_file(path)
    assert labels.tracks
    reviewed = labels.model_copy(
        update={"tracks": (labels.tracks[0].model_copy(update={"review": Review(status="accepted")}),)}
    )
    save_label_file(path, reviewed)
    summary = run(archive, out, clips, PipelineSettings(detect_every=2))
    assert outcomes(summary)["day1/a.mp4"] == "failed"
    assert "holds 1 reviewed track(s)" in summary.failures[0].reason
    assert load_label_file(path) == reviewed
    assert outcomes(summary)["day1/sub/b.mp4"] == "labelled"


def test_an_unreadable_label_file_is_replaced(archive, tmp_path, clips):
    out = tmp_path / "out"
    touch(out / "day1" / "a.mp4.labels.json", b'{"schema_version": 1, "recording": {}}')
    assert outcomes(run(archive, out, clips))["day1/a.mp4"] == "labelled"
    assert load_label_file(out / "day1" / "a.mp4.labels.json").recording.frame_count == 8


def test_a_torn_journal_line_is_ignored(archive, tmp_path, clips):
    out = tmp_path / "out"
    run(archive, out, clips)
    with (out / JOURNAL_NAME).open("ab") as fh:
        fh.write(b'{"kind": "file", "path": "/x", "outc')  # a crash in the middle of a line
    assert len(read_journal(out)) == 5
    assert run(archive, out, clips).skipped == 3
    lines = (out / JOURNAL_NAME).read_bytes().splitlines()
    assert json.loads(lines[-1])["kind"] == "run"  # appended on a line of its own


def test_one_batch_per_out_dir_at_a_time(archive, tmp_path, clips):
    out = tmp_path / "out"
    out.mkdir()
    holder = batch._Journal(out)
    try:
        with pytest.raises(InputError, match="expected no other batch writing into it"):
            run(archive, out, clips)
    finally:
        holder.close()
    assert run(archive, out, clips).labelled == 3


def test_all_is_complete():
    tree = ast.parse(Path(batch.__file__).read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    public = {n for n in names if not n.startswith("_") and n != "log"}
    assert public <= set(batch.__all__)
    assert all(hasattr(batch, name) for name in batch.__all__)


# --- the command line, with the committed models ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("arch")
    (root / "a").mkdir()
    make_tiny_video(root / "a" / "one.mp4", 64, 48, n_frames=6)
    make_tiny_video(root / "two.mkv", 64, 48, n_frames=6)
    return root


def test_cli_labels_then_skips(tiny_archive, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["batch", str(tiny_archive), "-o", str(out), "--no-progress"]) == EXIT_OK
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("labelled a/one.mp4: 0 tracks, 6 frames, ")
    assert err[0].endswith(" fps")
    assert err[1].startswith("labelled two.mkv: ")
    assert err[-1].startswith("batch: 2 recordings: 2 labelled, 0 skipped, 0 failed; 12 frames, 0 tracks; ")
    assert err[-1].endswith(f"-> {out / SUMMARY_NAME}")
    assert load_label_file(out / "a" / "one.mp4.labels.json").recording.frame_count == 6

    assert main(["batch", str(tiny_archive), "-o", str(out), "--no-progress"]) == EXIT_OK
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == [
        "skipped a/one.mp4: already labelled with these models and settings",
        "skipped two.mkv: already labelled with these models and settings",
    ]


def test_cli_reports_a_bad_file_and_exits_1(tiny_archive, tmp_path, capsys):
    source = tmp_path / "src"
    shutil.copytree(tiny_archive, source)
    touch(source / "broken.mp4", b"")
    settings = tmp_path / "s.yaml"
    settings.write_text("detect_every: 2\n")
    out = tmp_path / "out"
    args = ["batch", str(source), "-o", str(out), "--no-progress", "--settings", str(settings), "--exclude", "two*"]
    assert main(args) == EXIT_INPUT_ERRORS
    err = capsys.readouterr().err
    assert "FAILED broken.mp4: expected a video file, got 0 bytes\n" in err
    assert "labelled a/one.mp4: " in err
    assert "two.mkv" not in err
    assert "batch: 2 recordings: 1 labelled, 0 skipped, 1 failed;" in err
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["failures"] == [
        {"path": str(source / "broken.mp4"), "reason": "broken.mp4: expected a video file, got 0 bytes"}
    ]
    assert summary["settings"]["detect_every"] == 2
    assert main(args) == EXIT_INPUT_ERRORS
    assert "(failed in an earlier run; --retry-failed to try again)" in capsys.readouterr().err


def test_cli_missing_source_and_empty_folder(tmp_path, capsys):
    assert main(["batch", str(tmp_path / "nope"), "-o", str(tmp_path / "out")]) == EXIT_INPUT_ERRORS
    assert "expected a folder, a video or a list file, got no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["batch", str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == EXIT_INPUT_ERRORS
    assert "got none" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
