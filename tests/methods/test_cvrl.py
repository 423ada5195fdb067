"""CVRL (arXiv:2008.03800): its loss against a naive NT-Xent loop from the paper, the reduction to SimCLR on the same
embeddings, the temporal interval sampling's distribution (and that every window stays inside its record), the
recipe checks, gradients, a falling loss on a fixed batch, and two-process parity of ``gather``."""
from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp

from clip_standin import BATCH, TinyClipNet, clips, loss_falls, tiny
from spawned import gloo_group
from selfsup.config import ConfigError
from selfsup.losses.contrastive import nt_xent
from selfsup.methods import METHODS
from selfsup.methods.base import make_progress
from selfsup.views import Augment
from selfsup.views.clips import (ClipRecipe, apply_clip_overrides, clip_starts, interval_probabilities,
                                 make_clip_views, resolve_clip_sizes)

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """arXiv:2008.03800 eq. 1 (SimCLR's NT-Xent over the 2N clips), literally: for each clip i, −log of
    exp(sim(i, its pair)/τ) over Σ_{k ≠ i} exp(sim(i, k)/τ), averaged over the 2N clips."""
    z = torch.cat([z1, z2])
    n = z1.shape[0]
    u = [z[i] / z[i].norm() for i in range(2 * n)]
    total = z.new_zeros(())
    for i in range(2 * n):
        pair = (i + n) % (2 * n)
        den = sum(torch.exp(torch.dot(u[i], u[k]) / tau) for k in range(2 * n) if k != i)
        total = total - torch.log(torch.exp(torch.dot(u[i], u[pair]) / tau) / den)
    return total / (2 * n)


# ---------------------------------------------------------------- the loss

def test_cvrl_registered_as_a_clip_method_with_the_papers_settings():
    info = METHODS["cvrl"]
    assert info.family == "contrastive" and "2008.03800" in info.paper
    spec = info.spec
    assert spec.inputs == "clips" and spec.default_backbone == "small_r3d"
    assert isinstance(spec.views, ClipRecipe) and spec.views.clips == 2 and spec.views.interval == "decreasing"
    method = info.cls(TinyClipNet())
    assert method.temperature == 0.1  # the paper's (public config: SSLLosses.temperature = 0.1)
    linears = [m for m in method.projector if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [2048, 2048, 2048, 128]  # 3 hidden layers of 2048 with BN, then 128
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in method.projector) == 3


def test_cvrl_loss_is_the_papers_nt_xent_over_both_clips():
    method = tiny("cvrl")
    views = clips()
    loss, logs = method.training_step(views, make_progress(method, 0, 10, 0, 10))
    z1, z2 = method.projector(method.backbone(torch.cat(views))).chunk(2)  # both clips through BN together
    torch.testing.assert_close(loss, naive_nt_xent(z1, z2, 0.1))
    torch.testing.assert_close(logs["z"], z1.detach())
    torch.testing.assert_close(logs["z_pair"], z2.detach())


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_cvrl_reduces_to_simclr_on_the_same_embeddings(tau):
    """The clip method is SimCLR's loss, unchanged: on the same projections the two agree, and a SimCLR with
    CVRL's weights takes the same loss from the same clips."""
    cvrl = tiny("cvrl", temperature=tau)
    emb = cvrl.embed(clips(), make_progress(cvrl, 0, 10, 0, 10))
    loss, _ = cvrl.loss_from(emb, make_progress(cvrl, 0, 10, 0, 10))
    torch.testing.assert_close(loss, nt_xent(emb["z1"], emb["z2"], tau))
    simclr = METHODS["simclr"].cls(TinyClipNet(), temperature=tau, proj_hidden=32, proj_dim=16, proj_layers=4)
    simclr.load_state_dict(cvrl.state_dict())
    views = clips()
    torch.testing.assert_close(cvrl.training_step(views, make_progress(cvrl, 0, 10, 0, 10))[0],
                               simclr.training_step(views, make_progress(simclr, 0, 10, 0, 10))[0])


