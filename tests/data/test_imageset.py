"""ImageSet over a memory-mapped cache: views instead of copies, batches in any order, RAM or streaming."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.config import ConfigError, DataConfig, load_config
from selfsup.data import ImageSet, load_dataset
from selfsup.data.cache import load_image_folder


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "eel"):
        (tmp_path / "f" / c).mkdir(parents=True)
        for i in range(10):
            w, h = int(rng.integers(20, 60)), int(rng.integers(20, 60))
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "f" / c / f"{i}.png")
    return tmp_path / "f"


def _mapped(folder, tmp_path) -> ImageSet:
    return load_image_folder(folder, 16, cache_dir=str(tmp_path / "cache"), progress=False)


def _shares_file(s: ImageSet) -> bool:
    """Whether the set's records lie in a memory mapping of its cache's shard file (Linux: /proc/self/maps),
    i.e. nothing was copied into RAM."""
    ptr, shard = s._pixels.data_ptr(), f"{s.source}/images.u8"
    for line in open("/proc/self/maps"):
        span, *rest = line.split()
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= ptr < hi and rest and rest[-1] == shard:
            return True
    return False


def test_subsets_are_index_views_of_the_file_and_batches_keep_their_order(folder, tmp_path):
    full = _mapped(folder, tmp_path)
    everything = full.images.clone()  # whole set: the memmap itself, zero-copy
    assert full.mapped and _shares_file(full) and full.nbytes == 30 * 3 * 21 * 21
    sub = full.subset(torch.tensor([29, 3, 17, 4]))
    assert sub._pixels.data_ptr() == full._pixels.data_ptr() and len(sub) == 4  # no pixel was copied
    assert sub.paths == [full.paths[i] for i in (29, 3, 17, 4)] and sub.labels.tolist() == [2, 0, 1, 0]
    assert torch.equal(sub.aspect, full.aspect[[29, 3, 17, 4]])
    idx = torch.tensor([3, 0, 3, 1])  # unsorted, with a repeat: read in file order, returned as asked
    assert torch.equal(sub.batch(idx), everything[[4, 29, 4, 3]])
    nested = sub.subset([2, 0]).head(1)
    assert nested._pixels.data_ptr() == full._pixels.data_ptr() and torch.equal(nested.images, everything[[17]])
    assert sub.nbytes == 4 * 3 * 21 * 21 and sub.image_size == 16 and sub.stored_size == 21


def test_to_memory_and_with_channels(folder, tmp_path):
    full = _mapped(folder, tmp_path)
    sub = full.subset(torch.arange(5, 12))
    ram = sub.to_memory()
    assert not ram.mapped and not _shares_file(ram) and torch.equal(ram.images, sub.images)
    assert torch.equal(ram.aspect, sub.aspect) and ram.image_size == 16 and ram.paths == sub.paths
    gray = sub.with_channels(1)  # lazy for a file-backed set: converted batch by batch
    assert gray.mapped and gray.channels == 1 and gray._pixels.data_ptr() == full._pixels.data_ptr()
    assert torch.equal(gray.batch([2, 0]), ram.with_channels(1).images[[2, 0]])
    back = gray.with_channels(3).batch([1])
    assert back.shape == (1, 3, 21, 21) and torch.equal(back[:, 0], back[:, 2])


def test_mean_std_of_a_file_backed_set_matches_the_pixels(folder, tmp_path):
    full = _mapped(folder, tmp_path)
    mean, std = full.mean_std(chunk=7)
    x = full.images.double() / 255
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), x.mean(dim=(0, 2, 3)), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), x.std(dim=(0, 2, 3)), atol=1e-6, rtol=0)


def test_in_memory_sets_behave_as_before():
    x = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    s = ImageSet(x, torch.arange(10))
    assert s.images is x and s.aspect is None and s.image_size == s.stored_size == 8 and not s.mapped
    sub = s.subset([3, 1])
    assert torch.equal(sub.images, x[[3, 1]]) and sub.images.data_ptr() != x.data_ptr()  # a (small) copy
    assert torch.equal(s.batch(torch.tensor([5, 2])), x[[5, 2]]) and s.nbytes == 640
    assert s.to_memory() is s and s.with_channels(3).images.shape == (10, 3, 8, 8)


@pytest.mark.parametrize("stream, budget, mapped", [(None, 0.0, True), (None, 1.0, False), (True, 1.0, True),
                                                    (False, 0.0, False)])
def test_load_dataset_holds_a_folder_in_ram_or_streams_it(folder, tmp_path, stream, budget, mapped):
    cfg = DataConfig(name=str(folder), image_size=16, cache_dir=str(tmp_path / "cache"), stream=stream,
                     memory_budget_gb=budget)
    train, test = load_dataset(cfg)
    assert train.mapped == test.mapped == mapped
    assert len(train) + len(test) == 30 and train.aspect is not None and train.image_size == 16
    if mapped:
        assert train._pixels.data_ptr() == test._pixels.data_ptr()  # both splits index the one file
    limited, _ = load_dataset(DataConfig(name=str(folder), image_size=16, cache_dir=str(tmp_path / "cache"),
                                         limit=5, stream=stream, memory_budget_gb=budget))
    assert len(limited) == 5 and torch.equal(limited.images, train.images[:5])


def test_data_config_checks_the_cache_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, {"data.image_size": 64, "data.cache_size": 48, "data.cache_check": "sometimes",
                           "data.memory_budget_gb": -1, "data.stream": "maybe"})
    text = str(err.value)
    assert "data.cache_size (48) is smaller than data.image_size (64)" in text
    assert "data.cache_check must be fast or full" in text and "data.memory_budget_gb must be ≥ 0" in text
    assert "data.stream: expected bool" in text
    cfg = load_config(None, {"data.cache_dir": "/tmp/x", "data.cache_size": 96, "data.memory_budget_gb": 2,
                             "data.stream": True})
    assert (cfg.data.cache_dir, cfg.data.cache_size, cfg.data.memory_budget_gb, cfg.data.stream) == \
        ("/tmp/x", 96, 2.0, True)


def test_prefetched_batches_arrive_in_order_and_errors_reach_the_caller(folder, tmp_path):
    from selfsup.data.stream import prefetch_batches

    full = _mapped(folder, tmp_path)
    order = torch.randperm(30, generator=torch.Generator().manual_seed(0)).split(7)
    got = list(prefetch_batches(full, order, depth=2))
    assert [g[0].tolist() for g in got] == [o.tolist() for o in order]
    for idx, x, aspect in got:
        assert torch.equal(x, full.batch(idx)) and torch.equal(aspect, full.aspect[idx])
    early = prefetch_batches(full, order, depth=1)
    next(early)
    early.close()  # leaving the loop stops the reader thread
    with pytest.raises(IndexError):
        list(prefetch_batches(full, [torch.tensor([0, 99])]))


def _mapped_rss_kb(s: ImageSet) -> int:
    """Resident kB of the set's own mapping of its shard (/proc/self/smaps): pages read through that map."""
    ptr, inside = s._pixels.data_ptr(), False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line: "lo-hi perms ..."
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            inside = lo <= ptr < hi and head[-1] == f"{s.source}/images.u8"
        elif inside and head[0] == "Rss:":
            return int(head[1])
    raise AssertionError("the set is not a mapping of its shard")


