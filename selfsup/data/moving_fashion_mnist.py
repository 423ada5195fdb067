"""Moving Fashion-MNIST: a procedural video benchmark that ships with the code.

``--data moving-fashion-mnist``: the Moving MNIST generator of Srivastava et al. 2015 (arXiv:1502.04681, §3: digits
moving with a constant velocity inside a 64×64 canvas, bouncing off its edges) with Fashion-MNIST garments, and
with trajectories that are not all reversible, so that the arrow of time can be learnt rather than guessed.
Training sequences are made of the dataset's training images, test sequences of its test images only, so no test
object is ever pretrained on. Records are :class:`~selfsup.data.clips.ClipSet` clips of L frames, one video each.

Settings (:class:`MovingSettings`; ``data.generator`` keys, the canvas side is ``data.image_size``):

- canvas ``size`` 64 px (``data.image_size``, 44–256), ``frames`` L = 16 per sequence (2–256),
  ``train_size`` 10,000 and ``test_size`` 2,000 sequences, ``objects`` 1 (or 2), ``object_scale`` 1 (the object's
  side is round(28 × scale) px, at least 8 and at most the canvas side − 16), ``texture`` 0, ``seed`` 0.
- background: plain black, as the original, so an object's motion is the only thing that changes and max
  compositing keeps every garment pixel; ``texture`` t > 0 adds a static smooth grey field of brightness up to t
  (the same in every frame of a sequence: something a model must learn to ignore, never a motion cue).
- objects: a seeded permutation of the split's images, each used about once; with 2 objects they overlap by
  max-compositing (the original's rule) and the labels are the first object's.
- motion: the object's top-left corner moves in [0, R]², R = size − side, so a garment is always wholly inside
  the canvas; positions are sub-pixel and drawn by bilinear placement (the object's centroid is exact).
  Each sequence has a trajectory ``family`` (balanced over the split):

  0 ``bounce``: constant speed U(2, 4) px/frame, elastic walls — the original's motion, reversible in time (the
  reversed sequence is another bounce sequence of the same distribution);
  1 ``gravity``: initial speed U(1, 3) px/frame, a downward acceleration of :data:`GRAVITY` px/frame², elastic side
  walls and ceiling; the floor returns a fraction e ~ U(0.5, 0.8) (the restitution) of the vertical and horizontal
  speed, and an object that can no longer rise comes to rest on it — energy is lost at every bounce, irreversibly;
  2 ``friction``: initial speed U(3, 5) px/frame, slowed by a constant deceleration (Coulomb friction) that brings
  it to rest at a frame U(0.4, 0.8)·(L − 1), elastic walls — run backwards, a resting object would start by itself.

Labels: ``class`` (the first garment's Fashion-MNIST class, the records' labels), ``direction`` (the compass
direction of the first object's initial velocity in 8 bins, E, NE, N, …, SE, north up the canvas; the angle is
drawn within ±15° of its bin's centre so that no sequence is ambiguous, and the bins are balanced) and ``family``
(above), plus ``reversible`` (1 for the bounce family, 0 otherwise), as the ClipSet's extra labels.

Cache: generated once per (settings, Fashion-MNIST folder) into ``<cache root>/moving-fashion-mnist-<key>/`` (the
image-folder cache's root: ``data.cache_dir``, ``$SELFSUP_CACHE``, ``$XDG_CACHE_HOME/selfsup`` or
``~/.cache/selfsup``; the key hashes the settings, the folder's absolute path and :data:`FORMAT`, so a changed
setting makes a new cache beside the old one): ``train.u8`` and ``test.u8`` hold uint8 (N, L, S, S) records read
through a memory map, ``train.npz``/``test.npz`` the labels, each sequence's source images (``source`` (N, K), rows
of the Fashion-MNIST split) and object positions (``position`` (N, L, K, 2), top-left x, y in px), and
``manifest.json`` the settings and the source files' sizes and mtimes (a reinstalled dataset rebuilds the cache).
It is built in a temporary directory and renamed into place, under the image cache's lock, so a killed build
leaves nothing half-written in use. Generating and writing the default 10,000 + 2,000 sequences (786 MB of
records) takes about 10 s on one core (8–13 s measured on a shared 2-core AMD EPYC); a cached load, milliseconds.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.config import ConfigError, DataConfig
from selfsup.data.build import publish_staged, remove_leftovers, staged_build
from selfsup.data.cache import _build_lock, cache_root
from selfsup.data.clips import ClipSet
from selfsup.data.fashion_mnist import CLASSES, DEFAULT_ROOT, HOW_TO_GET, _find, load_fashion_mnist
from selfsup.data.imageset import DataError, ImageSet
from selfsup.data.shard import RecordFile

log = logging.getLogger(__name__)

NAME = "moving-fashion-mnist"
FORMAT = 1
"""Version of the generator and the cache layout: bumping it makes every cache anew."""
SOURCE_SIDE = 28
FAMILIES = ["bounce", "gravity", "friction"]
DIRECTIONS = ["E", "NE", "N", "NW", "W", "SW", "S", "SE"]
REVERSIBLE = ["irreversible", "reversible"]
GRAVITY = 0.8
"""Downward acceleration of the gravity family, px/frame²."""
BOUNCE_SPEED = (2.0, 4.0)
GRAVITY_SPEED = (1.0, 3.0)
FRICTION_SPEED = (3.0, 5.0)
FRICTION_STOP = (0.4, 0.8)
"""Where in the sequence (fraction of L − 1 frames) a friction object comes to rest."""
RESTITUTION = (0.5, 0.8)
DIRECTION_SPREAD = 15.0
"""Degrees an initial velocity may lie from its compass bin's centre."""
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
_SOURCE_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass(frozen=True)
class MovingSettings:
    """What a Moving Fashion-MNIST set is generated from (module docstring); ``data.generator`` sets all but
    ``size`` (``data.image_size``)."""

    size: int = 64
    frames: int = 16
    train_size: int = 10000
    test_size: int = 2000
    objects: int = 1
    object_scale: float = 1.0
    texture: float = 0.0
    seed: int = 0

    @property
    def side(self) -> int:
        """The object's side in px."""
        return int(round(SOURCE_SIDE * self.object_scale))

    def problems(self) -> list[str]:
        """Every impossible value, one line each (empty when the settings can be generated)."""
        p: list[str] = []

        def integer(key: str, low: int, high: int | None = None, where: str = "data.generator.") -> bool:
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
                span = f"{low}–{high}" if high is not None else f"≥ {low}"
                p.append(f"{where}{key}: must be an integer {span}, got {v!r}")
                return False
            return True

        ok = integer("size", 44, 256, where=f"{NAME}: data.image_size ") & integer("frames", 2, 256)
        integer("train_size", 1)
        integer("test_size", 1)
        integer("seed", 0)
        if self.objects not in (1, 2) or isinstance(self.objects, bool):
            p.append(f"data.generator.objects: must be 1 or 2, got {self.objects!r}")
        for key, low, high in (("object_scale", 0.0, None), ("texture", 0.0, 1.0)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low or (
                    high is not None and v > high):
                p.append(f"data.generator.{key}: must be a number {'in [0, 1]' if high else '> 0'}, got {v!r}")
                ok = False
        if ok and not 8 <= self.side <= self.size - 16:
            p.append(f"data.generator.object_scale: {self.object_scale:g} makes {self.side} px objects; they must be "
                     f"8–{self.size - 16} px (the canvas side less 16, room to move) on a {self.size} px canvas")
        return p

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "MovingSettings":
        """The settings of ``cfg`` (``data.generator`` and ``data.image_size``); a :class:`ConfigError` listing every
        unknown key and impossible value."""
        given = dict(cfg.generator or {})
        keys = [f.name for f in dataclasses.fields(cls) if f.name != "size"]
        problems = []
        for key in list(given):
            if key not in keys:
                close = difflib.get_close_matches(str(key), keys, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(keys)})"
                problems.append(f"unknown key 'data.generator.{key}' for {NAME}{hint}")
                del given[key]
        if "object_scale" in given and isinstance(given["object_scale"], int) and not isinstance(given["object_scale"], bool):
            given["object_scale"] = float(given["object_scale"])
        out = cls(size=cfg.image_size or cls.size, **given)
        problems += out.problems()
        if problems:
            raise ConfigError(problems)
        return out


