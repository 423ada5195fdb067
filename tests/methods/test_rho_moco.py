"""ρMoCo (arXiv:2104.14558): its loss against a naive loop over the ordered pairs of clips and the queue written
from the paper (ρ = 2, 3), the reduction to MoCo v2 (symmetrised) at ρ = 2 on the same networks and queue, the
queue written with every clip's keys only after the step, gradients to the query encoder only, the key
encoder's EMA formula, and a falling loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clip_standin import BATCH, TinyClipNet, clips, losses_on, step, student_and_teacher, tiny
from selfsup.losses.contrastive import info_nce
from selfsup.methods import METHODS
from selfsup.methods.base import make_progress, run_after_step, teacher_pairs
from selfsup.views.clips import ClipRecipe

pytestmark = pytest.mark.usefixtures("one_thread")
TEACHER = ("key_",)
TAU = 0.1


def naive_rho_moco(q: list[torch.Tensor], k: list[torch.Tensor], queue: torch.Tensor, tau: float) -> torch.Tensor:
    """MoCo's InfoNCE (arXiv:1911.05722 eq. 1) with every clip i's query against every other clip j's key as the
    positive and the queue as negatives, −log exp(q·k⁺/τ) / (exp(q·k⁺/τ) + Σ_queue exp(q·n/τ)), averaged over the
    samples and the ρ(ρ − 1) ordered pairs."""
    unit = lambda x: x / x.norm()
    terms = []
    for i in range(len(q)):
        for j in range(len(k)):
            if i == j:
                continue
            for s in range(q[i].shape[0]):
                a, pos = unit(q[i][s]), torch.exp(torch.dot(unit(q[i][s]), unit(k[j][s])) / tau)
                neg = sum(torch.exp(torch.dot(a, unit(n)) / tau) for n in queue)
                terms.append(-torch.log(pos / (pos + neg)))
    return torch.stack(terms).mean()


def networks(method, views):
    q = [method.projector(method.backbone(v)) for v in views]
    with torch.no_grad():  # bn_splits=1: the keys are a plain function of each clip batch
        k = [method.key_projector(method.key_backbone(v)) for v in views]
    return q, k


def test_rho_moco_registered_as_a_clip_method_with_the_papers_settings():
    info = METHODS["rho_moco"]
    assert info.family == "contrastive" and "2104.14558" in info.paper
    spec = info.spec
    assert spec.inputs == "clips" and spec.default_backbone == "small_r3d"
    assert isinstance(spec.views, ClipRecipe) and spec.views.clips == 2
    method = info.cls(TinyClipNet(), queue_size=64)
    assert method.temperature == 0.1
    assert [m.out_features for m in method.projector if isinstance(m, torch.nn.Linear)] == [2048, 2048, 128]
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in method.projector)  # MoCo v2's head: no BN
    assert method.key_projector.state_dict().keys() == method.projector.state_dict().keys()
    momentum = lambda s: make_progress(method, s, 100, 0, 10).value("teacher_momentum")
    assert momentum(0) == pytest.approx(0.994) and momentum(100) == pytest.approx(1.0)


@pytest.mark.parametrize("rho", [2, 3])
def test_rho_moco_loss_is_info_nce_over_ordered_pairs_against_the_queue(rho):
    method = tiny("rho_moco", bn_splits=1, queue_size=24)
    step(method, clips(rho))  # fill part of the queue
    assert int(method.queue.count) == min(24, rho * BATCH)
    views = clips(rho)
    loss, logs = method.training_step(views, make_progress(method, 1, 10, 0, 10))
    q, k = networks(method, views)
    torch.testing.assert_close(loss, naive_rho_moco(q, k, method.queue.contents(), TAU))
    torch.testing.assert_close(logs["z"], q[0].detach())


def test_first_step_with_an_empty_queue_contrasts_the_batchs_other_keys():
    method = tiny("rho_moco", bn_splits=1)
    views = clips(3)
    loss, _ = method.training_step(views, make_progress(method, 0, 10, 0, 10))
    q, k = networks(method, views)
    want = sum(info_nce(q[i], k[j], TAU) for i in range(3) for j in range(3) if i != j) / 6
    torch.testing.assert_close(loss, want)


def test_rho_moco_at_two_clips_is_symmetrised_mocov2():
    """ρ = 2 on the same networks and queue: the mean of MoCo v2's loss with either clip as the query."""
    rho_moco = tiny("rho_moco", bn_splits=1, proj_layers=2, temperature=0.2)
    step(rho_moco, clips())
    mocov2 = METHODS["mocov2"].cls(TinyClipNet(), **{**METHODS["mocov2"].spec.test_params, "bn_splits": 1})
    mocov2.load_state_dict(rho_moco.state_dict())
    views = clips()
    progress = make_progress(rho_moco, 1, 10, 0, 10)
    mine, _ = rho_moco.training_step(views, progress)
    q, k = networks(mocov2, views)
    theirs = [mocov2.loss_from({"q": q[i], "k": k[1 - i]}, progress)[0] for i in range(2)]
    torch.testing.assert_close(mine, (theirs[0] + theirs[1]) / 2)


