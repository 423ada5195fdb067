"""The collapse monitor on SimSiam's own recipe: it warns without stop-gradient and stays silent with it.

The paper's collapse ablation (Chen & He 2020, arXiv:2011.10566, §4.1): without stop-gradient the
embeddings fall onto a few directions while their spread stays near 1/√D, so only the rank shows it.
Budget: ``configs/simsiam_fashion_mnist.yaml`` unchanged except 3 epochs on the first 4,096 images
(14 steps of 256 an epoch) and a logged check every 5 steps, one thread.

Measured (2026-11-30, 1 thread, busy 2-core CPU): without stop-gradient the rank of z went 185 → 64
(step 20) → 42 (step 28) → 32–35, the warning fired at step 28 (threshold 0.35 × 184.6 = 64.6); with
it 188 → 140 (0.75 ×), silent. 30–50 s a run.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from selfsup.config import load_config
from selfsup.data.fashion_mnist import DEFAULT_ROOT
from selfsup.train import loop
from selfsup.train.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(DEFAULT_ROOT).exists(),
                                 reason="Fashion-MNIST is not installed (make setup installs dataset-fashion-mnist)")]


def _recipe(stop_gradient: bool):
    return load_config(ROOT / "configs" / "simsiam_fashion_mnist.yaml", {
        "data.limit": 4096, "train.epochs": 3, "train.log_every": 5, "train.threads": 1, "train.progress": False,
        "train.knn_every": 0, "train.stop_on_collapse": True, "method.params.stop_gradient": stop_gradient})


def test_simsiam_without_stop_gradient_warns_and_stops(tmp_path) -> None:
    with pytest.raises(loop.TrainingError, match="dimensional collapse.*stop_on_collapse"):
        loop.pretrain(_recipe(stop_gradient=False), tmp_path / "nosg")
    fired = [r for r in read_metrics(tmp_path / "nosg") if "collapse_warning" in r]
    assert len(fired) == 1
    w = fired[0]["collapse_warning"]
    print({k: w[k] for k in ("step", "rank", "rank_threshold", "reference_rank", "spread", "spread_healthy")})
    assert w["kind"] == "dimensional" and w["step"] <= 35
    assert w["rank"] > 0.05 * 256  # above the absolute threshold: only the run's own reference catches it
    assert w["spread"] > 0.5 * w["spread_healthy"]  # not complete collapse


def test_simsiam_with_stop_gradient_stays_silent(tmp_path) -> None:
    loop.pretrain(_recipe(stop_gradient=True), tmp_path / "sg")
    records = read_metrics(tmp_path / "sg")
    ranks = [r["rank"] for r in records if "rank" in r and "epoch_time_s" not in r]
    print(f"ranks {[round(r, 1) for r in ranks]}")
    assert len(ranks) >= 8 and not any("collapse_warning" in r for r in records)
