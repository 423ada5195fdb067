"""Moving Fashion-MNIST (selfsup.data.moving_fashion_mnist): deterministic, made of the right split's garments,
labels that mean what they say (balanced; gravity and friction lose energy, bounce keeps it), objects inside the
canvas, a cache that is reused and rebuilt when it should be, and load_dataset's ClipSets."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from selfsup.config import ConfigError, DataConfig, config_from_dict
from selfsup.data import moving_fashion_mnist as mfm
from selfsup.data.clips import ClipSet, is_clips
from selfsup.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist
from selfsup.data.imageset import DataError
from selfsup.data.load import load_dataset
from selfsup.data.moving_fashion_mnist import (DIRECTIONS, FAMILIES, GRAVITY, MovingSettings, generate,
                                               load_moving_fashion_mnist)

SMALL = MovingSettings(frames=8, train_size=200, test_size=96)
N = 200


@pytest.fixture(scope="module")
def fmnist():
    """The Fashion-MNIST splits, read once (tests that need them skip where the Debian package is absent)."""
    if not Path(DEFAULT_ROOT).exists():
        pytest.skip("Fashion-MNIST is not installed (make setup installs dataset-fashion-mnist)")
    return load_fashion_mnist()


@pytest.fixture(scope="module")
def made(fmnist):
    train, _ = fmnist
    return generate(train.images[:, 0], train.labels, N, SMALL, seed=7)


def _centroids(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intensity-weighted centroid (x, y) of each frame of (N, L, S, S): the single object's, on black."""
    x = frames.astype(np.float64)
    size = x.shape[-1]
    grid = np.arange(size) + 0.5
    mass = x.sum((2, 3))
    return (x.sum(2) * grid).sum(-1) / mass, (x.sum(3) * grid).sum(-1) / mass


def _bilinear_reference(obj: np.ndarray, x0: float, y0: float, size: int) -> np.ndarray:
    """The object drawn at sub-pixel top-left (x0, y0) by a tent filter (separable bilinear weights), written
    independently of the generator: canvas[r, c] = Σ obj[i, j] · tent(r − y0 − i) · tent(c − x0 − j)."""
    tent = lambda d: np.maximum(0.0, 1.0 - np.abs(d))
    k = np.arange(obj.shape[0])
    rows = tent(np.arange(size)[:, None] - y0 - k[None])  # (S, s)
    cols = tent(np.arange(size)[:, None] - x0 - k[None])
    return rows @ obj @ cols.T


# --------------------------------------------------------------------------------------------- the generator


def test_same_seed_same_bytes_other_seed_differs(fmnist, made):
    train, _ = fmnist
    again = generate(train.images[:, 0], train.labels, N, SMALL, seed=7)
    for key in ("frames", "labels", "direction", "family", "source", "position"):
        assert np.array_equal(getattr(made, key), getattr(again, key)), key
    other = generate(train.images[:, 0], train.labels, N, SMALL, seed=8)
    assert not np.array_equal(made.frames, other.frames)
    assert not np.array_equal(made.source, other.source)


def test_shapes_dtypes_and_label_ranges(made):
    assert made.frames.dtype == np.uint8 and made.frames.shape == (N, 8, 64, 64)
    assert made.position.dtype == np.float32 and made.position.shape == (N, 8, 1, 2)
    assert made.source.shape == (N, 1) and made.source.dtype == np.int64
    for key, k in (("labels", 10), ("direction", len(DIRECTIONS)), ("family", len(FAMILIES))):
        v = getattr(made, key)
        assert v.dtype == np.int64 and v.shape == (N,) and v.min() >= 0 and v.max() < k, key
    assert np.array_equal(made.reversible, (made.family == 0).astype(np.int64))
    # balanced: the families and direction bins in equal shares, every class present
    assert np.bincount(made.family, minlength=3).max() - np.bincount(made.family, minlength=3).min() <= 1
    assert np.bincount(made.direction, minlength=8).max() - np.bincount(made.direction, minlength=8).min() <= 1
    assert np.bincount(made.labels, minlength=10).min() >= 5
    assert len(np.unique(made.source)) == N  # each garment used once


