"""Fashion-MNIST scenes: a procedural benchmark for segmentation and detection that ships with the code.

``--data fashion-mnist-scenes``: grey canvases (64 px by default, ``data.image_size`` 64–96) showing 1–5
Fashion-MNIST objects each over a textured, cluttered background, with semantic masks (class + 1, 0 the
background), instance masks and boxes, generated deterministically from a seed. Training scenes are made of the
dataset's training images and test scenes of its test images only, so no test object is ever pretrained on.
Pretraining uses the images without any annotation; their image-level label (for the online kNN monitor and the
``knn``/``linear`` protocols) is the class of the object with the most visible pixels.

How a scene is made (:class:`SceneSettings`; every random draw from one generator per split):

- background: a base grey level U(0.05, 0.55), two sine gratings (1–6 cycles per canvas, random orientation and
  phase, amplitude U(0.03, 0.12)), smooth noise (an 8×8 Gaussian field, bicubically upsampled, σ 0.08) and fine
  noise (σ 0.02);
- clutter: 2–6 fragments (a random 8–14 px window of a random image of the same split) scaled to 10–25% of the
  canvas side and blended in at 30–80% opacity: pieces of garments that are *background*, so that a pixel's
  brightness or texture alone does not tell an object from its surroundings;
- objects: 1–5 images of the split (a seeded permutation, each used about once), each a square of 30–70% of the
  canvas side at a random position inside it, drawn in random z-order. An object's pixels are where its
  resampled intensity exceeds 0.1; they are painted c0 + c1·v (v its intensity, c0 ~ U(0, 0.4), c1 ~ U(0.4, 0.8)),
  so objects are sometimes darker and sometimes brighter than the ground under them. A placement that would hide
  more than half of an earlier object's box (box overlap) is drawn again (up to 20 times, else the object is left
  out), so every object stays recognisable;
- annotations: the semantic mask and instance ids of the visible pixels after occlusion, and each instance's
  tight box around its visible pixels (an instance left with no visible pixel gets none).

Generating the default 20,000 + 2,000 scenes takes a few seconds (``benchmarks/dense/README.md``); they are kept
in memory for the process.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.data.dense import DenseSet
from selfsup.data.fashion_mnist import CLASSES, load_fashion_mnist
from selfsup.data.imageset import DataError, ImageSet

NAME = "fashion-mnist-scenes"
MAX_OBJECTS = 5
MAX_CLUTTER = 6


@dataclass(frozen=True)
class SceneSettings:
    size: int = 64
    n_train: int = 20000
    n_test: int = 2000
    objects: tuple[int, int] = (1, MAX_OBJECTS)
    object_side: tuple[float, float] = (0.3, 0.7)
    """Object side as a fraction of the canvas side."""
    clutter: tuple[int, int] = (2, MAX_CLUTTER)
    clutter_side: tuple[float, float] = (0.1, 0.25)
    max_hidden: float = 0.5
    """The largest fraction of an earlier object's box a later one may cover."""
    threshold: float = 0.1
    """Intensity (0–1) above which a resampled Fashion-MNIST pixel belongs to the object."""
    seed: int = 0

    def check(self) -> None:
        if not 32 <= self.size <= 256:
            raise DataError(f"{NAME}: image size must be 32–256 px (data.image_size), got {self.size}")
        if self.n_train < 1 or self.n_test < 1:
            raise DataError(f"{NAME}: needs at least one training and one test scene")


def _uniform(g: torch.Generator, n: int | tuple, low: float, high: float) -> Tensor:
    shape = (n,) if isinstance(n, int) else n
    return torch.rand(shape, generator=g) * (high - low) + low


