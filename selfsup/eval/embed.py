"""Embeddings of a folder of images — or of videos, for a clip encoder — with a run's encoder (``selfsup embed``),
as NumPy or Parquet.

The folder is read through its on-disk cache (:func:`selfsup.data.cache.load_image_folder`: built on
first use, reused after; unreadable files skipped and counted), seen at the encoder's image size as
its evaluation view (the centre square of each image), brought to the encoder's number of channels,
normalised with the pretraining statistics and encoded in batches. A clip encoder reads a video folder
(:func:`selfsup.data.video_folder.load_video_clips`: records of the frames it trained on, at the run's
``data.video`` frame rate) and gives one row per record, its video's path and start time beside it; its
evaluation view is the training clip's length and stride from the centre of each record.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from selfsup.data.cache import CacheOptions, load_image_folder
from selfsup.data.clips import ClipSet, for_encoder
from selfsup.data.decode import Unreadable, decode_image
from selfsup.data.imageset import DataError, ImageSet
from selfsup.train.rundir import LoadedRun
from selfsup.monitor.features import extract_features


@dataclass
class Embeddings:
    vectors: Tensor
    """(N, D) float32 encoder features (not normalised)."""
    paths: list[str]
    labels: Tensor | None = None
    """(N,) class indices when the folder has class subfolders."""
    classes: list[str] = field(default_factory=list)
    skipped: int = 0
    """Files in the folder that could not be read."""
    meta: dict[str, Any] = field(default_factory=dict)
    starts: Tensor | None = None
    """(N,) seconds from its video's first frame to each row's clip (a video folder); ``None`` for images."""
    images: ImageSet | None = field(default=None, repr=False)
    """The images the vectors were computed from (the folder's cache records), for pixel checks; not written."""


def match_channels(images: ImageSet, in_chans: int) -> ImageSet:
    """Grayscale images for an RGB encoder are repeated over 3 channels; RGB images for a grayscale
    encoder become their luma (ITU-R 601), so the encoder can be used on any folder."""
    return images.with_channels(in_chans)


def takes_clips(run: LoadedRun) -> bool:
    return run.meta.get("inputs", "images") == "clips"


def video_settings(run: LoadedRun) -> dict[str, Any]:
    """How a folder's videos become records for this run's clip encoder: the run's ``data.video`` settings (every
    one filled in), records as long as the ones it trained on."""
    from selfsup.data.video_folder import complete_video_settings

    return complete_video_settings({**run.cfg.data.video, "frames": int(run.meta["clip"]["record_frames"])})


def load_folder_for(run: LoadedRun, folder: str | Path) -> ImageSet | ClipSet:
    """The folder's readable images (clips, for a clip encoder), at the encoder's size and channels (through the
    folder's cache, with the pretraining run's cache settings)."""
    d = run.cfg.data
    if takes_clips(run):
        from selfsup.data.video_folder import load_video_clips

        clips = load_video_clips(folder, run.meta["image_size"], video_settings(run), cache_dir=d.cache_dir,
                                 cache_size=d.cache_size, check=d.cache_check)
        return for_encoder(clips.with_channels(run.meta["in_chans"]), run.meta)
    from selfsup.data.video_folder import holds_videos

    if Path(folder).is_dir() and d.kind != "images" and holds_videos(folder):
        raise DataError(f"{folder} holds videos and this encoder was trained on still images ({run.cfg.method.name}); "
                        "embed it with a clip encoder, or point it at a folder of images")
    images = load_image_folder(folder, run.meta["image_size"], cache_dir=d.cache_dir, cache_size=d.cache_size,
                               check=d.cache_check)
    return match_channels(images, run.meta["in_chans"])


def load_query_clip(run: LoadedRun, path: str | Path) -> ClipSet:
    """One video file (or frame folder), decoded directly (no cache) as a folder's videos are cached: its records,
    each a clip the encoder embeds; raises :class:`DataError` when it cannot be read."""
    import tempfile

    from selfsup.data.video_decode import decode_clip, read_spilled

    path = Path(path)
    if not path.exists():
        raise DataError(f"query video not found: {path}")
    settings = video_settings(run)
    frames, size = settings["frames"], CacheOptions(run.meta["image_size"], run.cfg.data.cache_size).size
    with tempfile.TemporaryDirectory() as work:
        try:
            spilled = decode_clip(str(path), size, work, frames=frames, fps=float(settings["fps"]),
                                  short=settings["short"], frame_fps=settings["frame_fps"])
        except Unreadable as exc:
            raise DataError(f"query video {path} could not be read ({exc})") from None
        pixels = read_spilled(spilled, frames, size)
    records = ImageSet(torch.from_numpy(pixels), name=str(path), paths=[str(path)] * spilled.count,
                       aspect=torch.full((spilled.count,), spilled.columns["aspect"]),
                       image_size=run.meta["image_size"])
    clips = ClipSet(records, frames, video=torch.zeros(spilled.count, dtype=torch.long),
                    start=torch.arange(spilled.count, dtype=torch.float64) * frames / float(settings["fps"]))
    return for_encoder(clips.with_channels(run.meta["in_chans"]), run.meta)


def load_query_image(run: LoadedRun, path: str | Path) -> ImageSet:
    """One image file, decoded directly (no cache) exactly as a folder's images are cached, so a query
    that lies in the folder gets the same embedding as its copy there; unreadable files raise
    :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"query image not found: {path}")
    d = run.cfg.data
    opts = CacheOptions(run.meta["image_size"], d.cache_size)
    try:
        decoded = decode_image(path, opts.size)
    except Unreadable as exc:
        raise DataError(f"query image {path} could not be read ({exc})") from None
    x = torch.from_numpy(decoded.pixels).permute(2, 0, 1)[None].contiguous()
    one = ImageSet(x, name=str(path), paths=[str(path)], aspect=torch.tensor([decoded.aspect]),
                   image_size=run.meta["image_size"])
    return match_channels(one, run.meta["in_chans"])


def encode(run: LoadedRun, images: ImageSet, device: str = "cpu", batch_size: int = 512) -> Tensor:
    return extract_features(run.encoder, images, run.meta["mean"], run.meta["std"], device, batch_size)


def embed_folder(run: LoadedRun, folder: str | Path, device: str = "cpu", batch_size: int = 512) -> Embeddings:
    images = load_folder_for(run, folder)
    meta = {"method": run.cfg.method.name, "backbone": run.cfg.backbone.name, "image_size": run.meta["image_size"],
            "in_chans": run.meta["in_chans"], "folder": str(folder)}
    starts = getattr(images, "start", None)
    return Embeddings(encode(run, images, device, batch_size), list(images.paths or []), images.labels,
                      images.classes, images.skipped, meta, starts, images)


def write_embeddings(emb: Embeddings, out: str | Path) -> Path:
    """``out`` ending in ``.parquet``: a Parquet table (needs pyarrow); otherwise a ``.npz`` archive
    (``.npz`` is appended when missing) with ``embeddings`` (N, D), ``paths`` (N,) and, for class
    folders, ``labels`` and ``classes``. Returns the path written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {**emb.meta, "skipped": emb.skipped, "classes": emb.classes}
    vectors = emb.vectors.float().numpy()
    if out.suffix.lower() == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError("writing Parquet needs pyarrow, which is not installed: `pip install pyarrow`, "
                            "or write NumPy with --out FILE.npz") from None
        columns: dict[str, Any] = {
            "path": pa.array(emb.paths, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]),
        }
        if emb.labels is not None:
            columns["label"] = pa.array(emb.labels.numpy())
        if emb.starts is not None:
            columns["start"] = pa.array(emb.starts.numpy())
        table = pa.table(columns).replace_schema_metadata({"selfsup": json.dumps(meta)})
        pq.write_table(table, str(out))
        return out
    if out.suffix.lower() != ".npz":
        out = out.with_name(out.name + ".npz")
    arrays: dict[str, np.ndarray] = {"embeddings": vectors, "paths": np.array(emb.paths, dtype=str),
                                     "meta": np.array(json.dumps(meta))}
    if emb.labels is not None:
        arrays["labels"] = emb.labels.numpy()
        arrays["classes"] = np.array(emb.classes, dtype=str)
    if emb.starts is not None:
        arrays["starts"] = emb.starts.numpy()
    with out.open("wb") as f:
        np.savez(f, **arrays)
    return out


def read_embeddings(path: str | Path) -> Embeddings:
    """An ``.npz`` written by :func:`write_embeddings` (no pickles are loaded)."""
    with np.load(Path(path), allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        labels = torch.from_numpy(z["labels"]) if "labels" in z else None
        starts = torch.from_numpy(z["starts"]) if "starts" in z else None
        return Embeddings(torch.from_numpy(z["embeddings"]), z["paths"].tolist(), labels, meta.get("classes", []),
                          int(meta.get("skipped", 0)), meta, starts)
