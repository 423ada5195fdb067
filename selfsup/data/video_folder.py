"""Video folders decoded once into the on-disk cache: clip records of L frames, read as an ordinary image cache.

A video folder holds video files (mp4, m4v, mov, avi, webm, mkv) and/or frame folders (a directory holding frame
images is one clip, its frames in name order), with class sub-folders giving labels as image folders do:
``root/<class>/**/clip.mp4`` or ``root/<class>/**/<clip>/000001.png`` is labelled ``<class>``; a video or frame
folder directly in ``root`` makes the folder unlabelled. How a video becomes records — frames squashed to S×S as
image records are, resampled by timestamp to ``fps``, cut into records of L frames, short videos padded or
skipped — is :mod:`selfsup.data.video_decode`.

The cache is the image cache (:mod:`selfsup.data.cache`: the same key, manifest, shard, lock, atomic publish,
incremental update and skip list) with records of L·C channels: a video's records are consecutive, the manifest's
``records`` column says how many each file gave and ``length`` how many of its frames were real. Its set is a
plain :class:`~selfsup.data.imageset.ImageSet` (streamed from disk), one entry per record, with the video's
label, path and aspect ratio; :func:`load_video_folder` returns beside it which video each record is and when
its first frame is. A video cache's settings add ``frames``, ``fps``, ``short``, ``frame_fps`` and the video
decoder's version, so it never shares a cache directory with the folder's image cache or another frame rate.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch

from selfsup.data.build import RecordSource
from selfsup.data.cache import CacheOptions, open_cache, prepare_folder
from selfsup.data.clips import ClipSet
from selfsup.data.folder import IMAGE_SUFFIXES, FolderListing, list_folder
from selfsup.data.imageset import DataError, ImageSet
from selfsup.data.manifest import Manifest
from selfsup.data.video_decode import (AV_MISSING, SHORT, VIDEO_DECODER_VERSION, VIDEO_SUFFIXES, av_available,
                                       decode_clip)


def list_video_folder(root: str | Path) -> FolderListing:
    """Every video file and frame folder under ``root`` (sorted; a frame folder's size is its frames' bytes, its
    mtime the latest of its frames' and its own, so adding, removing or rewriting a frame changes the clip)."""
    listing = list_folder(root, VIDEO_SUFFIXES | IMAGE_SUFFIXES)
    entries: dict[str, tuple[int, int]] = {}
    for f, size, mtime in zip(listing.files, listing.sizes, listing.mtimes):
        if Path(f).suffix.lower() in VIDEO_SUFFIXES:
            entries[f] = (size, mtime)
            continue
        clip = f.rsplit("/", 1)[0] if "/" in f else "."
        have = entries.get(clip)
        if have is None:
            try:
                own = os.stat(listing.root / clip).st_mtime_ns
            except OSError:
                own = -1
            have = (0, own)
        entries[clip] = (have[0] + size, max(have[1], mtime))
    if not av_available() and any(Path(f).suffix.lower() in VIDEO_SUFFIXES for f in entries):
        raise DataError(f"{root} holds video files; {AV_MISSING}")
    ordered = sorted(entries)
    listing.files = ordered
    listing.sizes = [entries[f][0] for f in ordered]
    listing.mtimes = [entries[f][1] for f in ordered]
    return listing


def video_source(frames_per_record: int = 16, fps: float = 8.0, short: str = "pad",
                 frame_fps: float | None = None) -> RecordSource:
    """The hooks that make the image cache a video cache (see :class:`~selfsup.data.build.RecordSource`)."""
    if not isinstance(frames_per_record, int) or frames_per_record < 1:
        raise DataError(f"frames_per_record must be a positive integer, got {frames_per_record!r}")
    if not fps > 0 or (frame_fps is not None and not frame_fps > 0):
        raise DataError(f"fps and frame_fps must be positive, got fps={fps!r}, frame_fps={frame_fps!r}")
    if short not in SHORT:
        raise DataError(f"short must be one of {', '.join(SHORT)}, got {short!r}")
    frame_fps = float(frame_fps or fps)
    return RecordSource(
        decode=partial(decode_clip, frames=frames_per_record, fps=float(fps), short=short, frame_fps=frame_fps),
        lister=list_video_folder, frames=frames_per_record, columns=("length",), unit="video",
        what=f"videos ({', '.join(sorted(VIDEO_SUFFIXES))}) or frame folders", chunk=1, pool_min=2,
        settings={"frames": frames_per_record, "fps": float(fps), "short": short, "frame_fps": frame_fps,
                  "video_decoder": VIDEO_DECODER_VERSION, "video_resize": "swscale bicubic"})


def load_video_folder(folder: str | Path, image_size: int = 64, *, frames_per_record: int = 16, fps: float = 8.0,
                      short: str = "pad", frame_fps: float | None = None, cache_dir: str | None = None,
                      cache_size: int | None = None, check: str = "fast", workers: int | None = None,
                      progress: bool = True) -> tuple[ImageSet, dict]:
    """The folder's videos as clip records (L·C, S, S), L = ``frames_per_record`` frames at ``fps``, in a
    file-backed :class:`ImageSet` (labels from class folders, each record's video path and aspect ratio), building
    or updating the cache first when needed; and the records' metadata (:func:`clip_metadata`).

    S is the image cache's stored side (round(``image_size`` × 4/3) unless ``cache_size``); ``short``: ``"pad"``
    a video shorter than L frames by repeating its last frame, or ``"skip"`` it; ``frame_fps``: the rate frame
    folders were taken at (default ``fps``: each frame image is one frame)."""
    source = video_source(frames_per_record, fps, short, frame_fps)
    opts = CacheOptions(image_size, cache_size, cache_dir, check, workers, progress)
    try:
        report = prepare_folder(folder, opts, source)
        images = open_cache(report, folder, image_size)
    except FileNotFoundError:  # a concurrent rebuild replaced the cache between its check and its mapping
        report = prepare_folder(folder, opts, source)
        images = open_cache(report, folder, image_size)
    images.name = f"videos:{Path(folder).name}"
    return images, clip_metadata(report.manifest, folder)


def clip_metadata(m: Manifest, folder: str | Path) -> dict:
    """Per record (N of them): ``video`` int64 (N,), the record's video (an index into ``paths``); ``start``
    float64 (N,), seconds from the video's first frame to the record's; ``valid`` int64 (N,), how many of its L
    frames are the video's (fewer than L only in a padded short video: the rest repeat the last). Per video (V):
    ``paths`` (as :attr:`ImageSet.paths` spells them), ``records`` int64 (V,). And ``frames`` (L), ``fps``,
    ``channels`` (C per frame)."""
    length = int(m.settings["frames"])
    fps = float(m.settings["fps"])
    stored = m.stored()
    counts = torch.tensor([m.records(i) for i in stored], dtype=torch.long)
    video = torch.repeat_interleave(torch.arange(len(stored)), counts)
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    chunk = torch.arange(len(video)) - first
    real = torch.tensor([m.files["length"][i] for i in stored], dtype=torch.long)[video]
    paths = [str(Path(folder) / m.files["path"][i]) for i in stored]
    return {"video": video, "start": chunk.double() * length / fps, "valid": (real - chunk * length).clamp(max=length),
            "paths": paths, "records": counts, "frames": length, "fps": fps, "channels": m.channels // length}


def holds_videos(root: str | Path) -> bool:
    """Whether a video file lies anywhere under ``root`` (stops at the first; hidden entries are skipped, as
    listing skips them). An image folder is walked whole: ~0.3 s for 200,000 files on a 2-core machine."""
    videos, images = tuple(VIDEO_SUFFIXES), tuple(IMAGE_SUFFIXES)
    pending = [str(root)]
    while pending:
        try:
            entries = os.scandir(pending.pop())
        except OSError:
            continue
        with entries:
            for e in entries:
                name = e.name.lower()
                if name.startswith("."):
                    continue
                if name.endswith(videos):
                    return True
                if not name.endswith(images) and e.is_dir():  # an image file needs no is_dir
                    pending.append(e.path)
    return False


VIDEO_DEFAULTS = {"frames": 16, "fps": 8.0, "short": "pad", "frame_fps": None}
"""What ``data.video`` leaves unset (the defaults of :func:`load_video_folder`)."""


def complete_video_settings(settings: dict) -> dict:
    """``data.video`` with every setting filled in: :data:`VIDEO_DEFAULTS` under the ones given."""
    return {**VIDEO_DEFAULTS, **settings}


def load_video_clips(folder: str | Path, image_size: int, settings: dict, *, cache_dir: str | None = None,
                     cache_size: int | None = None, check: str = "fast") -> ClipSet:
    """A video folder as a :class:`~selfsup.data.clips.ClipSet`: its records (:func:`load_video_folder`, with
    ``settings`` = ``data.video``: ``frames``, ``fps``, ``short``, ``frame_fps``), which video each is, and the
    frame rate."""
    v = complete_video_settings(settings)
    records, meta = load_video_folder(folder, image_size, frames_per_record=v["frames"], fps=v["fps"],
                                      short=v["short"], frame_fps=v["frame_fps"], cache_dir=cache_dir,
                                      cache_size=cache_size, check=check)
    return ClipSet(records, meta["frames"], video=meta["video"], fps=meta["fps"], start=meta["start"])
