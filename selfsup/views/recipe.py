"""View recipes: which augmented views a method needs, and the function that makes them.

A method declares a :class:`ViewRecipe` (its paper's views); a run's ``views:`` config overrides
fields of it. ``make_views`` turns one uint8 batch on the training device into the list of
normalised float views, global views first, then local crops (multi-crop, Caron et al. 2020,
arXiv:2006.09882).
"""
from __future__ import annotations

import dataclasses
import functools
import difflib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from selfsup.config import ConfigError
from selfsup.views import ops


@dataclass(frozen=True)
class Augment:
    """Parameters of one view's random pipeline; ``size=None`` keeps the dataset's image size."""

    size: int | None = None
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0

    @staticmethod
    def identity(size: int | None = None) -> "Augment":
        """No randomness: the whole image, resized to ``size``."""
        return Augment(size=size, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0, jitter_p=0, gray_p=0, blur_p=0)


def _default_local() -> Augment:
    return Augment(scale=(0.05, 0.4))


@dataclass(frozen=True)
class ViewRecipe:
    globals_: tuple[Augment, ...] = (Augment(), Augment())
    local_crops: int = 0
    local: Augment = field(default_factory=_default_local)
    local_size_ratio: float = 96 / 224
    """Local crop side as a fraction of the global side when ``local.size`` is unset (DINO: 96/224)."""

    @property
    def num_views(self) -> int:
        return len(self.globals_) + self.local_crops


def byol_pair(**common: Any) -> ViewRecipe:
    """BYOL's asymmetric pair of views (Grill et al. 2020, arXiv:2006.07733, Table 6), also MoCo v3's, NNCLR's,
    Barlow Twins' and VICReg's: the first always blurred and never solarised, the second rarely blurred (p 0.1)
    and solarised with p 0.2; ``common`` settings apply to both (Barlow Twins and VICReg: ``saturation=0.2``)."""
    return ViewRecipe(globals_=(Augment(blur_p=1.0, solarize_p=0.0, **common),
                                Augment(blur_p=0.1, solarize_p=0.2, **common)))


def dino_multicrop(split: float, local_crops: int, saturation: float = 0.4) -> ViewRecipe:
    """DINO's multi-crop (Caron et al. 2021, main_dino.py's DataAugmentationDINO), shared by DINO, iBOT and
    DINOv2: two global crops of scale (``split``, 1) — one always blurred, one rarely blurred and sometimes
    solarised — and ``local_crops`` crops of scale (0.05, ``split``) blurred half the time."""
    jitter = {"saturation": saturation}
    return ViewRecipe(globals_=(Augment(scale=(split, 1.0), blur_p=1.0, **jitter),
                                Augment(scale=(split, 1.0), blur_p=0.1, solarize_p=0.2, **jitter)),
                      local_crops=local_crops, local=Augment(scale=(0.05, split), blur_p=0.5, **jitter))


AUGMENT_FIELDS = [f.name for f in dataclasses.fields(Augment)]
GLOBAL_ONLY = {"size", "scale"}
RECIPE_KEYS = ["local_crops", "local_size", "local_scale"] + AUGMENT_FIELDS