@dataclass
class Generated:
    """One split as the generator makes it (before the cache)."""

    frames: np.ndarray
    """uint8 (N, L, S, S)."""
    labels: np.ndarray
    """int64 (N,): the first object's class."""
    direction: np.ndarray
    """int64 (N,): compass bin (:data:`DIRECTIONS`) of the first object's initial velocity."""
    family: np.ndarray
    """int64 (N,): trajectory family (:data:`FAMILIES`)."""
    source: np.ndarray
    """int64 (N, K): the row of each object's image in its Fashion-MNIST split."""
    position: np.ndarray
    """float32 (N, L, K, 2): each object's top-left corner (x, y) in px, frame by frame."""

    @property
    def reversible(self) -> np.ndarray:
        """int64 (N,): 1 where the trajectory is time-reversible (the bounce family)."""
        return (self.family == 0).astype(np.int64)


# --------------------------------------------------------------------------------------------- generation


def _trajectories(rng: np.random.Generator, family: np.ndarray, direction: np.ndarray, n: int, k: int,
                  frames: int, reach: float) -> np.ndarray:
    """float64 (n, frames, k, 2) top-left corners in [0, reach]² for n sequences of k objects; every object of a
    sequence follows its family; ``direction`` (n, k) compass bins of the initial velocities."""
    fam = np.broadcast_to(family[:, None], (n, k))
    angle = np.deg2rad(direction * 45.0 + rng.uniform(-DIRECTION_SPREAD, DIRECTION_SPREAD, (n, k)))
    lows = np.choose(fam, [BOUNCE_SPEED[0], GRAVITY_SPEED[0], FRICTION_SPEED[0]])
    highs = np.choose(fam, [BOUNCE_SPEED[1], GRAVITY_SPEED[1], FRICTION_SPEED[1]])
    speed = rng.uniform(lows, highs)
    v = np.stack([speed * np.cos(angle), -speed * np.sin(angle)], axis=-1)  # image y points down: north is −y
    p = rng.uniform(0.0, reach, (n, k, 2))
    restitution = rng.uniform(*RESTITUTION, (n, k))
    stop = rng.uniform(*FRICTION_STOP, (n, k)) * (frames - 1)
    decel = speed / stop  # friction: px/frame² that brings the object to rest at frame `stop`
    gravity, friction = fam == 1, fam == 2
    out = np.empty((n, frames, k, 2))
    out[:, 0] = p
    for t in range(1, frames):
        v[..., 1] += np.where(gravity, GRAVITY, 0.0)
        norm = np.linalg.norm(v, axis=-1)
        slowed = np.maximum(norm - decel, 0.0) / np.maximum(norm, 1e-12)
        v *= np.where(friction, slowed, 1.0)[..., None]
        p = p + v
        # walls: mirror the overshoot back inside (speeds stay below reach, one reflection suffices)
        low, high = p < 0, p > reach
        p = np.where(low, -p, np.where(high, 2 * reach - p, p))
        v = np.where(low | high, -v, v)
        # gravity's floor keeps only a fraction e of the speed (both components: a bounce with friction)
        floor = gravity & high[..., 1]
        e = np.where(floor, restitution, 1.0)
        p[..., 1] = np.where(floor, reach - (reach - p[..., 1]) * e, p[..., 1])  # rebounds e of the overshoot
        v *= e[..., None]
        resting = floor & (np.abs(v[..., 1]) < GRAVITY)  # cannot rise above a frame's fall: it lies on the floor
        p[..., 1] = np.where(resting, reach, p[..., 1])
        v[..., 1] = np.where(resting, 0.0, v[..., 1])
        out[:, t] = p
    return out