def _paste_grid(size: int, x0: Tensor, y0: Tensor, side: Tensor, src: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """``grid_sample`` grid (n, size, size, 2) that draws a source image into the square of side ``side`` (px) at
    (x0, y0) of a size×size canvas; outside the square it samples outside the source (zeros). ``src`` = (u0, v0,
    extent): the window of the source drawn, in its normalised [-1, 1] coordinates (default: the whole source)."""
    pix = torch.arange(size, dtype=torch.float32) + 0.5  # canvas pixel centres
    u = (pix[None] - x0[:, None]) / side[:, None]  # (n, size): 0…1 inside the square
    v = (pix[None] - y0[:, None]) / side[:, None]
    if src is None:
        gx, gy = u * 2 - 1, v * 2 - 1
    else:
        u0, v0, extent = src
        gx, gy = u0[:, None] + u * extent[:, None], v0[:, None] + v * extent[:, None]
    inside = lambda t: (t >= 0) & (t <= 1)
    gx, gy = torch.where(inside(u), gx, 10.0), torch.where(inside(v), gy, 10.0)  # far outside [-1, 1]: zeros
    return torch.stack([gx[:, None, :].expand(-1, size, -1), gy[:, :, None].expand(-1, -1, size)], dim=-1)


def _background(g: torch.Generator, n: int, size: int) -> Tensor:
    base = _uniform(g, n, 0.05, 0.55).view(n, 1, 1)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32) / size, torch.arange(size, dtype=torch.float32) / size,
                            indexing="ij")
    out = base.expand(n, size, size).clone()
    for _ in range(2):
        freq = _uniform(g, n, 1.0, 6.0).view(n, 1, 1)
        theta = _uniform(g, n, 0.0, math.pi).view(n, 1, 1)
        phase = _uniform(g, n, 0.0, 2 * math.pi).view(n, 1, 1)
        amp = _uniform(g, n, 0.03, 0.12).view(n, 1, 1)
        out += amp * torch.sin(2 * math.pi * freq * (xx * torch.cos(theta) + yy * torch.sin(theta)) + phase)
    smooth = F.interpolate(torch.randn((n, 1, 8, 8), generator=g) * 0.08, size=(size, size), mode="bicubic",
                           align_corners=False)[:, 0]
    return out + smooth + torch.randn((n, size, size), generator=g) * 0.02


