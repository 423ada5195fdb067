"""SwAV and DeepCluster-v2 (arXiv:2006.09882): Sinkhorn–Knopp against the paper's Algorithm 1, its marginals
and invariances; swapped prediction and the DeepCluster cross-entropy against naive loops, with gradcheck;
k-means on separable data; the sample memory; and errors for impossible settings."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.config import ConfigError, config_from_dict
from selfsup.losses.clustering import deepcluster_loss, sinkhorn_knopp, spherical_kmeans, swav_loss
from selfsup.methods import METHODS
from selfsup.methods.base import Progress, finish_step
from selfsup.nn.backbones import build_backbone
from selfsup.train.build import build_method, check_run, view_recipe

DT = torch.float64


def naive_sinkhorn(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """Algorithm 1 of arXiv:2006.09882 with explicit loops: Q is K×B; rows → 1/K, columns → 1/B."""
    q = torch.exp(scores / eps).T.clone()
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iters):
        for i in range(k):
            q[i] = q[i] / q[i].sum() / k
        for j in range(b):
            q[:, j] = q[:, j] / q[:, j].sum() / b
    for j in range(b):
        q[:, j] = q[:, j] / q[:, j].sum()
    return q.T


@pytest.mark.parametrize("b,k,eps,iters", [(8, 5, 0.05, 3), (4, 10, 0.1, 1), (16, 3, 0.05, 10), (6, 6, 0.5, 3)])
def test_sinkhorn_matches_paper_algorithm(b, k, eps, iters):
    scores = F.normalize(torch.randn(b, 7, dtype=DT), dim=1) @ F.normalize(torch.randn(k, 7, dtype=DT), dim=1).T
    torch.testing.assert_close(sinkhorn_knopp(scores, eps, iters), naive_sinkhorn(scores, eps, iters))


def test_sinkhorn_marginals():
    b, k = 12, 4
    scores = torch.randn(b, k, dtype=DT) * 0.5
    q3 = sinkhorn_knopp(scores, 0.05, 3)
    torch.testing.assert_close(q3.sum(1), torch.ones(b, dtype=DT))  # each sample's code is a distribution
    assert (q3 >= 0).all()
    # Before the final row normalisation the prototype marginals are exactly B/K: iteration 3 is
    # "columns to B/K, then rows to 1" applied to the output of iteration 2.
    q2 = sinkhorn_knopp(scores, 0.05, 2)
    pre = q2 / q2.sum(0, keepdim=True) * (b / k)
    torch.testing.assert_close(pre.sum(0), torch.full((k,), b / k, dtype=DT))
    torch.testing.assert_close(pre / pre.sum(1, keepdim=True), q3)
    # Run to convergence (well-conditioned: exp(S/ε) within e^±2), both marginals hold at once (equipartition).
    q = sinkhorn_knopp(torch.rand(b, k, dtype=DT) * 0.2 - 0.1, 0.05, 200)
    torch.testing.assert_close(q.sum(0), torch.full((k,), b / k, dtype=DT), atol=1e-6, rtol=0)


def test_sinkhorn_invariances_and_analytic_cases():
    scores = torch.randn(10, 6, dtype=DT) * 0.3
    q = sinkhorn_knopp(scores, 0.05, 3)
    # A constant per prototype (a column scaling of exp(S/ε)) is absorbed by the first normalisation.
    torch.testing.assert_close(sinkhorn_knopp(scores + torch.randn(1, 6, dtype=DT), 0.05, 3), q)
    torch.testing.assert_close(sinkhorn_knopp(scores + 3.0, 0.05, 3), q)
    # gather=True on one process is the single-process computation.
    torch.testing.assert_close(sinkhorn_knopp(scores, 0.05, 3, gather=True), q)
    # Equal scores: every sample spread evenly over the prototypes.
    torch.testing.assert_close(sinkhorn_knopp(torch.zeros(5, 4, dtype=DT)), torch.full((5, 4), 0.25, dtype=DT))
    # Large scores stay finite (exp is shifted by the maximum), and float32 is kept for half inputs.
    big = sinkhorn_knopp(torch.randn(8, 5) * 100, 0.05, 3)
    assert torch.isfinite(big).all()
    assert sinkhorn_knopp(torch.randn(8, 5).bfloat16()).dtype == torch.float32


def naive_swav(scores: torch.Tensor, codes: torch.Tensor, tau: float) -> torch.Tensor:
    """Each global crop g's code predicted by every other crop v: −Σ_k q_gk log softmax(s_v / τ)_k."""
    v_n, b_n, _ = scores.shape
    total = scores.new_zeros(())
    for g in range(codes.shape[0]):
        sub = scores.new_zeros(())
        for v in range(v_n):
            if v == g:
                continue
            for b in range(b_n):
                p = torch.exp(scores[v, b] / tau) / torch.exp(scores[v, b] / tau).sum()
                sub = sub - (codes[g, b] * torch.log(p)).sum() / b_n
        total = total + sub / (v_n - 1)
    return total / codes.shape[0]


