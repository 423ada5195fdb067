"""Collapse diagnostics against hand-computed cases (selfsup/eval/diagnostics.py)."""
from __future__ import annotations

import math

import pytest
import torch

from selfsup.monitor.collapse import CollapseMonitor
from selfsup.monitor.diagnostics import (alignment, batch_diagnostics, effective_rank, energy_gap, healthy_spread,
                                      spread, uniformity)


def _orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    """(n, k) with orthonormal columns."""
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _low_rank(n: int, d: int, singular_values: list[float], seed: int = 0) -> torch.Tensor:
    k = len(singular_values)
    return (_orthonormal(n, k, seed) @ torch.diag(torch.tensor(singular_values, dtype=torch.float64))
            @ _orthonormal(d, k, seed + 1).T).float()


def _simplex(n: int, dim: int) -> torch.Tensor:
    """n unit vectors in ``dim`` ≥ n dimensions with pairwise cosine −1/(n−1): the centred one-hot vectors."""
    z = torch.zeros(n, dim)
    z[:, :n] = torch.eye(n) - 1.0 / n
    return z


# ---------------------------------------------------------------- effective rank (RankMe)


@pytest.mark.parametrize("k", [1, 3, 8, 16])
def test_rank_of_rank_k_matrix_with_equal_singular_values_is_k(k: int) -> None:
    z = _low_rank(64, 32, [2.5] * k)
    assert effective_rank(z) == pytest.approx(k, rel=1e-3)


def test_rank_with_unequal_singular_values_matches_hand_computation() -> None:
    # σ = (3, 1): p = (3/4, 1/4), H = −¾ ln ¾ − ¼ ln ¼ = 0.562335, exp(H) = 1.754765
    z = _low_rank(40, 10, [3.0, 1.0])
    assert effective_rank(z) == pytest.approx(1.754765, rel=1e-4)


def test_rank_is_scale_invariant_and_bounded() -> None:
    z = torch.randn(200, 12, generator=torch.Generator().manual_seed(0))
    r = effective_rank(z)
    assert effective_rank(1000 * z) == pytest.approx(r, rel=1e-4)
    assert 10 < r <= 12  # an isotropic Gaussian is close to full rank


def test_rank_of_degenerate_inputs() -> None:
    assert effective_rank(torch.zeros(5, 3)) == 0.0
    assert effective_rank(torch.ones(7, 4)) == pytest.approx(1.0, rel=1e-4)  # one point: rank 1
    z = torch.randn(8, 4)
    z[0, 0] = float("nan")
    assert math.isnan(effective_rank(z))  # never raises inside the training loop


# ---------------------------------------------------------------- spread


def test_spread_of_collapsed_embeddings_is_zero() -> None:
    z = torch.randn(1, 16).repeat(50, 1) * torch.rand(50, 1).add(0.5)  # one direction, any norms
    assert spread(z) == pytest.approx(0.0, abs=1e-6)


def test_spread_of_isotropic_embeddings_is_one_over_sqrt_d() -> None:
    z = torch.randn(20000, 64, generator=torch.Generator().manual_seed(0))
    assert healthy_spread(64) == 0.125
    assert spread(z) == pytest.approx(0.125, rel=0.02)


def test_spread_of_the_coordinate_axes_is_exact() -> None:
    # 4 one-hot rows in 4-D: each column is (1, 0, 0, 0) up to order: unbiased std = √((¾)² + 3·(¼)²)/3) = ½
    assert spread(torch.eye(4)) == pytest.approx(0.5, abs=1e-6)


def test_dimensional_collapse_keeps_spread_but_lowers_rank() -> None:
    """Embeddings on a randomly oriented 4-D subspace of 64-D: spread stays near healthy, rank drops to ~4.

    This is why the collapse monitor watches both figures.
    """
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 4, generator=g) @ _orthonormal(64, 4, 1).T.float()
    assert spread(z) > 0.5 * healthy_spread(64)
    assert effective_rank(z) < 4.1


# ---------------------------------------------------------------- alignment and uniformity


def test_alignment_of_identical_pairs_is_zero_and_of_antipodal_pairs_is_four() -> None:
    z = torch.randn(10, 8)
    assert alignment(z, z.clone()) == pytest.approx(0.0, abs=1e-6)
    assert alignment(z, 3 * z) == pytest.approx(0.0, abs=1e-6)  # scale-free: normalised first
    assert alignment(z, -z) == pytest.approx(4.0, rel=1e-6)  # ‖a − (−a)‖² = 4
    assert alignment(torch.eye(2), torch.eye(2).flip(0)) == pytest.approx(2.0, rel=1e-6)  # orthogonal: ‖a − b‖² = 2
    assert alignment(z, -z, alpha=1.0) == pytest.approx(2.0, rel=1e-6)