def _objects(images: Tensor, side: int) -> Tensor:
    """uint8 (M, 28, 28) → float32 (M, side, side) in [0, 1]."""
    x = images.float().div_(255)
    if side != SOURCE_SIDE:
        x = F.interpolate(x[:, None], size=(side, side), mode="bilinear", antialias=True, align_corners=False)[:, 0]
    return x.clamp_(0, 1)


def _draw(canvas: Tensor, objects: Tensor, corner: Tensor) -> None:
    """Max-composite ``objects`` (M, s, s) with top-left corners ``corner`` (M, 2) (x, y, px, sub-pixel: bilinear)
    into ``canvas`` (M, S + 1, S + 1) in place (the extra row and column take the zero-weight spill at x = R)."""
    m, s = objects.shape[0], objects.shape[-1]
    whole = corner.floor()
    fx, fy = (corner - whole).unbind(-1)
    ix, iy = whole.long().unbind(-1)
    o = F.pad(objects, (0, 1, 0, 1))
    right, down = o.roll(1, -1), o.roll(1, -2)  # the padding's zeros roll into the first column/row
    diag = down.roll(1, -1)
    fx, fy = fx.view(m, 1, 1), fy.view(m, 1, 1)
    patch = (1 - fx) * (1 - fy) * o + fx * (1 - fy) * right + (1 - fx) * fy * down + fx * fy * diag
    step = torch.arange(s + 1)
    rows = (iy[:, None] + step)[:, :, None]
    cols = (ix[:, None] + step)[:, None, :]
    at = torch.arange(m)[:, None, None]
    canvas[at, rows, cols] = torch.maximum(canvas[at, rows, cols], patch)


