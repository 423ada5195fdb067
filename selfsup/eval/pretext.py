"""Held-out pretext-task accuracy: how well a trained pretext method solves its own task on images it
never trained on (rotation: which of four turns; jigsaw: which permutation; relative position: which
neighbour).

The method's own training step is run in eval mode (batch-norm running statistics, no gradient) on
the test split, with the views of its recipe, and the ``pretext_acc`` it reports is averaged over the
images. Random choices (crops, puzzles) come from a fixed seed, so the figure is repeatable. The views
are made as the training loop makes them: an image folder's squashed records are cropped in each
original's pixel space (their ``aspect``), so the task is judged on the images it was trained on, not
on squashed ones; each batch is read with ``ImageSet.batch``, so a file-backed set is never loaded whole.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from selfsup.data import ImageSet, load_dataset
from selfsup.methods import get_method
from selfsup.monitor.features import eval_mode
from selfsup.methods.base import Progress
from selfsup.train.build import view_recipe
from selfsup.train.rundir import load_method, load_run
from selfsup.views import ViewRecipe, make_views


def pretext_accuracy(method: nn.Module, images: ImageSet, recipe: ViewRecipe, mean: Sequence[float],
                     std: Sequence[float], device: torch.device | str = "cpu", batch_size: int = 512,
                     seed: int = 0) -> float | None:
    """Mean ``pretext_acc`` of ``method.training_step`` over ``images``; None when the method reports
    no pretext accuracy (it is not a pretext-task classifier)."""
    if len(images) == 0:
        raise ValueError("pretext accuracy needs at least one image")
    device = torch.device(device)
    correct, seen = 0.0, 0
    done = Progress(step=1, total_steps=1, epoch=0, steps_per_epoch=1)  # a trained model: schedules at their end
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(method), \
            torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, len(images), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(images)))
            batch = images.batch(idx).to(device, non_blocking=True)
            _, logs = method.training_step(make_views(batch, recipe, mean, std, images.aspect_at(idx)), done)
            if "pretext_acc" not in logs:
                return None
            correct += float(logs["pretext_acc"]) * batch.shape[0]
            seen += batch.shape[0]
    return correct / seen


def held_out_pretext_accuracy(run_dir: str | Path, device: torch.device | str = "cpu") -> float | None:
    """A pretext run's accuracy on its own task over the test split of its dataset (the train split
    when there is no test split), with its training views and its seed; None for other methods."""
    run = load_run(run_dir, device)
    train, test = load_dataset(run.cfg.data.labelled())
    images = test if len(test) else train
    recipe = view_recipe(run.cfg, get_method(run.cfg.method.name).spec, images.image_size)
    return pretext_accuracy(load_method(run, run_dir, device), images, recipe, run.meta["mean"], run.meta["std"],
                            device, seed=run.cfg.train.seed)
