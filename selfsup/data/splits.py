"""Deterministic splits, random subsets and stratified label subsets."""
from __future__ import annotations

import torch

from selfsup.data.imageset import DataError


def holdout_split(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): ``val_size`` images (at most 10% of ``n``) held out, chosen by ``seed``."""
    val_size = min(val_size, n // 10)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def sample_indices(n: int, k: int, seed: int) -> torch.Tensor:
    """``k`` of ``n`` indices, sorted, drawn without replacement under ``seed`` (all of them when k ≥ n)."""
    if k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def parse_fraction(text: str | float) -> float | int:
    """``"1%"`` → 0.01, ``"0.1"`` → 0.1, ``"5-shot"`` / ``"5shot"`` → 5 (images per class)."""
    if isinstance(text, (int, float)):
        return float(text)
    t = str(text).strip().lower()
    try:
        if t.endswith("%"):
            value = float(t[:-1]) / 100
        elif t.endswith("shot"):
            return int(t.rstrip("shot").rstrip("-"))
        else:
            value = float(t)
    except ValueError:
        raise DataError(f"label amount {text!r} is not a fraction ('10%', '0.1') or a shot count ('5-shot')") from None
    if not 0 < value <= 1:
        raise DataError(f"label fraction must be in (0, 100%], got {text!r}")
    return value


def stratified_subset(labels: torch.Tensor, amount: float | int, seed: int, held_out: bool = False,
                      classes: list[str] | None = None) -> torch.Tensor:
    """Indices of a class-balanced subset: a fraction of each class (float) or k per class (int).

    Each class keeps ``round(fraction × its size)`` images; a class left with none is an error,
    since a probe could then never predict it. ``held_out``: the subset is set aside from the rest (a test
    split, the probe's validation images), so a class too small to give one (fewer than 3 images at 20%) gives
    none and keeps all its images on the other side: imbalanced folders with tiny classes split without error.
    ``classes``: the class names, for the errors.
    """
    g = torch.Generator().manual_seed(seed)
    name = lambda c: repr(classes[c]) if classes and 0 <= c < len(classes) else str(c)
    chosen = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        k = amount if isinstance(amount, int) else int(round(float(amount) * len(idx)))
        if k < 1 and not held_out:
            raise DataError(
                f"label fraction {amount} leaves class {name(c)} with no example ({len(idx)} images in that class); "
                "use a larger fraction or a few-shot count such as '1-shot'"
            )
        if k > len(idx):
            raise DataError(f"{k}-shot asks for more images than class {name(c)} has ({len(idx)})")
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(chosen).sort().values
