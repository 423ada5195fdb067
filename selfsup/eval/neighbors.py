"""Nearest neighbours and near-duplicate groups by cosine similarity (``selfsup neighbors``).

Exact search is a chunked matrix product in torch: (chunk, D) × (D, N) similarities at a time, so
memory stays O(chunk · N) for any collection size. When faiss is installed and the collection has
at least :data:`FAISS_MIN_SIZE` vectors, its exact inner-product index (``IndexFlatIP``) on the
l2-normalised vectors is used instead — the same answer, computed faster. Near-duplicate groups
(:func:`duplicate_groups`) are clusters in which *every* pair is at least the threshold similar
(complete linkage), measured on embeddings centred by the collection's mean; ``selfsup neighbors --duplicates``
builds them from pixel-verified pairs only (:mod:`selfsup.eval.duplicates`), from the pieces here.
"""
from __future__ import annotations

import heapq

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.data.imageset import DataError

FAISS_MIN_SIZE = 100_000
MAX_PAIRS = 5_000_000
"""Refuse thresholds so low that the pair list (and the linkage's per-pair bookkeeping, a few hundred
bytes a pair in Python) would not fit comfortably in memory."""


def _faiss(size: int, use_faiss: bool | None):
    """The faiss module when it should be used: ``use_faiss=None`` means "if installed and large"."""
    if use_faiss is False or (use_faiss is None and size < FAISS_MIN_SIZE):
        return None
    try:
        import faiss
    except ImportError:
        if use_faiss:
            raise DataError("faiss is not installed (`pip install faiss-cpu`); "
                            "the exact torch search needs nothing") from None
        return None
    return faiss


def _index(faiss, bank: Tensor):
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(np.ascontiguousarray(bank.numpy(), dtype=np.float32))
    return index


@torch.no_grad()
def cosine_topk(queries: Tensor, bank: Tensor, k: int, chunk: int = 1024,
                use_faiss: bool | None = None) -> tuple[Tensor, Tensor]:
    """Similarities (Q, k) and bank indices (Q, k) of each query's k most similar bank vectors,
    most similar first. queries (Q, D), bank (N, D); k is capped at N."""
    if queries.shape[1] != bank.shape[1]:
        raise DataError(f"queries have {queries.shape[1]} dimensions, the collection {bank.shape[1]}")
    q, b = F.normalize(queries.float(), dim=1), F.normalize(bank.float(), dim=1)
    k = min(k, b.shape[0])
    faiss = _faiss(b.shape[0], use_faiss)
    if faiss is not None:
        sims, idx = _index(faiss, b).search(np.ascontiguousarray(q.numpy(), dtype=np.float32), k)
        return torch.from_numpy(sims), torch.from_numpy(idx).long()
    out_s, out_i = [], []
    for start in range(0, q.shape[0], chunk):
        s, i = (q[start : start + chunk] @ b.T).topk(k, dim=1)
        out_s.append(s)
        out_i.append(i)
    if not out_s:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(out_s), torch.cat(out_i)


def _pairs_torch(x: Tensor, threshold: float, chunk: int) -> tuple[Tensor, Tensor]:
    """(P, 2) index pairs i < j with cos(x_i, x_j) ≥ threshold, and their (P,) similarities;
    x (N, D) is l2-normalised."""
    pairs, sims_out, total = [], [], 0
    n = x.shape[0]
    for start in range(0, n, chunk):
        sims = x[start : start + chunk] @ x.T
        rows = torch.arange(start, min(start + chunk, n))[:, None]
        hit = (sims >= threshold) & (torch.arange(n)[None] > rows)
        found = hit.nonzero()
        total += len(found)
        _check_pair_count(total, threshold)
        sims_out.append(sims[hit])  # row-major, the order of nonzero()
        found[:, 0] += start
        pairs.append(found)
    if not pairs:
        return torch.zeros(0, 2, dtype=torch.long), torch.zeros(0)
    return torch.cat(pairs), torch.cat(sims_out)


def _check_pair_count(total: int, threshold: float) -> None:
    if total > MAX_PAIRS:
        raise DataError(f"more than {MAX_PAIRS:,} image pairs are above similarity {threshold}; "
                        "raise --threshold (near-duplicates are usually ≥ 0.9 on the centred embeddings)")


