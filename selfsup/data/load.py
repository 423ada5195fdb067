"""One entry point from a data config to (train, test) image sets."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from selfsup.config import DataConfig
from selfsup.data.cifar import is_cifar_dir, load_cifar
from selfsup.data.fashion_mnist import load_fashion_mnist
from selfsup.data.cache import load_image_folder
from selfsup.data.clips import ClipSet
from selfsup.data.imageset import DataError, ImageSet
from selfsup.data.imbalance import long_tail_subset
from selfsup.data.sample_photos import sample_photo_crops
from selfsup.data.splits import holdout_split, stratified_subset

log = logging.getLogger(__name__)
NAMED = ("fashion-mnist", "digits", "cifar10", "cifar100", "sample-photos", "fashion-mnist-scenes",
         "moving-fashion-mnist")
DEFAULT_FOLDER_SIZE = 64
SAMPLE_PHOTO_CROPS, SAMPLE_PHOTO_SIZE = 10000, 32


def load_digits() -> tuple[ImageSet, ImageSet]:
    """scikit-learn's bundled 8×8 digits (1,797 images), split 80/20 stratified with a fixed seed."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8))[:, None]
    full = ImageSet(images, torch.from_numpy(d.target.astype(np.int64)), [str(i) for i in range(10)], "digits")
    return split_labelled(full, test_fraction=0.2)


def split_labelled(full: ImageSet, test_fraction: float = 0.2, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """A deterministic train/test split; stratified when labels exist."""
    n = len(full)
    if full.labels is not None:
        test = stratified_subset(full.labels, test_fraction, seed, held_out=True) if n >= 10 else torch.arange(0)
    else:
        test = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: int(n * test_fraction)].sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[test] = False
    train, test_set = full.subset(keep.nonzero().flatten()), full.subset(test)
    train.name, test_set.name = f"{full.name}/train", f"{full.name}/test"
    return train, test_set


def split_by_video(clips: ClipSet, test_fraction: float = 0.2, seed: int = 0) -> tuple[ClipSet, ClipSet]:
    """A deterministic train/test split of a video folder's clips that never splits a video: a fraction of its
    videos (stratified by class when labelled) gives the test clips."""
    video = clips.video
    first = torch.unique(video, return_inverse=True)[1]
    n_videos = int(first.max()) + 1 if len(first) else 0
    record_of = torch.full((n_videos,), -1, dtype=torch.long)
    record_of.scatter_reduce_(0, first, torch.arange(len(first)), reduce="amin", include_self=False)
    if clips.labels is not None:
        labels = clips.labels[record_of]
        test = stratified_subset(labels, test_fraction, seed, held_out=True) if n_videos >= 10 else torch.arange(0)
    else:
        g = torch.Generator().manual_seed(seed)
        test = torch.randperm(n_videos, generator=g)[: int(n_videos * test_fraction)]
    in_test = torch.zeros(n_videos, dtype=torch.bool)
    in_test[test] = True
    train, test_set = clips.subset((~in_test[first]).nonzero().flatten()), clips.subset(in_test[first].nonzero().flatten())
    train.name, test_set.name = f"{clips.name}/train", f"{clips.name}/test"
    return train, test_set


def _folder_kind(path: Path, cfg: DataConfig) -> str:
    """``videos`` or ``images``: ``data.kind``, or (``auto``) whether the folder holds a video file."""
    if cfg.kind != "auto":
        return cfg.kind
    from selfsup.data.video_folder import holds_videos

    return "videos" if path.is_dir() and holds_videos(path) else "images"