def _layers(sources: Tensor, picks: Tensor, grids: Tensor) -> Tensor:
    """(n, size, size) intensities in [0, 1]: source images ``picks`` drawn through ``grids``."""
    src = sources[picks].float().div_(255)[:, None]
    return F.grid_sample(src, grids, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


def _place(rng: np.random.Generator, count: int, size: int, side_range: tuple[float, float],
           max_hidden: float) -> list[tuple[float, float, float]]:
    """Up to ``count`` (x0, y0, side) squares inside the canvas, later ones hiding at most ``max_hidden`` of any
    earlier one's box."""
    placed: list[tuple[float, float, float]] = []
    for _ in range(count):
        for _try in range(20):
            s = rng.uniform(*side_range) * size
            x, y = rng.uniform(0, size - s), rng.uniform(0, size - s)
            if all(max(0.0, min(x + s, px + ps) - max(x, px)) * max(0.0, min(y + s, py + ps) - max(y, py))
                   <= max_hidden * ps * ps for px, py, ps in placed):
                placed.append((x, y, s))
                break
    return placed


def _make_split(sources: Tensor, labels: Tensor, n: int, cfg: SceneSettings, split_seed: int,
                chunk: int = 1000) -> DenseSet:
    g = torch.Generator().manual_seed(split_seed)
    rng = np.random.default_rng(split_seed)
    size = cfg.size
    order = torch.randperm(len(sources), generator=g)
    next_object = 0
    images, semantic, instance_maps, all_boxes, all_labels, counts, dominant = [], [], [], [], [], [], []
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        canvas = _background(g, b, size)
        # clutter: background fragments of random images of the same split
        n_clutter = torch.randint(cfg.clutter[0], cfg.clutter[1] + 1, (b,), generator=g)
        for slot in range(cfg.clutter[1]):
            on = (n_clutter > slot).float().view(b, 1, 1)
            side = _uniform(g, b, *cfg.clutter_side) * size
            x0, y0 = torch.rand(b, generator=g) * (size - side), torch.rand(b, generator=g) * (size - side)
            window = _uniform(g, b, 8 / 28, 14 / 28) * 2  # the source window's extent in [-1, 1] units
            u0 = torch.rand(b, generator=g) * (2 - window) - 1
            v0 = torch.rand(b, generator=g) * (2 - window) - 1
            picks = torch.randint(len(sources), (b,), generator=g)
            frag = _layers(sources, picks, _paste_grid(size, x0, y0, side, (u0, v0, window)))
            opacity = _uniform(g, b, 0.3, 0.8).view(b, 1, 1) * on
            canvas = canvas * (1 - opacity * frag) + opacity * frag * frag
        canvas = canvas.clamp(0, 1)
        # objects in z-order
        sem = torch.zeros(b, size, size, dtype=torch.uint8)
        inst = torch.zeros(b, size, size, dtype=torch.uint8)
        placements = [_place(rng, int(rng.integers(cfg.objects[0], cfg.objects[1] + 1)), size, cfg.object_side,
                          cfg.max_hidden) for _ in range(b)]
        slot_class = torch.full((b, MAX_OBJECTS), -1, dtype=torch.long)
        for slot in range(MAX_OBJECTS):
            rows = [i for i, p in enumerate(placements) if len(p) > slot]
            if not rows:
                break
            rows_t = torch.tensor(rows)
            x0, y0, side = (torch.tensor([placements[i][slot][k] for i in rows], dtype=torch.float32) for k in range(3))
            picks = order[(torch.arange(len(rows)) + next_object) % len(sources)]
            next_object += len(rows)
            v = _layers(sources, picks, _paste_grid(size, x0, y0, side))
            mask = v > cfg.threshold
            c0 = _uniform(g, len(rows), 0.0, 0.4).view(-1, 1, 1)
            c1 = _uniform(g, len(rows), 0.4, 0.8).view(-1, 1, 1)
            alpha = ((v - cfg.threshold / 2) * 4).clamp(0, 1) * mask
            canvas[rows_t] = canvas[rows_t] * (1 - alpha) + alpha * (c0 + c1 * v)
            cls = labels[picks]
            sem[rows_t] = torch.where(mask, (cls + 1).to(torch.uint8).view(-1, 1, 1), sem[rows_t])
            inst[rows_t] = torch.where(mask, torch.tensor(slot + 1, dtype=torch.uint8), inst[rows_t])
            slot_class[rows_t, slot] = cls
        # boxes around each instance's visible pixels
        ids = torch.arange(1, MAX_OBJECTS + 1, dtype=torch.uint8).view(1, -1, 1, 1)
        visible = inst[:, None] == ids  # (b, 5, S, S)
        area = visible.flatten(2).sum(-1)  # (b, 5)
        cols, rows_any = visible.any(2), visible.any(3)  # (b, 5, S)
        first = lambda m: m.float().argmax(-1)
        last = lambda m: size - 1 - m.flip(-1).float().argmax(-1)
        box = torch.stack([first(cols), first(rows_any), last(cols) + 1, last(rows_any) + 1], dim=-1).float() / size
        kept = area > 0
        for i in range(b):
            k = kept[i].nonzero().flatten()
            all_boxes.append(box[i, k])
            all_labels.append(slot_class[i, k] + 1)
            counts.append(len(k))
            # the scene's image-level label: the class with the most visible pixels
            dominant.append(int(slot_class[i, area[i].argmax()]))
        # ids follow the kept boxes: renumber instances so id k + 1 is the image's k-th box
        remap = torch.zeros(b, MAX_OBJECTS + 1, dtype=torch.uint8)
        remap[:, 1:] = (kept.cumsum(1) * kept).to(torch.uint8)
        inst = torch.gather(remap, 1, inst.long().flatten(1)).view(b, size, size)
        images.append((canvas * 255).round_().to(torch.uint8))
        semantic.append(sem)
        instance_maps.append(inst)
    start = torch.zeros(n + 1, dtype=torch.long)
    start[1:] = torch.tensor(counts).cumsum(0)
    img_set = ImageSet(torch.cat(images)[:, None], torch.tensor(dominant), list(CLASSES), NAME)
    return DenseSet(img_set, ["background"] + list(CLASSES),
                    masks=ImageSet(torch.cat(semantic)[:, None], name=f"{NAME} masks"),
                    boxes=torch.cat(all_boxes), box_labels=torch.cat(all_labels).long(), box_start=start,
                    instances=ImageSet(torch.cat(instance_maps)[:, None], name=f"{NAME} instances"),
                    sizes=torch.full((n, 2), size, dtype=torch.long), name=NAME,
                    sources={"format": "procedural", "generator": asdict(cfg)})


@functools.lru_cache(maxsize=2)
def make_scenes(root: str | None = None, settings: SceneSettings = SceneSettings()) -> tuple[DenseSet, DenseSet]:
    """(train, test) scenes; deterministic in ``settings`` (kept for the process: both pretraining data and
    the dense protocols ask for them)."""
    settings.check()
    train_src, test_src = load_fashion_mnist(root)
    train = _make_split(train_src.images[:, 0], train_src.labels, settings.n_train, settings, settings.seed * 2)
    test = _make_split(test_src.images[:, 0], test_src.labels, settings.n_test, settings, settings.seed * 2 + 1)
    for split, d in (("train", train), ("test", test)):
        d.name = d.images.name = f"{NAME}/{split}"
    return train, test