def test_direction_label_is_the_initial_velocitys_compass_bin(made):
    step = made.position[:, 1, 0] - made.position[:, 0, 0]
    angle = np.degrees(np.arctan2(-step[:, 1], step[:, 0])) % 360  # north is up (−y)
    # gravity bends the first step and walls mirror it: check the families without gravity away from the walls
    reach = 64 - 28
    p0, p1 = made.position[:, 0, 0], made.position[:, 1, 0]
    inside = ((p0 > 6) & (p0 < reach - 6)).all(-1) & ((p1 > 0) & (p1 < reach)).all(-1) & (made.family != 1)
    assert inside.sum() > 30
    bins = np.round(angle[inside] / 45).astype(int) % 8
    assert np.array_equal(bins, made.direction[inside])


def test_first_frame_holds_the_source_garment_of_the_right_split(fmnist):
    """Every first frame is its source image drawn at its position (an independent bilinear reference), and the
    nearest of all 70,000 Fashion-MNIST images to the drawn garment is, but for the dataset's near-duplicates, that
    source, in the sequence's own split."""
    train, test = fmnist
    both = torch.cat([train.images[:, 0], test.images[:, 0]]).reshape(-1, 784).double()
    both = both - both.mean(1, keepdim=True)
    both = both / both.norm(dim=1, keepdim=True).clamp_min(1e-9)
    for split, src, offset in (("train", train, 0), ("test", test, len(train))):
        got = generate(src.images[:, 0], src.labels, 24, SMALL, seed=3)
        assert got.source.max() < len(src)
        assert np.array_equal(got.labels, src.labels.numpy()[got.source[:, 0]])
        crops = []
        for i in range(len(got.source)):
            obj = src.images[got.source[i, 0], 0].numpy().astype(np.float64)
            x0, y0 = got.position[i, 0, 0].astype(np.float64)
            ref = _bilinear_reference(obj, x0, y0, 64)
            assert np.abs(got.frames[i, 0].astype(np.float64) - ref).max() <= 1.0, (split, i)
            ix, iy = int(round(x0)), int(round(y0))
            crops.append(got.frames[i, 0, iy : iy + 28, ix : ix + 28].astype(np.float64).ravel())
        c = torch.from_numpy(np.stack(crops))
        c = (c - c.mean(1, keepdim=True)) / (c - c.mean(1, keepdim=True)).norm(dim=1, keepdim=True)
        corr = c @ both.T
        nearest = corr.argmax(1).numpy()  # Fashion-MNIST holds near-duplicates, across its splits too
        assert ((nearest >= offset) & (nearest < offset + len(src))).mean() >= 0.9, split
        own = corr[torch.arange(len(c)), torch.from_numpy(got.source[:, 0] + offset)]
        assert (own > 0.97 * corr.max(1).values).all() and (nearest == got.source[:, 0] + offset).mean() >= 0.9


def test_gravity_and_friction_lose_energy_bounce_keeps_it(made):
    """Energy measured from the frames only: each frame's centroid, its displacement v_t = c_{t+1} − c_t, and
    E_t = ½|v_t|² + g·(height at the midpoint of the step), which the free flight of the generator conserves
    exactly (g = 0 for the families without gravity)."""
    cx, cy = _centroids(made.frames)
    v = np.stack([np.diff(cx, axis=1), np.diff(cy, axis=1)], -1)  # (N, L − 1, 2)
    mid_y = (cy[:, 1:] + cy[:, :-1]) / 2
    for family, g in ((0, 0.0), (1, GRAVITY), (2, 0.0)):
        pick = made.family == family
        energy = 0.5 * (v[pick] ** 2).sum(-1) - g * mid_y[pick]  # image y points down: height is −y
        # a step that meets a wall is shortened, its energy underestimated: start from the most of the first three
        change = energy[:, -1] - energy[:, :3].max(1)
        speed = np.linalg.norm(v[pick], axis=-1)
        if family == 0:  # constant speed (a wall frame's displacement is shortened: compare means)
            assert abs(speed[:, -1].mean() / speed[:, 0].mean() - 1) < 0.1
            assert speed.mean() > 2.0  # clearly moving
        else:
            assert change.max() < 0.5, FAMILIES[family]  # never gains energy
            assert change.mean() < -1.5, FAMILIES[family]
            assert (change < -0.5).mean() > 0.4, FAMILIES[family]  # gravity: those that meet the floor
        if family == 2:  # decelerates to rest (by 0.8 of the sequence at the latest)
            assert speed[:, 0].mean() > 2.5 and (speed[:, -1] < 0.05).all()


