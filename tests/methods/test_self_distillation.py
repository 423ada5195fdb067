"""BYOL, SimSiam and DINO: losses against naive references from the papers' pseudocode, gradcheck,
the schedules (BYOL/DINO momentum, DINO teacher temperature, centre), DINO's frozen last layer,
optimiser groups, clear errors for bad settings, and SimSiam's collapse without stop-gradient."""
from __future__ import annotations

import math

import pytest
import torch

from selfsup.config import ConfigError, DataConfig, ModelConfig, OptimConfig, RunConfig
from selfsup.monitor.diagnostics import effective_rank, healthy_spread, spread
from selfsup.losses.distillation import byol_loss, dino_loss, negative_cosine
from selfsup.methods.base import Progress, make_progress, run_after_step
from selfsup.methods.byol import BYOL
from selfsup.methods.dino import DINO
from selfsup.methods.simsiam import SimSiam
from selfsup.nn.backbones import build_backbone
from selfsup.train.build import build_method
from selfsup.train.loop import pretrain
from selfsup.train.optim import build_optimizer, set_optim_values
from selfsup.views import apply_overrides, make_views, normalize, resolve_sizes, to_float

f64 = dict(dtype=torch.float64)


def tiny_backbone(size: int = 16):
    return build_backbone("small_resnet", 1, size, widths=[8, 16])


# ---------------------------------------------------------------- losses


def naive_dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
                    tps: float, tpt: float) -> torch.Tensor:
    """Algorithm 1 of arXiv:2104.14294 for every (teacher global, other student view) pair, one sample at a time."""
    total, n = 0.0, 0
    for g, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == g:
                continue
            pair = 0.0
            for i in range(t.shape[0]):
                pt = torch.exp((t[i] - center) / tpt) / torch.exp((t[i] - center) / tpt).sum()
                ps = torch.exp(s[i] / tps) / torch.exp(s[i] / tps).sum()
                pair = pair - (pt * torch.log(ps)).sum()
            total, n = total + pair / t.shape[0], n + 1
    return total / n


@pytest.mark.parametrize("v,b,k,tps,tpt", [(2, 3, 5, 0.1, 0.04), (4, 2, 7, 0.1, 0.07), (6, 4, 3, 0.5, 0.2)])
def test_dino_loss_matches_naive_loop(v, b, k, tps, tpt):
    student = [torch.randn(b, k, **f64) for _ in range(v)]
    teacher = [torch.randn(b, k, **f64) for _ in range(2)]
    center = torch.randn(k, **f64)
    expected = naive_dino_loss(student, teacher, center, tps, tpt)
    torch.testing.assert_close(dino_loss(student, teacher, center, tps, tpt), expected)
    # the same numbers as stacked (V, B, K) and flat (V·B, K) tensors
    torch.testing.assert_close(dino_loss(torch.stack(student), torch.stack(teacher), center, tps, tpt), expected)
    torch.testing.assert_close(dino_loss(torch.cat(student), torch.cat(teacher), center[None], tps, tpt), expected)


def test_dino_loss_analytic_and_shift_invariant():
    """Uniform teacher and student: H(u, u) = log K. Softmax ignores a constant added to a row, and a
    centre that is constant over K changes nothing."""
    k = 8
    flat = [torch.zeros(3, k, **f64) for _ in range(4)]
    assert dino_loss(flat, flat[:2], torch.zeros(k, **f64)).item() == pytest.approx(math.log(k), rel=1e-12)
    s, t = [torch.randn(3, k, **f64) for _ in range(4)], [torch.randn(3, k, **f64) for _ in range(2)]
    base = dino_loss(s, t, torch.zeros(k, **f64))
    shifted = dino_loss([x + torch.randn(3, 1, **f64) for x in s], [x + 5.0 for x in t], torch.full((k,), 2.0, **f64))
    torch.testing.assert_close(shifted, base)


