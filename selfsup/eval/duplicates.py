"""Near-duplicate groups a user can trust (``selfsup neighbors --duplicates``): embedding candidates, pixel-verified.

1. Candidates: pairs whose embeddings (centred by the folder's mean, :func:`selfsup.eval.neighbors.centred_unit`)
   have cosine similarity ≥ the threshold — a number, or ``auto``: calibrated on the folder's own distribution of
   each image's nearest-neighbour similarity (:func:`auto_threshold`), since what "very similar" means depends on
   the encoder (a weak one puts most images near each other).
2. Verification: each candidate pair must also look alike in pixels (:mod:`selfsup.eval.pixel_check`); an encoder
   that learnt little or collapsed proposes many unrelated pairs, and these fail here.
3. Groups: complete linkage over the verified pairs only (:func:`selfsup.eval.neighbors.complete_linkage`).

What the embedding alone would have grouped is kept beside the result, so the command can say how much the pixel
check removed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from selfsup.data.imageset import DataError, ImageSet
from selfsup.eval.neighbors import (MAX_PAIRS, candidate_pairs, centred_unit, check_threshold, complete_linkage, cosine_topk,
                                    sort_groups)
from selfsup.eval.pixel_check import PixelCheck, verify_pairs

AUTO_QUANTILE = 0.1
"""``--threshold auto`` with the pixel check: this quantile of the images' nearest-neighbour similarities."""
AUTO_FENCE = 3.0
"""``--threshold auto`` without it: Q3 + this × IQR of the same (Tukey's far-out fence), capped at :data:`AUTO_CAP`."""
AUTO_CAP = 0.9999
AUTO_RULE_VERIFIED = ("the 10th percentile of each image's nearest-neighbour similarity: nine images in ten get a "
                      "candidate, and the pixel check judges each")
AUTO_RULE_EMBEDDING = ("Q3 + 3 × IQR of each image's nearest-neighbour similarity (capped at 0.9999): only "
                       "outliers, as nothing else checks the embedding")
"""The rules of ``--threshold auto`` in words, as the help and the output state them."""


@dataclass
class AutoThreshold:
    threshold: float
    quartiles: tuple[float, float, float]
    """(Q1, median, Q3) of the nearest-neighbour similarities."""
    rule: str

    def describe(self) -> str:
        q1, q2, q3 = self.quartiles
        return (f"auto: {self.threshold:.4f} = {self.rule}; nearest-neighbour similarity quartiles "
                f"{q1:.4f} / {q2:.4f} / {q3:.4f}")


@dataclass
class DuplicateResult:
    groups: list[list[int]]
    """Verified groups (≥ 2 members, indices ascending), largest first."""
    threshold: float
    auto: AutoThreshold | None
    candidate_pairs: int
    """Pairs at or above the threshold on the embeddings."""
    failed_pairs: int
    """Candidate pairs whose images do not look alike (0 without a pixel check)."""
    embedding_groups: list[list[int]] = field(default_factory=list)
    """The groups the embedding alone gives (all candidate pairs)."""
    check: PixelCheck | None = None

    def describe_threshold(self) -> str:
        return self.auto.describe() if self.auto else f"{self.threshold:g}"


@torch.no_grad()
def nearest_similarity(x: Tensor, at_mean: Tensor, chunk: int = 1024, use_faiss: bool | None = None) -> Tensor:
    """(N,) each unit vector's largest cosine similarity to another row of x (N, D); vectors at the mean (zero rows)
    get 1, the similarity of the equal vectors they are."""
    sims, idx = cosine_topk(x, x, 2, chunk, use_faiss)
    if x.shape[0] < 2:
        return torch.ones(x.shape[0])
    own = idx[:, 0] == torch.arange(x.shape[0])  # an exact copy may rank before the image itself
    best = torch.where(own, sims[:, 1], sims[:, 0])
    return torch.where(at_mean, torch.ones_like(best), best)