def test_uniformity_of_two_antipodal_points() -> None:
    z = torch.tensor([[1.0, 0.0, 0.0], [-2.0, 0.0, 0.0]])
    assert uniformity(z) == pytest.approx(-8.0, rel=1e-6)  # log exp(−2 · 4)
    assert uniformity(z, t=1.0) == pytest.approx(-4.0, rel=1e-6)


@pytest.mark.parametrize("n", [3, 4, 10])
def test_uniformity_of_a_regular_simplex(n: int) -> None:
    # every pair at cosine −1/(n−1): ‖x − y‖² = 2 + 2/(n−1) = 2n/(n−1)
    z = _simplex(n, n + 2)
    cos = torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(z, dim=1).T
    assert torch.allclose(cos[~torch.eye(n, dtype=torch.bool)], torch.tensor(-1 / (n - 1)), atol=1e-6)
    assert uniformity(z) == pytest.approx(-2 * 2 * n / (n - 1), rel=1e-5)


def test_uniformity_of_a_collapsed_batch_is_zero_and_of_one_point_is_nan() -> None:
    assert uniformity(torch.ones(6, 3)) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(uniformity(torch.ones(1, 3)))


def test_uniformity_matches_a_naive_pair_loop() -> None:
    z = torch.randn(7, 5, generator=torch.Generator().manual_seed(3))
    x = torch.nn.functional.normalize(z, dim=1)
    terms = [math.exp(-2 * float((x[i] - x[j]).pow(2).sum())) for i in range(7) for j in range(i + 1, 7)]
    assert uniformity(z) == pytest.approx(math.log(sum(terms) / len(terms)), rel=1e-5)


# ---------------------------------------------------------------- energy gap


def test_energy_gap_of_aligned_orthogonal_pairs_is_one() -> None:
    z = torch.eye(5, 8)
    assert energy_gap(z, z.clone()) == pytest.approx(1.0, abs=1e-6)  # positives at cos 1, others at cos 0
    assert energy_gap(z, -z) == pytest.approx(-1.0, abs=1e-6)


def test_energy_gap_of_a_collapsed_batch_is_zero() -> None:
    z = torch.ones(6, 4)
    assert energy_gap(z, z + 1) == pytest.approx(0.0, abs=1e-6)  # positives and negatives equally similar


def test_energy_gap_of_aligned_simplex_pairs() -> None:
    # positives at cos 1, the others at −1/(n−1): gap = 1 + 1/(n−1) = n/(n−1)
    z = _simplex(4, 6)
    assert energy_gap(z, z) == pytest.approx(4 / 3, rel=1e-5)


def test_energy_gap_matches_a_naive_loop_and_needs_two_rows() -> None:
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))
    pos = sum(cos(z1[i], z2[i]) for i in range(6)) / 6
    neg = sum(cos(z1[i], z2[j]) for i in range(6) for j in range(6) if i != j) / 30
    assert energy_gap(z1, z2) == pytest.approx(pos - neg, rel=1e-5)
    assert math.isnan(energy_gap(z1[:1], z2[:1]))


def test_batch_diagnostics_keys() -> None:
    z = torch.randn(16, 8)
    assert set(batch_diagnostics(z)) == {"spread", "spread_healthy", "rank"}
    full = batch_diagnostics(z, z)
    assert set(full) == {"spread", "spread_healthy", "rank", "alignment", "uniformity", "energy_gap"}
    assert full["spread_healthy"] == pytest.approx(1 / math.sqrt(8))
    assert full["alignment"] == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- collapse monitor


def _feed(monitor: CollapseMonitor, batches: list[torch.Tensor], start: int = 0) -> list[dict]:
    out = []
    for i, z in enumerate(batches):
        fired = monitor.update(start + i, batch_diagnostics(z, z), z)
        if fired:
            out.append(fired["collapse_warning"])
    return out


def _isotropic(n: int = 10, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 32, generator=g) for _ in range(n)]


def test_monitor_is_silent_on_healthy_embeddings() -> None:
    monitor = CollapseMonitor(verbose=False)
    assert _feed(monitor, _isotropic(20)) == []
    assert not monitor.collapsed