def test_streamed_batches_never_count_the_shard_in_this_process(folder, tmp_path):
    """Batches are read with positioned reads (selfsup.data.shard), not through the memory map: a process
    streaming a shard larger than RAM once per epoch must not end the epoch with all of it resident."""
    full = _mapped(folder, tmp_path)
    expected = full.images.clone()  # the whole set: the map itself (and now resident)
    fresh = _mapped(folder, tmp_path)  # another set, another mapping of the same file
    sub = fresh.subset(torch.arange(3, 30))
    assert _mapped_rss_kb(fresh) == 0
    for idx in torch.randperm(27).split(5):
        assert torch.equal(sub.batch(idx), expected[3:][idx])
    fresh.mean_std()
    ram = sub.to_memory()
    assert torch.equal(ram.images, expected[3:])
    assert _mapped_rss_kb(fresh) == 0


def test_a_folder_has_one_normalisation_streamed_or_in_ram(folder, tmp_path, monkeypatch):
    import selfsup.data.imageset as imageset

    full = _mapped(folder, tmp_path)
    assert full.mean_std() == full.to_memory().mean_std()
    sub = full.subset(torch.arange(0, 30, 2))
    assert sub.mean_std() == sub.to_memory().mean_std()
    # a large folder: the statistics come from images spread over it, as many as hold STATS_VALUES values
    monkeypatch.setattr(imageset, "STATS_VALUES", 5 * 3 * full.stored_size**2)
    monkeypatch.setattr(imageset, "STATS_MIN_IMAGES", 1)
    picked = torch.linspace(0, 29, 5).round().long()
    assert full.mean_std() == full.subset(picked).to_memory().mean_std(sample=5)
