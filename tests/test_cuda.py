"""The CUDA path, end to end: pretraining, device choice, views made on the GPU, evaluation, resuming on
the CPU, and peak memory. Marked ``cuda`` and skipped where no CUDA device is visible (CPU machines and
CI); ``benchmarks/gpu_check.sh`` runs them on a GPU machine (``pytest -m cuda tests/test_cuda.py``).

The runs use scikit-learn's digits (8×8, bundled, nothing to carry) with a small CNN, so the whole file
takes seconds on a GPU. They go through ``pretrain(cfg, run_dir)``, as the CLI does, not a method's internals.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from selfsup.config import RunConfig, load_config
from selfsup.train.checkpoint import safe_load
from selfsup.train.device import resolve_device, resolve_precision
from selfsup.train.loop import pretrain
from selfsup.views import ViewRecipe, apply_overrides, make_views, resolve_sizes
from selfsup.views import ops

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _cfg(**overrides) -> RunConfig:
    """SimCLR on digits, 2 epochs of 10 steps, bf16 autocast and channels-last forced on."""
    return load_config(None, {"data.name": "digits", "train.epochs": 2, "train.batch_size": 128, "train.device": "cuda",
                              "train.precision": "bf16", "train.channels_last": "on", "train.progress": False,
                              "train.log_every": 2, "backbone.params": {"widths": [16, 32, 64]},
                              "method.params": {"proj_hidden": 64}, **overrides})


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory) -> tuple[Path, dict, int]:
    """(run dir, last epoch's summary, peak CUDA bytes allocated while pretraining)."""
    run = tmp_path_factory.mktemp("cuda") / "run"
    torch.cuda.reset_peak_memory_stats()
    summary = pretrain(_cfg(), run)
    return run, summary, torch.cuda.max_memory_allocated()


def test_auto_device_and_precision_pick_the_gpu():
    assert resolve_device("auto").type == "cuda"
    if torch.cuda.is_bf16_supported():
        assert resolve_precision("auto", torch.device("cuda")) == torch.bfloat16


def test_pretrain_on_cuda_with_bf16_and_channels_last_writes_a_run_dir(cuda_run):
    run, summary, _ = cuda_run
    for name in ("config.yaml", "env.json", "metrics.jsonl", "encoder.pt", "encoder.json", "checkpoints/last.pt",
                 "checkpoints/epoch_1.pt"):
        assert (run / name).is_file(), name
    env = json.loads((run / "env.json").read_text())
    assert env["device"].startswith("cuda") and env["gpu"]
    assert env["precision"] == "torch.bfloat16" and env["channels_last"] is True
    steps = [r for r in _records(run) if "lr" in r]
    assert steps and all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in steps)
    assert not any(r.get("skipped") for r in steps), "bf16 on CUDA produced non-finite steps"
    assert summary["epoch"] == 2 and math.isfinite(summary["loss"]) and summary["knn"] is not None
    encoder = safe_load(run / "encoder.pt")
    assert all(t.device.type == "cpu" for t in encoder.values()), "encoder.pt must load without a GPU"


def test_peak_memory_is_measured(cuda_run):
    _, _, peak = cuda_run
    assert 0 < peak < torch.cuda.get_device_properties(0).total_memory
    print(f"peak CUDA memory allocated by the digits pretrain: {peak / 2**20:.1f} MiB")


VIEW_OPS = {
    "resized_crop_flip": lambda x: ops.resized_crop_flip(x, 24, (0.2, 1.0), (3 / 4, 4 / 3), 0.5),
    "color_jitter": lambda x: ops.color_jitter(x, 0.8, 0.4, 0.4, 0.4, 0.1),
    "random_grayscale": lambda x: ops.random_grayscale(x, 0.5),
    "gaussian_blur": lambda x: ops.gaussian_blur(x, 1.0, (0.1, 2.0)),
    "solarize": lambda x: ops.solarize(x, 0.5),
}


@pytest.mark.parametrize("name", list(VIEW_OPS))
@pytest.mark.parametrize("channels", [1, 3])
def test_view_ops_run_on_the_gpu_and_return_gpu_tensors(name, channels):
    x = torch.rand(16, channels, 32, 32, device="cuda")
    y = VIEW_OPS[name](x.clone())
    assert y.is_cuda and y.dtype == x.dtype and y.shape[:2] == x.shape[:2]
    assert torch.isfinite(y).all() and y.min() >= -1e-5 and y.max() <= 1 + 1e-5


def test_make_views_makes_no_host_copy_and_no_sync():
    """After a warm-up call (which copies the few constants once), making views touches the host not at
    all: ``set_sync_debug_mode('error')`` raises on any device-host copy or synchronisation."""
    batch = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device="cuda")
    recipe = resolve_sizes(apply_overrides(ViewRecipe(), {"solarize_p": 0.2, "local_crops": 2}), 32)
    mean, std = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
    make_views(batch, recipe, mean, std)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        views = make_views(batch, recipe, mean, std)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(views) == 4 and all(v.is_cuda and v.dtype == torch.float32 for v in views)
    assert torch.isfinite(torch.cat([v.flatten() for v in views])).all()


def test_evaluate_run_on_cuda(cuda_run):
    from selfsup.eval.evaluate import evaluate_run

    run, _, _ = cuda_run
    results = evaluate_run(run, ["knn", "linear"], device="cuda", write=False)
    assert [r["protocol"] for r in results] == ["knn", "linear"]
    for r in results:  # digits has 10 classes: chance is 10%
        assert 0.2 < r["accuracy"] <= 1.0, r
        assert all(0.0 <= v <= 1.0 for v in r["baselines"].values())


def test_checkpoint_written_on_cuda_resumes_on_cpu(cuda_run, tmp_path):
    """The epoch-1 checkpoint of the CUDA run, loaded with map_location=cpu, finishes epoch 2 on the CPU."""
    run, _, _ = cuda_run
    resumed = tmp_path / "run"
    shutil.copytree(run, resumed)
    (resumed / "encoder.pt").unlink()
    shutil.copy(resumed / "checkpoints" / "epoch_1.pt", resumed / "checkpoints" / "last.pt")
    ckpt = safe_load(resumed / "checkpoints" / "last.pt", map_location="cpu")
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())
    first_epoch_steps = int(ckpt["step"])
    summary = pretrain(_cfg(**{"train.device": "cpu", "train.threads": 2}), resumed)
    assert summary["epoch"] == 2 and math.isfinite(summary["loss"])
    env = json.loads((resumed / "env.json").read_text())
    assert env["device"] == "cpu" and env["resumed_from_step"] == first_epoch_steps
    steps = [r["step"] for r in _records(resumed) if "lr" in r]
    assert steps == sorted(set(steps)) and steps[-1] == summary["step"], "resumed metrics repeat or skip steps"
    assert (resumed / "encoder.pt").is_file()
