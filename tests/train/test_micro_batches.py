"""``train.micro_batch_size`` (selfsup.train.micro): a step in chunks has the whole batch's loss and gradients.

BatchNorm, the one documented difference (a chunk's batch statistics), is handled two ways here:

- against the whole batch, the networks' BatchNorm layers run in eval mode (running statistics), so every
  cross-sample interaction left is the method's loss — which GradCache must reproduce exactly;
- with BatchNorm in training mode, against the same chunks computed with gradient in one graph (the reference a
  micro-batched step must equal: BN statistics per chunk, the first pass's random draws), which also checks that
  running statistics move once per chunk, not twice, and that random draws are replayed.

Tiny methods (tests/methods' settings), float64, 16 px, batch 16 in chunks of 6 (sizes 6, 5, 5: uneven on purpose).
"""
from __future__ import annotations

import copy
import json
import math
import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.modules.batchnorm import _BatchNorm

from selfsup.config import ConfigError, load_config
from selfsup.methods import METHODS
from selfsup.methods.base import embed_of, loss_of, make_progress, run_after_step, targets_of
from selfsup.train import micro
from selfsup.train.micro import _take, accumulate, chunk_slices, micro_problems
from spawned import gloo_group

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))
from test_methods import fixed_views, tiny_batch, tiny_method  # noqa: E402  (the registry tests' tiny settings)

SIZE = 6
SPLIT = [m for m, info in METHODS.items() if hasattr(info.cls, "loss_from")]  # the embed/loss_from split
DECLARED = {m: info.spec.micro_batches for m, info in METHODS.items()}
PER_SAMPLE = sorted(m for m, kind in DECLARED.items() if kind == "per_sample")
STATEFUL = {m for m in SPLIT if hasattr(METHODS[m].cls, "after_step")}  # queues, supports, centres
# NNCLR's support set holds fp32 rows (its neighbours are fp32 whatever the embeddings' dtype): compared in fp32
FP32_ONLY = {"nnclr"}
# Steps that draw twice per batch (tile jitter, then puzzle labels): chunks interleave the draws, so they are
# compared with the same chunks' losses in one graph rather than with the whole batch's draws
INTERLEAVED_DRAWS = {"jigsaw", "relative_position"}


def _in_chans(name: str) -> int:
    return METHODS[name].spec.test_in_chans


def _setup(name: str, digits, bn_eval: bool, **backbone):
    """The tiny method in float64, its fixed views (and ``boxes=``), BatchNorm in eval mode when asked."""
    torch.manual_seed(0)
    dtype = torch.float32 if name in FP32_ONLY else torch.float64
    method = tiny_method(name, _in_chans(name)).to(dtype)
    views, extra = fixed_views(method, tiny_batch(digits, _in_chans(name)))
    views = [v.to(dtype) for v in views]
    if bn_eval:
        for m in method.modules():
            if isinstance(m, _BatchNorm):
                m.eval()
    return method, views, extra


def _warm(method, views, extra, progress) -> None:
    """One step's state updates (a queue filled, a centre moved), so the step compared reads them."""
    with torch.no_grad():
        _, logs = method.training_step(views, progress, **extra)
    run_after_step(method, progress, logs)


def _grads(method) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in method.named_parameters() if p.grad is not None}


def _whole(method, views, extra, progress, seed: int = 5):
    method.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, logs = method.training_step(views, progress, **extra)
    loss.backward()
    return loss.detach(), _grads(method), logs


def _micro(method, views, extra, progress, seed: int = 5, kind: str | None = None, size: int = SIZE):
    method.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, logs = accumulate(method, views, progress, extra, size, kind=kind)
    return loss, _grads(method), logs


def _chunk_losses(method, views, extra, progress, seed: int = 5, size: int = SIZE):
    """The reference for steps whose draws interleave: each chunk's ``training_step`` in order, their losses weighted
    by the chunks' shares in one graph, one backward."""
    method.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    b, loss, logs = views[0].shape[0], 0.0, {}
    for part in chunk_slices(b, size):
        chunk_loss, logs = method.training_step(_take(views, part), progress, **_take(extra, part))
        loss = loss + chunk_loss * ((part.stop - part.start) / b)
    loss.backward()
    return loss.detach(), _grads(method), logs