def test_byol_loss_is_normalised_mse_and_negative_cosine_its_affine_twin():
    p, z = torch.randn(5, 4, **f64), torch.randn(5, 4, **f64)
    naive = torch.stack([((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum() for i in range(5)]).mean()
    torch.testing.assert_close(byol_loss(p, z), naive)
    torch.testing.assert_close(byol_loss(p, z), 2 + 2 * negative_cosine(p, z))
    torch.testing.assert_close(byol_loss(3 * p, 0.2 * z), byol_loss(p, z))  # scale-invariant
    assert negative_cosine(p, 2 * p).item() == pytest.approx(-1.0)
    assert byol_loss(p, -p).item() == pytest.approx(4.0)


def test_gradcheck_every_loss():
    p, z = torch.randn(3, 4, **f64, requires_grad=True), torch.randn(3, 4, **f64, requires_grad=True)
    assert torch.autograd.gradcheck(byol_loss, (p, z))
    assert torch.autograd.gradcheck(negative_cosine, (p, z))
    s = torch.randn(3 * 2, 5, **f64, requires_grad=True)
    t = torch.randn(2 * 2, 5, **f64, requires_grad=True)
    c = torch.randn(5, **f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, t, c: dino_loss(s, t, c, 0.1, 0.04), (s, t, c))


def test_dino_loss_rejects_bad_inputs():
    with pytest.raises(ValueError, match="temperatures"):
        dino_loss([torch.randn(2, 3)] * 2, [torch.randn(2, 3)] * 2, torch.zeros(3), 0.1, 0.0)
    with pytest.raises(ValueError, match="split into views"):
        dino_loss(torch.randn(5, 3), torch.randn(4, 3), torch.zeros(3))


# ---------------------------------------------------------------- schedules and state


@pytest.mark.parametrize("k", [0, 1, 25, 50, 99, 100])
def test_byol_momentum_follows_the_paper(k):
    """τ = 1 − (1 − τ_base)·(cos(πk/K) + 1)/2 (arXiv:2006.07733, §3.2)."""
    method = BYOL(tiny_backbone(), **BYOL.spec.test_params, momentum_start=0.99)
    K = 100
    expected = 1 - (1 - 0.99) * (math.cos(math.pi * k / K) + 1) / 2
    assert make_progress(method, k, K, 0, 10).value("teacher_momentum") == pytest.approx(expected, abs=1e-12)


def test_dino_teacher_temperature_warms_up_linearly_then_stays():
    method = DINO(tiny_backbone(), **{**DINO.spec.test_params, "warmup_teacher_temp_epochs": 2})
    at = lambda step: make_progress(method, step, 100, step // 10, 10).value("teacher_temp")
    assert at(0) == pytest.approx(0.04)
    assert at(10) == pytest.approx(0.055)
    assert at(20) == at(60) == pytest.approx(0.07)
    no_warmup = DINO(tiny_backbone(), **{**DINO.spec.test_params, "warmup_teacher_temp_epochs": 0})
    assert make_progress(no_warmup, 0, 100, 0, 10).value("teacher_temp") == pytest.approx(0.07)


def _dino_views(method: DINO, n: int = 8) -> list[torch.Tensor]:
    images = torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8)
    return make_views(images, resolve_sizes(apply_overrides(method.spec.views, {"local_crops": 2}), 16), [0.5], [0.25])


def test_dino_center_moves_by_its_momentum_and_teacher_sees_globals_only():
    method = DINO(tiny_backbone(), **{**DINO.spec.test_params, "center_momentum": 0.8})
    seen: list[int] = []
    method.teacher_backbone.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    for step in range(2):  # twice, so the second update starts from a non-zero centre
        views = _dino_views(method)
        progress = make_progress(method, step, 10, 0, 10)
        _, logs = method.training_step(views, progress)
        with torch.no_grad():
            teacher_out = method.teacher_head(method.teacher_backbone(torch.cat(views[:2])))
        old = method.center.clone()
        run_after_step(method, progress, logs)
        torch.testing.assert_close(method.center, 0.8 * old + 0.2 * teacher_out.mean(dim=0, keepdim=True))
    assert seen[0] == 2 * 8  # two global views of 8 images; the local crops never reach the teacher


@pytest.mark.parametrize("use_bn_in_head", [False, True])
def test_dino_last_layer_frozen_during_first_epochs_and_magnitude_fixed(use_bn_in_head):
    method = DINO(tiny_backbone(), **{**DINO.spec.test_params, "freeze_last_layer_epochs": 1,
                                      "use_bn_in_head": use_bn_in_head})
    magnitude = method.head.last_layer.parametrizations.weight.original0
    direction = method.head.last_layer.parametrizations.weight.original1
    assert not magnitude.requires_grad and torch.all(magnitude == 1)
    views = _dino_views(method)
    for epoch, frozen in ((0, True), (1, False)):
        method.zero_grad(set_to_none=True)
        loss, _ = method.training_step(views, make_progress(method, epoch * 10, 100, epoch, 10))
        loss.backward()
        assert (direction.grad.abs().sum() == 0) == frozen, f"epoch {epoch}"
        assert method.head.mlp[0].weight.grad.abs().sum() > 0  # the rest of the head learns meanwhile


# ---------------------------------------------------------------- optimiser groups


def test_byol_predictor_lr_scale_and_simsiam_fixed_predictor_lr():
    byol = BYOL(tiny_backbone(), **BYOL.spec.test_params, predictor_lr_scale=10.0)
    opt = build_optimizer(byol, OptimConfig(name="sgd"), lr=0.1)
    set_optim_values(opt, 0.05, 0.1)
    pred = {id(p) for p in byol.predictor.parameters()}
    for g in opt.param_groups:
        is_pred = all(id(p) in pred for p in g["params"])
        assert g["lr"] == pytest.approx(0.5 if is_pred else 0.05)
    simsiam = SimSiam(tiny_backbone(), **SimSiam.spec.test_params)
    opt = build_optimizer(simsiam, OptimConfig(name="sgd"), lr=0.1)
    set_optim_values(opt, 0.01, 0.1)  # late in the cosine decay: the predictor keeps the base rate (arXiv:2011.10566 §4.2)
    pred = {id(p) for p in simsiam.predictor.parameters()}
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.1 if all(id(p) in pred for p in g["params"]) else 0.01)


def test_byol_recipe_declares_asymmetric_views():
    a, b = BYOL.spec.views.globals_
    assert (a.blur_p, a.solarize_p, b.blur_p, b.solarize_p) == (1.0, 0.0, 0.1, 0.2)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("name,params,match", [
    ("byol", {"momentum_start": 1.5}, "momentum_start must be in"),
    ("byol", {"momentum_end": -0.1}, "momentum_end must be in"),
    ("dino", {"momentum_start": 1.01}, "momentum_start must be in"),
    ("dino", {"center_momentum": -0.5}, "center_momentum must be in"),
    ("dino", {"warmup_teacher_temp_epochs": -1}, "warmup_teacher_temp_epochs must be ≥ 0"),
    ("dino", {"teacher_temp": 0.03, "warmup_teacher_temp": 0.04}, "must be ≥ warmup_teacher_temp"),
    ("dino", {"student_temp": 0.0}, "student_temp must be > 0"),
    ("simsiam", {"proj_layers": 0}, "proj_layers must be ≥ 1"),
])
def test_impossible_settings_are_config_errors(name, params, match):
    cfg = RunConfig(method=ModelConfig(name, params), backbone=ModelConfig("small_resnet", {"widths": [8, 16]}))
    with pytest.raises(ConfigError, match=match):
        build_method(cfg, 1, 16)


@pytest.mark.parametrize("name", ["byol", "simsiam"])
def test_two_view_method_given_three_views_fails_before_training(name, tmp_path):
    """An odd number of views (2 globals + 1 local crop) is refused by ``pretrain`` before any step."""
    cfg = RunConfig(method=ModelConfig(name, {}), backbone=ModelConfig("small_resnet", {"widths": [8, 16]}),
                    data=DataConfig(name="digits", val_size=100), views={"local_crops": 1})
    cfg.train.batch_size, cfg.train.threads = 32, 1
    with pytest.raises(ConfigError, match="takes exactly 2 view"):
        pretrain(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


# ---------------------------------------------------------------- collapse (arXiv:2011.10566, §4.1, fig. 2)


def _train_simsiam(digits, stop_gradient: bool, steps: int = 100, batch: int = 128) -> tuple[float, float]:
    """Short SGD run on the digits; returns (spread of held-out projections in eval mode, rank of the last z)."""
    train, test = digits
    mean, std = train.mean_std()
    torch.manual_seed(0)
    method = SimSiam(build_backbone("small_resnet", 1, 8, widths=[16, 32]), proj_hidden=64, proj_dim=64,
                     proj_layers=2, pred_hidden=16, stop_gradient=stop_gradient)
    recipe = resolve_sizes(apply_overrides(SimSiam.spec.views, {"scale": [0.3, 1.0], "blur_p": 0.0}), 8)
    opt = torch.optim.SGD(method.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-4)
    for step in range(steps):
        x = train.images[torch.randint(0, len(train), (batch,))]
        loss, logs = method.training_step(make_views(x, recipe, mean, std), Progress(step, steps, 0, steps))
        opt.zero_grad()
        loss.backward()
        opt.step()
    method.eval()
    with torch.no_grad():
        z = method.projector(method.backbone(normalize(to_float(test.images[:256]), mean, std)))
    return spread(z), effective_rank(logs["z"])


@pytest.mark.slow
def test_simsiam_collapses_without_stop_gradient_and_not_with_it(digits):
    healthy = healthy_spread(64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions gain nothing from threads, and a busy machine makes them thrash
    try:
        collapsed_spread, collapsed_rank = _train_simsiam(digits, stop_gradient=False)
        spread_ok, rank_ok = _train_simsiam(digits, stop_gradient=True)
    finally:
        torch.set_num_threads(threads)
    assert collapsed_spread < 0.25 * healthy and collapsed_rank < 3, (collapsed_spread, collapsed_rank)
    assert spread_ok > 0.6 * healthy and rank_ok > 8, (spread_ok, rank_ok)