def test_objects_stay_inside_the_canvas(fmnist, made):
    train, _ = fmnist
    reach = 64 - 28
    assert made.position.min() >= 0 and made.position.max() <= reach
    mass = made.frames.astype(np.float64).sum((2, 3))
    whole = train.images[made.source[:, 0], 0].double().sum((1, 2)).numpy()
    assert np.abs(mass / whole[:, None] - 1).max() < 0.02  # every garment pixel is drawn in every frame


def test_two_objects_max_composite_and_labels_of_the_first(fmnist):
    train, _ = fmnist
    two = dataclasses.replace(SMALL, objects=2)
    got = generate(train.images[:, 0], train.labels, 40, two, seed=1)
    assert got.source.shape == (40, 2) and got.position.shape == (40, 8, 2, 2)
    assert np.array_equal(got.labels, train.labels.numpy()[got.source[:, 0]])
    i, t = 0, 3
    layers = [_bilinear_reference(train.images[got.source[i, k], 0].numpy().astype(np.float64),
                                  *got.position[i, t, k].astype(np.float64), 64) for k in range(2)]
    assert np.abs(got.frames[i, t] - np.maximum(*layers)).max() <= 1.0


def test_texture_is_a_static_background(fmnist):
    train, _ = fmnist
    got = generate(train.images[:, 0], train.labels, 8, dataclasses.replace(SMALL, texture=0.3), seed=0)
    plain = generate(train.images[:, 0], train.labels, 8, SMALL, seed=0)
    assert np.array_equal(got.position, plain.position)
    off = plain.frames == 0  # where no object is: the same texture in every frame, at most 0.3 bright
    bg = np.where(off, got.frames.astype(np.int16), -1)
    assert got.frames[off].max() <= round(0.3 * 255) and got.frames[off].mean() > 10
    first = np.broadcast_to(got.frames[:, :1], got.frames.shape)
    assert np.array_equal(bg[off & off[:, :1]], first[off & off[:, :1]].astype(np.int16))


# --------------------------------------------------------------------------------------------- settings


def test_settings_from_config_are_checked_together():
    cfg = DataConfig(name="moving-fashion-mnist", generator={"frame": 8, "objects": 3, "texture": 2.0},
                     image_size=40)
    with pytest.raises(ConfigError) as exc:
        MovingSettings.from_config(cfg)
    text = str(exc.value)
    assert "did you mean 'frames'" in text and "objects" in text and "texture" in text and "image_size" in text
    with pytest.raises(ConfigError, match="object_scale"):
        MovingSettings.from_config(DataConfig(name="moving-fashion-mnist", generator={"object_scale": 2}))
    s = MovingSettings.from_config(DataConfig(name="moving-fashion-mnist", image_size=96,
                                              generator={"frames": 8, "object_scale": 1, "seed": 3}))
    assert (s.size, s.frames, s.side, s.seed) == (96, 8, 28, 3)
    with pytest.raises(ConfigError, match="data.generator is read only by"):
        config_from_dict({"data": {"name": "fashion-mnist", "generator": {"frames": 8}}})
    config_from_dict({"data": {"name": "moving-fashion-mnist", "generator": {"frames": 8}}})


