"""One video (a file, or a folder of frame images) → clip records of L frames at a fixed frame rate.

A clip record is uint8 (L·C, S, S), frame-major: ``record[t*C:(t+1)*C]`` is frame t. Frames are made as the image
cache makes its records (:mod:`selfsup.data.decode`): the whole frame *squashed* to S×S (nothing cropped away,
the aspect ratio W/H kept beside it for the crops), frames more elongated than 3:1 centre-cropped to 3:1 first.

Frame rate: the video is resampled by timestamp to ``fps``. Output frame t shows the source frame whose
presentation time (relative to the first frame) is nearest to t/fps, ties to the earlier one, for every t/fps
before the end of the last source frame; so 30 → 10 fps keeps frames 0, 3, 6, …, 30 → 60 fps shows each frame
twice, and timestamps rounded by a container (1 ms in Matroska) pick the right frame. The resampled frames are cut
into consecutive records of L frames from the start; a tail of fewer than L frames after the last full record is
dropped. A video shorter than L frames at ``fps``: ``short="pad"`` (default) repeats its last frame to fill one
record (the manifest keeps how many frames were real, so the set's metadata says it); ``short="skip"`` leaves it
out with the reason ``too short: ...``.

Videos are read with PyAV (FFmpeg; the ``video`` extra), chosen over torchcodec by benchmarks/data/video_decoding.md,
one decoding thread per worker process, and resized by FFmpeg's swscale (bicubic; 2.4× PIL's resize there); only
frames a record uses are converted. Frame folders are sorted by name with numbers compared as numbers
(``frame2`` before ``frame10``), each frame decoded by :func:`~selfsup.data.decode.decode_image`, at ``frame_fps``
frames per second (default: ``fps``, one image per output frame). Any error skips the whole video with a reason,
as a broken image is skipped (never half a video); records are written to a spill file in the build's directory as
they are made, so a worker holds one record however long the video.
"""
from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

import numpy as np
from PIL import Image

from selfsup.data.build import Spilled
from selfsup.data.decode import MAX_ASPECT, RESIZE_GAP, Unreadable, content_box, decode_image
from selfsup.data.folder import IMAGE_SUFFIXES

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".webm", ".mkv"})
SHORT = ("pad", "skip")
VIDEO_DECODER_VERSION = 1
"""Part of a video cache's settings: raise it when records would come out differently."""
AV_MISSING = "reading video files needs PyAV, which is not installed: pip install 'selfsup[video]'"
_EPS = 1e-6
_END_SLACK = 1e-3
T = TypeVar("T")


def av_available() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def resample(timed: Iterable[tuple[float | None, T]], fps: float, interval: float) -> Iterator[T]:
    """The item nearest in time to each output time t/fps, t = 0, 1, … (ties: the earlier item), while t/fps lies
    before the end of the last item: its time plus ``interval`` (the nominal frame duration; 1 ms of slack for
    timestamps a container rounded). ``timed``: (seconds or None, item) in presentation order; times count from
    the first item's, None means the previous time + the last gap, and a time not after the previous one drops its
    item (a duplicate timestamp)."""
    step, t = 1.0 / fps, 0
    prev, prev_time, first, gap = None, 0.0, None, interval
    for time, item in timed:
        if time is None:
            time = prev_time + gap if prev is not None else 0.0
        else:
            first = float(time) if first is None else first
            time = float(time) - first
        if prev is not None:
            if time <= prev_time:
                continue
            middle = (prev_time + time) / 2
            while t * step <= middle + _EPS:
                yield prev
                t += 1
            gap = time - prev_time
        prev, prev_time = item, time
    if prev is not None:
        while t * step < prev_time + interval - _END_SLACK:
            yield prev
            t += 1