def test_queue_gets_every_clips_keys_only_after_the_step():
    method = tiny("rho_moco", queue_size=64, bn_splits=1)
    views = clips(3)
    progress = make_progress(method, 0, 10, 0, 10)
    loss, logs = method.training_step(views, progress)
    assert int(method.queue.count) == 0  # a skipped (non-finite) step leaves the queue untouched
    loss.backward()
    run_after_step(method, progress, logs)
    assert int(method.queue.count) == 3 * BATCH
    _, k = networks(method, views)
    torch.testing.assert_close(method.queue.contents(), F.normalize(torch.cat(k), dim=1))  # clip-major
    assert not method.queue.rows.requires_grad


@pytest.mark.parametrize("rho", [2, 3])
def test_gradients_reach_the_query_encoder_only(rho):
    method = tiny("rho_moco")
    step(method, clips(rho))
    method.zero_grad()
    loss, _ = method.training_step(clips(rho), make_progress(method, 1, 10, 0, 10))  # now against the queue
    loss.backward()
    student, teacher = student_and_teacher(method, TEACHER)
    assert teacher and student
    assert not [n for n, p in student if p.grad is None or not p.grad.abs().sum()]
    assert not [n for n, p in teacher if p.requires_grad or p.grad is not None]
    assert method.queue.rows.grad is None


def test_key_networks_are_the_ema_teachers():
    """The EMA update itself is checked for every method by tests/methods/test_methods.py; here: which networks
    are the teachers, and the momentum near MoCo's 0.99."""
    method = tiny("rho_moco")
    assert teacher_pairs(method) == [(method.key_backbone, method.backbone), (method.key_projector, method.projector)]
    assert 0.994 < make_progress(method, 40, 100, 0, 10).value("teacher_momentum") < 1


def test_a_few_steps_lower_the_loss():
    """From the first step against a full queue (step 0 has in-batch negatives only; a queue of ρ·B keys is full
    from step 1 on, so every later loss has as many negatives)."""
    losses = losses_on(tiny("rho_moco", queue_size=2 * BATCH), clips(), steps=12, lr=0.05)
    assert min(losses[-3:]) < losses[1], losses


def test_refuses_fewer_than_two_clips_and_impossible_settings():
    method = tiny("rho_moco")
    with pytest.raises(ValueError, match="ρ ≥ 2"):
        method.training_step(clips(1), make_progress(method, 0, 10, 0, 10))
    for params, match in (({"temperature": 0.0}, "rho_moco: temperature"), ({"momentum_end": 2.0}, "rho_moco"),
                          ({"proj_layers": 0}, "proj_layers"), ({"queue_size": 0}, "queue_size")):
        with pytest.raises(ValueError, match=match):
            tiny("rho_moco", **params)