def _chunked_graph(method, views, extra, progress, seed: int = 5, size: int = SIZE):
    """The reference with BatchNorm in training: every chunk's ``embed`` then ``targets`` with gradient, in order (the
    draws of the micro path's first pass), the loss once on their concatenation, one backward."""
    method.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    student, teacher = [], []
    for part in chunk_slices(views[0].shape[0], size):
        v, e = _take(views, part), _take(extra, part)
        student.append(embed_of(method, v, progress, **e))
        teacher.append(targets_of(method, v, progress, **e))
    emb = {k: torch.cat([c[k] for c in student]) for k in student[0]}
    emb.update({k: torch.cat([c[k] for c in teacher]) for k in teacher[0]})
    loss, logs = loss_of(method, emb, progress, **extra)
    loss.backward()
    return loss.detach(), _grads(method), logs


def _assert_same(name: str, got, want) -> None:
    """The loss and every parameter's gradient to 1e-5 (relative; fp32-only methods 1e-4)."""
    (loss, grads), (ref_loss, ref_grads) = got[:2], want[:2]
    fp32 = ref_loss.dtype == torch.float32
    rtol, noise = (1e-4, 1e-5) if fp32 else (1e-5, 1e-9)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=noise, msg=f"{name}: loss {loss} vs {ref_loss}")
    assert grads.keys() == ref_grads.keys(), f"{name}: parameters with a gradient differ: {grads.keys() ^ ref_grads.keys()}"
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for key, g in ref_grads.items():  # exact zeros come out as rounding noise of the size of the largest gradient
        worst = float((grads[key] - g).abs().max())
        torch.testing.assert_close(grads[key], g, rtol=rtol, atol=noise * (1 + scale),
                                   msg=f"{name}: gradient of {key} off by up to {worst:.3g} (largest {scale:.3g})")


def _warm_cases(names) -> list:
    return [pytest.param(n, w, id=f"{n}-{'warm' if w else 'first'}") for n in sorted(names)
            for w in ((False, True) if n in STATEFUL else (False,))]


# ---------------------------------------------------------------- the declarations


def test_every_method_declares_a_way_that_it_has():
    for name, kind in DECLARED.items():
        assert kind in (None, "embeddings", "per_sample"), name
        if kind == "embeddings":
            assert name in SPLIT, f"{name} declares GradCache but has no embed/loss_from"
    assert {"simclr", "swav", "vicreg", "byol"} <= set(SPLIT)
    assert {"mae", "simmim", "rotation", "jigsaw", "relative_position", "colorization"} <= set(PER_SAMPLE)


def test_chunks_are_near_equal_and_cover_the_batch():
    assert [(s.start, s.stop) for s in chunk_slices(16, 6)] == [(0, 6), (6, 11), (11, 16)]
    assert [s.stop - s.start for s in chunk_slices(4096, 256)] == [256] * 16
    assert [s.stop - s.start for s in chunk_slices(10, 20)] == [10]
    for b, m in ((17, 5), (1000, 256), (7, 1)):
        sizes = [s.stop - s.start for s in chunk_slices(b, m)]
        assert sum(sizes) == b and max(sizes) <= m and max(sizes) - min(sizes) <= 1 and len(sizes) == math.ceil(b / m)


# ---------------------------------------------------------------- GradCache = the whole batch (BN in eval mode)


@pytest.mark.parametrize("name,warm", _warm_cases(n for n in SPLIT if not METHODS[n].spec.stochastic_step))
def test_grad_cache_equals_the_whole_batch(name, warm, digits):
    method, views, extra = _setup(name, digits, bn_eval=True)
    progress = make_progress(method, 5, 100, 0, 10)
    if warm:
        _warm(method, views, extra, progress)
    want = _whole(method, views, extra, progress)
    got = _micro(method, views, extra, progress, kind="embeddings")
    _assert_same(name, got, want)
    assert got[2].keys() == want[2].keys()
    for key in ("z", "z_pair"):
        if key in want[2]:
            torch.testing.assert_close(got[2][key], want[2][key], rtol=1e-6, atol=1e-8)
            assert not got[2][key].requires_grad