def test_cvrl_gradients_reach_every_parameter_and_the_loss_falls():
    method = tiny("cvrl")
    loss, _ = method.training_step(clips(), make_progress(method, 0, 10, 0, 10))
    loss.backward()
    missing = [n for n, p in method.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing
    method = tiny("cvrl")
    first, last = loss_falls(method, clips())
    assert last < first


def test_cvrl_rejects_impossible_settings():
    for params, match in (({"temperature": 0.0}, "temperature"), ({"proj_layers": 0}, "proj_layers")):
        with pytest.raises(ValueError, match=match):
            tiny("cvrl", **params)


# ---------------------------------------------------------------- temporal interval sampling

@pytest.mark.parametrize("m", [1, 2, 9, 40])
def test_interval_probabilities_are_the_floored_decreasing_density(m):
    p = interval_probabilities(m)  # p = 1: density ∝ 1 − d/M on [0, M], floored to whole frames
    assert p.shape == (m,) and torch.all(p > 0)
    torch.testing.assert_close(p.sum(), torch.tensor(1.0, dtype=F64))
    d = torch.arange(m, dtype=F64)
    torch.testing.assert_close(p, (2 * m - 2 * d - 1) / m**2)  # ∫_d^{d+1} 2(M − x)/M² dx
    assert torch.all(p.diff() < 0)  # monotonically decreasing
    for power in (0.5, 2.0, 4.0):  # the density ∝ 1 − (d/M)^p, integrated per frame: a numerical check
        q = interval_probabilities(m, power=power)
        x = (d[:, None] + torch.linspace(0, 1, 2001, dtype=F64)) / m  # 2001 points across each frame
        dens = (1 - x.pow(power)) * (power + 1) / power  # normalised on [0, 1]
        torch.testing.assert_close(q, torch.trapezoid(dens, x, dim=1), atol=1e-6, rtol=1e-5)
        assert torch.all(q.diff() <= 0)
    torch.testing.assert_close(interval_probabilities(m, "uniform"), torch.full((m,), 1 / m, dtype=F64))


@pytest.mark.parametrize("interval,power", [("decreasing", 1.0), ("decreasing", 3.0), ("uniform", 1.0)])
def test_clip_starts_follow_the_interval_distribution_inside_the_record(interval, power):
    frames, n = 16, 60_000
    recipe = ClipRecipe(clip_len=4, stride=2, clips=2, interval=interval, interval_power=power)  # span 7, M = 10
    m = frames - recipe.span + 1
    starts = clip_starts(recipe, n, frames, torch.device("cpu"))
    assert starts.shape == (2, n) and starts.dtype == torch.int64
    assert starts.min() >= 0 and starts.max() <= m - 1  # every window inside the record
    dist = (starts[1] - starts[0]).abs()
    freq = torch.bincount(dist, minlength=m).double() / n
    want = interval_probabilities(m, interval, power)
    # 5 binomial standard errors per bin, plus the mean distance against the distribution's
    assert torch.all((freq - want).abs() <= 5 * (want * (1 - want) / n).sqrt() + 1e-4), (freq, want)
    mean = (torch.arange(m, dtype=F64) * want).sum()
    sd = ((torch.arange(m, dtype=F64) - mean).pow(2) * want).sum().sqrt()
    assert abs(dist.double().mean() - mean) < 5 * sd / math.sqrt(n)
    later_second = (starts[1] > starts[0]).double().mean()
    assert abs(later_second - (1 - want[0]) / 2) < 0.01  # either clip is the earlier one as often
    # given the distance, the earlier start is uniform over the M − d starts that leave room: here d = 1
    early = torch.minimum(starts[0], starts[1])[dist == 1]
    counts = torch.bincount(early, minlength=m).double()
    assert counts[m - 1] == 0 and counts[: m - 1].min() > 0.8 * counts[: m - 1].mean()


def test_independent_starts_stay_the_default_and_unchanged():
    recipe = ClipRecipe(clip_len=4, stride=2, clips=3)
    assert recipe.interval == "independent"
    starts = clip_starts(recipe, 30_000, 16, torch.device("cpu"))
    assert starts.shape == (3, 30_000) and starts.min() >= 0 and starts.max() <= 9
    for v in range(3):  # each view uniform over the 10 starts, independent of the others
        freq = torch.bincount(starts[v], minlength=10).double() / 30_000
        assert (freq - 0.1).abs().max() < 0.01
    assert abs(torch.corrcoef(starts.double())[0, 1]) < 0.03
    same = clip_starts(ClipRecipe(clip_len=4, stride=2, clips=3, same_start=True), 100, 16, torch.device("cpu"))
    assert torch.equal(same[0], same[1]) and torch.equal(same[0], same[2])


def test_make_clip_views_takes_the_sampled_frames():
    """End to end through make_clip_views: frames whose pixel value is their index give back each view's start;
    both views start inside the record and their distances follow the interval distribution."""
    b, frames, size = 4000, 16, 8
    records = torch.arange(frames, dtype=torch.uint8).view(1, frames, 1, 1).expand(b, frames, size, size).contiguous()
    still = Augment(size=size, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    recipe = ClipRecipe(clip_len=4, stride=2, clips=2, interval="decreasing", augment=still)
    views = make_clip_views(records, recipe, mean=[0.0], std=[1 / 255])  # pixels back on the 0–255 scale
    assert [tuple(v.shape) for v in views] == [(b, 1, 4, size, size)] * 2
    got = [v[:, 0, :, 0, 0].round().long() for v in views]  # (B, T) frame indices
    for g in got:
        torch.testing.assert_close(g - g[:, :1], torch.arange(0, 8, 2).expand(b, 4))  # stride 2 from the start
        assert g.min() >= 0 and g.max() <= frames - 1
    dist = (got[1][:, 0] - got[0][:, 0]).abs()
    freq = torch.bincount(dist, minlength=10).double() / b
    want = interval_probabilities(10)
    assert torch.all((freq - want).abs() <= 5 * (want * (1 - want) / b).sqrt() + 1e-3)


@pytest.mark.parametrize("overrides,match", [
    ({"interval": "decreasin"}, "did you mean 'decreasing'"),
    ({"interval": "decreasing", "clips": 3}, "views.clips"),
    ({"interval": "uniform", "same_start": True}, "same_start"),
    ({"interval_power": 0.0}, "interval_power"),
])
def test_interval_settings_refused_with_what_to_change(overrides, match):
    recipe = apply_clip_overrides(ClipRecipe(clip_len=4, stride=2), overrides)  # config keys are accepted ...
    with pytest.raises(ConfigError, match=match):  # ... and checked with the data's sizes
        resolve_clip_sizes(recipe, 16, 16)


def test_interval_with_other_than_two_clips_is_refused_when_drawn():
    with pytest.raises(ValueError, match="two clips"):
        clip_starts(ClipRecipe(clips=3, interval="decreasing"), 4, 16, torch.device("cpu"))


# ---------------------------------------------------------------- two processes

def _cvrl_rank(rank: int, world: int, tmp: str, z1: torch.Tensor, z2: torch.Tensor) -> None:
    with gloo_group(rank, world, init_file=f"{tmp}/init"):
        method = tiny("cvrl", gather=True)
        n = z1.shape[0] // world
        a = z1[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        b = z2[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        loss, _ = method.loss_from({"z1": a, "z2": b}, make_progress(method, 0, 10, 0, 10))
        loss.backward()
        torch.save((loss.detach(), a.grad, b.grad), f"{tmp}/rank{rank}.pt")


@pytest.mark.slow
def test_cvrl_gather_matches_one_process(tmp_path):
    """Two gloo processes with half the clips each and ``gather=True``: the mean of their losses is the one-process
    loss of the whole batch and the row gradients are world × its (DDP's averaging makes them equal)."""
    world = 2
    z1, z2 = torch.randn(BATCH, 6, dtype=F64), torch.randn(BATCH, 6, dtype=F64)
    mp.spawn(_cvrl_rank, args=(world, str(tmp_path), z1, z2), nprocs=world)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    method = tiny("cvrl")
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    full, _ = method.loss_from({"z1": a, "z2": b}, make_progress(method, 0, 10, 0, 10))
    full.backward()
    torch.testing.assert_close(sum(g[0] for g in got) / world, full.detach())
    torch.testing.assert_close(torch.cat([g[1] for g in got]) / world, a.grad)
    torch.testing.assert_close(torch.cat([g[2] for g in got]) / world, b.grad)
