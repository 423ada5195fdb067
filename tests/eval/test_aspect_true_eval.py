"""Fine-tuning and held-out pretext accuracy see an image folder as pretraining does: crops drawn in each
original image's pixel space and, for testing, the centre square of the original — never a squashed
record. Sets without aspect ratios (in-memory datasets) are cropped exactly as before. A file-backed folder is
read batch by batch, never whole, with the same result as the same images held in RAM.

The folder's images are coordinate ramps (red = x / W, green = y / H; blue tells the shape apart), so
the region of its original that a view shows can be read off the view's own pixels.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from selfsup.config import config_from_dict
from selfsup.data import load as load_mod
from selfsup.data.cache import load_image_folder
from selfsup.data.imageset import ImageSet
from selfsup.eval.evaluate import evaluate_run
from selfsup.eval.finetune import (Classifier, FinetuneSettings, shuffled_batches, _channels_last, _optimizer_groups,
                                   classifier_accuracy, train_classifier)
from selfsup.schedules import warmup_cosine
from selfsup.eval.pretext import held_out_pretext_accuracy, pretext_accuracy
from selfsup.views import Augment, ViewRecipe, make_views, normalize, to_float
from selfsup.views.ops import resized_crop_flip

PAST_NS = 1_577_836_800 * 10**9  # 2020-01-01: directory times the cache's fast check trusts
SHAPES = {"wide": ((96, 32), 255), "tall": ((32, 96), 0), "square": ((48, 48), 128)}
"""(width, height) and blue level of each kind of image in the folder (each class has it at other sizes)."""
PLAIN = ([0.0] * 3, [1.0] * 3)
"""Mean and std that leave views in [0, 1], so their ramps read as fractions of the original."""


def _ramp(width: int, height: int, blue: int) -> Image.Image:
    x = (np.arange(width) + 0.5) / width * 255
    y = (np.arange(height) + 0.5) / height * 255
    rgb = np.zeros((height, width, 3), dtype=np.float64)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = x[None, :], y[:, None], blue
    return Image.fromarray(rgb.round().astype(np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Three classes, each with two 3:1, two 1:3 and two square images."""
    root = tmp_path_factory.mktemp("aspect") / "images"
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for name, ((w, h), blue) in SHAPES.items():
            for i in range(2):
                k = 4 + 2 * c + i  # sizes × 1, 1.25, ... 2.25: the same aspect ratio at six sizes
                _ramp(w * k // 4, h * k // 4, blue).save(root / f"c{c}" / f"{name}{i}.png")
    for d in [root, *root.iterdir()]:
        os.utime(d, ns=(PAST_NS, PAST_NS))
    return root


def _regions(views: Tensor) -> dict[str, Tensor]:
    """Each view's region of its original image, read off its ramps: a straight line fitted over the
    middle half of the view (away from resampling at the borders), extended to the view's edges.
    ``left``/``right``/``top``/``bottom`` as fractions of the original's width and height, ``aspect`` the
    region's pixel width / height and ``rho`` the original's width / height (from the blue level)."""
    n = views.shape[-1]
    t = ((torch.arange(n) + 0.5) / n)[n // 4 : n - n // 4]

    def span(ramp: Tensor) -> tuple[Tensor, Tensor]:
        v = ramp[:, n // 4 : n - n // 4]
        slope = ((t - t.mean()) * (v - v.mean(1, keepdim=True))).sum(1) / (t - t.mean()).square().sum()
        at_0 = v.mean(1) - slope * t.mean()
        ends = torch.stack([at_0, at_0 + slope], 1)  # a mirrored view runs right to left
        return ends.min(1).values, ends.max(1).values

    left, right = span(views[:, 0].mean(1))
    top, bottom = span(views[:, 1].mean(2))
    blue = views[:, 2].mean((1, 2))
    rho = torch.where(blue > 0.75, 3.0, torch.where(blue < 0.25, 1 / 3, 1.0))
    aspect = (right - left) / (bottom - top) * rho
    return {"left": left, "right": right, "top": top, "bottom": bottom, "aspect": aspect, "rho": rho}


def _assert_aspect_true_crops(views: Tensor, ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
    """Every view is a region inside its original whose pixel aspect is in ``ratio`` (a crop of the squashed
    record would have a 3:1 original's aspect in 3·ratio, 2.25–4)."""
    r = _regions(views)
    assert {round(v, 3) for v in r["rho"].tolist()} == {3.0, 0.333, 1.0}  # every shape was seen
    assert (r["aspect"] > ratio[0] / 1.2).all() and (r["aspect"] < ratio[1] * 1.2).all(), r["aspect"]
    assert (r["left"] > -0.03).all() and (r["top"] > -0.03).all()
    assert (r["right"] < 1.03).all() and (r["bottom"] < 1.03).all()


class _KeepsInputs(nn.Module):
    """An encoder that keeps every input it is given, by train (True) or eval (False) mode."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.fc = nn.Linear(channels, 4)
        self.inputs: dict[bool, list[Tensor]] = {True: [], False: []}

    def forward(self, x: Tensor) -> Tensor:
        self.inputs[self.training].append(x.detach().clone())
        return self.fc(x.mean(dim=(2, 3)))


class _KeepsViews(nn.Module):
    """A pretext "method" that keeps the views it is given and reports a fixed accuracy."""

    def __init__(self):
        super().__init__()
        self.views: list[list[Tensor]] = []

    def training_step(self, views, progress):
        self.views.append([v.clone() for v in views])
        return torch.zeros(()), {"pretext_acc": torch.tensor(1.0)}


# ------------------------------------------------------------------------------------------- fine-tuning


def test_finetune_crops_and_test_images_of_a_folder_keep_each_originals_aspect(folder, tmp_path):
    images = load_image_folder(folder, 16, cache_dir=str(tmp_path / "cache"), progress=False)
    assert images.aspect is not None and {round(v, 3) for v in images.aspect.tolist()} == {0.333, 1.0, 3.0}
    spy = _KeepsInputs()
    settings = FinetuneSettings(min_steps=6, max_steps=6, batch_size=18)
    model = train_classifier(spy, 4, images, *PLAIN, settings)
    crops = torch.cat(spy.inputs[True])
    assert crops.shape == (6 * 18, 3, 16, 16)
    _assert_aspect_true_crops(crops)
    # scale ≥ 0.5 never fits a 4:3-at-most region in a 3:1 image: torchvision's fallback, the centre 4:3 at full height
    wide = _regions(crops[_regions(crops)["rho"] == 3.0])
    torch.testing.assert_close(wide["right"] - wide["left"], torch.full_like(wide["left"], 4 / 9), atol=0.04, rtol=0)
    # the test images: the centre square of each original, as kNN and linear probes see them
    classifier_accuracy(model, images, *PLAIN)
    seen = _regions(torch.cat(spy.inputs[False]))
    torch.testing.assert_close(seen["aspect"], torch.ones(len(images)), atol=0.1, rtol=0)
    torch.testing.assert_close((seen["left"] + seen["right"]) / 2, torch.full((len(images),), 0.5), atol=0.03, rtol=0)


def test_without_aspect_ratios_finetune_crops_are_what_they_always_were(digits):
    """An in-memory set: the encoder is given exactly the crops of the recipe before aspect ratios existed
    (``resized_crop_flip`` without them, from the same random state), and the test images themselves."""
    train, test = digits[0].subset(torch.arange(40)), digits[1].subset(torch.arange(20))
    assert train.aspect is None
    mean, std = [0.3], [0.2]
    spy = _KeepsInputs(channels=1)
    model = train_classifier(spy, 4, train, mean, std, FinetuneSettings(min_steps=3, max_steps=3, batch_size=16))
    torch.manual_seed(0)
    nn.Linear(4, train.num_classes)  # the head's initialisation: the draws made before the first crop
    batches = shuffled_batches(len(train), 16, 3, torch.Generator().manual_seed(0))
    assert len(spy.inputs[True]) == 3
    for idx, seen in zip(batches, spy.inputs[True]):
        before = resized_crop_flip(to_float(train.images[idx]), 8, (0.5, 1.0), (3 / 4, 4 / 3), 0.5)
        assert torch.equal(seen, normalize(before, mean, std))
    classifier_accuracy(model, test, mean, std)
    assert torch.equal(torch.cat(spy.inputs[False]), normalize(to_float(test.images), mean, std))


def _train_classifier_holding_the_set(encoder, num_features, train, mean, std, settings, seed=0) -> Classifier:
    """``train_classifier`` as it was before it read one batch at a time: every record held in one tensor
    (``train.images``) and indexed per step."""
    torch.manual_seed(seed)
    model = Classifier(encoder, num_features, train.num_classes)
    if _channels_last(train):
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(_optimizer_groups(model, settings), lr=settings.lr)
    steps, batch = settings.steps_for(len(train)), min(settings.batch_size, len(train))
    warmup = int(settings.warmup_fraction * steps)
    images, labels, aspect = train.images, train.labels, train.aspect
    model.train()
    for step, idx in enumerate(shuffled_batches(len(train), batch, steps, torch.Generator().manual_seed(seed))):
        for g in optimizer.param_groups:
            g["lr"] = warmup_cosine(step, steps, warmup, settings.lr) * g["lr_scale"]
        with torch.no_grad():
            x = resized_crop_flip(to_float(images[idx]), train.image_size, settings.crop_scale, (3 / 4, 4 / 3),
                                  settings.flip_p, None if aspect is None else aspect[idx])
            x = normalize(x, mean, std)
            if _channels_last(train):
                x = x.contiguous(memory_format=torch.channels_last)
        loss = torch.nn.functional.cross_entropy(model(x), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def _small_cnn(channels: int) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_finetune_reads_batches_with_the_result_of_holding_the_set(digits):
    """An in-memory set: the same crops, order and random draws as indexing the whole set, so the trained
    weights are bit-identical (5 steps of 16 over 40 images cross two epoch boundaries)."""
    train = digits[0].subset(torch.arange(40))
    settings = FinetuneSettings(min_steps=5, max_steps=5, batch_size=16)
    got = train_classifier(_small_cnn(1), 4, train, [0.3], [0.2], settings)
    want = _train_classifier_holding_the_set(_small_cnn(1), 4, train, [0.3], [0.2], settings)
    _assert_same_weights(got, want)


def test_finetune_on_a_file_backed_folder_never_loads_it_whole(folder, tmp_path, monkeypatch):
    """A folder read from its cache file batch by batch (``ImageSet.images``, which would read it all, is
    never touched) trains the weights that holding all its records in RAM did, aspect ratios included."""
    images = load_image_folder(folder, 16, cache_dir=str(tmp_path / "cache"), progress=False)
    assert images.mapped and images.aspect is not None
    in_ram = images.to_memory()
    settings = FinetuneSettings(min_steps=4, max_steps=4, batch_size=8)
    want = _train_classifier_holding_the_set(_small_cnn(3), 4, in_ram, *PLAIN, settings)
    monkeypatch.setattr(ImageSet, "images", property(lambda self: pytest.fail("read the whole set")))
    got = train_classifier(_small_cnn(3), 4, images, *PLAIN, settings)
    _assert_same_weights(got, want)


# ------------------------------------------------------------------------------------ pretext accuracy


def test_pretext_views_of_a_folder_are_cropped_in_each_originals_pixel_space(folder, tmp_path):
    images = load_image_folder(folder, 16, cache_dir=str(tmp_path / "cache"), progress=False)
    recipe = ViewRecipe(globals_=(Augment(size=16, jitter_p=0, gray_p=0, blur_p=0),))  # scale 0.08–1
    method = _KeepsViews()
    assert pretext_accuracy(method, images, recipe, *PLAIN, batch_size=7) == 1.0
    views = torch.cat([v[0] for v in method.views])
    assert views.shape == (len(images), 3, 16, 16)
    _assert_aspect_true_crops(views)


def test_without_aspect_ratios_pretext_views_are_what_they_always_were(digits):
    """An in-memory set: the views are the training views of the loop before aspect ratios existed."""
    images = digits[1].subset(torch.arange(30))
    recipe = ViewRecipe(globals_=(Augment(size=8), Augment(size=8, scale=(0.5, 1.0))))
    method = _KeepsViews()
    pretext_accuracy(method, images, recipe, [0.3], [0.2], batch_size=12, seed=5)
    torch.manual_seed(5)
    for start, got in zip(range(0, 30, 12), method.views, strict=True):
        want = make_views(images.images[start : start + 12], recipe, [0.3], [0.2])
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


# ---------------------------------------------------------------------------------- end to end, one run


@pytest.fixture(scope="module")
def rotation_run(folder, tmp_path_factory) -> Path:
    """A rotation-prediction run pretrained for one epoch on the folder."""
    from selfsup.train.loop import pretrain

    out = tmp_path_factory.mktemp("aspect_run") / "rotation"
    cfg = config_from_dict({
        "method": {"name": "rotation", "params": {"head_hidden": 16}},
        "backbone": {"name": "small_resnet", "params": {"widths": [8, 16]}},
        "data": {"name": str(folder), "image_size": 16},
        "optim": {"name": "sgd", "lr": 0.05},
        "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "progress": False, "knn_every": 0, "threads": 1}})
    pretrain(cfg, out)
    return out


def test_finetune_and_pretext_accuracy_run_on_the_folder(rotation_run):
    (result,) = evaluate_run(rotation_run, ["finetune"], finetune_settings=FinetuneSettings(
        min_steps=3, max_steps=3, batch_size=8), write=False)
    assert result["n_train"] + result["n_test"] == 18 and result["settings"]["steps"] == 3
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["baselines"]["from_scratch"] <= 1
    acc = held_out_pretext_accuracy(rotation_run)
    assert acc is not None and 0 <= acc <= 1


def test_finetune_evaluation_of_a_file_backed_folder_reads_it_batch_by_batch(rotation_run, monkeypatch):
    """``evaluate --protocol finetune`` on a folder over the memory budget: the pretrained and from-scratch
    fine-tunes (probe-initialised head), their test accuracy and the raw-pixel and random-encoder probes all
    read the cache file batch by batch; nothing loads a whole set (``.images``, ``.to_memory()``)."""
    monkeypatch.setattr(load_mod, "memory_budget", lambda cfg: 0)  # left on disk, as a folder too big for RAM
    monkeypatch.setattr(ImageSet, "images", property(lambda self: pytest.fail("read the whole set")))
    monkeypatch.setattr(ImageSet, "to_memory", lambda self: pytest.fail("loaded the set into RAM"))
    read_from = []
    batch = ImageSet.batch
    monkeypatch.setattr(ImageSet, "batch", lambda self, idx: read_from.append(self.mapped) or batch(self, idx))
    (result,) = evaluate_run(rotation_run, ["finetune"], finetune_settings=FinetuneSettings(
        min_steps=3, max_steps=3, batch_size=8, head_init="linear_probe"), write=False)
    assert read_from and all(read_from)
    assert len(result["from_scratch_recipes"]) == 2
    assert {"from_scratch", "raw_pixels", "random_encoder"} <= result["baselines"].keys()