def auto_threshold(x: Tensor, at_mean: Tensor, verified: bool = True, use_faiss: bool | None = None) -> AutoThreshold:
    """The cosine threshold of ``--threshold auto`` for unit vectors x (N, D), from the distribution of each image's
    nearest-neighbour similarity — the folder's own scale, since a weak encoder puts most images near each other
    and a good one spreads them, so that a fixed number is too low for one and too high for the other.

    ``verified`` (a pixel check follows): the 10th percentile (:data:`AUTO_QUANTILE`); nine images in ten get at
    least one candidate. The embedding then only proposes and the pixels decide, so the bar is set for recall:
    measured on 1,165 clip-art images with 120 planted groups (``benchmarks/duplicates/``), a copy's embedding is
    often no closer than an unrelated image's (36-step encoder: at 0.95, 16,512 candidate pairs of which 149
    planted), no unrelated pair passed the pixel check at any threshold tried, and lower thresholds only found more
    copies: planted pairs recalled 0.72 / 0.86 / 0.95 / 0.99 at the median / Q1 / 10th / 5th percentile, against
    0.71 at 0.95 and 0.56 at 0.98. The 10th percentile costs 3× Q1's candidates (160,812 pairs, 10 s with the check,
    for the 36-step encoder; 24,307 for a 360-step one) and, being a quantile of nearest-neighbour similarities,
    grows with the folder about linearly rather than with its square.

    Not ``verified``: Tukey's far-out fence, Q3 + 3 × (Q3 − Q1), capped at :data:`AUTO_CAP` — only similarities
    far above the bulk, which copies' are when they are a minority. Nothing else checks the pairs, so this is the
    conservative choice, and it can be very conservative: with a quarter of the clip-art folder in planted groups
    the quartiles lie among the copies, the fence reached its cap, and only the 25 nearly exact pairs were kept
    (precision 1, recall 0.12; the 1.5 × IQR fence and a median + 3.5 MAD rule did the same). A folder with many
    copies needs the pixel check, or a number.
    """
    if x.shape[0] < 4:
        raise DataError(f"--threshold auto needs at least 4 images to calibrate on, the folder has {x.shape[0]}; "
                        "give a number (e.g. --threshold 0.95)")
    nn = nearest_similarity(x, at_mean, use_faiss=use_faiss)
    q1, q2, q3 = torch.quantile(nn.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    if verified:
        value = float(torch.quantile(nn.double(), AUTO_QUANTILE))
        return AutoThreshold(value, (q1, q2, q3), AUTO_RULE_VERIFIED)
    return AutoThreshold(min(q3 + AUTO_FENCE * (q3 - q1), AUTO_CAP), (q1, q2, q3), AUTO_RULE_EMBEDDING)


def _at_mean_pairs(at_mean: Tensor) -> Tensor:
    """(P, 2) every pair of vectors at the mean: equal embeddings, similarity 1, for the pixel check to judge."""
    members = at_mean.nonzero().flatten()
    if len(members) * (len(members) - 1) // 2 > MAX_PAIRS:
        raise DataError(f"{len(members):,} images have the same embedding (the folder's mean): the encoder collapsed; "
                        "these cannot all be compared in pixels. Train a working encoder first")
    return torch.combinations(members, 2) if len(members) > 1 else torch.zeros(0, 2, dtype=torch.long)


@torch.no_grad()
def find_duplicates(vectors: Tensor, threshold: float | str = "auto", images: ImageSet | None = None,
                    check: PixelCheck | None = PixelCheck(), use_faiss: bool | None = None) -> DuplicateResult:
    """Near-duplicate groups among vectors (N, D), the embeddings of ``images`` (same order).

    ``threshold``: a cosine similarity in [-1, 1] on the centred embeddings, or ``"auto"`` (:func:`auto_threshold`).
    ``check``: the pixel check every candidate pair must pass (``images`` needed), or None for the embedding alone.
    """
    if check is not None and images is None:
        raise ValueError("a pixel check needs the images")
    if images is not None and len(images) != vectors.shape[0]:
        raise ValueError(f"{vectors.shape[0]} embeddings for {len(images)} images")
    x, at_mean = centred_unit(vectors)
    auto = None
    if threshold == "auto":
        auto = auto_threshold(x, at_mean, check is not None, use_faiss)
        value = auto.threshold
    elif isinstance(threshold, str):
        raise DataError(f"--threshold is a cosine similarity in [-1, 1] or auto, got {threshold!r}")
    else:
        value = float(threshold)
        check_threshold(value)
    pairs, sims = candidate_pairs(x, at_mean, value, use_faiss=use_faiss)
    extra = _at_mean_pairs(at_mean)
    pairs, sims = torch.cat([pairs, extra]), torch.cat([sims, torch.ones(len(extra))])
    embedding_groups = sort_groups(complete_linkage(pairs, sims))
    if check is None:
        return DuplicateResult(embedding_groups, value, auto, len(pairs), 0, embedding_groups, None)
    passed, _ = verify_pairs(images, pairs, check)
    groups = sort_groups(complete_linkage(pairs[passed], sims[passed]))
    return DuplicateResult(groups, value, auto, len(pairs), int((~passed).sum()), embedding_groups, check)


def parse_threshold(text: str) -> float | str:
    """``--threshold``: ``auto`` or a number in [-1, 1]."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"--threshold is a cosine similarity in [-1, 1] or auto, got {text!r}") from None
    check_threshold(value)
    return value


def _criterion(res: DuplicateResult) -> str:
    text = (f"every pair in a group at cosine similarity ≥ {res.describe_threshold()} on embeddings centred by the "
            "folder's mean")
    return text + (f", and its {res.check.describe()}" if res.check else ", by the embedding alone (no pixel check)")


def _pixel_line(res: DuplicateResult) -> str | None:
    """What the pixel check removed, in one line (None without one)."""
    if res.check is None:
        return None
    largest = max(map(len, res.embedding_groups), default=0)
    line = (f"pixel check: {res.failed_pairs:,} of {res.candidate_pairs:,} candidate pairs failed it; by the embedding "
            f"alone there would be {len(res.embedding_groups)} group(s), the largest of {largest} images")
    if res.candidate_pairs and res.failed_pairs > res.candidate_pairs - res.failed_pairs:
        line += " — most images the embedding calls alike do not look alike"
    return line


def result_json(res: DuplicateResult, paths: list[str], skipped: int, warning: str | None) -> dict:
    """What ``neighbors --duplicates --json`` prints."""
    return {"threshold": res.threshold, "threshold_rule": res.auto.rule if res.auto else "given",
            "criterion": _criterion(res), "pixel_check": res.check.describe() if res.check else None,
            "candidate_pairs": res.candidate_pairs, "failed_pixel_check": res.failed_pairs,
            "embedding_only_groups": len(res.embedding_groups),
            "embedding_only_largest": max(map(len, res.embedding_groups), default=0),
            "images": len(paths), "skipped": skipped, "warning": warning,
            "groups": [[paths[i] for i in g] for g in res.groups]}


def result_text(res: DuplicateResult, paths: list[str], note: str = "") -> str:
    """What ``neighbors --duplicates`` prints: a summary line, the criterion, what the pixel check removed, the
    groups."""
    lines = [f"{len(res.groups)} group(s) of near-duplicates among {len(paths)} images{note}: {_criterion(res)}"]
    pixel = _pixel_line(res)
    if pixel:
        lines.append(pixel)
    for n, group in enumerate(res.groups, 1):
        lines.append(f"group {n} ({len(group)} images):")
        lines += [f"  {paths[i]}" for i in group]
    return "\n".join(lines) + "\n"
