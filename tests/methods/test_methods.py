"""Every registered method, parametrised over the registry (as timm's tests/test_models.py).

Checks: a finite loss; every trainable parameter gets a gradient and no teacher parameter does;
EMA teachers follow θ_t ← m·θ_t + (1 − m)·θ_s; a few optimiser steps on a fixed batch lower the loss.

A method's ``spec`` names its default backbone (e.g. a ViT for masked methods), its small test settings and
its test input channels; the tiny settings for each backbone come from ``conftest.TINY_BACKBONES``. Methods
are driven as the loop drives them: ``make_progress`` evaluates their schedules, ``run_after_step`` and
``update_teachers`` follow each optimiser step.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import TINY_BACKBONES
from selfsup.methods import METHODS
from selfsup.methods.base import Method, make_progress, run_after_step, teacher_pairs
from selfsup.nn.backbones import build_backbone
from selfsup.nn.ema import update_teachers
from selfsup.views import make_views, resolve_sizes
from selfsup.views.clips import make_clip_views, resolve_clip_sizes

IMAGE_SIZE, BATCH = 16, 16
RECORD_FRAMES = 16
"""Frames of the tests' clip records (clip methods); more where a method's views span more."""


def takes_clips(name: str) -> bool:
    return METHODS[name].spec.inputs == "clips"


def record_frames(method) -> int:
    return max(RECORD_FRAMES, method.spec.views.span) if method.spec.inputs == "clips" else 0


def tiny_method(name: str, in_chans: int = 1):
    cls = METHODS[name].cls
    bb_name = cls.spec.default_backbone or "small_resnet"
    backbone = build_backbone(bb_name, in_chans, IMAGE_SIZE, **TINY_BACKBONES.get(bb_name, {}))
    return cls(backbone, **cls.spec.test_params)


def tiny_recipe(method):
    """The method's views at the tests' image size; local crops of a ViT method snapped to a multiple of the patch
    size (the paper's 96/224 of 16 px is 7, which patch 4 does not divide; a run gets a clear error instead)."""
    recipe = resolve_sizes(method.spec.views, IMAGE_SIZE)
    p = getattr(method.backbone, "patch_size", None)
    if recipe.local_crops and isinstance(p, int) and recipe.local.size % p:
        recipe = dataclasses.replace(recipe, local=dataclasses.replace(recipe.local, size=max(p, recipe.local.size // p * p)))
    return recipe


def fixed_views(method, images: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    """The views, and the extra ``training_step`` arguments the loop passes with them: ``boxes=`` for a method
    whose ``spec.needs_view_boxes``. A clip method's views come from clip records made of the images (a digit
    moving one pixel a frame, :func:`moving_records`)."""
    if method.spec.inputs == "clips":
        frames = record_frames(method)
        recipe = resolve_clip_sizes(method.spec.views, IMAGE_SIZE, frames)
        torch.manual_seed(1)
        channels = images.shape[1]
        return make_clip_views(moving_records(images, frames), recipe, [0.5] * channels, [0.25] * channels), {}
    recipe = tiny_recipe(method)
    torch.manual_seed(1)
    views, boxes = make_views(images, recipe, [0.5] * images.shape[1], [0.25] * images.shape[1], with_boxes=True)
    return views, ({"boxes": boxes} if method.spec.needs_view_boxes else {})


def tiny_batch(digits, in_chans: int = 1) -> torch.Tensor:
    train, _ = digits
    x = torch.nn.functional.interpolate(train.images[:BATCH].float(), size=IMAGE_SIZE, mode="bilinear")
    x = x.round().clamp(0, 255).to(torch.uint8)
    return x.repeat(1, in_chans, 1, 1)


def moving_records(images: torch.Tensor, frames: int) -> torch.Tensor:
    """uint8 (B, C, S, S) → clip records (B, L·C, S, S): image b moving right (b even) or down (b odd) one pixel a
    frame, wrapping around."""
    b = images.shape[0]
    shifted = [torch.where((torch.arange(b) % 2 == 0).view(b, 1, 1, 1), images.roll(t, dims=-1), images.roll(t, dims=-2))
               for t in range(frames)]
    return torch.stack(shifted, 1).flatten(1, 2).contiguous()


def _in_chans(name: str) -> int:
    return METHODS[name].spec.test_in_chans


@pytest.mark.parametrize("name", sorted(METHODS))
def test_loss_finite_and_gradients_reach_student_only(name, digits):
    method = tiny_method(name, _in_chans(name))
    views, extra = fixed_views(method, tiny_batch(digits, _in_chans(name)))
    loss, logs = method.training_step(views, make_progress(method, 0, 100, 0, 10), **extra)
    assert loss.ndim == 0 and torch.isfinite(loss), f"{name}: loss {loss}"
    loss.backward()
    teacher_ids = {id(p) for t, _ in teacher_pairs(method) for p in t.parameters()}
    missing = [n for n, p in method.named_parameters() if p.requires_grad and id(p) not in teacher_ids
               and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
    assert not missing, f"{name}: no gradient reached {missing}"
    leaked = [n for n, p in method.named_parameters() if id(p) in teacher_ids and (p.requires_grad or p.grad is not None)]
    assert not leaked, f"{name}: teacher parameters take gradients: {leaked}"
    if "z" in logs:
        assert logs["z"].ndim == 2 and not logs["z"].requires_grad


@pytest.mark.parametrize("name", sorted(METHODS))
def test_ema_follows_formula(name, digits):
    method = tiny_method(name, _in_chans(name))
    pairs = teacher_pairs(method)
    if not pairs:
        pytest.skip(f"{name} has no EMA teacher")
    views, extra = fixed_views(method, tiny_batch(digits, _in_chans(name)))
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    progress = make_progress(method, 3, 100, 0, 10)
    loss, logs = method.training_step(views, progress, **extra)
    loss.backward()
    opt.step()
    before = [[p.detach().clone() for p in t.parameters()] for t, _ in pairs]
    m = progress.value("teacher_momentum")
    assert 0 < m < 1
    run_after_step(method, progress, logs)
    update_teachers(pairs, m)
    for (teacher, student), old in zip(pairs, before):
        for t_new, t_old, s in zip(teacher.parameters(), old, student.parameters()):
            torch.testing.assert_close(t_new, m * t_old + (1 - m) * s.detach())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_few_steps_lower_the_loss(name, digits):
    method = tiny_method(name, _in_chans(name))
    views, extra = fixed_views(method, tiny_batch(digits, _in_chans(name)))
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3, weight_decay=0)
    losses = []
    for step in range(12):
        progress = make_progress(method, step, 1000, 0, 100)
        torch.manual_seed(step)  # methods that draw masks or crops draw the same ones each run
        loss, logs = method.training_step(views, progress, **extra)
        opt.zero_grad()
        loss.backward()
        opt.step()
        run_after_step(method, progress, logs)
        if teacher_pairs(method):
            update_teachers(teacher_pairs(method), progress.value("teacher_momentum"))
        losses.append(float(loss.detach()))
    assert min(losses[-3:]) < losses[0], f"{name}: loss did not go down: {losses}"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_declares_contract(name):
    info = METHODS[name]
    cls = info.cls
    assert cls.spec.views.num_views >= 1 and cls.spec.min_batch_size >= 1
    assert info.paper and "arXiv" in info.paper or "doi" in info.paper.lower() or info.family == "pretext"
    method = tiny_method(name, _in_chans(name))
    assert isinstance(method, Method)  # the Protocol: spec, backbone, forward, training_step
    assert not [k for k in vars(method) if k.startswith("_") and not k.startswith("__") and k not in nn_module_fields()], \
        f"{name}: private attributes outside nn.Module's own (state passed between calls?)"
    clip = (method.spec.views.clip_len,) if takes_clips(name) else ()
    x = torch.randn(4, _in_chans(name), *clip, IMAGE_SIZE, IMAGE_SIZE)
    method.eval()
    assert method(x).shape == (4, method.backbone.num_features)


def nn_module_fields() -> set[str]:
    return set(vars(torch.nn.Module()))


@pytest.mark.parametrize("name", sorted(n for n, m in METHODS.items()
                                         if m.spec.inputs == "images" and not m.spec.views.local_crops))
def test_fixed_view_methods_refuse_local_crops(name):
    """A method that compares a fixed set of views is never handed extra crops it would ignore."""
    from selfsup.config import ConfigError, load_config
    from selfsup.train.build import view_recipe

    cfg = load_config(None, {"method.name": name, "views.local_crops": 2})
    with pytest.raises(ConfigError, match="no local crops"):
        view_recipe(cfg, METHODS[name].spec, 28)
