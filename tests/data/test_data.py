"""Datasets: IDX parsing, splits, label subsets, corrupt image files (fuzzed). Image folders and their
cache: test_folder_cache.py."""
from __future__ import annotations

import dataclasses
import gzip
import io
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from selfsup.data import DataError, ImageSet, holdout_split, parse_fraction, stratified_subset
from selfsup.data.cache import load_image_folder
from selfsup.data.fashion_mnist import read_idx

FUZZ_CASES = 300


def _png(mode: str = "RGB", size=(12, 10), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_read_idx_roundtrip_and_truncation(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 3, 4) + data.tobytes()
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), data)
    (tmp_path / "b").write_bytes(raw[:-5])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "b")


def test_holdout_split_is_deterministic_and_disjoint():
    tr, va = holdout_split(1000, 5000, seed=3)
    assert len(va) == 100 and len(tr) == 900  # at most 10% held out
    assert set(tr.tolist()).isdisjoint(va.tolist())
    tr2, va2 = holdout_split(1000, 5000, seed=3)
    assert torch.equal(va, va2)


def test_stratified_subset_fractions_and_shots():
    labels = torch.arange(10).repeat_interleave(100)
    idx = stratified_subset(labels, 0.1, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [10] * 10
    idx = stratified_subset(labels, parse_fraction("5-shot"), seed=0)
    assert torch.bincount(labels[idx]).tolist() == [5] * 10
    assert parse_fraction("1%") == pytest.approx(0.01)
    with pytest.raises(DataError, match="leaves class 10 with no example"):
        stratified_subset(torch.cat([labels, torch.tensor([10])]), 0.1, seed=0)
    with pytest.raises(DataError):
        parse_fraction("150%")


def test_held_out_subset_lets_tiny_classes_give_none():
    """A test split or the probe's validation images (``held_out``): a class with 1 or 2 images gives none at 20%
    and keeps them all for training, instead of failing the whole split; where every class gives one, the
    indices are the plain subset's, so existing splits do not move. Errors name the class."""
    labels = torch.tensor([0] * 60 + [1] * 1 + [2] * 2 + [3] * 7)
    idx = stratified_subset(labels, 0.2, seed=0, held_out=True)
    assert torch.bincount(labels[idx], minlength=4).tolist() == [12, 0, 0, 1]
    big = torch.arange(10).repeat_interleave(37)
    assert torch.equal(stratified_subset(big, 0.2, seed=3, held_out=True), stratified_subset(big, 0.2, seed=3))
    with pytest.raises(DataError, match="leaves class 'solo' with no example"):
        stratified_subset(labels, 0.2, seed=0, classes=["many", "solo", "pair", "some"])


@settings(max_examples=FUZZ_CASES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["png", "jpeg"]), seed=st.integers(0, 3),
       mutations=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_fuzz_corrupt_images_never_crash(tmp_path_factory, kind, seed, mutations, cut):
    """Byte mutations and truncations of valid PNG/JPEG files: every file is loaded or counted as skipped."""
    folder = tmp_path_factory.mktemp("fuzz")
    data = bytearray(_png(seed=seed) if kind == "png" else _jpeg(seed=seed))
    for pos, value in mutations:
        data[int(pos * len(data))] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    (folder / f"mutant.{kind}").write_bytes(bytes(data))
    for i in range(2):
        (folder / f"good{i}.png").write_bytes(_png(seed=10 + i))
    images = load_image_folder(folder, 8, cache_dir=str(folder / ".cache"), workers=1, progress=False)
    assert len(images) + images.skipped == 3
    assert images.images.shape[1:] == (images.channels, 11, 11) and images.image_size == 8


def test_long_tail_pretraining_subset_decays_by_the_factor_and_evaluation_keeps_every_label(tmp_path):
    """``data.long_tail``: pretraining sees classes shrinking geometrically (first / last = the factor);
    ``DataConfig.labelled()``, what evaluation loads, has every labelled image again."""
    from selfsup.config import ConfigError, DataConfig, load_config
    from selfsup.data import load_dataset

    full, _ = load_dataset(DataConfig(name="digits"))
    cfg = DataConfig(name="digits", long_tail=10.0)
    train, test = load_dataset(cfg)
    counts = torch.bincount(train.labels, minlength=10)
    smallest = int(torch.bincount(full.labels).min())
    assert int(counts[0]) == smallest and int(counts[9]) == round(smallest / 10)
    assert (counts[1:] <= counts[:-1]).all() and "long tail" in train.name
    assert len(load_dataset(cfg.labelled())[0]) == len(full)
    assert len(load_dataset(DataConfig(name="digits", long_tail=10.0, limit=50))[0]) == 50  # limit after the tail
    # what a run says and records about the images it pretrains on
    recorded = train.class_counts()
    assert list(recorded.values()) == counts.tolist() and list(recorded)[0] == train.classes[0]
    assert train.describe() == f"{len(train)} images of 10 classes ({int(counts[9])}–{smallest} per class)"
    assert ImageSet(train.images, None).class_counts() is None
    with pytest.raises(ConfigError, match="data.long_tail must be ≥ 1"):
        load_config(None, {"data.long_tail": 0.5})
    with pytest.raises(DataError, match="needs labelled training images"):
        load_dataset(DataConfig(name=str(_unlabelled_folder(tmp_path)), long_tail=10.0))


def _unlabelled_folder(root):
    folder = root / "flat"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("extra", [{}, {"limit": 300}, {"long_tail": 5.0}, {"long_tail": 5.0, "limit": 200, "val_size": 7}])
def test_pretraining_holdout_replays_the_images_a_run_held_out(extra):
    """``pretraining_holdout`` finds, in the whole labelled training split, exactly the images a run's set-up held
    out of pretraining (``load_dataset`` then ``holdout_split`` under the run's seed), after a limit or long tail."""
    from selfsup.config import DataConfig
    from selfsup.data import load_dataset, pretraining_holdout

    cfg = DataConfig(name="digits", **extra)
    labelled, _ = load_dataset(cfg.labelled())
    for seed in (0, 1):
        pool, _ = load_dataset(cfg)
        _, val = holdout_split(len(pool), cfg.val_size, seed)
        held = pretraining_holdout(labelled, cfg, seed)
        assert len(held) == len(val) == min(cfg.val_size, len(pool) // 10) > 0
        assert torch.equal(labelled.images[held], pool.images[val]) and torch.equal(labelled.labels[held], pool.labels[val])
    assert not torch.equal(pretraining_holdout(labelled, cfg, 0), pretraining_holdout(labelled, cfg, 1))
    assert len(pretraining_holdout(labelled, dataclasses.replace(cfg, val_size=0), 0)) == 0
