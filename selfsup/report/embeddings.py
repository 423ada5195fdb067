"""Pictures of an encoder's embedding: a 2-D map of test images coloured by class, and a retrieval grid.

- map: t-SNE (van der Maaten & Hinton 2008) from scikit-learn on a few thousand test embeddings,
  or UMAP (McInnes et al. 2018, arXiv:1802.03426) when ``umap-learn`` is installed and asked for;
- retrieval: for one test query per class, its top-k cosine neighbours in (part of) the training
  set, framed green when they share the query's class and red when not.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from selfsup.config import ConfigError
from selfsup.data.imageset import ImageSet
from selfsup.data.splits import sample_indices
from selfsup.monitor.features import eval_images
from selfsup.report.curves import save_figure

GOOD, BAD = "#2ca02c", "#d62728"


def umap_available() -> bool:
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


def project_2d(features: Tensor, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """(N, D) features → (N, 2) coordinates; features are l2-normalised first (the kNN geometry)."""
    x = F.normalize(features.float(), dim=1).numpy()
    if method == "umap":
        if not umap_available():
            raise ConfigError(["the UMAP map needs umap-learn (pip install umap-learn); use --map tsne instead"])
        import umap

        return umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    if method != "tsne":
        raise ConfigError([f"map method must be tsne or umap, got {method!r}"])
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    return TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x)


def plot_map(coords: np.ndarray, labels: Tensor | None, classes: Sequence[str], path: Path, title: str) -> Path:
    fig = Figure(figsize=(7.5, 6.5))
    ax = fig.subplots()
    if labels is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=4, alpha=0.7)
    else:
        y = labels.numpy()
        cmap = "tab10" if y.max() < 10 else "tab20"
        for c in np.unique(y):
            name = classes[c] if c < len(classes) else str(c)
            ax.scatter(coords[y == c, 0], coords[y == c, 1], s=4, alpha=0.7, label=name,
                       color=_colormap(cmap)(int(c) % (10 if cmap == "tab10" else 20)))
        ax.legend(fontsize=8, markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set(title=title, xticks=[], yticks=[])
    return save_figure(fig, path)


def _colormap(name: str):
    from matplotlib import colormaps

    return colormaps[name]


def pick_queries(test: ImageSet, n: int, seed: int) -> Tensor:
    """``n`` test images (all when fewer): the first of each class, so every class appears, then random
    others when there are fewer classes than ``n``; random ones without labels."""
    if test.labels is None:
        return sample_indices(len(test), n, seed)
    firsts = [int((test.labels == c).nonzero()[0]) for c in test.labels.unique().tolist()][:n]
    others = [i for i in sample_indices(len(test), n, seed).tolist() if i not in firsts]
    return torch.tensor(firsts + others[:n - len(firsts)], dtype=torch.long)


def nearest(bank: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(Q, k) cosine similarities and indices into the (N, D) ``bank`` of the (Q, D) ``queries``."""
    sim = F.normalize(queries.float(), dim=1) @ F.normalize(bank.float(), dim=1).T
    return sim.topk(min(k, bank.shape[0]), dim=1)


def _show(ax, image: Tensor) -> None:
    img = image.float().div(255)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def plot_retrieval(test: ImageSet, query_idx: Tensor, bank: ImageSet, sims: Tensor, idx: Tensor, path: Path) -> Path:
    """Rows: a query (left, blue frame) then its neighbours by decreasing cosine similarity (for clips, each a strip
    of its frames)."""
    q, k = idx.shape
    first = eval_images(test, query_idx[:1])[0]
    wide = first.shape[-1] / first.shape[-2]  # clip strips: T frames side by side
    fig = Figure(figsize=(1.15 * (k + 1) * min(wide, 4.0), 1.3 * q))
    axes = fig.subplots(q, k + 1, squeeze=False)
    for r in range(q):
        qi = int(query_idx[r])
        _show(axes[r][0], eval_images(test, [qi])[0])
        q_label = None if test.labels is None else int(test.labels[qi])
        if q_label is not None:
            axes[r][0].set_ylabel(test.classes[q_label] if q_label < len(test.classes) else str(q_label), fontsize=7)
        _frame(axes[r][0], "#1f77b4")
        for c in range(k):
            j = int(idx[r, c])
            ax = axes[r][c + 1]
            _show(ax, eval_images(bank, [j])[0])
            if q_label is not None and bank.labels is not None:
                _frame(ax, GOOD if int(bank.labels[j]) == q_label else BAD)
            ax.set_xlabel(f"{float(sims[r, c]):.2f}", fontsize=6, labelpad=1)
    axes[0][0].set_title("query", fontsize=8)
    for c in range(k):
        axes[0][c + 1].set_title(f"#{c + 1}", fontsize=8)
    return save_figure(fig, path)


def _frame(ax, color: str) -> None:
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(2.5)