def load_dataset(cfg: DataConfig, place: bool = True) -> tuple[ImageSet, ImageSet]:
    """(train, test). ``cfg.long_tail`` makes the training images class-imbalanced, then ``cfg.limit``
    keeps the first N of them. An image folder's sets are then held in RAM or left on disk by :func:`resident`;
    ``place=False`` leaves them on disk (views of the cache file) for a caller that first takes the part it
    needs — a subset of a file-backed set costs no memory — and then calls :func:`resident` on that part.
    ``moving-fashion-mnist`` and video folders (``data.kind``) give :class:`~selfsup.data.clips.ClipSet` s (clips,
    memory-mapped from their cache), which every step here takes as it takes image sets."""
    name = cfg.name
    if name == "fashion-mnist":
        train, test = load_fashion_mnist(cfg.root)
    elif name == "digits":
        train, test = load_digits()
    elif name == "sample-photos":  # RGB crops of scikit-learn's two bundled photos (colour without a download)
        full = sample_photo_crops(SAMPLE_PHOTO_CROPS, cfg.image_size or SAMPLE_PHOTO_SIZE, seed=0)
        train, test = split_labelled(full)
    elif name == "fashion-mnist-scenes":  # the dense benchmark's images; labels: each scene's dominant object
        from selfsup.data.annotations import load_dense

        dense_train, dense_test = load_dense(cfg)
        train, test = dense_train.images, dense_test.images
    elif name == "moving-fashion-mnist":  # clips (ClipSet), memory-mapped from their generated cache
        from selfsup.data.moving_fashion_mnist import load_moving_fashion_mnist

        train, test = load_moving_fashion_mnist(cfg)  # at data.image_size already: never resized below
    elif name in ("cifar10", "cifar100"):
        if not cfg.root:
            raise DataError(f"{name}: pass --data-root DIR (or --data DIR) with the unpacked python-version batches; "
                            "nothing is downloaded at run time")
        train, test = load_cifar(cfg.root)
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise DataError(f"unknown dataset {name!r}: not one of {', '.join(NAMED)} and no such path")
        from selfsup.data.coco import is_coco_source
        from selfsup.data.voc import is_voc_folder

        if is_voc_folder(path) or is_coco_source(path):  # annotated images: pretrain on the training split only
            from selfsup.data.annotations import load_dense

            dense_train, dense_test = load_dense(cfg)
            train, test = (d.images.subset(torch.arange(len(d))) for d in (dense_train, dense_test))
            for part in (train, test):  # views without labels: masks and boxes are for the dense protocols
                part.labels, part.classes = None, []
        elif path.is_dir() and is_cifar_dir(path):
            train, test = load_cifar(path)
        elif _folder_kind(path, cfg) == "videos":  # video files and frame folders: clips (ClipSet), one cache
            from selfsup.data.video_folder import load_video_clips

            full = load_video_clips(path, cfg.image_size or DEFAULT_FOLDER_SIZE, cfg.video, cache_dir=cfg.cache_dir,
                                    cache_size=cfg.cache_size, check=cfg.cache_check)
            train, test = split_by_video(full) if full.labels is not None else (full, full.subset([]))
        else:
            full = load_image_folder(path, cfg.image_size or DEFAULT_FOLDER_SIZE, cache_dir=cfg.cache_dir,
                                     cache_size=cfg.cache_size, check=cfg.cache_check)
            train, test = split_labelled(full) if full.labels is not None else (full, full.subset([]))
    if cfg.image_size and cfg.image_size != train.image_size and not Path(name).is_dir():
        train, test = resize(train, cfg.image_size), resize(test, cfg.image_size)
    if cfg.long_tail is not None:
        train = long_tail(train, cfg.long_tail)
    train = train.head(cfg.limit)
    return resident(train, test, cfg) if place else (train, test)


def memory_budget(cfg: DataConfig) -> int:
    """Bytes of image records this process may hold in RAM: ``data.memory_budget_gb``, else a quarter of
    the machine's RAM divided among the processes torchrun started on it (``LOCAL_WORLD_SIZE``)."""
    if cfg.memory_budget_gb is not None:
        return int(cfg.memory_budget_gb * 2**30)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 16 * 2**30
    return ram // 4 // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def resident(train: ImageSet, test: ImageSet, cfg: DataConfig) -> tuple[ImageSet, ImageSet]:
    """File-backed sets loaded into RAM when ``data.stream`` is false, or (unset) when both fit the
    memory budget together; otherwise left on disk, read batch by batch."""
    if not (train.mapped or test.mapped) or cfg.stream:
        return train, test
    need, budget = train.nbytes + test.nbytes, memory_budget(cfg)
    if cfg.stream is None and need > budget:
        log.info("reading %s from its cache file as batches need it (%.2f GiB of records, over the %.2f GiB "
                 "memory budget, data.memory_budget_gb)", train.name, need / 2**30, budget / 2**30)
        return train, test
    if cfg.stream is False and need > budget:
        log.warning("data.stream=false: loading %.2f GiB of image records into RAM, over the %.2f GiB budget",
                    need / 2**30, budget / 2**30)
    return train.to_memory(), test.to_memory()


def long_tail_indices(train: ImageSet, decay: float) -> torch.Tensor:
    """Positions in ``train`` of the class-imbalanced subset of ``data.long_tail`` (see :mod:`selfsup.data.imbalance`)."""
    if train.labels is None:
        raise DataError(f"{train.name}: data.long_tail needs labelled training images to make a class-imbalanced "
                        "subset; this dataset has no labels")
    smallest = int(torch.bincount(train.labels).min())
    return long_tail_subset(train.labels, smallest, decay)


def long_tail(train: ImageSet, decay: float) -> ImageSet:
    out = train.subset(long_tail_indices(train, decay))
    out.name = f"{train.name} (long tail ×{decay:g})"
    return out


def pretraining_holdout(labelled_train: ImageSet, cfg: DataConfig, seed: int) -> torch.Tensor:
    """Positions in the whole labelled training split (``load_dataset(cfg.labelled())[0]``) of the images a run
    with data config ``cfg`` and seed ``seed`` held out of pretraining (``data.val_size``, for its online kNN
    monitor): the split :func:`load_dataset` and :func:`~selfsup.data.splits.holdout_split` make, replayed, so
    the run's encoder never trained on them."""
    pool = torch.arange(len(labelled_train))
    if cfg.long_tail is not None:
        pool = long_tail_indices(labelled_train, cfg.long_tail)
    if cfg.limit is not None:
        pool = pool[: cfg.limit]
    _, val = holdout_split(len(pool), cfg.val_size, seed)
    return pool[val]


def resize(images: ImageSet, size: int) -> ImageSet:
    """An in-memory set resized to ``size`` (named datasets at another ``data.image_size``)."""
    x = torch.nn.functional.interpolate(images.images.float(), size=(size, size), mode="bilinear",
                                        antialias=True, align_corners=False)
    return ImageSet(x.round().clamp(0, 255).to(torch.uint8), images.labels, images.classes, images.name,
                    images.paths, images.skipped)