@pytest.mark.parametrize("name", PER_SAMPLE)
def test_plain_accumulation_equals_the_whole_batch(name, digits):
    """Per-sample losses: chunks' losses scaled by their share; the methods' random draws (masks, puzzles) come from
    one stream element by element, so the chunks draw what the whole batch does."""
    method, views, extra = _setup(name, digits, bn_eval=True)
    progress = make_progress(method, 5, 100, 0, 10)
    want = (_chunk_losses if name in INTERLEAVED_DRAWS else _whole)(method, views, extra, progress)
    got = _micro(method, views, extra, progress)
    _assert_same(name, got, want)
    logs, ref = got[2], want[2]
    assert logs.keys() == ref.keys()
    if "z" in ref:  # per-sample logs are the whole batch's
        assert logs["z"].shape[0] == views[0].shape[0] and logs["z"].shape[1:] == ref["z"].shape[1:]
    if name == "dino":  # a batch mean merged from the chunks' is the batch's: the centre moves as with one pass
        torch.testing.assert_close(logs["teacher_mean"], ref["teacher_mean"], rtol=1e-6, atol=1e-10)
    run_after_step(method, progress, logs)


# ---------------------------------------------------------------- BN in training: chunks, random draws, running stats


@pytest.mark.parametrize("name", sorted(SPLIT))
def test_grad_cache_with_batchnorm_training_equals_the_chunks_in_one_graph(name, digits):
    """Also: the buffers (BN running statistics and batch counts, teachers' included) end where one pass over the
    chunks leaves them — the no-gradient pass does not move them a second time."""
    method, views, extra = _setup(name, digits, bn_eval=False)
    progress = make_progress(method, 5, 100, 0, 10)
    ref_method = copy.deepcopy(method)
    want = _chunked_graph(ref_method, views, extra, progress)
    got = _micro(method, views, extra, progress, kind="embeddings")
    _assert_same(name, got, want)
    buffers, ref_buffers = dict(method.named_buffers()), dict(ref_method.named_buffers())
    for key, b in ref_buffers.items():
        torch.testing.assert_close(buffers[key], b, rtol=1e-7, atol=1e-10, msg=f"{name}: buffer {key}")


def test_running_statistics_move_once_per_chunk(digits):
    method, views, extra = _setup("simclr", digits, bn_eval=False)
    bn = method.backbone.stem[1]
    before_mean, before_count = bn.running_mean.clone(), int(bn.num_batches_tracked)
    _micro(method, views, extra, make_progress(method, 0, 100, 0, 10))
    chunks = len(chunk_slices(views[0].shape[0], SIZE))
    assert int(bn.num_batches_tracked) == before_count + chunks  # 3, not 6: the no-gradient pass left them
    expected = before_mean.clone()  # what one forward per chunk does to it, computed independently
    m = bn.momentum
    with torch.no_grad():
        for part in chunk_slices(views[0].shape[0], SIZE):
            stem_in = torch.cat([views[0][part], views[1][part]])
            conv = method.backbone.stem[0](stem_in)
            expected = (1 - m) * expected + m * conv.mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-9, atol=1e-12)


def test_random_draws_are_replayed_in_the_second_pass(digits, monkeypatch):
    """Drop-path on a ViT: the second pass must draw what the first drew, or the cached gradients belong to other
    networks. Without the replay the gradients differ (so the check has teeth)."""
    torch.manual_seed(0)
    from selfsup.methods.simclr import SimCLR
    from selfsup.nn.backbones import build_backbone

    backbone = build_backbone("vit_tiny", 1, 16, depth=2, embed_dim=48, num_heads=3, drop_path=0.5)
    method = SimCLR(backbone, proj_hidden=32, proj_dim=16).double()
    views, _ = fixed_views(method, tiny_batch(digits))
    views = [v.double() for v in views]
    progress = make_progress(method, 0, 100, 0, 10)
    want = _chunked_graph(copy.deepcopy(method), views, {}, progress, seed=7)
    other = _chunked_graph(copy.deepcopy(method), views, {}, progress, seed=8)
    assert not torch.allclose(want[0], other[0]), "drop-path draws nothing: the test would not see a missing replay"
    _assert_same("simclr+drop_path", _micro(method, views, {}, progress, seed=7), want)
    monkeypatch.setattr(micro.RandState, "replay", lambda self: torch.random.fork_rng(devices=[]))
    unreplayed = _micro(method, views, {}, progress, seed=7)
    assert not torch.allclose(unreplayed[1]["backbone.patch_embed.proj.weight"],
                              want[1]["backbone.patch_embed.proj.weight"])