def test_monitor_warns_once_on_sustained_complete_collapse(caplog) -> None:
    g = torch.Generator().manual_seed(0)
    c = torch.randn(1, 32, generator=g)
    # the embedding shrinks onto one point: spread 1/√32 · 0.5^t
    collapsing = [c + 0.5 ** t * torch.randn(64, 32, generator=g) for t in range(12)]
    monitor = CollapseMonitor(window=3)
    with caplog.at_level("WARNING", logger="selfsup"):
        warnings = _feed(monitor, collapsing)
    assert len(warnings) == 1 and warnings[0]["kind"] == "complete"
    w = warnings[0]
    assert w["spread"] < w["spread_threshold"] == pytest.approx(0.25 / math.sqrt(32))
    assert w["step"] - w["since_step"] == 2 and w["checks"] == 3  # fired on the third low check in a row
    assert "stop-gradient" in w["message"] and f"{w['spread']:.4f}" in w["message"]
    assert "COLLAPSE WARNING (complete collapse)" in caplog.text
    assert monitor.collapsed and monitor.should_stop()
    assert "complete collapse" in monitor.stop_message()


def test_monitor_names_dimensional_collapse() -> None:
    # a randomly oriented 2-D subspace of 64-D: spread stays above its threshold, rank ≈ 2 < 0.05 · 64
    g = torch.Generator().manual_seed(0)
    basis = _orthonormal(64, 2, 1).T.float()
    flat = [torch.randn(128, 2, generator=g) @ basis for _ in range(4)]
    # the run's first check spans the space; then 2 directions
    warnings = _feed(CollapseMonitor(verbose=False), [torch.randn(128, 64, generator=g)] + flat)
    assert [w["kind"] for w in warnings] == ["dimensional"]
    assert warnings[0]["rank"] < warnings[0]["rank_threshold"]
    assert "projector" in warnings[0]["message"]


def test_monitor_judges_a_run_that_starts_low_by_its_own_start() -> None:
    """A ViT at initialisation spans a few directions of its 192 (I-JEPA's recipe: rank 7 of 192, below the
    absolute bar 0.05 · 192 = 9.6): staying there is its starting point, not a collapse; falling well below
    it is."""
    g = torch.Generator().manual_seed(0)
    low = [t @ _orthonormal(192, 8, 1).T.float() for t in torch.randn(6, 256, 8, generator=g)]
    assert _feed(CollapseMonitor(verbose=False), low) == []
    falling = low[:3] + [t @ _orthonormal(192, 2, 2).T.float() for t in torch.randn(4, 256, 2, generator=g)]
    warnings = _feed(CollapseMonitor(verbose=False), falling)
    assert [w["kind"] for w in warnings] == ["dimensional"]
    assert warnings[0]["rank_threshold"] == pytest.approx(0.35 * warnings[0]["reference_rank"])


def _subspace_batches(ranks: list[int], dim: int = 64, batch: int = 128, seed: int = 0) -> list[torch.Tensor]:
    """One (batch, dim) batch per entry, isotropic within a randomly oriented k-dimensional subspace:
    effective rank ≈ k (a little below), spread near the healthy 1/√D once k is not tiny."""
    g = torch.Generator().manual_seed(seed)
    basis = _orthonormal(dim, max(ranks), seed + 1).T.float()
    return [torch.randn(batch, k, generator=g) @ basis[:k] for k in ranks]


def test_monitor_warns_when_the_rank_falls_far_below_the_runs_first_checks() -> None:
    """Dimensional collapse above the absolute threshold (0.05 × 64 = 3.2): the rank falls from ~40
    in the first checks to ~10, below 0.35 × the reference, while the spread stays up."""
    batches = _subspace_batches([40, 40, 40, 30, 10, 10, 10, 10])
    monitor = CollapseMonitor(verbose=False)
    warnings = _feed(monitor, batches)
    assert [w["kind"] for w in warnings] == ["dimensional"] and warnings[0]["step"] == 6  # 3rd low check
    w = warnings[0]
    assert w["spread"] > w["spread_threshold"] and w["rank"] > 0.05 * 64
    assert w["reference_rank"] == pytest.approx(monitor.reference_rank) and 30 < w["reference_rank"] <= 40
    assert w["rank_threshold"] == pytest.approx(0.35 * w["reference_rank"])
    assert f"0.35 × the {w['reference_rank']:.1f} this run reached in its first logged checks" in w["message"]
    # the old, absolute-only rule (rank_drop = 0) misses it
    assert _feed(CollapseMonitor(verbose=False, rank_drop=0.0), batches) == []


