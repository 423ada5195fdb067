"""Reconstruction pictures for masked image modelling: inputs, masked inputs, reconstructions.

A method that defines ``reconstruct(x) -> (masked_input, reconstruction)`` on normalised images
(B, C, H, W) (MAE, SimMIM) gets a PNG grid in its run directory, in the style of MAE's figures
(He et al. 2021, arXiv:2111.06377, fig. 2): one column per image, rows input / masked / reconstruction.
A method that reconstructs clips (B, C, T, H, W) (VideoMAE) gets frame strips instead: each clip's T frames side by
side, three rows per clip.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from selfsup.monitor.features import eval_mode
from selfsup.report.curves import save_figure
from selfsup.views import normalize, to_float

FILENAME = "reconstructions.png"


def unnormalize(x: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    """Normalised images back to pixels in [0, 1] (clamped); without ``mean``/``std`` only clamped."""
    if mean is not None and std is not None:
        shape = (1, -1) + (1,) * (x.ndim - 2)  # images (B, C, H, W) or clips (B, C, T, H, W)
        m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(shape)
        s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(shape)
        x = x * s + m
    return x.clamp(0, 1)


def model_inputs(model: nn.Module, images: Tensor, mean: Sequence[float] | None,
                 std: Sequence[float] | None) -> tuple[Tensor, Tensor]:
    """A few uint8 or [0, 1] images on the model's device: (as floats in [0, 1], normalised with the
    dataset's ``mean``/``std`` as training views are — or unchanged without them)."""
    x = to_float(images.to(next(model.parameters()).device))
    return x, (normalize(x, mean, std) if mean is not None and std is not None else x).contiguous()


def save_reconstruction_grid(rows: Sequence[Tensor], labels: Sequence[str], path: str | Path,
                             title: str | None = None) -> Path:
    """Save rows of (N, C, H, W) images in [0, 1] (C = 1 or 3) as one PNG grid, a label per row (a column as wide
    as its images are: frame strips get room)."""
    n = rows[0].shape[0]
    wide = rows[0].shape[-1] / rows[0].shape[-2]
    fig = Figure(figsize=(1.2 * n * wide, 1.3 * len(rows)))
    axes = fig.subplots(len(rows), n, squeeze=False)
    for r, (images, label) in enumerate(zip(rows, labels)):
        for i in range(n):
            img = images[i].detach().float().cpu()
            ax = axes[r][i]
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


@torch.no_grad()
def save_method_pictures(model: nn.Module, images: Tensor, run_dir: str | Path, mean: Sequence[float] | None = None,
                         std: Sequence[float] | None = None, seed: int = 0) -> Path | None:
    """``run_dir/reconstructions.png`` for a method with ``reconstruct``; ``None`` (nothing written) otherwise.
    A method's optional ``reconstruction_note`` (str) is added to the title.

    ``images``: a few (N, C, H, W) images (or (N, C, T, H, W) clips), uint8 or floats in [0, 1], normalised here with the
    dataset's ``mean``/``std`` (as training views are). The masks are drawn under ``seed`` so the
    picture is reproducible; the model's train/eval mode and the global RNG state are restored.
    """
    if not hasattr(model, "reconstruct"):
        return None
    x, x_in = model_inputs(model, images, mean, std)
    with eval_mode(model), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        masked, recon = model.reconstruct(x_in)
    rows = [x.cpu(), unnormalize(masked.float().cpu(), mean, std), unnormalize(recon.float().cpu(), mean, std)]
    labels = ["input", "masked", "reconstruction"]
    name = getattr(model, "method_name", type(model).__name__)
    title = f"{name}: hidden patches reconstructed, visible patches pasted back"
    if x.ndim == 5:  # clips: three strips per clip, its frames side by side
        rows = [frame_strip(r[i : i + 1]) for i in range(x.shape[0]) for r in rows]
        labels = [f"clip {i + 1}: {label}" if j == 0 else label for i in range(x.shape[0]) for j, label in enumerate(labels)]
        title = f"{name}: hidden tubes reconstructed\n(visible tubes pasted back; frames left to right)"
    if getattr(model, "reconstruction_note", None):
        title += f"\n({model.reconstruction_note})"
    return save_reconstruction_grid(rows, labels, Path(run_dir) / FILENAME, title=title)


def frame_strip(clips: Tensor) -> Tensor:
    """(B, C, T, H, W) → (B, C, H, T·W): a clip's frames side by side."""
    return clips.permute(0, 1, 3, 2, 4).flatten(3)