def test_masked_views_of_msn_are_replayed(digits):
    """MSN draws its anchors' masks inside ``embed``: GradCache with replay equals the chunks in one graph (covered
    for every method above; named here because it is the masked case)."""
    method, views, extra = _setup("msn", digits, bn_eval=False)
    progress = make_progress(method, 5, 100, 0, 10)
    want = _chunked_graph(copy.deepcopy(method), views, extra, progress, seed=3)
    _assert_same("msn", _micro(method, views, extra, progress, seed=3), want)


# ---------------------------------------------------------------- refusals and checks


def test_methods_that_support_neither_are_refused_in_one_line():
    unsupported = sorted(m for m, kind in DECLARED.items() if kind is None)
    assert "pirl" in unsupported
    method = tiny_method("pirl")
    (line,) = micro_problems(method, "pirl", 4, 16)
    assert "pirl" in line and "micro_batch_size" in line and "\n" not in line and "lower train.batch_size" in line
    with pytest.raises(ValueError, match="pirl|PIRL"):
        accumulate(method, [torch.zeros(4, 1, 16, 16)] * 2, make_progress(method, 0, 10, 0, 10), {}, 2)
    assert micro_problems(tiny_method("simclr"), "simclr", 4, 16) == []
    assert micro_problems(method, "pirl", None, 16) == []


def test_chunks_of_one_image_are_refused_where_batchnorm_trains():
    (line,) = micro_problems(tiny_method("simclr"), "simclr", 1, 16)
    assert "BatchNorm" in line and "≥ 2" in line
    assert micro_problems(tiny_method("mae"), "mae", 1, 16) == []  # a ViT: no BatchNorm


def test_config_checks_the_setting():
    for value, needle in ((0, "train.micro_batch_size must be ≥ 1"), (-3, "must be ≥ 1")):
        with pytest.raises(ConfigError, match=needle):
            load_config(None, {"train.micro_batch_size": value})
    with pytest.raises(ConfigError, match="train.compile=backbone"):
        load_config(None, {"train.micro_batch_size": 8, "train.compile": "on"})
    assert load_config(None, {"train.micro_batch_size": 8}).train.micro_batch_size == 8


# ---------------------------------------------------------------- the loop: real runs on digits

RUN = {"data.name": "digits", "data.limit": 256, "backbone.name": "small_resnet", "backbone.widths": [8, 16],
       "train.batch_size": 32, "train.threads": 1, "train.log_every": 1, "train.progress": False,
       "train.device": "cpu", "train.knn_every": 0, "train.epochs": 1}


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name,params", [("simclr", {"proj_hidden": 32}), ("rotation", {"head_hidden": 16})])
def test_a_real_epoch_with_micro_batches(name, params, tmp_path, monkeypatch):
    """One epoch of 7 steps on digits, batch 32 in chunks of at most 10 (⌈32/10⌉ = 4 chunks of 8), under the loop's
    precision (bf16 autocast where the CPU has it): a finite loss every step and the same steps as without."""
    from selfsup.train import loop

    settings = {**RUN, "method.name": name, "method.params": params}
    plain = loop.pretrain(load_config(None, settings), tmp_path / "plain")
    calls = []
    monkeypatch.setattr(loop, "micro_step", lambda *a: calls.append(a[1][0].shape[0]) or micro.micro_step(*a))
    chunked = loop.pretrain(load_config(None, {**settings, "train.micro_batch_size": 10}), tmp_path / "micro")
    assert calls == [32] * 7  # every step went through the micro-batch path
    steps = [r["step"] for r in _records(tmp_path / "micro") if "lr" in r]
    assert steps == [r["step"] for r in _records(tmp_path / "plain") if "lr" in r] == list(range(1, 8))
    assert chunked["step"] == plain["step"] == 7
    losses = [r["loss"] for r in _records(tmp_path / "micro") if "lr" in r]
    assert all(math.isfinite(v) for v in losses) and not any(r.get("skipped") for r in _records(tmp_path / "micro"))
    assert (tmp_path / "micro" / "encoder.pt").is_file()