def test_monitor_is_silent_when_the_rank_settles_lower_but_not_collapsed() -> None:
    """A healthy run's rank often falls from its first steps (SimSiam's recipe: 146 → 92, 0.63 ×)."""
    batches = _subspace_batches([40, 36, 32, 28, 24, 24, 24, 24, 24])
    monitor = CollapseMonitor(verbose=False)
    assert _feed(monitor, batches) == [] and not monitor.collapsed


def test_the_reference_is_the_first_checks_only() -> None:
    """A rank that rises after the first checks does not raise the bar; a later fall is measured
    against the first checks' highest rank."""
    monitor = CollapseMonitor(verbose=False, reference_checks=2)
    _feed(monitor, _subspace_batches([20, 24, 60, 60]))
    assert 20 < monitor.reference_rank <= 24
    assert monitor.thresholds(128, 64)[1] == pytest.approx(0.35 * monitor.reference_rank)


def test_monitor_ignores_a_short_dip_and_rearms_after_recovery() -> None:
    collapsed = [torch.ones(64, 32) + 1e-4 * torch.randn(64, 32) for _ in range(3)]
    monitor = CollapseMonitor(window=3, verbose=False)
    assert _feed(monitor, collapsed[:2] + _isotropic(2) + collapsed[:2]) == []  # never 3 in a row
    assert len(_feed(monitor, collapsed[:1], start=10)) == 1  # third in a row now
    assert _feed(monitor, collapsed, start=11) == []  # still the same episode: no repeat
    assert _feed(monitor, _isotropic(1), start=20) == [] and not monitor.collapsed
    assert len(_feed(monitor, collapsed, start=30)) == 1  # a new episode warns again


def test_monitor_skips_non_finite_batches_and_rejects_bad_settings() -> None:
    z = torch.full((8, 4), float("nan"))
    assert CollapseMonitor(window=1, verbose=False).update(0, batch_diagnostics(z), z) == {}
    with pytest.raises(ValueError, match="window"):
        CollapseMonitor(window=0)
    with pytest.raises(ValueError, match="spread_fraction"):
        CollapseMonitor(spread_fraction=1.5)
    with pytest.raises(ValueError, match="rank_drop"):
        CollapseMonitor(rank_drop=1.0)
    with pytest.raises(ValueError, match="reference_checks"):
        CollapseMonitor(reference_checks=0)


def _tiny_run_config(tmp_path, **train):
    from selfsup.config import load_config

    overrides = {"method.name": "simclr", "data.name": "digits", "data.limit": 256, "backbone.name": "small_resnet",
                 "backbone.widths": [8, 16, 32], "train.epochs": 1, "train.batch_size": 32, "train.threads": 1,
                 "train.log_every": 1, "train.progress": False, "train.device": "cpu", "train.knn_every": 0}
    overrides.update({f"train.{k}": v for k, v in train.items()})
    return load_config(None, overrides)


def test_loop_records_the_warning_and_stops_when_asked(tmp_path, monkeypatch) -> None:
    """The wiring in the loop, with thresholds no run can meet (so a healthy tiny run 'collapses' on cue)."""
    import functools

    from selfsup.train import loop, setup
    from selfsup.train.rundir import read_metrics

    strict = functools.partial(CollapseMonitor, spread_fraction=0.999, min_rank=1e9, window=2)
    monkeypatch.setattr(setup, "CollapseMonitor", strict)
    loop.pretrain(_tiny_run_config(tmp_path), tmp_path / "warn")
    fired = [r for r in read_metrics(tmp_path / "warn") if "collapse_warning" in r]
    assert len(fired) == 1 and fired[0]["step"] == 2 and fired[0]["collapse_warning"]["kind"] in ("complete", "dimensional")
    assert (tmp_path / "warn" / "encoder.pt").is_file()  # a warning alone does not stop the run

    with pytest.raises(loop.TrainingError, match="stopped at step 2.*stop_on_collapse"):
        loop.pretrain(_tiny_run_config(tmp_path, stop_on_collapse=True), tmp_path / "stop")
    assert not (tmp_path / "stop" / "encoder.pt").exists()


def test_default_thresholds_are_silent_on_a_tiny_healthy_run(tmp_path) -> None:
    from selfsup.train import loop
    from selfsup.train.rundir import read_metrics

    loop.pretrain(_tiny_run_config(tmp_path, stop_on_collapse=True), tmp_path / "ok")
    records = read_metrics(tmp_path / "ok")
    assert any("spread" in r for r in records) and not any("collapse_warning" in r for r in records)
