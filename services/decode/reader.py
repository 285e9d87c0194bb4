"""Video decoding with PyAV: a recording in, ``Frame``s out, in a thread of its own.

Times come from the stream's own timestamps (pts * time_base), never from index / fps, so variable frame rates and
non-zero start times come out right. The container's display rotation is applied to every frame. Audio is never
decoded. A packet that fails to decode is skipped and recorded as a gap; too many failures in a row, or a file
that is not a video at all, raise ``UnreadableVideo`` with what was expected and what was found.

The decoder thread feeds a bounded queue (bounded in bytes, so an 8K stream holds as little memory as a 720p one)
and forwards any exception to the consumer, which re-raises it: a failing decoder never leaves its caller hung,
and a caller that stops early stops the thread.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import av
import av.error
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from services.common.errors import UnreadableVideo
from services.common.types import Frame, FrameRef

__all__ = ["DecodeGap", "DecodeSettings", "VideoInfo", "VideoReader", "open_video", "read_frame_at", "read_frames_at"]

log = logging.getLogger(__name__)


class DecodeSettings(BaseModel):
    """How the decoder reads a recording.

    Attributes:
        queue_bytes: Most bytes of decoded frames waiting for the consumer (at least one frame is always allowed).
        max_consecutive_bad_packets: Raise ``UnreadableVideo`` after this many packets in a row fail to decode.
        max_pixels: Refuse streams with more pixels per frame than this (8K UHD is 33.2 M).
        threads: Decoder threads (0: let FFmpeg choose, frame and slice threading).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    queue_bytes: int = Field(96 << 20, ge=1)
    max_consecutive_bad_packets: int = Field(100, ge=1)
    max_pixels: int = Field(8192 * 8192, ge=1)
    threads: int = Field(0, ge=0)


@dataclass(frozen=True, slots=True)
class VideoInfo:
    """What the container says about the video stream, before decoding it.

    Attributes:
        width: Displayed width in pixels (after rotation).
        height: Displayed height in pixels.
        rotation_deg: Counter-clockwise display rotation applied to every frame: 0, 90, 180 or 270.
        fps: Average frame rate as the container states it (0.0 when it states none); for tools that need one.
        frame_count_hint: Frames the container says the stream has, or None when it does not say.
        duration_s_hint: Stream duration the container states, or None.
        start_s: Presentation time of the stream's start (subtracted from every frame's time).
        codec: Decoder name, e.g. ``h264``.
        container: Demuxer name, e.g. ``mov,mp4,m4a,3gp,3g2,mj2``.
    """

    width: int
    height: int
    rotation_deg: int
    fps: float
    frame_count_hint: int | None
    duration_s_hint: float | None
    start_s: float
    codec: str
    container: str


@dataclass(slots=True)
class DecodeGap:
    """Frames lost between two decoded frames.

    Attributes:
        after_frame: Decode index of the last good frame before the gap (-1: before the first).
        from_s: That frame's time (0.0 when -1).
        to_s: Time of the next good frame, or of the stream's end when none came.
        packets: Packets that failed in the gap.
        reason: The first failure's message.
    """

    after_frame: int
    from_s: float
    to_s: float
    packets: int
    reason: str


@dataclass(slots=True)
class _Stats:
    frames: int = 0
    decode_s: float = 0.0
    last_t: float = 0.0
    min_step: float = math.inf
    max_step: float = 0.0
    gaps: list[DecodeGap] = field(default_factory=list)


_END = object()


def open_video(path: Path, recording_id: str, settings: DecodeSettings | None = None) -> VideoReader:
    """Open a recording for decoding (see ``VideoReader``)."""
    return VideoReader(path, recording_id, settings or DecodeSettings())