@pytest.mark.parametrize("v,g,b,k,tau", [(2, 2, 4, 3, 0.1), (6, 2, 3, 5, 0.1), (4, 1, 5, 4, 0.5)])
def test_swav_loss_matches_naive(v, g, b, k, tau):
    scores = torch.rand(v, b, k, dtype=DT) * 2 - 1
    codes = torch.softmax(torch.randn(g, b, k, dtype=DT), dim=2)
    torch.testing.assert_close(swav_loss(scores, codes, tau), naive_swav(scores, codes, tau))


def test_swav_loss_analytic_uniform():
    """Equal scores predict the uniform distribution: cross-entropy log K whatever the codes."""
    codes = torch.softmax(torch.randn(2, 3, 7, dtype=DT), dim=2)
    assert swav_loss(torch.zeros(4, 3, 7, dtype=DT), codes).item() == pytest.approx(math.log(7), rel=1e-12)


def test_losses_gradcheck():
    scores = (torch.rand(3, 4, 5, dtype=DT) * 2 - 1).requires_grad_()
    codes = sinkhorn_knopp(scores.detach()[:2].reshape(-1, 5)).reshape(2, 4, 5)  # constants
    assert torch.autograd.gradcheck(lambda s: swav_loss(s, codes, 0.1), (scores,))
    targets = torch.tensor([0, 4, 2, 2])
    assert torch.autograd.gradcheck(lambda s: deepcluster_loss(s, targets, 0.1), (scores,))


def test_deepcluster_loss_matches_naive():
    scores, targets = torch.rand(3, 4, 5, dtype=DT) * 2 - 1, torch.tensor([1, 0, 4, 1])
    naive = sum(-torch.log_softmax(scores[v, b] / 0.1, 0)[targets[b]] for v in range(3) for b in range(4)) / 12
    torch.testing.assert_close(deepcluster_loss(scores, targets, 0.1), naive)


def test_kmeans_recovers_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(5, 16, generator=gen), dim=1)
    truth = torch.arange(5).repeat_interleave(40)
    x = centres[truth] + 0.05 * torch.randn(200, 16, generator=gen)
    for seed in range(5):
        centroids, assign = spherical_kmeans(x, 5, 10, generator=torch.Generator().manual_seed(seed))
        pairs = set(zip(truth.tolist(), assign.tolist()))
        assert len(pairs) == 5 and len({a for _, a in pairs}) == 5, f"seed {seed}: clusters mixed"
        torch.testing.assert_close(centroids.norm(dim=1), torch.ones(5))
        assert (centroids[assign] * F.normalize(x, dim=1)).sum(1).min() > 0.9
    _, few = spherical_kmeans(x[:3], 5, 10)  # fewer points than clusters: still one label each
    assert few.shape == (3,) and len(set(few.tolist())) == 3


def _method(name: str, **params):
    cls = METHODS[name].cls
    backbone = build_backbone("small_resnet", 1, 16, widths=[8, 16])
    return cls(backbone, **{**cls.spec.test_params, **params})


def _views(n_views: int = 6, b: int = 8) -> list[torch.Tensor]:
    return [torch.randn(b, 1, 16, 16)] * 2 + [torch.randn(b, 1, 8, 8) for _ in range(n_views - 2)]


def test_swav_prototypes_unit_rows_and_frozen_at_start():
    m = _method("swav", freeze_prototypes_iters=5)
    loss, _ = m.training_step(_views(), Progress(0, 100, 0, 10))
    torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(8))
    loss.backward()
    assert m.prototypes.weight.grad.abs().max() == 0 and m.projector[0].weight.grad.abs().max() > 0
    m.zero_grad()
    loss, _ = m.training_step(_views(), Progress(5, 100, 0, 10))
    loss.backward()
    assert m.prototypes.weight.grad.abs().max() > 0


def test_swav_seer_head_has_three_layers_without_batchnorm():
    """SEER's projector (arXiv:2103.01988; vissl's d10444_d8192_d8192_d256 head, use_bn False): 3 linear layers."""
    m = _method("swav", proj_layers=3, proj_bn=False)
    linears = [l for l in m.projector if isinstance(l, torch.nn.Linear)]
    assert len(linears) == 3 and not any(isinstance(l, torch.nn.BatchNorm1d) for l in m.projector)
    assert linears[0].out_features == linears[1].in_features == linears[1].out_features == 32
    loss, _ = m.training_step(_views(), Progress(0, 100, 0, 10))
    loss.backward()
    assert all(l.weight.grad.abs().max() > 0 for l in linears)
    default = _method("swav")
    assert sum(isinstance(l, torch.nn.Linear) for l in default.projector) == 2
    assert any(isinstance(l, torch.nn.BatchNorm1d) for l in default.projector)


