"""Nearest neighbours and near-duplicate groups by cosine similarity (``selfsup neighbors``).

Exact search is a chunked matrix product in torch: (chunk, D) × (D, N) similarities at a time, so
memory stays O(chunk · N) for any collection size. When faiss is installed and the collection has
at least :data:`FAISS_MIN_SIZE` vectors, its exact inner-product index (``IndexFlatIP``) on the
l2-normalised vectors is used instead — the same answer, computed faster. Near-duplicate groups
are the connected components of the graph joining every pair with similarity ≥ the threshold.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.data.imageset import DataError

FAISS_MIN_SIZE = 100_000
MAX_PAIRS = 20_000_000
"""Refuse thresholds so low that the pair list would not fit comfortably in memory."""


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


def _pairs_torch(x: Tensor, threshold: float, chunk: int) -> Tensor:
    """(P, 2) index pairs i < j with cos(x_i, x_j) ≥ threshold."""
    pairs, total = [], 0
    n = x.shape[0]
    for start in range(0, n, chunk):
        sims = x[start : start + chunk] @ x.T
        rows = torch.arange(start, min(start + chunk, n))[:, None]
        hit = (sims >= threshold) & (torch.arange(n)[None] > rows)
        found = hit.nonzero()
        total += len(found)
        if total > MAX_PAIRS:
            raise DataError(f"more than {MAX_PAIRS:,} image pairs are above similarity {threshold}; "
                            "raise --threshold (near-duplicates are usually ≥ 0.95)")
        found[:, 0] += start
        pairs.append(found)
    return torch.cat(pairs) if pairs else torch.zeros(0, 2, dtype=torch.long)


def _pairs_faiss(faiss, x: Tensor, threshold: float) -> Tensor:
    lims, _, idx = _index(faiss, x).range_search(np.ascontiguousarray(x.numpy(), dtype=np.float32), threshold)
    rows = np.repeat(np.arange(x.shape[0]), np.diff(lims))
    pairs = torch.from_numpy(np.stack([rows, idx.astype(np.int64)], axis=1))
    return pairs[pairs[:, 0] < pairs[:, 1]]


def _components(n: int, pairs: Tensor) -> Tensor:
    """Component label (n,) of each node; union-find with path halving over the edge list."""
    parent = list(range(n))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, j in pairs.tolist():
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return torch.tensor([root(i) for i in range(n)], dtype=torch.long)


@torch.no_grad()
def duplicate_groups(vectors: Tensor, threshold: float = 0.95, chunk: int = 1024,
                     use_faiss: bool | None = None) -> list[list[int]]:
    """Groups (≥ 2 members, indices ascending) of vectors (N, D) linked by cosine similarity ≥ threshold,
    transitively (connected components); largest group first, then by first index."""
    if not -1.0 <= threshold <= 1.0:
        raise DataError(f"--threshold is a cosine similarity in [-1, 1], got {threshold}")
    x = F.normalize(vectors.float(), dim=1)
    n = x.shape[0]
    faiss = _faiss(n, use_faiss)
    pairs = _pairs_faiss(faiss, x, threshold) if faiss is not None else _pairs_torch(x, threshold, chunk)
    labels = _components(n, pairs)
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(labels.tolist()):
        groups.setdefault(c, []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))
