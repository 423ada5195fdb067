"""Clip views: T frames sampled from each clip record with temporal jitter, augmented consistently across frames.

A video method declares a :class:`ClipRecipe`. :func:`make_clip_views` turns one uint8 batch of clip records
(B, L·C, S, S) (:class:`selfsup.data.clips.ClipSet`) on the training device into ``clips`` float views
(B, C, T, H, W), normalised: each view is T frames ``stride`` apart from a random start inside the record (the
temporal jitter; ``same_start`` gives every view of a sample the same frames, e.g. for appearance-only
augmentation; ``interval`` chooses how two views' starts relate, :func:`clip_starts`), then one random crop, flip, colour jitter, grey, blur and solarisation *per clip*, the same on
every frame (CVRL's temporally consistent augmentation, Qian et al. 2021, arXiv:2008.03800 §3.2: independent
per-frame jitter would break the motion the video methods learn from).

The frame-wise parts run on reshaped batches of the image ops (:mod:`selfsup.views.ops`), which draw their
parameters per sample: crop, flip and blur see a clip as one image of T·C channels; colour jitter and grey see it
as one image of C channels T frames tall.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from selfsup.config import ConfigError
from selfsup.views import ops
from selfsup.views.recipe import AUGMENT_FIELDS, Augment, check_augment, normalize, to_float


def _clip_augment() -> Augment:
    return Augment(scale=(0.3, 1.0), hue=0.0, saturation=0.0, blur_p=0.0, gray_p=0.0)


@dataclass(frozen=True)
class ClipRecipe:
    """The clip views of a video method (``views:`` config keys: ``clip_len``, ``stride``, ``clips``,
    ``same_start``, ``interval``, ``interval_power``, and any :class:`Augment` field for every clip)."""

    clip_len: int = 8
    """T, the frames of each view."""
    stride: int = 2
    """Record frames between consecutive view frames (temporal subsampling)."""
    clips: int = 2
    """Views per sample (two for the clip-level joint-embedding methods, one for VideoMAE and the order tasks)."""
    same_start: bool = False
    """Every view of a sample starts at the same frame (otherwise each draws its own start)."""
    interval: str = "independent"
    """How the starts of a sample's views are drawn (:func:`clip_starts`): ``"independent"``, each view its own
    uniform start; ``"decreasing"``, CVRL's temporal interval sampling (two views whose distance in frames is drawn
    from a monotonically decreasing distribution, :func:`interval_probabilities`); ``"uniform"``, the same with the
    distance drawn uniformly (CVRL's comparison, arXiv:2008.03800 fig. 3)."""
    interval_power: float = 1.0
    """p of the ``"decreasing"`` interval density ∝ 1 − (d/M)^p (1: CVRL's linear decrease; larger p is flatter
    near 0 and falls faster near the longest distance)."""
    augment: Augment = field(default_factory=_clip_augment)

    @property
    def num_views(self) -> int:
        return self.clips

    @property
    def span(self) -> int:
        """Record frames one view covers: (T − 1)·stride + 1."""
        return (self.clip_len - 1) * self.stride + 1


CLIP_KEYS = ["clip_len", "stride", "clips", "same_start", "interval", "interval_power"]
INTERVALS = ("independent", "decreasing", "uniform")


def apply_clip_overrides(recipe: ClipRecipe, overrides: dict[str, Any]) -> ClipRecipe:
    """A run's ``views:`` settings on a clip recipe; unknown keys are errors naming the close one."""
    problems: list[str] = []
    own: dict[str, Any] = {}
    every: dict[str, Any] = {}
    for key, value in overrides.items():
        value = tuple(value) if isinstance(value, list) else value
        if key in CLIP_KEYS:
            own[key] = value
        elif key in AUGMENT_FIELDS:
            every[key] = value
        else:
            close = difflib.get_close_matches(key, CLIP_KEYS + AUGMENT_FIELDS, n=1)
            problems.append(f"unknown key 'views.{key}' for clip views" + (f" (did you mean '{close[0]}'?)" if close else ""))
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(recipe, **own, augment=dataclasses.replace(recipe.augment, **every))


def resolve_clip_sizes(recipe: ClipRecipe, image_size: int, frames: int) -> ClipRecipe:
    """Fill the crop size from the data and check the recipe fits records of ``frames`` frames (every problem)."""
    recipe = dataclasses.replace(recipe, augment=dataclasses.replace(recipe.augment,
                                                                     size=recipe.augment.size or image_size))
    problems = check_augment(recipe.augment, "clip views")
    for key in ("clip_len", "stride", "clips"):
        value = getattr(recipe, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"views.{key} must be an integer ≥ 1, got {value!r}")
    problems += _interval_problems(recipe)
    if not problems and recipe.span > frames:
        problems.append(f"clip views of {recipe.clip_len} frames {recipe.stride} apart span {recipe.span} frames, "
                        f"more than the {frames} of each clip record: lower views.clip_len or views.stride")
    if problems:
        raise ConfigError(problems)
    return recipe


def _interval_problems(recipe: ClipRecipe) -> list[str]:
    if recipe.interval not in INTERVALS:
        close = difflib.get_close_matches(str(recipe.interval), INTERVALS, n=1)
        return [f"views.interval must be one of {', '.join(INTERVALS)}, got {recipe.interval!r}"
                + (f" (did you mean '{close[0]}'?)" if close else "")]
    problems = []
    power = recipe.interval_power
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not power > 0:
        problems.append(f"views.interval_power must be a number > 0, got {power!r}")
    if recipe.interval != "independent":
        if recipe.clips != 2:
            problems.append(f"views.interval={recipe.interval!r} spaces two clips of a video; views.clips is "
                            f"{recipe.clips}: set views.clips to 2 or views.interval to 'independent'")
        if recipe.same_start:
            problems.append(f"views.interval={recipe.interval!r} draws a distance between the clips' starts, and "
                            "views.same_start gives them one start: drop one of the two")
    return problems


def frame_starts(batch: int, frames: int, span: int, device: torch.device) -> Tensor:
    """(B,) int64 uniform random starts of a ``span``-frame window in records of ``frames`` frames."""
    return torch.randint(0, frames - span + 1, (batch,), device=device)


def interval_probabilities(starts: int, interval: str = "decreasing", power: float = 1.0) -> Tensor:
    """(M,) float64 probabilities of the distance d = 0 … M − 1 between two clips' starts, M = ``starts`` the
    number of valid starts (frames − span + 1).

    ``"decreasing"``: CVRL's temporal interval sampling (Qian et al. 2021, arXiv:2008.03800 §3.1: a monotonically
    decreasing distribution over the interval; the public implementation, tensorflow/models
    official/projects/video_ssl, draws d from the density ∝ 1 − (d/M)^p on [0, M] and floors it, p = 1 by default).
    Here exactly that: P(d) = F((d + 1)/M) − F(d/M) with the CDF F(x) = ((p + 1)·x − x^(p+1))/p. ``"uniform"``:
    every distance equally likely. (Two *independent* uniform starts also give a distance density ∝ 1 − d/M, in the
    continuum; CVRL's sampling differs in choosing the distance first, which lets ``interval_power`` shape it.)
    """
    if starts < 1:
        raise ValueError(f"a clip needs at least one valid start, got {starts}")
    if interval == "uniform":
        return torch.full((starts,), 1.0 / starts, dtype=torch.float64)
    if interval != "decreasing":
        raise ValueError(f"interval must be 'decreasing' or 'uniform', got {interval!r}")
    x = torch.arange(starts + 1, dtype=torch.float64) / starts
    cdf = ((power + 1) * x - x.pow(power + 1)) / power
    return cdf.diff()


def clip_starts(recipe: ClipRecipe, batch: int, frames: int, device: torch.device) -> Tensor:
    """(V, B) int64 start frames of the ``recipe.clips`` views of each record of ``frames`` frames, every window
    inside the record.

    ``"independent"``: each view a uniform start (one for all with ``same_start``). ``"decreasing"`` / ``"uniform"``
    (two views): CVRL's sampling — a distance d from :func:`interval_probabilities`, the earlier start uniform over
    the M − d starts that leave room for the later one d frames on, and the two in random order (as the public
    implementation shuffles them), so neither view is always the earlier one.
    """
    if recipe.interval == "independent":
        starts = frame_starts(batch, frames, recipe.span, device)
        if recipe.same_start:
            return starts.expand(recipe.clips, batch)
        rest = [frame_starts(batch, frames, recipe.span, device) for _ in range(recipe.clips - 1)]
        return torch.stack([starts, *rest])
    if recipe.clips != 2:
        raise ValueError(f"interval={recipe.interval!r} spaces two clips, the recipe asks for {recipe.clips}")
    m = frames - recipe.span + 1
    probs = interval_probabilities(m, recipe.interval, recipe.interval_power).to(device=device, dtype=torch.float32)
    d = torch.multinomial(probs, batch, replacement=True)  # (B,)
    first = (torch.rand(batch, device=device) * (m - d)).long().clamp_(max=m - 1 - d)  # uniform in [0, m − d)
    pair = torch.stack([first, first + d])
    swap = torch.rand(batch, device=device) < 0.5
    return torch.where(swap, pair.flip(0), pair)


def take_frames(clips: Tensor, starts: Tensor, clip_len: int, stride: int) -> Tensor:
    """(B, L, C, S, S) and starts (B,) → (B, T, C, S, S): frames start, start + stride, …, one gather."""
    t = starts[:, None] + torch.arange(clip_len, device=clips.device) * stride  # (B, T)
    return clips[torch.arange(clips.shape[0], device=clips.device)[:, None], t]


def augment_clip(x: Tensor, a: Augment, aspect: Tensor | None = None) -> Tensor:
    """One random view of float clips (B, T, C, S, S) in [0, 1], the same draw for every frame of a clip →
    (B, T, C, size, size)."""
    b, t, c = x.shape[:3]
    y = ops.resized_crop_flip(x.flatten(1, 2), a.size, a.scale, a.ratio, a.flip_p, aspect)  # (B, T·C, s, s)
    s = y.shape[-1]
    tall = y.view(b, t, c, s, s).transpose(1, 2).reshape(b, c, t * s, s)  # C channels, frames stacked
    tall = ops.color_jitter(tall, a.jitter_p, a.brightness, a.contrast, a.saturation, a.hue)
    tall = ops.random_grayscale(tall, a.gray_p)
    y = tall.view(b, c, t, s, s).transpose(1, 2).reshape(b, t * c, s, s)
    y = ops.gaussian_blur(y, a.blur_p, a.blur_sigma)
    y = ops.solarize(y, a.solarize_p)
    return y.view(b, t, c, s, s)


def to_video_layout(x: Tensor) -> Tensor:
    """(B, T, C, H, W) → (B, C, T, H, W), contiguous (what torchvision's video models and Conv3d take)."""
    return x.transpose(1, 2).contiguous()


def make_clip_views(batch: Tensor, recipe: ClipRecipe, mean: Sequence[float], std: Sequence[float],
                    aspect: Tensor | None = None) -> list[Tensor]:
    """uint8 clip records (B, L·C, S, S) on the training device → ``recipe.clips`` normalised float views
    (B, C, T, H, W). ``mean``/``std`` are per colour channel (C of them), which fixes C and so L."""
    c = len(mean)
    clips = batch.unflatten(1, (-1, c))  # (B, L, C, S, S)
    views = []
    for starts in clip_starts(recipe, clips.shape[0], clips.shape[1], clips.device):
        x = to_float(take_frames(clips, starts, recipe.clip_len, recipe.stride))
        views.append(normalize(to_video_layout(augment_clip(x, recipe.augment, aspect)), mean, std))
    return views


def random_clip(batch: Tensor, channels: int, clip_len: int, stride: int, size: int, scale: tuple[float, float],
                flip_p: float, aspect: Tensor | None = None) -> Tensor:
    """Fine-tuning's light augmentation of clip records: T frames ``stride`` apart from a random start, one random
    resized crop and flip per clip → float (B, C, T, size, size) in [0, 1], not normalised."""
    clips = batch.unflatten(1, (-1, channels))
    b, frames = clips.shape[:2]
    starts = frame_starts(b, frames, (clip_len - 1) * stride + 1, clips.device)
    x = to_float(take_frames(clips, starts, clip_len, stride))
    y = ops.resized_crop_flip(x.flatten(1, 2), size, scale, (3 / 4, 4 / 3), flip_p, aspect)
    return to_video_layout(y.view(b, clip_len, channels, size, size))


def center_clip(batch: Tensor, aspect: Tensor | None, size: int, clip_len: int, stride: int, channels: int,
                frames: str = "as_is") -> Tensor:
    """The evaluation view of clip records: the temporally centred T frames ``stride`` apart, each the centre
    square in its original pixel space at ``size`` → float (B, C, T, size, size) in [0, 1], not normalised.

    ``frames="shuffled"``: the T frames in a fixed pseudo-random order (the same for every clip and call, never the
    identity for T > 1): what the frames' order adds; ``"centre"``: only the centre frame, T = 1 (appearance alone)."""
    clips = batch.unflatten(1, (-1, channels))
    b, frames_in = clips.shape[:2]
    span = (clip_len - 1) * stride + 1
    if span > frames_in:
        raise ValueError(f"an evaluation clip of {clip_len} frames {stride} apart spans {span} frames, more than the "
                         f"{frames_in} of each clip record")
    start = torch.full((b,), (frames_in - span) // 2, device=clips.device)
    if frames == "centre":
        start, clip_len = start + (clip_len // 2) * stride, 1
    x = to_float(take_frames(clips, start, clip_len, stride))  # (B, T, C, S, S)
    if frames == "shuffled" and clip_len > 1:
        x = x[:, fixed_shuffle(clip_len, x.device)]
    y = ops.center_crop(x.flatten(1, 2), size, aspect)
    return to_video_layout(y.view(b, clip_len, channels, size, size))


def fixed_shuffle(n: int, device: torch.device | str = "cpu") -> Tensor:
    """A fixed order of ``n`` frames that moves every frame (for n > 1): one n-cycle through a seeded random
    order, so frame p[i] is shown where p[i+1] was. The frame-shuffled baseline's order, the same everywhere."""
    p = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    order = torch.empty_like(p)
    order[p] = p.roll(-1)
    return order.to(device)