class VideoReader:
    """One recording, opened and checked; ``frames()`` decodes it once.

    Use as a context manager, or call ``close()``. ``gaps`` and ``frames_decoded`` are complete once ``frames()``
    is exhausted.

    Raises (from the constructor):
        UnreadableVideo: Missing, empty or not a video, no video stream, a frame size of 0 or above
            ``settings.max_pixels``.
    """

    def __init__(self, path: Path, recording_id: str, settings: DecodeSettings) -> None:
        self.path = path
        self.recording_id = recording_id
        self.settings = settings
        self._stats = _Stats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._container = self._open(path)
        try:
            self.info = self._probe()
        except BaseException:
            self._container.close()
            raise

    @staticmethod
    def _open(path: Path) -> Any:
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise UnreadableVideo(f"{path.name}: expected a video file, got {exc.strerror or exc}") from exc
        if not path.is_file():
            raise UnreadableVideo(f"{path.name}: expected a video file, got a directory or special file")
        if size == 0:
            raise UnreadableVideo(f"{path.name}: expected a video file, got 0 bytes")
        try:
            return av.open(str(path), mode="r", metadata_errors="ignore")
        except (av.error.FFmpegError, UnicodeDecodeError, ValueError, OSError) as exc:
            raise UnreadableVideo(
                f"{path.name}: expected a video file (MP4, MOV, MKV, AVI, WebM ...), got {size} bytes that FFmpeg "
                f"cannot open: {exc}"
            ) from exc

    def _probe(self) -> VideoInfo:
        container = self._container
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["no streams"]
            raise UnreadableVideo(f"{self.path.name}: expected a video stream, got {', '.join(kinds)}")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        if width < 1 or height < 1:
            raise UnreadableVideo(
                f"{self.path.name}: expected a video with a frame size, got a {container.format.name} "
                f"{ctx.name} stream of {width}x{height} pixels"
            )
        if width * height > self.settings.max_pixels:
            raise UnreadableVideo(
                f"{self.path.name}: expected at most {self.settings.max_pixels} pixels per frame, got {width}x{height}"
            )
        tb = stream.time_base or Fraction(1, 90000)
        start_s = float(stream.start_time * tb) if stream.start_time is not None else 0.0
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        duration_s = float(stream.duration * tb) if stream.duration else None
        if duration_s is None and container.duration:
            duration_s = container.duration / 1_000_000
        try:
            rotation = _probe_rotation(self.path)
        except (av.error.FFmpegError, OSError):
            rotation = 0
        if rotation in (90, 270):
            width, height = height, width
        return VideoInfo(
            width=width,
            height=height,
            rotation_deg=rotation,
            fps=fps,
            frame_count_hint=int(stream.frames) if stream.frames else None,
            duration_s_hint=duration_s,
            start_s=start_s,
            codec=str(ctx.name),
            container=str(container.format.name),
        )

    @property
    def gaps(self) -> list[DecodeGap]:
        """Gaps found so far (complete once ``frames()`` is exhausted)."""
        return list(self._stats.gaps)

    @property
    def frames_decoded(self) -> int:
        """Frames decoded so far."""
        return self._stats.frames

    @property
    def last_pts_s(self) -> float:
        """Time of the last frame decoded so far (``FrameRef.pts_s`` convention)."""
        return self._stats.last_t

    @property
    def variable_frame_rate(self) -> bool:
        """Whether frame durations seen so far differ by more than 1 % (steps across gaps not counted)."""
        st = self._stats
        return st.max_step > 0 and st.max_step > 1.01 * st.min_step

    @property
    def decode_s(self) -> float:
        """Seconds the decoder thread spent decoding and converting."""
        return self._stats.decode_s

    def frames(self) -> Generator[Frame, None, None]:
        """Decode every frame, in presentation order, in a background thread.

        Yields:
            ``Frame``s: RGB (H, W, 3) uint8 in displayed orientation; ``ref.index`` counts decoded frames from 0,
            ``ref.pts_s`` is the presentation time minus ``info.start_s``.

        Raises:
            UnreadableVideo: Too many packets in a row failed, or not one frame could be decoded.
            RuntimeError: ``frames()`` was called a second time.
        """
        if self._thread is not None:
            raise RuntimeError("VideoReader.frames() decodes once; open the video again to re-read it")
        frame_bytes = self.info.width * self.info.height * 3
        depth = max(1, min(64, self.settings.queue_bytes // max(frame_bytes, 1)))
        q: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, args=(q,), name=f"decode-{self.recording_id}", daemon=True)
        self._thread.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, Frame)  # noqa: S101 - our own queue, only Frames besides the two markers
                yield item
        finally:
            self._stop.set()
            # Unblock a producer waiting on a full queue, then wait for it to close the container.
            while self._thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    q.get(timeout=0.05)
            self._thread.join()

    def _put(self, q: queue.Queue[object], item: object) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, q: queue.Queue[object]) -> None:
        try:
            self._decode(q)
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer, which re-raises it
            self._put(q, exc)
        else:
            self._put(q, _END)
        finally:
            self._container.close()

    def _decode(self, q: queue.Queue[object]) -> None:
        stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"
        if self.settings.threads:
            stream.thread_count = self.settings.threads
        tb = stream.time_base or Fraction(1, 90000)
        info = self.info
        k = info.rotation_deg // 90
        stats = self._stats
        bad_in_row = 0
        pending: DecodeGap | None = None
        last_t = 0.0
        frame_step = 1.0 / info.fps if info.fps > 0 else 0.04
        name = self.path.name
        tick = time.perf_counter()

        def fail(reason: str, pts: int | None) -> None:
            nonlocal pending, bad_in_row
            bad_in_row += 1
            where = "?" if pts is None else f"{float(pts * tb) - info.start_s:.3f} s"
            log.debug("skipped an undecodable packet", extra={"video": name, "at": where, "error": reason})
            if pending is None:
                pending = DecodeGap(stats.frames - 1, last_t if stats.frames else 0.0, math.nan, 0, reason)
            pending.packets += 1
            if bad_in_row >= self.settings.max_consecutive_bad_packets:
                raise UnreadableVideo(
                    f"{name}: expected decodable video packets, got {bad_in_row} corrupt packets in a row "
                    f"(after {stats.frames} good frames; last error: {reason})"
                )

        def close_gap(gap: DecodeGap) -> None:
            stats.gaps.append(gap)
            log.warning(
                "frames lost to undecodable packets",
                extra={"video": name, "from_s": round(gap.from_s, 3), "to_s": round(gap.to_s, 3), "error": gap.reason},
            )

        def emit(av_frame: Any) -> bool:
            nonlocal pending, bad_in_row, last_t, tick
            if av_frame.pts is not None:
                t = float(av_frame.pts * tb) - info.start_s
            else:  # a stream without timestamps: the only place a frame rate stands in for them
                t = last_t + frame_step if stats.frames else 0.0
            image = av_frame.to_ndarray(format="rgb24")
            if k:
                image = np.ascontiguousarray(np.rot90(image, k))
            if pending is not None:
                pending.to_s = t
                close_gap(pending)
                pending = None
            elif stats.frames:
                step = t - last_t
                stats.min_step = min(stats.min_step, step)
                stats.max_step = max(stats.max_step, step)
            bad_in_row = 0
            frame = Frame(FrameRef(self.recording_id, stats.frames, t), image)
            stats.frames += 1
            last_t = stats.last_t = t
            stats.decode_s += time.perf_counter() - tick  # busy time: waiting on a full queue is not decoding
            ok = self._put(q, frame)
            tick = time.perf_counter()
            return ok

        demux = self._container.demux(stream)
        while not self._stop.is_set():
            try:
                packet = next(demux)
            except StopIteration:
                break
            except av.error.FFmpegError as exc:
                # The demuxer itself gave up (a truncated or garbled container): what follows is lost.
                fail(f"container unreadable from here: {exc}", None)
                break
            try:
                decoded = packet.decode()
            except (av.error.InvalidDataError, av.error.FFmpegError) as exc:
                fail(str(exc), packet.pts)
                continue
            for av_frame in decoded:
                if not emit(av_frame):
                    return
        stats.decode_s += time.perf_counter() - tick
        if self._stop.is_set():
            return
        if stats.frames == 0:
            reason = pending.reason if pending else "the stream holds no frames"
            raise UnreadableVideo(f"{name}: expected at least one decodable frame, got none ({reason})")
        end_s = (info.duration_s_hint or 0.0) + 0.0
        expected_end = max(end_s - frame_step, last_t)
        if pending is not None:
            pending.to_s = expected_end
            close_gap(pending)
        elif info.frame_count_hint and info.duration_s_hint and expected_end - last_t > 2.5 * frame_step:
            # No packet failed, yet the stream stops well before the end its container declares: truncated.
            stats.gaps.append(
                DecodeGap(
                    stats.frames - 1,
                    last_t,
                    expected_end,
                    0,
                    f"the file ends at {last_t:.3f} s, before the {end_s:.3f} s its container declares (truncated)",
                )
            )

    def close(self) -> None:
        """Stop decoding and close the file."""
        self._stop.set()
        if self._thread is None:
            self._container.close()
        elif self._thread.is_alive():
            self._thread.join(timeout=5)

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _probe_rotation(path: Path, max_packets: int = 64) -> int:
    """The counter-clockwise display rotation of the first video stream, snapped to 0, 90, 180 or 270.

    FFmpeg attaches the container's display matrix to decoded frames (PyAV: ``VideoFrame.rotation``), so this
    decodes the first frame from a second handle on the file; a file whose first packets do not decode, or an
    old-style ``rotate`` tag, fall back to the stream's metadata.
    """
    with av.open(str(path), mode="r", metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        tag = stream.metadata.get("rotate")
        try:
            for n, packet in enumerate(container.demux(stream)):
                if n >= max_packets:
                    break
                try:
                    decoded = packet.decode()
                except av.error.FFmpegError:
                    continue
                if decoded:
                    return int(round(float(decoded[0].rotation or 0) / 90.0)) % 4 * 90
        except av.error.FFmpegError:
            pass
    try:
        # The legacy tag is a clockwise angle; VideoFrame.rotation is counter-clockwise.
        return int(round(-float(tag) / 90.0)) % 4 * 90 if tag else 0
    except ValueError:
        return 0


def read_frame_at(path: Path, t_s: float, *, max_frames: int = 600) -> tuple[float, np.ndarray]:
    """The first frame at or after ``t_s`` (the ``FrameRef.pts_s`` convention), for showing one frame or one crop.

    Seeks to the key frame before ``t_s`` and decodes forward, so it costs at most one GOP of decoding. The
    display rotation is applied.

    Returns:
        (the frame's ``pts_s``, (H, W, 3) uint8 RGB).

    Raises:
        UnreadableVideo: The file cannot be opened, or no frame decodes at or after ``t_s`` within ``max_frames``.
    """
    return read_frames_at(path, [t_s], max_frames=max_frames)[0]


def read_frames_at(path: Path, times_s: Sequence[float], *, max_frames: int = 600) -> list[tuple[float, np.ndarray]]:
    """:func:`read_frame_at` for several times, opening the file once (opening a long MP4 parses its whole index).

    Returns:
        One (``pts_s``, image) per requested time, in the order given.

    Raises:
        UnreadableVideo: As :func:`read_frame_at`, for the first time that has no frame.
    """
    out: list[tuple[float, np.ndarray]] = []
    with VideoReader(path, "frame", DecodeSettings()) as reader:
        info = reader.info
        k = info.rotation_deg // 90
        container = reader._container
        stream = container.streams.video[0]
        tb = stream.time_base or Fraction(1, 90000)
        for t_s in times_s:
            target = t_s + info.start_s
            try:
                container.seek(max(0, int((target - 0.0005) / tb)), stream=stream, backward=True, any_frame=False)
                best: tuple[float, Any] | None = None
                for n, av_frame in enumerate(container.decode(stream)):
                    if av_frame.pts is None:
                        continue
                    when = float(av_frame.pts * tb)
                    if when >= target - 0.0005:
                        best = (when - info.start_s, av_frame)
                        break
                    if n >= max_frames:
                        break
            except av.error.FFmpegError as exc:
                raise UnreadableVideo(f"{path.name}: expected a frame at {t_s:.3f} s, got {exc}") from exc
            if best is None:
                raise UnreadableVideo(f"{path.name}: expected a frame at {t_s:.3f} s, got none")
            image = best[1].to_ndarray(format="rgb24")
            out.append((best[0], np.ascontiguousarray(np.rot90(image, k)) if k else image))
    return out
