"""Weighted k-nearest-neighbour classification on cosine similarity.

Wu et al. 2018 (arXiv:1805.01978) §3.4, as used by DINO (arXiv:2104.14294): the k most similar bank
features vote for their class with weight exp(similarity / T); k = 20, T = 0.07 by default.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_predict(bank: Tensor, bank_labels: Tensor, queries: Tensor, num_classes: int, k: int = 20,
                temperature: float = 0.07, chunk: int = 1024) -> Tensor:
    """Predicted labels (Q,) for queries (Q, D) given bank features (N, D) and labels (N,)."""
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    preds = []
    for start in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[start : start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, bank_labels[idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def knn_accuracy(bank: Tensor, bank_labels: Tensor, queries: Tensor, query_labels: Tensor, num_classes: int,
                 k: int = 20, temperature: float = 0.07) -> float:
    pred = knn_predict(bank, bank_labels, queries, num_classes, k, temperature)
    return float((pred == query_labels).float().mean()) if len(query_labels) else float("nan")
