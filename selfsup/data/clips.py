"""The clip collection every video dataset loads into: fixed-length clip records on top of an :class:`ImageSet`.

A clip record is L frames of C channels at S×S, stored as one image record of L·C channels, frame-major
(``record[t·C:(t+1)·C]`` is frame t). Everything the image path has — the in-memory tensor or the memory-mapped
on-disk cache, subsets that are index views, prefetching beyond RAM, positioned reads — is the image set's, used
unchanged; :class:`ClipSet` adds only what a clip means: how many frames, how many colour channels, the video each
record came from, and labels beyond the class (a motion direction, a trajectory family).

A batch is read as the records are stored, uint8 (B, L·C, S, S): that is what travels to the training device (one
gather, as for images); the clip views (:mod:`selfsup.views.clips`) sample T frames of it there, with temporal
jitter, and give float clips (B, C, T, H, W), torchvision's video layout.
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import Tensor

from selfsup.data.imageset import DataError, ImageSet


EVAL_FRAMES = ("as_is", "shuffled", "centre")


class ClipSet:
    """N clip records of ``frames`` frames × ``channels`` channels, held by ``records`` (an :class:`ImageSet` of
    (L·C, S, S) records, in RAM or memory-mapped).

    ``video`` (N,) int64: which source video each record is a chunk of (records of one video are positives for
    the clip-level joint-embedding methods and never split between train and test); ``None``: one video each.
    ``extra_labels``: further per-record labels by name ((N,) int64 each, e.g. ``"direction"``), with their class
    names in ``extra_classes``; the evaluation protocols can be pointed at them.
    """

    kind = "clips"

    def __init__(self, records: ImageSet, frames: int, *, video: Tensor | None = None,
                 extra_labels: Mapping[str, Tensor] | None = None,
                 extra_classes: Mapping[str, Sequence[str]] | None = None, fps: float | None = None,
                 start: Tensor | None = None):
        if frames < 1 or records.channels % frames:
            raise DataError(f"{records.name}: records of {records.channels} channels cannot hold {frames} frames each")
        self.records = records
        self.frames = int(frames)
        self.video = video
        self.extra_labels = dict(extra_labels or {})
        self.extra_classes = {k: list(v) for k, v in (extra_classes or {}).items()}
        self.fps = fps
        """Frames per second of the records (decoded videos), ``None`` where time has no unit (a generator)."""
        self.start = start
        """(N,) float64: seconds from its video's first frame to each record's (decoded videos); ``None``: unknown."""
        self.eval_clip = (self.frames, 1)
        """(T, stride) of the evaluation view (:func:`~selfsup.views.clips.center_clip`): the run's training clip
        once :meth:`with_eval` sets it; the whole record until then."""
        self.eval_frames = "as_is"
        """What the evaluation view does to time: ``"as_is"``; ``"shuffled"`` (frames permuted, the same fixed
        permutation for every clip: what order adds); ``"centre"`` (the centre frame alone: appearance alone)."""
        n = len(records)
        labels = ((f"{k!r} labels", v) for k, v in self.extra_labels.items())
        checked = (("video ids", video), ("start times", start), *labels)
        for what, value in checked:
            if value is not None and len(value) != n:
                raise DataError(f"{records.name}: {n} clips but {len(value)} {what}")

    # ------------------------------------------------------------------ what the image path reads, delegated
    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        where = f", mapped from {self.source}" if self.mapped else ""
        return (f"ClipSet({self.name!r}, {len(self)} × ({self.frames} frames, {self.channels}, {self.stored_size}, "
                f"{self.stored_size}){where})")

    @property
    def channels(self) -> int:
        """Colour channels of one frame (what a video backbone's ``in_chans`` is)."""
        return self.records.channels // self.frames

    labels = property(lambda self: self.records.labels, lambda self, v: setattr(self.records, "labels", v))
    classes = property(lambda self: self.records.classes, lambda self, v: setattr(self.records, "classes", v))
    name = property(lambda self: self.records.name, lambda self, v: setattr(self.records, "name", v))
    paths = property(lambda self: self.records.paths)
    skipped = property(lambda self: self.records.skipped)
    aspect = property(lambda self: self.records.aspect)
    source = property(lambda self: self.records.source)
    mapped = property(lambda self: self.records.mapped)
    nbytes = property(lambda self: self.records.nbytes)
    stored_size = property(lambda self: self.records.stored_size)
    image_size = property(lambda self: self.records.image_size)
    num_classes = property(lambda self: self.records.num_classes)

    @property
    def images(self) -> Tensor:
        """All records, uint8 (N, L·C, S, S) (as :attr:`ImageSet.images`)."""
        return self.records.images

    def batch(self, idx: Tensor | Sequence[int]) -> Tensor:
        """The records at ``idx`` as stored: uint8 (B, L·C, S, S); :meth:`frames_of` shows them as (B, L, C, S, S)."""
        return self.records.batch(idx)

    def frames_of(self, records: Tensor) -> Tensor:
        """(B, L·C, S, S) → (B, L, C, S, S), a view."""
        return records.unflatten(1, (self.frames, self.channels))

    def aspect_at(self, idx: Tensor | Sequence[int]) -> Tensor | None:
        return self.records.aspect_at(idx)

    def class_counts(self) -> dict[str, int] | None:
        return self.records.class_counts()

    def describe(self) -> str:
        counts = self.class_counts()
        clips = f"{len(self)} clips of {self.frames} frames"
        videos = "" if self.video is None else f" from {len(torch.unique(self.video))} videos"
        if not counts:
            return f"{clips}{videos}, unlabelled"
        sizes = sorted(counts.values())
        return f"{clips}{videos}, {len(counts)} classes ({sizes[0]}–{sizes[-1]} per class)"

    # ------------------------------------------------------------------ views of the set
    def _like(self, records: ImageSet, index: Tensor | None) -> "ClipSet":
        pick = (lambda t: t) if index is None else (lambda t: t[index])
        out = ClipSet(records, self.frames, video=None if self.video is None else pick(self.video),
                      extra_labels={k: pick(v) for k, v in self.extra_labels.items()},
                      extra_classes=self.extra_classes, fps=self.fps,
                      start=None if self.start is None else pick(self.start))
        out.eval_clip, out.eval_frames = self.eval_clip, self.eval_frames
        return out

    def with_eval(self, clip_len: int | None = None, stride: int | None = None,
                  frames: str | None = None) -> "ClipSet":
        """The same clips with another evaluation view: T frames ``stride`` apart (the run's training clip), and
        ``frames`` as :attr:`eval_frames`."""
        out = self._like(self.records, None)
        t, s = clip_len or self.eval_clip[0], stride or self.eval_clip[1]
        if (t - 1) * s + 1 > self.frames:
            raise DataError(f"{self.name}: an evaluation clip of {t} frames {s} apart is longer than its "
                            f"{self.frames}-frame records")
        if frames is not None and frames not in EVAL_FRAMES:
            raise ValueError(f"eval frames must be one of {EVAL_FRAMES}, got {frames!r}")
        out.eval_clip, out.eval_frames = (t, s), frames or self.eval_frames
        return out

    def subset(self, index: Tensor | Sequence[int]) -> "ClipSet":
        index = torch.as_tensor(index, dtype=torch.long)
        return self._like(self.records.subset(index), index)

    def head(self, n: int | None) -> "ClipSet":
        if n is None or n >= len(self):
            return self
        return self.subset(torch.arange(n))

    def to_memory(self) -> "ClipSet":
        return self._like(self.records.to_memory(), None)

    def with_channels(self, channels: int) -> "ClipSet":
        """The same clips with ``channels`` channels per frame (grey frames repeated to RGB, RGB to luma)."""
        if channels == self.channels:
            return self
        return self._like(self.records.with_channels(channels, self.frames), None)

    def with_labels(self, name: str) -> "ClipSet":
        """The same clips labelled by ``extra_labels[name]`` (e.g. ``"direction"``) instead of the class."""
        if name not in self.extra_labels:
            raise DataError(f"{self.name}: no {name!r} labels (it has: class"
                            f"{''.join(', ' + k for k in self.extra_labels)})")
        records = copy.copy(self.records)  # shares the pixels; its labels are its own
        records.labels, records.classes = self.extra_labels[name], list(self.extra_classes.get(name, []))
        out = self._like(records, None)
        out.name = f"{self.name} ({name})"
        return out

    def mean_std(self, sample: int = 20000, chunk: int = 256) -> tuple[list[float], list[float]]:
        """Per colour channel mean and std of pixel values in [0, 1], pooled over the frames (every frame of a
        record has the same number of pixels, so the pooled variance is the mean of E[x²] less the squared mean)."""
        mean, std = self.records.mean_std(sample, chunk)
        m = torch.tensor(mean, dtype=torch.float64).view(self.frames, self.channels)
        s = torch.tensor(std, dtype=torch.float64).view(self.frames, self.channels)
        pooled = m.mean(0)
        var = (s.square() + m.square()).mean(0) - pooled.square()
        return pooled.tolist(), var.clamp_min(0).sqrt().clamp_min(1e-3).tolist()


def is_clips(data) -> bool:
    """Whether a loaded set holds clips (a :class:`ClipSet`) rather than images."""
    return getattr(data, "kind", "images") == "clips"


def for_encoder(data, meta: Mapping) -> "ClipSet":
    """Clip data as an encoder saw it in training: its evaluation view set to the clip ``encoder.json`` records
    (``meta["clip"]``: T and stride); an image set is refused for a clip encoder (and a clip set for an image one)
    with a line saying what to evaluate on."""
    trained_on = meta.get("inputs", "images")
    if is_clips(data) != (trained_on == "clips"):
        held = "clips" if is_clips(data) else "still images"
        raise DataError(f"this encoder was trained on {trained_on.replace('images', 'still images')} and {data.name} "
                        f"holds {held}; evaluate it on data of its kind"
                        + (" (--data moving-fashion-mnist or a folder of videos)" if trained_on == "clips" else ""))
    if not is_clips(data):
        return data
    clip = meta.get("clip") or {}
    return data.with_eval(clip.get("clip_len"), clip.get("stride"))