def test_swav_queue_codes_use_only_batch_rows():
    m = _method("swav", queue_length=16)
    views = _views(b=8)
    for step in range(2):  # two pushes of 8 fill the queue
        assert not m.queues[0].full
        _, logs = m.training_step(views, Progress(step, 100, 0, 10))
        finish_step(m, Progress(step, 100, 0, 10), logs)
    assert m.queues[0].full and m.queues[1].full
    w = F.normalize(m.prototypes.weight.detach(), dim=1)
    scores = torch.randn(8, 8)
    expected = sinkhorn_knopp(torch.cat([m.queues[0].contents() @ w.T, scores]), 0.05, 3)[-8:]
    torch.testing.assert_close(m.codes(scores, 0, w), expected)
    assert not torch.allclose(m.codes(scores, 0, w), sinkhorn_knopp(scores))


def test_deepcluster_memory_indices_epochs_and_resume():
    m = _method("deepclusterv2")
    views = _views(n_views=3, b=8)
    m.training_step(views, Progress(0, 100, 0, 10), indices=torch.arange(20, 28))
    assert len(m.memory) == 28 and m.memory.filled.sum() == 8 and (m.assignments.rows[20:28] >= 0).all()
    _, logs = m.training_step(views, Progress(1, 100, 0, 10), indices=torch.arange(0, 8))
    assert m.memory.filled.sum() == 16 and int(m.clustered_rows) == 8 and logs["labels_from_kmeans"] == 0  # not yet seen
    _, logs = m.training_step(views, Progress(2, 100, 0, 10), indices=torch.arange(8, 16))
    assert int(m.clustered_rows) == 16 and m.memory.filled.sum() == 24  # filled rows doubled: clustered again
    m.training_step(views, Progress(3, 100, 1, 10), indices=torch.arange(0, 8))
    assert int(m.clustered_epoch) == 1 and int(m.clustered_rows) == 24
    fresh = _method("deepclusterv2")
    fresh.load_state_dict(m.state_dict())  # the memory grew; a fresh model takes the saved size
    torch.testing.assert_close(fresh.memory.rows, m.memory.rows)
    assert torch.equal(fresh.memory.filled, m.memory.filled)
    assert torch.equal(fresh.assignments.rows, m.assignments.rows)


def test_bad_values_raise():
    for name, bad in [("swav", {"temperature": 0.0}), ("swav", {"epsilon": -1.0}), ("swav", {"num_prototypes": 0}),
                      ("swav", {"proj_layers": 0}),
                      ("deepclusterv2", {"temperature": -0.1}), ("deepclusterv2", {"num_clusters": 0})]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            _method(name, **bad)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_knopp(torch.randn(3, 4), epsilon=0.0)
    with pytest.raises(ValueError, match="shape"):
        sinkhorn_knopp(torch.randn(3, 4, 2))
    with pytest.raises(ValueError, match="temperature"):
        swav_loss(torch.randn(2, 3, 4), torch.rand(2, 3, 4), 0.0)
    with pytest.raises(ValueError, match="targets"):
        deepcluster_loss(torch.randn(2, 3, 4), torch.zeros(4, dtype=torch.long))


def _cfg(name: str, params: dict, views: dict | None = None):
    return config_from_dict({"method": {"name": name, "params": params}, "views": views or {},
                             "data": {"name": "digits"}, "train": {"batch_size": 16}})


def test_run_checks_before_training():
    cfg = _cfg("swav", {"temperature": 0.0})
    with pytest.raises(ConfigError, match="temperature"):
        build_method(cfg, 1, 28)
    recipe = view_recipe(_cfg("swav", {}), METHODS["swav"].spec, 28)
    for name, key in [("swav", "num_prototypes"), ("deepclusterv2", "num_clusters")]:
        cfg = _cfg(name, {key: 300, "proj_hidden": 16, "proj_dim": 8})
        with pytest.raises(ConfigError, match=f"300 (prototypes|clusters) for 200 training images"):
            check_run(build_method(cfg, 1, 28), cfg, 200, recipe)
        check_run(build_method(cfg, 1, 28), cfg, 1000, recipe)  # fine with enough images
    with pytest.raises(ConfigError, match="local crops .* bigger than global"):
        view_recipe(_cfg("swav", {}, {"local_size": 32}), METHODS["swav"].spec, 28)


def test_loop_passes_indices_to_deepcluster(tmp_path):
    """A real two-epoch run on digits: the loop hands the batch indices to the memory (``needs_indices``)."""
    from selfsup.train.loop import pretrain

    cfg = config_from_dict({
        "method": {"name": "deepclusterv2", "params": {"num_clusters": 10, "proj_hidden": 32, "proj_dim": 16}},
        "backbone": {"name": "small_resnet", "params": {"widths": [8, 16]}},
        "data": {"name": "digits", "limit": 200, "val_size": 20}, "views": {"local_crops": 1},
        "optim": {"name": "sgd", "lr": 0.05}, "train": {"epochs": 2, "batch_size": 30, "device": "cpu",
                                                        "progress": False, "knn_every": 0, "threads": 1}})
    pretrain(cfg, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert state["memory.filled"].sum() == 180 and state["clustered_epoch"] == 1  # every training sample, re-clustered
    pretrain(cfg, tmp_path / "run")  # resuming loads the grown memory into a freshly built model