def _pairs_faiss(faiss, x: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    lims, dist, idx = _index(faiss, x).range_search(np.ascontiguousarray(x.numpy(), dtype=np.float32), threshold)
    rows = np.repeat(np.arange(x.shape[0]), np.diff(lims))
    pairs = torch.from_numpy(np.stack([rows, idx.astype(np.int64)], axis=1))
    keep = pairs[:, 0] < pairs[:, 1]
    _check_pair_count(int(keep.sum()), threshold)
    return pairs[keep], torch.from_numpy(np.asarray(dist, dtype=np.float32))[keep]


def complete_linkage(pairs: Tensor, sims: Tensor) -> list[list[int]]:
    """Agglomerative clustering with complete linkage, cut at the threshold the pairs were found with.

    pairs (P, 2) and sims (P,): every pair at or above the threshold (the sparse similarity graph).
    Two clusters may merge only when every cross pair is in the graph; their linkage is the smallest
    cross similarity, and the pair of clusters with the largest linkage merges first (ties: lower
    cluster ids first, so the result is deterministic). The Lance–Williams update for complete
    linkage (the linkage to a merged cluster is the min of the two) keeps each merge local. Returns
    the clusters of ≥ 2 members.
    """
    link: dict[int, dict[int, float]] = {}
    for (i, j), s in zip(pairs.tolist(), sims.tolist()):
        link.setdefault(i, {})[j] = s
        link.setdefault(j, {})[i] = s
    heap = [(-s, i, j) for i, nbrs in link.items() for j, s in nbrs.items() if i < j]
    heapq.heapify(heap)
    members = {i: [i] for i in link}
    next_id = max(link, default=-1) + 1
    while heap:
        _, a, b = heapq.heappop(heap)
        if a not in members or b not in members:  # one side was merged since: a stale entry
            continue
        c, next_id = next_id, next_id + 1
        la, lb = link.pop(a), link.pop(b)
        for k in la:
            if k != b:
                del link[k][a]
        for k in lb:
            if k != a:
                del link[k][b]
        # A cluster linked to both halves stays linkable; one linked to only one half has a cross
        # pair below the threshold with the merged cluster and can never join it.
        merged = {k: min(la[k], lb[k]) for k in la.keys() & lb.keys()}
        for k, s in merged.items():
            link[k][c] = s
            heapq.heappush(heap, (-s, k, c))
        link[c] = merged
        members[c] = members.pop(a) + members.pop(b)
    return [sorted(m) for m in members.values() if len(m) > 1]


@torch.no_grad()
def duplicate_groups(vectors: Tensor, threshold: float = 0.95, chunk: int = 1024,
                     use_faiss: bool | None = None, centre: bool = True) -> list[list[int]]:
    """Groups of near-duplicates among vectors (N, D): clusters in which every pair has cosine
    similarity ≥ threshold. Groups have ≥ 2 members, indices ascending; largest group first, then by
    first index.

    Why complete linkage: near-duplicates of one image are all close to each other, so asking it of
    every pair loses none of them, while it stops the chaining of single linkage (connected
    components), where a ~ b ~ c ~ … joins images that are nothing alike through a path of
    similar-enough neighbours — on a real folder that put 3,851 of 4,261 images in one group. Mutual
    nearest neighbours would not chain either, but finds pairs only, not an image with two copies.

    Why centre (``centre=True``, the collection's mean feature subtracted before l2-normalising):
    pooled ReLU features are non-negative and share one large positive direction, so the raw cosine
    of *any* two images is high and a threshold separates little. The centred cosine measures how
    two images differ from the collection's average one. It needs a collection, not a pair: two
    exact copies stay at similarity 1, but a folder of only two images gives them opposite directions.
    Vectors that equal the mean (a collection of one repeated image) have no direction after centring;
    they are one group, since they equal each other.
    """
    check_threshold(threshold)
    x, at_mean = centred_unit(vectors, centre)
    pairs, sims = candidate_pairs(x, at_mean, threshold, chunk, use_faiss)
    groups = complete_linkage(pairs, sims)
    if int(at_mean.sum()) > 1:
        groups.append(at_mean.nonzero().flatten().tolist())
    return sort_groups(groups)


def check_threshold(threshold: float) -> None:
    if not -1.0 <= threshold <= 1.0:
        raise DataError(f"--threshold is a cosine similarity in [-1, 1], got {threshold}")


def centred_unit(vectors: Tensor, centre: bool = True) -> tuple[Tensor, Tensor]:
    """(x, at_mean): vectors (N, D) minus their mean (``centre``) and l2-normalised, float32 (N, D); and the
    (N,) mask of vectors that equal the mean, which have no direction after centring (their rows are zero)."""
    x = vectors.float()
    at_mean = torch.zeros(x.shape[0], dtype=torch.bool)
    if centre and x.shape[0] > 0:
        centred = x - x.mean(dim=0)
        at_mean = centred.norm(dim=1) <= 1e-6 * x.norm(dim=1).clamp_min(1e-12)
        x = centred
    return F.normalize(x, dim=1), at_mean


def candidate_pairs(x: Tensor, at_mean: Tensor, threshold: float, chunk: int = 1024,
                    use_faiss: bool | None = None) -> tuple[Tensor, Tensor]:
    """(P, 2) pairs i < j of unit vectors x (N, D) with cos ≥ threshold and their (P,) similarities, leaving out
    the vectors at the mean (``at_mean``, zero rows: similarity 0 to everything, though they equal each other)."""
    faiss = _faiss(x.shape[0], use_faiss)
    pairs, sims = _pairs_faiss(faiss, x, threshold) if faiss is not None else _pairs_torch(x, threshold, chunk)
    if at_mean.any():
        keep = ~(at_mean[pairs[:, 0]] | at_mean[pairs[:, 1]])
        pairs, sims = pairs[keep], sims[keep]
    return pairs, sims


def sort_groups(groups: list[list[int]]) -> list[list[int]]:
    """Largest group first, then by first index."""
    return sorted(groups, key=lambda g: (-len(g), g[0]))