def apply_overrides(recipe: ViewRecipe, overrides: dict[str, Any]) -> ViewRecipe:
    """``size``/``scale`` set the global views; ``local_*`` the local crops; other keys every view."""
    problems: list[str] = []
    every: dict[str, Any] = {}
    glob: dict[str, Any] = {}
    local: dict[str, Any] = {}
    local_crops = recipe.local_crops
    for key, value in overrides.items():
        if isinstance(value, list):
            value = tuple(value)
        if key == "local_crops":
            if not isinstance(value, int) or value < 0:
                problems.append(f"views.local_crops must be an integer ≥ 0, got {value!r}")
            else:
                local_crops = value
        elif key in ("local_size", "local_scale"):
            local[key.removeprefix("local_")] = value
        elif key in GLOBAL_ONLY:
            glob[key] = value
        elif key in AUGMENT_FIELDS:
            every[key] = value
        else:
            close = difflib.get_close_matches(key, RECIPE_KEYS, n=1)
            problems.append(f"unknown key 'views.{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    if problems:
        raise ConfigError(problems)
    return ViewRecipe(
        globals_=tuple(dataclasses.replace(a, **every, **glob) for a in recipe.globals_),
        local_crops=local_crops,
        local=dataclasses.replace(recipe.local, **every, **local),
        local_size_ratio=recipe.local_size_ratio,
    )


def resolve_sizes(recipe: ViewRecipe, image_size: int) -> ViewRecipe:
    """Fill in unset sizes from the dataset and check the recipe can be made; errors list every problem."""
    globals_ = tuple(dataclasses.replace(a, size=a.size or image_size) for a in recipe.globals_)
    local_size = recipe.local.size or max(4, round(globals_[0].size * recipe.local_size_ratio)) if globals_ else 0
    local = dataclasses.replace(recipe.local, size=local_size)
    problems: list[str] = []
    for name, a in [(f"global view {i}", g) for i, g in enumerate(globals_)] + [("local crops", local)]:
        if name == "local crops" and recipe.local_crops == 0:
            continue
        problems += check_augment(a, name)
    if recipe.local_crops and globals_ and local.size > min(g.size for g in globals_):
        problems.append(f"local crops ({local.size}px) must not be bigger than global views ({globals_[0].size}px)")
    if problems:
        raise ConfigError(problems)
    return ViewRecipe(globals_, recipe.local_crops, local, recipe.local_size_ratio)


def check_augment(a: Augment, name: str) -> list[str]:
    p: list[str] = []
    if not isinstance(a.size, int) or a.size < 2:
        p.append(f"{name}: size must be an integer ≥ 2, got {a.size!r}")
    for key in ("scale", "ratio", "blur_sigma"):
        lo, hi = getattr(a, key)
        if not 0 < lo <= hi or (key == "scale" and hi > 1):
            p.append(f"{name}: {key} must satisfy 0 < low ≤ high{' ≤ 1' if key == 'scale' else ''}, got {(lo, hi)}")
    for key in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
        if not 0 <= getattr(a, key) <= 1:
            p.append(f"{name}: {key} must be a probability in [0, 1], got {getattr(a, key)}")
    for key in ("brightness", "contrast", "saturation", "hue"):
        if getattr(a, key) < 0:
            p.append(f"{name}: {key} must be ≥ 0, got {getattr(a, key)}")
    if a.hue > 0.5:
        p.append(f"{name}: hue must be ≤ 0.5, got {a.hue}")
    return p


def augment(x: Tensor, a: Augment, aspect: Tensor | None = None, return_box: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """One random view of a float batch in [0, 1]; ``aspect`` (B,) as in :func:`make_views`; ``return_box``: also
    the crop, as :func:`~selfsup.views.ops.resized_crop_flip` gives it."""
    x, box = ops.resized_crop_flip(x, a.size, a.scale, a.ratio, a.flip_p, aspect, return_box=True)
    x = ops.color_jitter(x, a.jitter_p, a.brightness, a.contrast, a.saturation, a.hue)
    x = ops.random_grayscale(x, a.gray_p)
    x = ops.gaussian_blur(x, a.blur_p, a.blur_sigma)
    x = ops.solarize(x, a.solarize_p)
    return (x, box) if return_box else x


def to_float(batch: Tensor) -> Tensor:
    return batch.float().div_(255) if batch.dtype == torch.uint8 else batch


@functools.lru_cache(maxsize=32)
def _channel_constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype, ndim: int = 4) -> Tensor:
    """(1, C, 1, …) of ``ndim`` dimensions on ``device``, made once: on a GPU a fresh tensor per call is a
    host-to-device copy that waits for everything queued on the stream."""
    with torch.inference_mode(False):  # usable outside inference mode too
        return torch.tensor(values, dtype=dtype).view(1, -1, *([1] * (ndim - 2))).to(device)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Per-channel normalisation of images (B, C, H, W) or clips (B, C, T, H, W)."""
    m = _channel_constant(tuple(float(v) for v in mean), x.device, x.dtype, x.ndim)
    s = _channel_constant(tuple(float(v) for v in std), x.device, x.dtype, x.ndim)
    return (x - m) / s


def make_views(batch: Tensor, recipe: ViewRecipe, mean: Sequence[float], std: Sequence[float],
               aspect: Tensor | None = None, with_boxes: bool = False) -> list[Tensor] | tuple[list[Tensor], list[Tensor]]:
    """uint8 (B, C, H, W) on the training device → normalised views: globals, then local crops.

    ``aspect`` (B,): each image's original width / height when the batch holds whole images squashed to
    squares (``ImageSet.aspect`` of an image-folder cache); crops are then drawn in the original pixel
    space, as torchvision's RandomResizedCrop on the original image. ``None``: square images.

    ``with_boxes``: also return where each view lies in its image (methods that match locations across views,
    VICRegL): per view (B, 4) (centre x, centre y, width, height) in units of the image's height, x scaled by
    the aspect ratio so that distances are those of the original pixels; the width is negative where the view is
    mirrored (view point (u, v) ∈ [0, 1]² is image point (cx + (u − ½)·w, cy + (v − ½)·h)).
    """
    x = to_float(batch)
    pairs = [augment(x, a, aspect, return_box=True) for a in recipe.globals_]
    pairs += [augment(x, recipe.local, aspect, return_box=True) for _ in range(recipe.local_crops)]
    views = [normalize(v, mean, std) for v, _ in pairs]
    if not with_boxes:
        return views
    scale = torch.ones(1, 4, device=x.device)
    if aspect is not None:
        scale = torch.stack([aspect, torch.ones_like(aspect), aspect, torch.ones_like(aspect)], 1).to(x.device, x.dtype)
    return views, [box * scale for _, box in pairs]


def center_view(batch: Tensor, aspect: Tensor | None, size: int) -> Tensor:
    """The evaluation view: uint8 (B, C, S, S) → float (B, C, size, size) in [0, 1], the centre square of
    each image in its original pixel space ("resize the short side, centre-crop"); not normalised."""
    return ops.center_crop(to_float(batch), size, aspect)


def group_by_size(views: Sequence[Tensor]) -> list[tuple[list[int], Tensor]]:
    """Consecutive views of one size concatenated, so the backbone sees each size once (DINO's
    MultiCropWrapper idea). Returns (view indices, (len(indices)·B, C, H, W)) pairs."""
    groups: list[tuple[list[int], list[Tensor]]] = []
    for i, v in enumerate(views):
        if groups and groups[-1][1][0].shape[-2:] == v.shape[-2:]:
            groups[-1][0].append(i)
            groups[-1][1].append(v)
        else:
            groups.append(([i], [v]))
    return [(idx, torch.cat(vs)) for idx, vs in groups]