def test_missing_fashion_mnist_is_the_clear_error(tmp_path):
    cfg = DataConfig(name="moving-fashion-mnist", root=str(tmp_path / "nothing"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_dataset(cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_moving_fashion_mnist(dataclasses.replace(cfg, root=str(tmp_path / "empty")))


# --------------------------------------------------------------------------------------------- cache and loader


def _cfg(tmp_path, **generator) -> DataConfig:
    small = {"frames": 8, "train_size": 200, "test_size": 96}
    return DataConfig(name="moving-fashion-mnist", cache_dir=str(tmp_path), generator={**small, **generator})


def test_cache_is_reused_and_rebuilt_when_a_setting_changes(fmnist, tmp_path, monkeypatch):
    monkeypatch.setattr(mfm, "load_fashion_mnist", lambda root=None: fmnist)  # read the .gz files once
    train, test = load_moving_fashion_mnist(_cfg(tmp_path))
    target = Path(train.source)
    assert train.mapped and target.parent == tmp_path and target.name.startswith("moving-fashion-mnist-")
    stamp = (target / "manifest.json").stat().st_mtime_ns
    first = train.images.clone()
    # the generator's own output, byte for byte
    src_train, src_test = fmnist
    ref = generate(src_train.images[:, 0], src_train.labels, 200, dataclasses.replace(SMALL), seed=0)
    assert np.array_equal(first.numpy().reshape(ref.frames.shape), ref.frames)
    assert torch.equal(train.labels, torch.from_numpy(ref.labels))
    # test sequences: the test images, under the split's own seed
    ref_test = generate(src_test.images[:, 0], src_test.labels, 96, SMALL, seed=1)
    assert np.array_equal(test.images.numpy().reshape(ref_test.frames.shape), ref_test.frames)
    built = []
    real_build = mfm._build
    monkeypatch.setattr(mfm, "_build", lambda *a: (built.append(a[1]), real_build(*a)))
    again, _ = load_moving_fashion_mnist(_cfg(tmp_path))
    assert built == [] and torch.equal(again.images, first)
    assert (target / "manifest.json").stat().st_mtime_ns == stamp
    # a changed setting: a new cache beside the old one
    other, _ = load_moving_fashion_mnist(_cfg(tmp_path, seed=1))
    assert len(built) == 1 and Path(other.source) != target and target.is_dir()
    assert not torch.equal(other.images, first)
    shorter, _ = load_moving_fashion_mnist(_cfg(tmp_path, frames=6))
    assert len(built) == 2 and shorter.frames == 6 and shorter.images.shape == (200, 6, 64, 64)
    # a damaged cache is rebuilt in place; no temporary directory is left
    with open(target / "train.u8", "r+b") as f:
        f.truncate(1000)
    repaired, _ = load_moving_fashion_mnist(_cfg(tmp_path))
    assert len(built) == 3 and Path(repaired.source) == target and torch.equal(repaired.images, first)
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["settings"]["frames"] == 8 and manifest["counts"] == {"train": 200, "test": 96}
    with np.load(target / "test.npz") as z:  # test sequences are made of test images
        assert z["source"].max() < 10000 and z["position"].shape == (96, 8, 1, 2)


def test_load_dataset_gives_clip_sets(fmnist, tmp_path, monkeypatch):
    monkeypatch.setattr(mfm, "load_fashion_mnist", lambda root=None: fmnist)
    cfg = _cfg(tmp_path)
    train, test = load_dataset(cfg)
    for part, n, split in ((train, 200, "train"), (test, 96, "test")):
        assert isinstance(part, ClipSet) and is_clips(part)
        assert part.frames == 8 and part.channels == 1 and len(part) == n and part.stored_size == 64
        assert part.name == f"moving-fashion-mnist/{split}" and part.classes[0] == "T-shirt/top"
        assert torch.equal(part.video, torch.arange(n))
        assert set(part.extra_labels) == {"direction", "family", "reversible"}
        assert part.extra_classes["family"] == ["bounce", "gravity", "friction"]
        assert torch.equal(part.extra_labels["reversible"], (part.extra_labels["family"] == 0).long())
        assert part.batch([3, 1]).shape == (2, 8, 64, 64) and part.batch([0]).dtype == torch.uint8
    assert not train.mapped  # small: held in RAM by resident()
    lazy, _ = load_dataset(cfg, place=False)
    assert lazy.mapped and torch.equal(lazy.images, train.images)
    assert torch.equal(lazy.with_labels("direction").labels, train.extra_labels["direction"])
    limited, _ = load_dataset(dataclasses.replace(cfg, limit=50, stream=True))
    assert len(limited) == 50 and limited.mapped and len(limited.extra_labels["family"]) == 50
    big, _ = load_dataset(dataclasses.replace(cfg, image_size=48))
    assert big.stored_size == 48 and big.image_size == 48