def natural_key(name: str) -> tuple:
    """``frame2.png`` before ``frame10.png``; zero-padded names sort as they would as text."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


class _Records:
    """Frames in, records of ``length`` frames out to a spill file; the video's columns at the end."""

    def __init__(self, workdir: str, length: int, size: int, short: str, fps: float):
        self.path = os.path.join(workdir, f"spill-{os.getpid()}-{secrets.token_hex(6)}.u8")
        self.length, self.short, self.fps = length, short, fps
        self.buffer = np.empty((length, 3, size, size), np.uint8)
        self.filled = self.count = self.frames = 0
        self.gray = True
        self.file = None

    def add(self, frame: np.ndarray) -> None:
        """One frame (S, S, C), C = 1 or 3."""
        if frame.shape[2] == 3:
            same = (frame[..., 0] == frame[..., 1]).all() and (frame[..., 1] == frame[..., 2]).all()
            self.gray = self.gray and bool(same)
        self.buffer[self.filled] = frame.transpose(2, 0, 1)  # a gray frame is broadcast to the staged RGB
        self.filled += 1
        self.frames += 1
        if self.filled == self.length:
            self._flush()

    def _flush(self) -> None:
        if self.file is None:
            self.file = open(self.path, "wb")
        self.file.write(self.buffer.data)
        self.count += 1
        self.filled = 0

    def finish(self, what: str, **columns) -> Spilled:
        if self.frames == 0:
            raise Unreadable(f"no frames: {what} has no frame that could be shown")
        if self.count == 0:
            if self.short == "skip":
                raise Unreadable(f"too short: {self.frames} frame(s) at {self.fps:g} fps, fewer than the "
                                 f"{self.length} a record holds")
            self.buffer[self.filled :] = self.buffer[self.filled - 1]
            self._flush()
        self.close()
        return Spilled(self.path, self.count, {"gray": self.gray, "length": self.frames, **columns})

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def discard(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def decode_clip(path: str, size: int, workdir: str, *, frames: int, fps: float, short: str = "pad",
                frame_fps: float | None = None, max_aspect: float = MAX_ASPECT) -> Spilled:
    """``path`` (a video file, or a directory of frame images) as records of ``frames`` frames, written to a spill
    file in ``workdir``; raises :class:`Unreadable` with the reason it cannot be used."""
    out = _Records(workdir, frames, size, short, fps)
    try:
        if os.path.isdir(path):
            return _frame_folder(path, size, out, frame_fps or fps, max_aspect)
        if os.stat(path).st_size == 0:
            raise Unreadable("empty file: zero bytes")
        return _video_file(path, size, out, max_aspect)
    except Unreadable:
        out.discard()
        raise
    except Exception as exc:  # FFmpeg and PIL raise many types for broken files; each means "skip this video"
        out.discard()
        raise _classify(exc, out.frames) from None


def read_spilled(spilled: Spilled, frames: int, size: int) -> np.ndarray:
    """A video's records from its spill file, uint8 (count, L·C, S, S), C = 1 when every frame was grey (as the
    cache stores a grey folder); the spill file is removed."""
    staged = np.fromfile(spilled.path, np.uint8).reshape(spilled.count, frames, 3, size, size)
    os.unlink(spilled.path)
    if spilled.columns["gray"]:
        staged = staged[:, :, :1]
    return np.ascontiguousarray(staged).reshape(spilled.count, -1, size, size)


def _classify(exc: BaseException, decoded: int) -> Unreadable:
    import av

    text = str(exc)
    if isinstance(exc, (PermissionError, av.error.PermissionError)):
        return Unreadable("permission denied: the file cannot be opened for reading")
    if isinstance(exc, MemoryError):
        return Unreadable("out of memory while decoding")
    if isinstance(exc, av.error.InvalidDataError) and decoded == 0:
        return Unreadable(f"not a video: FFmpeg cannot read it ({text})")
    if isinstance(exc, (av.error.InvalidDataError, av.error.EOFError, EOFError)):
        return Unreadable(f"truncated or corrupt: after {decoded} frame(s): {text}")
    if isinstance(exc, av.error.DecoderNotFoundError):
        return Unreadable(f"no decoder: this FFmpeg build cannot decode it ({text})")
    return Unreadable(f"decode error: {type(exc).__name__}: {text}")


def _video_file(path: str, size: int, out: _Records, max_aspect: float) -> Spilled:
    try:
        import av
    except ImportError:
        raise Unreadable(AV_MISSING) from None
    with av.open(path) as container:
        if not container.streams.video:
            raise Unreadable("no video stream: the file holds audio or data only")
        stream = container.streams.video[0]
        stream.thread_type, stream.thread_count = "SLICE", 1  # one thread: the build runs a process per core
        width, height = stream.codec_context.width, stream.codec_context.height
        if not width or not height:
            raise Unreadable("no video stream: its frames have no size")
        rate = stream.average_rate or stream.guessed_rate or 30
        box = content_box(width, height, max_aspect)
        clamped = box != (0.0, 0.0, float(width), float(height))
        last, pixels = None, None
        timed = ((frame.time, frame) for frame in container.decode(stream))
        for frame in resample(timed, out.fps, 1.0 / float(rate)):
            if frame is not last:  # a frame shown twice (a higher output rate) is converted once
                last, pixels = frame, _frame_pixels(frame, size, box, clamped)
            out.add(pixels)
    aspect = (box[2] - box[0]) / (box[3] - box[1])
    return out.finish("the video", width=width, height=height, aspect=round(aspect, 6))


def _frame_pixels(frame, size: int, box: tuple[float, float, float, float], clamped: bool) -> np.ndarray:
    """(S, S, 3) uint8: FFmpeg's bicubic squash, or PIL's (as the image cache) when a 3:1 clamp crops the frame.
    One swscale thread: its thread pool would not survive the fork of a later process pool (the child hangs)."""
    if not clamped:
        return frame.reformat(size, size, "rgb24", interpolation="BICUBIC", threads=1).to_ndarray()
    img = Image.fromarray(frame.reformat(format="rgb24", threads=1).to_ndarray())
    return np.asarray(img.resize((size, size), Image.BICUBIC, box=box, reducing_gap=RESIZE_GAP))


def frame_files(folder: str) -> list[str]:
    """The frame images of a frame folder, in order."""
    names = [e.name for e in os.scandir(folder) if not e.name.startswith(".") and e.is_file()
             and Path(e.name).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(names, key=natural_key)


def _frame_folder(folder: str, size: int, out: _Records, frame_fps: float, max_aspect: float) -> Spilled:
    names = frame_files(folder)
    if not names:
        raise Unreadable("no frames: the folder holds no images")
    first = None
    last, pixels = None, None
    for name in resample(((i / frame_fps, n) for i, n in enumerate(names)), out.fps, 1.0 / frame_fps):
        if name is not last:
            try:
                got = decode_image(os.path.join(folder, name), size, max_aspect)
            except Unreadable as exc:
                raise Unreadable(f"{str(exc).split(':')[0]}: frame {name}: {exc}") from None
            first = first or got
            last, pixels = name, got.pixels
        out.add(pixels)
    return out.finish("the folder", width=first.width, height=first.height, aspect=round(first.aspect, 6))