def _background(g: torch.Generator, n: int, size: int, texture: float) -> Tensor:
    """float32 (n, S, S): a static smooth grey field up to ``texture`` (zeros for the plain black canvas)."""
    if texture <= 0:
        return torch.zeros(n, size, size)
    field = F.interpolate(torch.rand((n, 1, 6, 6), generator=g), size=(size, size), mode="bicubic",
                          align_corners=False)[:, 0]
    return field.clamp_(0, 1).mul_(texture)


def generate(images: Tensor, labels: Tensor, n: int, settings: MovingSettings, seed: int, *,
             out: np.ndarray | None = None, chunk: int = 256) -> Generated:
    """``n`` sequences of the objects ``images`` uint8 (M, 28, 28) with classes ``labels`` (M,), deterministic in
    (``settings``, ``seed``). ``out``: where to write the frames (N, L, S, S) (e.g. a file's memory map), else a new
    array."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    s, size, frames, k = settings.side, settings.size, settings.frames, settings.objects
    # balanced labels: the families and the first object's direction bins in shuffled equal shares
    family = rng.permutation(np.arange(n) % len(FAMILIES)).astype(np.int64)
    direction = np.empty((n, k), dtype=np.int64)
    direction[:, 0] = rng.permutation(np.arange(n) % len(DIRECTIONS))
    if k > 1:
        direction[:, 1:] = rng.integers(0, len(DIRECTIONS), (n, k - 1))
    order = rng.permutation(len(images))
    source = order[np.arange(n * k) % len(images)].reshape(n, k)
    position = _trajectories(rng, family, direction, n, k, frames, float(size - s)).astype(np.float32)
    frames_out = out if out is not None else np.empty((n, frames, size, size), dtype=np.uint8)
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        canvas = _background(g, b, size, settings.texture)
        canvas = F.pad(canvas, (0, 1, 0, 1))[:, None].expand(b, frames, size + 1, size + 1).reshape(-1, size + 1, size + 1)
        canvas = canvas.contiguous()
        for j in range(k):
            obj = _objects(images[torch.from_numpy(source[start : start + b, j])], s)  # (b, s, s)
            obj = obj[:, None].expand(b, frames, s, s).reshape(-1, s, s)
            corner = torch.from_numpy(position[start : start + b, :, j]).reshape(-1, 2)
            _draw(canvas, obj, corner)
        pixels = canvas[:, :size, :size].mul_(255).round_().clamp_(0, 255).to(torch.uint8)
        frames_out[start : start + b] = pixels.view(b, frames, size, size).numpy()
    return Generated(frames_out, labels.numpy()[source[:, 0]].astype(np.int64), direction[:, 0].copy(), family,
                     source.astype(np.int64), position)


# --------------------------------------------------------------------------------------------- the cache


def _source_stats(root: str | None) -> dict[str, list[int]]:
    """Size and mtime_ns of the four Fashion-MNIST files (the existing clear error where they are missing)."""
    base = Path(root or DEFAULT_ROOT)
    if not base.is_dir():
        raise DataError(f"Fashion-MNIST not found: {base} does not exist; {HOW_TO_GET}")
    out = {}
    for stems in _SOURCE_FILES.values():
        for stem in stems:
            path = _find(base, stem)
            st = path.stat()
            out[str(path.resolve())] = [st.st_size, st.st_mtime_ns]
    return out


def cache_dir_for(settings: MovingSettings, root: str | None = None, cache_dir: str | None = None) -> Path:
    """``<cache root>/moving-fashion-mnist-<16 hex digits>``: the key hashes the settings, the Fashion-MNIST folder
    and :data:`FORMAT`."""
    folder = str(Path(root or DEFAULT_ROOT).expanduser().resolve())
    key = hashlib.sha256(json.dumps({"format": FORMAT, "settings": asdict(settings), "root": folder},
                                    sort_keys=True).encode()).hexdigest()[:16]
    return cache_root(cache_dir) / f"{NAME}-{key}"


def _valid(target: Path, settings: MovingSettings, stats: dict) -> str | None:
    """None when ``target`` holds these settings' sets made from these files, else why not."""
    try:
        m = json.loads((target / MANIFEST).read_text())
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest: {exc}"
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return "another cache format"
    if m.get("settings") != json.loads(json.dumps(asdict(settings))):
        return "other settings"
    if m.get("files") != stats:
        return "the Fashion-MNIST files changed"
    record = settings.frames * settings.size**2
    for split, count in zip(SPLITS, (settings.train_size, settings.test_size)):
        try:
            if os.stat(target / f"{split}.u8").st_size != count * record:
                return f"{split}.u8 truncated or damaged"
            if not (target / f"{split}.npz").is_file():
                return f"{split}.npz missing"
        except OSError as exc:
            return f"damaged: {exc}"
    return None


