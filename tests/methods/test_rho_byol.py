"""ρBYOL (arXiv:2104.14558): its loss against a naive loop over the ordered pairs of clips written from the paper
(ρ = 2, 3, 4), the reduction to BYOL at ρ = 2 on the same networks, gradients to the online networks only, the
target's EMA formula, and a falling loss on a fixed batch."""
from __future__ import annotations

import pytest
import torch

from clip_standin import TinyClipNet, clips, loss_falls, step, student_and_teacher, tiny
from selfsup.methods import METHODS
from selfsup.methods.base import make_progress, teacher_pairs
from selfsup.views.clips import ClipRecipe

pytestmark = pytest.mark.usefixtures("one_thread")
TEACHER = ("target_",)


def naive_rho_byol(p: list[torch.Tensor], t: list[torch.Tensor]) -> torch.Tensor:
    """Every clip i predicts every other clip j's target: the normalised-MSE ‖p̄_i − t̄_j‖² (BYOL eq. 2) per
    sample, averaged over the batch; BYOL's two orders of each pair summed, averaged over the ρ(ρ − 1)/2 pairs."""
    rho, n = len(p), p[0].shape[0]
    pairs = 0
    total = p[0].new_zeros(())
    for i in range(rho):
        for j in range(i + 1, rho):
            pairs += 1
            for a, b in ((i, j), (j, i)):
                for s in range(n):
                    total = total + (p[a][s] / p[a][s].norm() - t[b][s] / t[b][s].norm()).pow(2).sum() / n
    return total / pairs


def test_rho_byol_registered_as_a_clip_method_with_the_papers_settings():
    info = METHODS["rho_byol"]
    assert info.family == "self-distillation" and "2104.14558" in info.paper
    spec = info.spec
    assert spec.inputs == "clips" and spec.default_backbone == "small_r3d"
    assert isinstance(spec.views, ClipRecipe) and spec.views.clips == 2 and spec.views.interval == "independent"
    method = info.cls(TinyClipNet())
    assert [m.out_features for m in method.projector if isinstance(m, torch.nn.Linear)] == [4096, 256]
    assert [m.out_features for m in method.predictor if isinstance(m, torch.nn.Linear)] == [4096, 256]
    momentum = lambda k: make_progress(method, k, 100, 0, 10).value("teacher_momentum")
    assert momentum(0) == pytest.approx(0.996) and momentum(100) == pytest.approx(1.0)


@pytest.mark.parametrize("rho", [2, 3, 4])
def test_rho_byol_loss_is_the_average_over_pairs_of_clips(rho):
    method = tiny("rho_byol")
    views = clips(rho)
    loss, logs = method.training_step(views, make_progress(method, 0, 10, 0, 10))
    z = [method.projector(method.backbone(v)) for v in views]  # each clip alone: BN statistics per clip
    p = [method.predictor(zi) for zi in z]
    with torch.no_grad():
        t = [method.target_projector(method.target_backbone(v)) for v in views]
    torch.testing.assert_close(loss, naive_rho_byol(p, t))
    torch.testing.assert_close(logs["z"], z[0].detach())
    torch.testing.assert_close(logs["z_pair"], z[1].detach())
    assert not logs["z"].requires_grad


def test_rho_byol_at_two_clips_is_byol():
    rho_byol = tiny("rho_byol")
    for _ in range(2):  # move the target away from the online network first
        step(rho_byol, clips())
    byol = METHODS["byol"].cls(TinyClipNet(), **METHODS["byol"].spec.test_params)
    byol.load_state_dict(rho_byol.state_dict())
    views = clips()
    torch.manual_seed(3)
    mine, _ = rho_byol.training_step(views, make_progress(rho_byol, 2, 10, 0, 10))
    torch.manual_seed(3)
    theirs, _ = byol.training_step(views, make_progress(byol, 2, 10, 0, 10))
    torch.testing.assert_close(mine, theirs)


@pytest.mark.parametrize("rho", [2, 3])
def test_gradients_reach_the_online_networks_only(rho):
    method = tiny("rho_byol")
    loss, _ = method.training_step(clips(rho), make_progress(method, 0, 10, 0, 10))
    loss.backward()
    student, teacher = student_and_teacher(method, TEACHER)
    assert teacher and student
    assert not [n for n, p in student if p.grad is None or not p.grad.abs().sum()]
    assert not [n for n, p in teacher if p.requires_grad or p.grad is not None]


def test_target_networks_are_the_ema_teachers():
    """The EMA update itself is checked for every method by tests/methods/test_methods.py; here: which networks
    are the teachers, and BYOL's momentum schedule (0.996 → 1)."""
    method = tiny("rho_byol")
    assert teacher_pairs(method) == [(method.target_backbone, method.backbone),
                                     (method.target_projector, method.projector)]
    assert 0.996 < make_progress(method, 30, 100, 0, 10).value("teacher_momentum") < 1


def test_a_few_steps_lower_the_loss():
    first, last = loss_falls(tiny("rho_byol"), clips(3))
    assert last < first


def test_refuses_fewer_than_two_clips_and_bad_momentum():
    method = tiny("rho_byol")
    with pytest.raises(ValueError, match="ρ ≥ 2"):
        method.training_step(clips(1), make_progress(method, 0, 10, 0, 10))
    with pytest.raises(ValueError, match="rho_byol: momentum_start"):
        tiny("rho_byol", momentum_start=1.5)