def test_non_finite_micro_steps_are_skipped_and_clipping_applies(tmp_path, monkeypatch):
    """The loop's finite check and gradient clipping see the micro-batched gradients: a NaN loss from step 4 on
    (GradCache's ``loss_from``) is skipped like any, and three in a row stop the run with its checkpoint intact."""
    from selfsup.methods.simclr import SimCLR
    from selfsup.train.loop import TrainingError, pretrain
    from selfsup.train.checkpoint import safe_load

    original = SimCLR.loss_from

    def poisoned(self, emb, progress):
        loss, logs = original(self, emb, progress)
        return (loss * float("nan"), logs) if progress.step >= 4 else (loss, logs)

    monkeypatch.setattr(SimCLR, "loss_from", poisoned)
    cfg = load_config(None, {**RUN, "method.name": "simclr", "method.params": {"proj_hidden": 32},
                             "train.micro_batch_size": 10, "train.checkpoint_steps": 2, "train.max_bad_steps": 3,
                             "optim.clip_grad": 1.0})
    with pytest.raises(TrainingError, match="stopped at step 4: 3 consecutive steps"):
        pretrain(cfg, tmp_path / "run")
    assert int(safe_load(tmp_path / "run" / "checkpoints" / "last.pt")["step"]) == 4


def test_a_refused_method_stops_before_training(tmp_path):
    from selfsup.train.loop import pretrain

    cfg = load_config(None, {**RUN, "method.name": "pirl", "train.micro_batch_size": 8,
                             "method.params": {"num_negatives": 16}})
    with pytest.raises(ConfigError, match="pirl cannot split a batch into micro-batches"):
        pretrain(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


# ---------------------------------------------------------------- DDP: one all-reduce, the same gradients

WORLD = 2
DDP_METHODS = ("swav", "byol")  # GradCache with the loss's own parameters (prototypes); plain accumulation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_setup(name: str, gather: bool):
    from test_methods import tiny_recipe
    from selfsup.views import make_views

    torch.manual_seed(0)
    method = tiny_method(name).double()
    if hasattr(method, "gather"):
        method.gather = gather
    for m in method.modules():
        if isinstance(m, _BatchNorm):
            m.eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2 * 8, 1, 16, 16), generator=g, dtype=torch.uint8)
    torch.manual_seed(2)
    views = [v.double() for v in make_views(images, tiny_recipe(method), [0.5], [0.25])]
    return method, views


def _ddp_worker(rank: int, port: int, out: str) -> None:
    from selfsup.train.setup import _Stepper

    with gloo_group(rank, WORLD, port):
        result = {}
        for name in DDP_METHODS:
            method, views = _ddp_setup(name, gather=True)
            stepper = torch.nn.parallel.DistributedDataParallel(_Stepper(method))
            mine = [v[rank * 8:(rank + 1) * 8] for v in views]
            torch.manual_seed(5)
            loss, _ = accumulate(method, mine, make_progress(method, 5, 100, 0, 10), {}, 3, stepper=stepper)
            dist.all_reduce(loss)
            result[name] = (loss / WORLD, _grads(method))  # DDP has averaged the gradients
        if rank == 0:
            torch.save(result, os.path.join(out, "ddp.pt"))


def test_ddp_two_processes_with_micro_batches_match_one_process():
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_ddp_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
        got = torch.load(os.path.join(out, "ddp.pt"), weights_only=True)
    for name in DDP_METHODS:
        method, views = _ddp_setup(name, gather=False)
        want = _whole(method, views, {}, make_progress(method, 5, 100, 0, 10))
        _assert_same(f"{name} (2 processes, micro-batches)", got[name], want)