def _build(target: Path, settings: MovingSettings, root: str | None, stats: dict) -> None:
    t0 = time.perf_counter()
    sources = load_fashion_mnist(root)
    with staged_build(target, f"{NAME} cache") as tmp:
        shape = (settings.frames, settings.size, settings.size)
        for s, (split, src, n) in enumerate(zip(SPLITS, sources, (settings.train_size, settings.test_size))):
            path = tmp / f"{split}.u8"
            frames = np.memmap(path, dtype=np.uint8, mode="w+", shape=(n, *shape))
            got = generate(src.images[:, 0], src.labels, n, settings, settings.seed * 2 + s, out=frames)
            frames.flush()
            del frames, got.frames
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            np.savez(tmp / f"{split}.npz", labels=got.labels, direction=got.direction, family=got.family,
                     source=got.source, position=got.position)
        manifest = {"format": FORMAT, "settings": asdict(settings), "files": stats,
                    "counts": {"train": settings.train_size, "test": settings.test_size},}
        publish_staged(tmp, target, manifest, t0)
    log.info("%s: generated %d + %d sequences of %d frames in %.1f s into %s", NAME, settings.train_size,
             settings.test_size, settings.frames, time.perf_counter() - t0, target)


def _open(target: Path, settings: MovingSettings) -> tuple[ClipSet, ClipSet]:
    shape = (settings.frames, settings.size, settings.size)
    out = []
    for split, n in zip(SPLITS, (settings.train_size, settings.test_size)):
        path = target / f"{split}.u8"
        with np.load(target / f"{split}.npz", allow_pickle=False) as z:
            arrays = {key: torch.from_numpy(z[key]) for key in ("labels", "direction", "family")}
        pixels = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", shape=(n, *shape)))
        records = ImageSet(pixels, arrays["labels"], list(CLASSES), f"{NAME}/{split}", mapped=True, source=str(target),
                           file=RecordFile(path, n, shape))
        family = arrays["family"]
        out.append(ClipSet(records, settings.frames, video=torch.arange(n),
                           extra_labels={"direction": arrays["direction"], "family": family,
                                         "reversible": (family == 0).long()},
                           extra_classes={"direction": DIRECTIONS, "family": FAMILIES, "reversible": REVERSIBLE}))
    return out[0], out[1]


def make_moving_fashion_mnist(settings: MovingSettings = MovingSettings(), root: str | None = None,
                              cache_dir: str | None = None) -> tuple[ClipSet, ClipSet]:
    """(train, test) clip sets of ``settings``, generated into the cache on first use and memory-mapped from it."""
    problems = settings.problems()
    if problems:
        raise ConfigError(problems)
    stats = _source_stats(root)
    target = cache_dir_for(settings, root, cache_dir)
    why = _valid(target, settings, stats)
    if why is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _build_lock(target):
            why = _valid(target, settings, stats)  # another process may have built it while we waited
            if why is not None:
                remove_leftovers(target.parent, target.name)
                if why != "missing":
                    log.info("%s: rebuilding %s (%s)", NAME, target, why)
                _build(target, settings, root, stats)
    return _open(target, settings)


def load_moving_fashion_mnist(cfg: DataConfig) -> tuple[ClipSet, ClipSet]:
    """(train, test) for ``--data moving-fashion-mnist``: settings from ``data.generator`` and ``data.image_size``,
    Fashion-MNIST from ``data.root``, the cache under ``data.cache_dir``."""
    return make_moving_fashion_mnist(MovingSettings.from_config(cfg), cfg.root, cfg.cache_dir)

