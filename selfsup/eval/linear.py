"""Linear probe: multinomial logistic regression on frozen, standardised features.

Trained full-batch with L-BFGS in torch. The L2 strength is chosen on a stratified 10% of the
training features from a small grid, then the probe is refit on all of them (the protocol of
Kolesnikov et al. 2019, arXiv:1901.09005, and SimCLR's appendix B.6, in miniature).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.data.splits import stratified_subset

L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2)
# L-BFGS iterations: the refit on all features runs to convergence (on 60,000 × 512 SimCLR features the
# test accuracy moves by ≤ 0.05 points from 300 to 1,000 iterations, but by up to 0.4 from 100 to 300);
# the validation fits that only rank the L2 strengths stop earlier.
FIT_ITERATIONS, SELECT_ITERATIONS = 300, 100


def _standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def fit_logistic(x: Tensor, y: Tensor, num_classes: int, l2: float, max_iter: int = 100) -> tuple[Tensor, Tensor]:
    """Weights (D, C) and bias (C,) minimising mean cross-entropy + l2·‖W‖²/2."""
    x = x.float()
    # the weight is held as (C, D) for F.linear, whose weight gradient is grad.T @ x: on MKL that is
    # 10-40x faster than the x.T @ grad of ``x @ w`` for tall x (measured, 60000 × 784 pixels)
    w = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(F.linear(x, w, b), y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().T.contiguous(), b.detach()


def predict(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return (x.float() @ w + b).argmax(dim=1)


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int,
                 l2_grid: tuple[float, ...] = L2_GRID, seed: int = 0) -> dict:
    """Accuracy on the test features and the chosen L2 strength."""
    train_x, test_x = _standardise(train_x.float(), test_x.float())
    best_l2 = l2_grid[0]
    if len(l2_grid) > 1 and len(train_y) >= 10 * num_classes:
        val = stratified_subset(train_y, 0.1, seed)
        keep = torch.ones(len(train_y), dtype=torch.bool)
        keep[val] = False
        scores = []
        for l2 in l2_grid:
            w, b = fit_logistic(train_x[keep], train_y[keep], num_classes, l2, max_iter=SELECT_ITERATIONS)
            scores.append(float((predict(train_x[val], w, b) == train_y[val]).float().mean()))
        best_l2 = l2_grid[max(range(len(scores)), key=lambda i: (scores[i], i))]
    w, b = fit_logistic(train_x, train_y, num_classes, best_l2, max_iter=FIT_ITERATIONS)
    acc = float((predict(test_x, w, b) == test_y).float().mean())
    return {"accuracy": acc, "l2": best_l2}
