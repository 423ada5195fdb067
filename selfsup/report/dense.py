"""Pictures of the dense protocols' predictions: segmentation overlays (truth beside prediction) and detections
drawn on test images, from the examples each protocol saved beside its result (``RUN/eval_<protocol>*_examples.pt``,
written by :func:`selfsup.eval.evaluate.evaluate_run`). Draws only; nothing here trains or evaluates."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from selfsup.data.dense import IGNORE
from selfsup.report.curves import save_figure

SCORE_SHOWN = 0.3
"""Detections drawn: those scoring at least this (the scoring itself uses every detection)."""


def _palette(n: int) -> np.ndarray:
    """(n, 3) class colours in [0, 1]; the background transparent-black, others from tab20."""
    cmap = colormaps["tab20"]
    colours = np.array([cmap(i % 20)[:3] for i in range(max(n, 1))])
    colours[0] = 0
    return colours


def _grey(image: torch.Tensor) -> np.ndarray:
    """uint8 (C, H, W) → float (H, W, 3) in [0, 1]."""
    x = image.float().div(255).permute(1, 2, 0).numpy()
    return np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x


def _overlay(image: np.ndarray, mask: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """The image with each class's pixels tinted by its colour (background and ignored pixels left as they are)."""
    out = image.copy()
    shown = (mask != 0) & (mask != IGNORE)
    ids = np.clip(mask, 0, len(colours) - 1)
    out[shown] = 0.45 * image[shown] + 0.55 * colours[ids[shown]]
    out[mask == IGNORE] *= 0.5  # ignored (and letterbox padding) darkened
    return out


def plot_segmentation(examples: dict[str, torch.Tensor], classes: Sequence[str], path: Path, title: str) -> Path:
    """One row per test image: the image, its truth and the prediction over it."""
    n = len(examples["images"])
    colours = _palette(len(classes))
    fig = Figure(figsize=(6.0, 2.0 * n + 0.8))
    axes = fig.subplots(n, 3, squeeze=False)
    for i in range(n):
        image = _grey(examples["images"][i])
        for j, (name, mask) in enumerate((("image", None), ("truth", examples["truth"][i]),
                                           ("prediction", examples["prediction"][i]))):
            ax = axes[i, j]
            ax.imshow(image if mask is None else _overlay(image, mask.numpy().astype(np.int64), colours),
                      interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(name, fontsize=9)
    present = sorted({int(v) for key in ("truth", "prediction") for v in examples[key].unique().tolist()}
                     - {0, IGNORE})
    handles = [Rectangle((0, 0), 1, 1, color=colours[c]) for c in present if c < len(classes)]
    if handles:
        fig.legend(handles, [classes[c] for c in present if c < len(classes)], loc="lower center", ncol=4, fontsize=7,
                   frameon=False)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_detections(examples: dict[str, Any], classes: Sequence[str], path: Path, title: str) -> Path:
    """A grid of test images: true boxes dashed green, detections scoring ≥ :data:`SCORE_SHOWN` red with their
    class and score."""
    n = len(examples["images"])
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(2.4 * cols, 2.5 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    name = lambda c: classes[c] if 0 <= c < len(classes) else str(c)
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= n:
            continue
        ax.imshow(_grey(examples["images"][k]), interpolation="nearest")
        for (x0, y0, x1, y1) in examples["truth"][k].tolist():
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="#2ca02c", lw=1.2, ls="--"))
        for b, lab, s in zip(examples["boxes"][k].tolist(), examples["labels"][k].tolist(),
                             examples["scores"][k].tolist()):
            if s < SCORE_SHOWN:
                continue
            ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec="#d62728", lw=1.0))
            ax.text(b[0], b[1], f"{name(lab)} {s:.2f}", fontsize=5, color="white",
                    bbox={"facecolor": "#d62728", "pad": 0.5, "lw": 0})
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def dense_pictures(run_dir: Path, out: Path) -> list[tuple[Path, str]]:
    """(PNG, caption) for every dense protocol result with saved examples, in file order."""
    pictures = []
    for examples_path in sorted(run_dir.glob("eval_*_examples.pt")):
        result_path = examples_path.with_name(examples_path.name.replace("_examples.pt", ".json"))
        try:
            result = json.loads(result_path.read_text())
            examples = torch.load(examples_path, weights_only=True)
        except (OSError, ValueError, RuntimeError):
            continue
        protocol = result.get("protocol", "?")
        title = (f"{protocol} on {result.get('dataset')}, {result.get('labels')} of the labels: {result.get('metric')} "
                 f"{100 * result.get('score', float('nan')):.1f}%")
        target = out / examples_path.name.replace("_examples.pt", ".png")
        classes = result.get("classes") or [str(i) for i in range(256)]
        if protocol.startswith("segmentation"):
            pictures.append((plot_segmentation(examples, classes, target, title),
                             "Test images, their truth and the prediction (classes tinted, ignored pixels darkened)."))
        else:
            pictures.append((plot_detections(examples, classes, target, title),
                             f"True boxes dashed green; detections scoring ≥ {SCORE_SHOWN} red, with class and score."))
    return pictures
