"""Evaluation protocols and using the encoder: fine-tuning with few labels, few-shot probes, transfer
to an image folder, embeddings, neighbours and near-duplicates, export; and the bad inputs of each.

Runs are real: tiny SimCLR pretraining on scikit-learn's 8×8 digits (one epoch, tiny widths).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.cli import main
from selfsup.config import ConfigError, config_from_dict
from selfsup.data import DataError
from selfsup.eval.embed import embed_folder, read_embeddings, write_embeddings
from selfsup.eval.evaluate import evaluate_run, format_table
from selfsup.train.rundir import load_run
from selfsup.monitor.features import extract_features
from selfsup.eval.finetune import FinetuneSettings, classifier_accuracy, train_classifier
from selfsup.eval.neighbors import cosine_topk, duplicate_groups
from selfsup.train.checkpoint import CheckpointError

FAST = FinetuneSettings(min_steps=15, max_steps=15, batch_size=64)


pytestmark = pytest.mark.usefixtures("one_thread")


def _pretrain(out: Path, backbone: str, params: dict, limit: int | None = None, batch: int = 64) -> Path:
    from selfsup.train.loop import pretrain

    cfg = config_from_dict({
        "method": {"name": "simclr", "params": {"proj_hidden": 32, "proj_dim": 16}},
        "backbone": {"name": backbone, "params": params},
        "data": {"name": "digits", "limit": limit, "val_size": 20},
        "optim": {"name": "sgd", "lr": 0.05},
        "train": {"epochs": 1, "batch_size": batch, "device": "cpu", "progress": False, "knn_every": 0,
                  "threads": 1}})
    pretrain(cfg, out)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return _pretrain(tmp_path_factory.mktemp("evalp") / "simclr", "small_resnet", {"widths": [8, 16, 32]})


def _copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("checkpoints", "eval_*.json"))
    return dest


def _write_pngs(root: Path, images: torch.Tensor, labels: torch.Tensor | None, n: int) -> list[Path]:
    """The first ``n`` images as 8-bit grayscale PNGs, in class subfolders when labels are given."""
    paths = []
    for i in range(n):
        folder = root / f"class_{int(labels[i])}" if labels is not None else root
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:04d}.png"
        Image.fromarray(images[i, 0].numpy(), "L").save(path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------- fine-tune


def test_finetune_steps_scale_with_the_label_count() -> None:
    s = FinetuneSettings()
    assert s.steps_for(50) == s.min_steps  # 5-shot on 10 classes: the floor
    assert s.steps_for(600) == s.min_steps  # 1% of Fashion-MNIST: 30 epochs would be 141 steps
    assert s.steps_for(6000) == 1407  # 10%: 30 epochs of batch 128
    assert s.steps_for(60000) == s.max_steps  # 100%: capped
    assert s.to_dict(50)["effective_batch_size"] == 50


def test_finetuning_from_scratch_learns_digits(digits) -> None:
    """The recipe itself works: a tiny CNN trained from scratch on digits' 1,437 labels beats 80%."""
    from selfsup.nn.backbones import SmallResNet

    train, test = digits
    mean, std = train.mean_std()
    settings = FinetuneSettings(min_steps=120, max_steps=120, batch_size=64, lr=3e-3)
    model = train_classifier(SmallResNet(1, (8, 16, 32)), 32, train, mean, std, settings)
    assert not model.training  # evaluation uses BN running statistics
    assert classifier_accuracy(model, test, mean, std) > 0.8


def test_finetune_protocol_reports_pretrained_and_from_scratch(run_dir) -> None:
    weights = (run_dir / "encoder.pt").read_bytes()
    # after a frozen-feature protocol in the same call, whose extraction must not leave the encoder untrainable
    linear, result = evaluate_run(run_dir, ["linear", "finetune"], labels="10%", finetune_settings=FAST)
    assert result["protocol"] == "finetune" and result["labels"] == "10%"
    assert set(result["baselines"]) == {"from_scratch", "raw_pixels", "random_encoder"}
    assert all(0 <= v <= 1 for v in [result["accuracy"], *result["baselines"].values()])
    assert result["margin_over_scratch"] == pytest.approx(result["accuracy"] - result["baselines"]["from_scratch"])
    assert result["settings"]["steps"] == 15 and result["settings"]["batchnorm"] == "train mode"
    assert result["n_train"] == linear["n_train"] == pytest.approx(0.1 * 1437, abs=10)
    # the frozen baselines of a fine-tune are the linear probes on the same labels
    assert result["baselines"]["raw_pixels"] == linear["baselines"]["raw_pixels"]
    assert json.loads((run_dir / "eval_finetune_10pct.json").read_text())["accuracy"] == result["accuracy"]
    assert (run_dir / "encoder.pt").read_bytes() == weights  # the run itself is not modified
    assert "from scratch (fine-tuned)" in format_table([linear, result])
    assert result["seed"] == 0 and result["pretraining_epochs"] == 1
    # another seed (another label subset) is written beside seed 0's, not over it
    (other,) = evaluate_run(run_dir, ["finetune"], labels="10%", finetune_settings=FAST, seed=1)
    assert json.loads((run_dir / "eval_finetune_10pct_seed1.json").read_text())["seed"] == 1
    assert json.loads((run_dir / "eval_finetune_10pct.json").read_text())["accuracy"] == result["accuracy"]
    from selfsup.report.html import _eval_results

    assert "10% (seed 1)" in _eval_results(run_dir)
    # same seed, same recipe → the same numbers
    (again,) = evaluate_run(run_dir, ["finetune"], labels="10%", finetune_settings=FAST, write=False)
    assert again["accuracy"] == result["accuracy"]
    assert again["baselines"]["from_scratch"] == result["baselines"]["from_scratch"]


def test_an_encoder_stays_trainable_after_feature_extraction(digits) -> None:
    """extract_features converts weights to channels-last; done in inference mode, they could never be trained."""
    from selfsup.nn.backbones import SmallResNet

    model = SmallResNet(1, (8, 16))
    extract_features(model, digits[1], [0.5], [0.5], channels_last=True)
    assert not any(p.is_inference() for p in model.parameters())
    model(torch.randn(2, 1, 8, 8)).sum().backward()


def test_linear_probe_head_init_starts_from_the_probe(run_dir, digits) -> None:
    """LP-FT: with zero steps' worth of learning rate, the classifier is the linear probe itself."""
    from selfsup.eval.linear import linear_probe

    run, (train, test) = load_run(run_dir), digits
    mean, std = run.meta["mean"], run.meta["std"]
    settings = FinetuneSettings(min_steps=1, max_steps=1, lr=1e-12, head_init="linear_probe", probe_l2=1e-3)
    feats = [extract_features(run.encoder, s, mean, std) for s in (train, test)]
    model = train_classifier(run.encoder, 32, train, mean, std, settings)
    probe = linear_probe(*feats[:1], train.labels, feats[1], test.labels, 10, l2_grid=(1e-3,))
    # one step in train mode moved the BN running statistics a little; the accuracy stays the probe's
    assert classifier_accuracy(model, test, mean, std) == pytest.approx(probe["accuracy"], abs=0.03)


def test_layer_decay_scales_each_vit_layer_below_the_head(digits) -> None:
    """BEiT/MAE layer-wise decay: head, final norm and top block at the full rate, each block below × decay,
    the patch embedding lowest; biases and norms without weight decay; every trainable weight in one group."""
    from selfsup.eval.finetune import Classifier, _optimizer_groups
    from selfsup.nn.vit import vit_tiny

    model = Classifier(vit_tiny(1, 8, depth=3, embed_dim=48, num_heads=3), 48, 10)
    groups = _optimizer_groups(model, FinetuneSettings(layer_decay=0.5, weight_decay=0.05))
    scale, decay = {}, {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in scale
            scale[id(p)], decay[id(p)] = g["lr_scale"], g["weight_decay"]
    named = dict(model.named_parameters())
    assert set(scale) == {id(p) for p in named.values() if p.requires_grad}
    expected = {"head.weight": 1, "encoder.norm.weight": 1, "encoder.blocks.2.attn.qkv.weight": 1,
                "encoder.blocks.1.attn.qkv.weight": 0.5, "encoder.blocks.0.mlp.fc1.weight": 0.25,
                "encoder.patch_embed.proj.weight": 0.125, "encoder.cls_token": 0.125}
    for name, s in expected.items():
        assert scale[id(named[name])] == pytest.approx(s), name
    assert decay[id(named["head.weight"])] == 0.05 and decay[id(named["head.bias"])] == 0
    assert decay[id(named["encoder.blocks.0.norm1.weight"])] == 0
    # trained with a tiny decay, the patch embedding barely moves while the head learns
    train, _ = digits
    mean, std = train.mean_std()
    watched = ["encoder.patch_embed.proj.weight", "encoder.blocks.2.attn.qkv.weight"]
    before = {n: named[n].detach().clone() for n in watched}
    train_classifier(model.encoder, 48, train, mean, std, FinetuneSettings(min_steps=5, max_steps=5, layer_decay=1e-4,
                                                                            warmup_fraction=0))
    moved = {n: float((named[n].detach() - before[n]).abs().max()) for n in watched}
    assert moved["encoder.patch_embed.proj.weight"] < 1e-6 < 1e-4 < moved["encoder.blocks.2.attn.qkv.weight"]


def test_layer_decay_needs_a_vit_and_a_rate_in_range(digits) -> None:
    from selfsup.nn.backbones import SmallResNet

    with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\]"):
        FinetuneSettings(layer_decay=0)
    with pytest.raises(ValueError, match="head_init must be"):
        FinetuneSettings(head_init="zeros")
    train, _ = digits
    with pytest.raises(ValueError, match="needs a ViT encoder; this one is a SmallResNet"):
        train_classifier(SmallResNet(1, (8, 16)), 16, train, [0.5], [0.5], FinetuneSettings(layer_decay=0.75))


def test_from_scratch_gets_the_better_of_the_shared_and_the_plain_recipe(run_dir) -> None:
    """A pretrained-only knob (here the probe-initialised head) is tried on the from-scratch encoder too,
    and without it; the baseline is the better of the two, so the margin is never flattered."""
    settings = FinetuneSettings(min_steps=15, max_steps=15, batch_size=64, head_init="linear_probe")
    assert settings.for_scratch() == FinetuneSettings(min_steps=15, max_steps=15, batch_size=64)
    assert dataclasses.replace(settings, lr=1e-4, layer_decay=0.5).for_scratch() == settings.for_scratch()
    (result,) = evaluate_run(run_dir, ["finetune"], labels="10%", finetune_settings=settings, write=False)
    recipes = result["from_scratch_recipes"]
    assert [(r["head_init"], r["lr"]) for r in recipes] == [("linear_probe", 1e-3), ("random", 1e-3)]
    assert result["baselines"]["from_scratch"] == max(r["accuracy"] for r in recipes)
    (plain,) = evaluate_run(run_dir, ["finetune"], labels="10%", finetune_settings=FAST, write=False)
    assert len(plain["from_scratch_recipes"]) == 1  # nothing pretrained-only: one from-scratch run


def test_finetune_from_the_command_line(run_dir, capsys) -> None:
    argv = ["evaluate", str(run_dir), "--protocol", "finetune", "--labels", "5-shot", "--finetune-steps", "5",
            "--threads", "1", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_train"] == 50 and result["settings"]["steps"] == 5 and "from_scratch" in result["baselines"]
    assert main(argv[:-1]) == 0  # the table
    assert "from scratch (fine-tuned)" in capsys.readouterr().out
    assert main(argv + ["--finetune-head", "linear_probe"]) == 0  # LP-FT
    assert json.loads(capsys.readouterr().out)["settings"]["head_init"] == "linear_probe"
    assert main(argv + ["--finetune-lr", "3e-4"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["lr"] == 3e-4
    assert main(argv + ["--finetune-lr", "0"]) == 2
    assert "--finetune-lr must be > 0" in capsys.readouterr().err
    assert main(argv + ["--finetune-layer-decay", "0.75"]) == 2  # a CNN run: refused before any training
    assert "layer-wise learning-rate decay needs a ViT" in capsys.readouterr().err
    assert main(argv + ["--finetune-layer-decay", "1.5"]) == 2
    assert "--finetune-layer-decay: layer_decay must be in (0, 1]" in capsys.readouterr().err


def test_a_label_fraction_that_empties_a_class_is_an_error(run_dir, capsys) -> None:
    with pytest.raises(DataError, match="leaves class '0' with no example"):
        evaluate_run(run_dir, ["finetune"], labels="0.1%", finetune_settings=FAST, write=False)
    assert main(["evaluate", str(run_dir), "--protocol", "knn", "--labels", "0.1%"]) == 2
    assert "leaves class '0' with no example" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- label fractions


@pytest.mark.parametrize("labels, n_train", [("5-shot", 50), ("1-shot", 10), ("10%", None)])
def test_knn_and_linear_with_label_fractions_and_few_shot(run_dir, digits, labels, n_train) -> None:
    results = evaluate_run(run_dir, ["knn", "linear"], labels=labels)
    for r in results:
        assert r["labels"] == labels and 0 <= r["accuracy"] <= 1
        assert set(r["baselines"]) == {"raw_pixels", "random_encoder"}
        if n_train is not None:
            assert r["n_train"] == n_train
        else:
            assert r["n_train"] == pytest.approx(143.7, abs=10)
        suffix = labels.replace("%", "pct")
        assert (run_dir / f"eval_{r['protocol']}_{suffix}.json").is_file()
        assert r["n_test"] == len(digits[1])  # the test split is never subsampled


def test_fit_logistic_matches_scikit_learn() -> None:
    """The probe's solver (weights held as (C, D) for speed) reaches the same optimum as scikit-learn's
    multinomial logistic regression: mean CE + l2·‖W‖²/2 is sum CE + ‖W‖²/(2C) with C = 1/(l2·n)."""
    from sklearn.linear_model import LogisticRegression

    from selfsup.eval.linear import fit_logistic

    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 6, generator=g)
    y = (x[:, :3] + 0.5 * torch.randn(300, 3, generator=g)).argmax(dim=1)
    l2 = 1e-2
    w, b = fit_logistic(x, y, 3, l2, max_iter=500)
    assert w.shape == (6, 3) and b.shape == (3,)
    ref = LogisticRegression(C=1 / (l2 * 300), tol=1e-10, max_iter=10000).fit(x.numpy(), y.numpy())
    ours = torch.softmax(x @ w + b, dim=1)
    np.testing.assert_allclose(ours.numpy(), ref.predict_proba(x.numpy()), atol=1e-3)


@pytest.mark.parametrize("n, classes", [(2000, 3), (2345, 10), (700, 17)])  # whole blocks / a remainder / only a
def test_logistic_objective_matches_autograd(n, classes) -> None:       # remainder; classes padded to 16 and 32
    """The probe's written-out objective (padded classes, row-blocked batched GEMM) against autograd through
    ``F.cross_entropy`` in float64: loss and both gradients."""
    from selfsup.eval.linear import logistic_objective

    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 24, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    w = torch.randn(classes, 24, generator=g, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(classes, generator=g, dtype=torch.float64).requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(x @ w.T + b, y) + 0.5 * 3e-3 * (w * w).sum()
    ref.backward()
    loss, grad_w, grad_b = logistic_objective(x, y, w.detach(), b.detach(), 3e-3)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_w, w.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grad_b, b.grad, rtol=1e-10, atol=1e-14)


def test_fit_logistic_from_a_warm_start_reaches_the_same_optimum() -> None:
    from selfsup.eval.linear import fit_logistic

    g = torch.Generator().manual_seed(4)
    x = torch.randn(400, 8, generator=g)
    y = (x[:, :4] + 0.5 * torch.randn(400, 4, generator=g)).argmax(dim=1)
    cold = fit_logistic(x, y, 4, 1e-3, max_iter=500)
    strong = fit_logistic(x, y, 4, 1e-1, max_iter=500)
    init = (strong[0].clone(), strong[1].clone())
    warm = fit_logistic(x, y, 4, 1e-3, max_iter=500, init=init)
    torch.testing.assert_close(warm, cold, atol=2e-3, rtol=0)
    assert torch.equal(init[0], strong[0]) and torch.equal(init[1], strong[1])  # the start is not written to


@pytest.mark.parametrize("n_train", [600, 1400])  # an interior strength (1e-4); a three-way tie (→ 1e-3)
def test_linear_probe_path_picks_the_strength_a_converged_grid_picks(n_train) -> None:
    """The warm-started path (SELECT_ITERATIONS from zeros, then WARM_SELECT_ITERATIONS per strength, stopping
    PATIENCE strengths past its best) ranks the L2 grid like fits run to convergence
    from zeros, and its refit reaches the converged fit's test accuracy (scikit-learn's 8×8 digits)."""
    from sklearn.datasets import load_digits

    from selfsup.data.splits import stratified_subset
    from selfsup.eval.linear import L2_GRID, _standardise, fit_logistic, linear_probe, predict

    digits = load_digits()
    perm = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(0))
    x, y = torch.tensor(digits.data, dtype=torch.float32)[perm], torch.tensor(digits.target)[perm]
    tr, te = slice(0, n_train), slice(1400, None)
    result = linear_probe(x[tr], y[tr], x[te], y[te], 10)
    xs, xt = _standardise(x[tr], x[te])
    val = stratified_subset(y[tr], 0.1, 0)
    keep = torch.ones(n_train, dtype=torch.bool)
    keep[val] = False
    fits = {l2: fit_logistic(xs[keep], y[tr][keep], 10, l2, 1000) for l2 in L2_GRID}
    scores = {l2: float((predict(xs[val], *fit) == y[tr][val]).float().mean()) for l2, fit in fits.items()}
    assert result["l2"] == max(L2_GRID, key=lambda l2: (scores[l2], l2)) == {600: 1e-4, 1400: 1e-3}[n_train]
    converged = fit_logistic(xs, y[tr], 10, result["l2"], 1000)
    assert result["accuracy"] == pytest.approx(float((predict(xt, *converged) == y[te]).float().mean()), abs=0.003)


@pytest.mark.parametrize("scores, peaked", [([0.9, 0.8, 0.8], True), ([0.9, 0.8], False), ([0.8, 0.9, 0.85], False),
                                            ([0.8, 0.9, 0.85, 0.85], True), ([0.9, 0.9, 0.9, 0.9], False),
                                            ([0.9, 0.8, 0.9, 0.8], False), ([0.9, 0.85, 0.91, 0.9, 0.7], True)])
def test_the_path_stops_after_patience_strengths_below_its_best(scores, peaked) -> None:
    from selfsup.eval.linear import PATIENCE, path_has_peaked

    assert PATIENCE == 2 and path_has_peaked(scores) is peaked


def test_linear_probe_walks_a_prefix_of_the_grid_and_refits_its_choice(monkeypatch) -> None:
    """Strongest first, stopping where ``path_has_peaked`` says (here after the first fit has two weaker ones
    scoring below it), then one refit at the chosen strength."""
    from sklearn.datasets import load_digits

    from selfsup.eval import linear

    digits = load_digits()
    x, y = torch.tensor(digits.data, dtype=torch.float32), torch.tensor(digits.target)
    calls: list[float] = []
    fit = linear.fit_logistic
    monkeypatch.setattr(linear, "fit_logistic", lambda *a, **k: calls.append(a[3]) or fit(*a, **k))
    monkeypatch.setattr(linear, "path_has_peaked", lambda scores: len(scores) == 3)
    result = linear.linear_probe(x[:1400], y[:1400], x[1400:], y[1400:], 10)
    *path, refit = calls
    assert path == sorted(linear.L2_GRID, reverse=True)[:3] and refit == result["l2"] and result["l2"] in path


def test_unknown_protocol_names_the_choices(run_dir) -> None:
    with pytest.raises(ConfigError, match="knn, linear, finetune"):
        evaluate_run(run_dir, ["knn", "probe"])


# ------------------------------------------------------------------------------------------------ transfer


def test_transfer_to_an_image_folder(run_dir, digits, tmp_path) -> None:
    """Pretrained on digits, evaluated on an image folder (class subfolders of PNGs)."""
    _, test = digits
    _write_pngs(tmp_path / "folder", test.images, test.labels, 200)
    (r,) = evaluate_run(run_dir, ["knn"], data=str(tmp_path / "folder"), write=False)
    assert r["dataset"] == str(tmp_path / "folder")
    assert r["n_train"] + r["n_test"] == 200 and r["n_test"] == 40
    assert r["accuracy"] > 0.5  # 10 classes: chance is 0.1


# ---------------------------------------------------------------------------------------------- embeddings


@pytest.fixture()
def folder_with_broken_files(digits, tmp_path) -> tuple[Path, list[Path]]:
    train, _ = digits
    good = _write_pngs(tmp_path / "imgs", train.images, train.labels, 30)
    (tmp_path / "imgs" / "class_0" / "empty.png").write_bytes(b"")
    (tmp_path / "imgs" / "class_1" / "not_an_image.jpg").write_text("hello")
    return tmp_path / "imgs", good


def test_embed_skips_and_counts_unreadable_files(run_dir, folder_with_broken_files, tmp_path, capsys) -> None:
    folder, good = folder_with_broken_files
    emb = embed_folder(load_run(run_dir), folder)
    assert emb.skipped == 2 and len(emb.paths) == 30 and emb.vectors.shape == (30, 32)
    assert sorted(emb.paths) == sorted(str(p) for p in good)
    out = write_embeddings(emb, tmp_path / "emb.npz")
    back = read_embeddings(out)
    assert torch.equal(back.vectors, emb.vectors) and back.paths == emb.paths and back.skipped == 2
    assert torch.equal(back.labels, emb.labels)
    # the embedding of a path is the encoder's output on that image alone
    run = load_run(run_dir)
    from selfsup.eval.embed import encode, load_query_image

    i = emb.paths.index(str(good[7]))
    torch.testing.assert_close(encode(run, load_query_image(run, good[7]))[0], emb.vectors[i], atol=1e-5, rtol=1e-5)

    argv = ["embed", str(run_dir), "--data", str(folder), "--out", str(tmp_path / "cli.npz"), "--threads", "1"]
    assert main(argv) == 0
    assert "wrote 30 embeddings of dimension 32" in capsys.readouterr().out
    assert (tmp_path / "cli.npz").is_file()


def test_embed_parquet_without_pyarrow_is_a_clear_error(run_dir, folder_with_broken_files, tmp_path,
                                                        monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow → ImportError
    emb = embed_folder(load_run(run_dir), folder_with_broken_files[0])
    with pytest.raises(DataError, match="Parquet needs pyarrow"):
        write_embeddings(emb, tmp_path / "emb.parquet")


def test_embed_an_empty_folder_is_a_clear_error(run_dir, tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        embed_folder(load_run(run_dir), tmp_path / "empty")
    assert main(["embed", str(run_dir), "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "e.npz")]) == 2
    err = capsys.readouterr().err
    assert "selfsup: error:" in err and "no image files" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------- neighbours, duplicates


def test_cosine_topk_matches_a_brute_force_reference() -> None:
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(57, 6, generator=g), torch.randn(9, 6, generator=g)
    sims, idx = cosine_topk(queries, bank, k=4, chunk=4)  # chunks smaller than the query count
    for q in range(9):
        ref = [float(queries[q] @ bank[j] / (queries[q].norm() * bank[j].norm())) for j in range(57)]
        order = sorted(range(57), key=lambda j: -ref[j])[:4]
        assert idx[q].tolist() == order
        assert sims[q].tolist() == pytest.approx([ref[j] for j in order], abs=1e-5)
    assert cosine_topk(queries, bank[:2], k=5)[1].shape == (9, 2)  # k capped at the collection size


def test_duplicate_groups_are_complete_linkage_clusters() -> None:
    """Every pair in a group is ≥ the threshold: a chain of similar neighbours does not join its ends."""
    e = torch.eye(4)
    a, b, c = e[0], e[1], e[2]
    mid_ab = torch.nn.functional.normalize(2 * a + b, dim=0)
    # a ~ mid_ab ~ b at cos 0.894 and 0.447 while a, b are orthogonal: single linkage chains a to b
    vectors = torch.stack([a, 2 * a, c, mid_ab, b, e[3], -c])
    groups = lambda t: duplicate_groups(vectors, threshold=t, centre=False)  # noqa: E731
    assert groups(0.999) == [[0, 1]]  # uncentred, scale does not matter, only direction
    assert groups(0.4) == [[0, 1, 3]]  # {a, 2a} joins mid_ab (0.894 to both), but b is at 0 from a
    assert groups(-1.0) == [list(range(7))]
    with pytest.raises(DataError, match="cosine similarity in"):
        duplicate_groups(vectors, threshold=1.5)


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.95])
def test_duplicate_groups_match_scipy_complete_linkage(threshold) -> None:
    """The sparse agglomeration cut at the threshold equals scipy's complete linkage on the full
    cosine-distance matrix, cut at distance 1 − threshold (clusters of ≥ 2 members)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    g = torch.Generator().manual_seed(4)
    centres = torch.randn(12, 6, generator=g, dtype=torch.float64)
    x = centres[torch.randint(0, 12, (80,), generator=g)] + 0.3 * torch.randn(80, 6, generator=g, dtype=torch.float64)
    labels = fcluster(linkage(pdist(x.numpy(), "cosine"), "complete"), t=1 - threshold, criterion="distance")
    expected = [np.flatnonzero(labels == c).tolist() for c in np.unique(labels)]
    expected = sorted((e for e in expected if len(e) > 1), key=lambda e: (-len(e), e[0]))
    got = duplicate_groups(x, threshold, centre=False)
    assert got == expected and len(got) >= 5


def test_duplicate_groups_centre_away_the_shared_direction() -> None:
    """Non-negative features with one large common component (what pooled ReLU features look like):
    every raw cosine is above 0.95, so uncentred everything is one group; centred, only the copies."""
    g = torch.Generator().manual_seed(3)
    x = 10 + torch.rand(30, 16, generator=g)
    x[5] = x[3] + 0.01 * torch.rand(16, generator=g)
    x[17] = x[3] * 1.001
    x[9] = x[22].clone()
    raw = torch.nn.functional.normalize(x, dim=1)
    assert (raw @ raw.T).min() > 0.95
    assert duplicate_groups(x, 0.95, centre=False) == [list(range(30))]
    assert duplicate_groups(x, 0.95) == [[3, 5, 17], [9, 22]]


def test_a_folder_of_one_repeated_image_is_one_group() -> None:
    """Centred, identical vectors are all zero (no direction); they are still one group of copies."""
    x = torch.cat([torch.ones(4, 3), torch.ones(1, 3)])
    assert duplicate_groups(x, 0.95) == [[0, 1, 2, 3, 4]]
    y = torch.cat([torch.ones(3, 3), torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 5.0, 0.0]])])
    assert duplicate_groups(y, 0.95)[0] == [0, 1, 2]


def test_faiss_path_gives_the_exact_answer(monkeypatch) -> None:
    """The faiss branch, through a stand-in with faiss's API (faiss is optional and not installed here)."""

    class IndexFlatIP:
        def __init__(self, d: int) -> None:
            self.x = np.zeros((0, d), np.float32)

        def add(self, x: np.ndarray) -> None:
            self.x = np.concatenate([self.x, x])

        def search(self, q: np.ndarray, k: int):
            s = q @ self.x.T
            i = np.argsort(-s, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(s, i, 1), i

        def range_search(self, q: np.ndarray, r: float):
            s = q @ self.x.T
            hits = [np.nonzero(row > r)[0] for row in s]
            lims = np.concatenate([[0], np.cumsum([len(h) for h in hits])])
            idx = np.concatenate(hits) if hits else np.zeros(0, np.int64)
            return lims, np.concatenate([row[h] for row, h in zip(s, hits)]), idx

    monkeypatch.setitem(sys.modules, "faiss", types.SimpleNamespace(IndexFlatIP=IndexFlatIP))
    g = torch.Generator().manual_seed(2)
    bank = torch.randn(40, 5, generator=g)
    bank[7] = 1.001 * bank[3]
    bank[20] = bank[3] + 1e-4
    queries = torch.randn(6, 5, generator=g)
    exact = cosine_topk(queries, bank, 5, use_faiss=False)
    fast = cosine_topk(queries, bank, 5, use_faiss=True)
    assert torch.equal(exact[1], fast[1]) and torch.allclose(exact[0], fast[0], atol=1e-5)
    assert duplicate_groups(bank, 0.99, use_faiss=True) == duplicate_groups(bank, 0.99, use_faiss=False) == [[3, 7, 20]]


def test_neighbors_cli_query_and_duplicates(run_dir, digits, tmp_path, capsys) -> None:
    train, _ = digits
    paths = _write_pngs(tmp_path / "col", train.images, None, 25)
    shutil.copy(paths[4], tmp_path / "col" / "copy_of_4.png")
    shutil.copy(paths[4], tmp_path / "col" / "another_copy_of_4.png")

    assert main(["neighbors", str(run_dir), "--data", str(tmp_path / "col"), "--query", str(paths[4]), "--k", "3",
                 "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["neighbors"]
    assert len(hits) == 3 and str(paths[4]) not in [h["path"] for h in hits]  # the query is not its own neighbour
    copies = {str(tmp_path / "col" / n) for n in ("copy_of_4.png", "another_copy_of_4.png")}
    assert {h["path"] for h in hits[:2]} == copies
    assert hits[0]["similarity"] == pytest.approx(1.0, abs=1e-5) and hits[0]["similarity"] >= hits[2]["similarity"]

    assert main(["neighbors", str(run_dir), "--data", str(tmp_path / "col"), "--duplicates", "--threshold", "0.9999",
                 "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert sorted(groups[0]) == sorted(str(tmp_path / "col" / n)
                                       for n in ("copy_of_4.png", "another_copy_of_4.png", paths[4].name))

    assert main(["neighbors", str(run_dir), "--data", str(tmp_path / "col")]) == 2  # neither --query nor --duplicates
    assert "--query IMAGE or --duplicates" in capsys.readouterr().err
    missing = str(tmp_path / "nope.png")
    assert main(["neighbors", str(run_dir), "--data", str(tmp_path / "col"), "--query", missing]) == 2
    assert "query image not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- export


def _check_export_roundtrip(run_dir: Path, tmp_path: Path, fresh: torch.nn.Module) -> None:
    """Export both formats, load each with plain torch/safetensors into ``fresh`` (strict), compare outputs."""
    from safetensors.torch import load_file

    run = load_run(run_dir)
    x = torch.randn(3, run.meta["in_chans"], run.meta["image_size"], run.meta["image_size"])
    run.encoder.eval()
    with torch.no_grad():
        expected = run.encoder(x)
    for fmt, loader in (("pt", lambda p: torch.load(p, weights_only=True)), ("safetensors", load_file)):
        assert main(["export", str(run_dir), "--format", fmt, "--out", str(tmp_path / f"enc.{fmt}")]) == 0
        state = loader(tmp_path / f"enc.{fmt}")
        assert not any(k.startswith("net.") for k in state)
        fresh.load_state_dict(state, strict=True)
        fresh.eval()
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), expected)
        meta = json.loads((tmp_path / f"enc.{fmt}.json").read_text())
        assert meta["mean"] == run.meta["mean"] and meta["in_chans"] == run.meta["in_chans"]


def test_export_small_resnet_loads_into_a_fresh_module(run_dir, tmp_path) -> None:
    from selfsup.nn.backbones import SmallResNet

    _check_export_roundtrip(run_dir, tmp_path, SmallResNet(1, (8, 16, 32)))


def test_export_resnet18_loads_into_plain_torchvision(tmp_path) -> None:
    import torchvision

    run_dir = _pretrain(tmp_path / "r18", "resnet18", {}, limit=40, batch=16)
    net = torchvision.models.resnet18(weights=None)
    net.conv1 = torch.nn.Conv2d(1, 64, 3, 1, 1, bias=False)  # the small-image stem, as the export's JSON says
    net.maxpool = torch.nn.Identity()
    net.fc = torch.nn.Identity()
    _check_export_roundtrip(run_dir, tmp_path, net)
    arch = json.loads((tmp_path / "enc.pt.json").read_text())["architecture"]
    assert arch == ("net = torchvision.models.resnet18(weights=None); net.conv1 = torch.nn.Conv2d(1, 64, 3, 1, 1, "
                    "bias=False); net.maxpool = torch.nn.Identity(); net.fc = torch.nn.Identity()")
    # the registered resnet18 is torchvision's: --format torchvision writes the same weights and description
    assert main(["export", str(run_dir), "--format", "torchvision", "--out", str(tmp_path / "tv.pt")]) == 0
    tv, pt = torch.load(tmp_path / "tv.pt", weights_only=True), torch.load(tmp_path / "enc.pt", weights_only=True)
    assert tv.keys() == pt.keys() and all(torch.equal(tv[k], pt[k]) for k in tv)
    assert json.loads((tmp_path / "tv.pt.json").read_text())["architecture"] == arch


def test_export_vit_loads_into_plain_timm(tmp_path) -> None:
    from timm.models.vision_transformer import VisionTransformer

    run_dir = _pretrain(tmp_path / "vit", "vit_tiny", {"depth": 1, "embed_dim": 32, "num_heads": 2}, limit=40, batch=16)
    net = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=0, embed_dim=32, depth=1, num_heads=2,
                            class_token=True, global_pool="token", fc_norm=False)
    _check_export_roundtrip(run_dir, tmp_path, net)


def _rebuild_from_sidecar(weights: Path) -> torch.nn.Module:
    """The module made by the constructor call recorded beside exported weights, run as written (as a user would
    paste it), with the weights loaded strictly; in eval mode."""
    import timm
    import torchvision

    meta = json.loads(weights.with_name(weights.name + ".json").read_text())
    scope = {"torch": torch, "torchvision": torchvision, "timm": timm}
    exec(meta["architecture"], scope)
    net = scope["net"]
    net.load_state_dict(torch.load(weights, weights_only=True), strict=True)
    return net.eval()


def _check_library_export(run_dir: Path, tmp_path: Path, fmt: str, other: str | None) -> dict:
    """``selfsup export --format torchvision|timm``: the weights rebuild, without selfsup, into a module with the
    run's outputs; the ``other`` library's format is refused. Returns the sidecar."""
    run = load_run(run_dir)
    x = torch.randn(3, run.meta["in_chans"], run.meta["image_size"], run.meta["image_size"])
    run.encoder.eval()
    with torch.no_grad():
        expected = run.encoder(x)
    assert main(["export", str(run_dir), "--format", fmt, "--out", str(tmp_path / f"{fmt}.pt")]) == 0
    with torch.no_grad():
        torch.testing.assert_close(_rebuild_from_sidecar(tmp_path / f"{fmt}.pt")(x), expected)
    if other:
        assert main(["export", str(run_dir), "--format", other, "--out", str(tmp_path / "other.pt")]) == 2
        assert not (tmp_path / "other.pt").exists()
    meta = json.loads((tmp_path / f"{fmt}.pt.json").read_text())
    assert meta["library"] == fmt and meta["file_format"] == "pt"
    return meta


def test_export_torchvision_cnn_round_trip(tmp_path, capsys) -> None:
    """MobileNetV3: a 1-channel first conv deep in ``features``, and a head whose last Linear (and the dropout
    before it) go while its 1024-wide pre-logits layer stays."""
    run_dir = _pretrain(tmp_path / "run", "torchvision:mobilenet_v3_small", {}, limit=40, batch=16)
    meta = _check_library_export(run_dir, tmp_path, "torchvision", "timm")
    assert "is a torchvision model (its weights load into torchvision.models.mobilenet_v3_small), not a timm one; " \
           "export it with --format torchvision" in capsys.readouterr().err
    assert meta["architecture"] == ("net = torchvision.models.mobilenet_v3_small(weights=None); "
                                    "net.features[0][0] = torch.nn.Conv2d(1, 16, 3, 2, 1, bias=False); "
                                    "net.classifier[3] = torch.nn.Identity(); net.classifier[2] = torch.nn.Identity()")


def test_export_timm_cnn_and_vit_round_trip(tmp_path) -> None:
    cnn = _pretrain(tmp_path / "cnn", "timm:resnet18", {}, limit=40, batch=16)
    meta = _check_library_export(cnn, tmp_path / "c", "timm", "torchvision")
    assert meta["constructor"]["kwargs"] == {"pretrained": False, "num_classes": 0, "in_chans": 1}
    assert [path for path, _ in meta["constructor"]["replace"]] == ["conv1", "maxpool"]  # small-image stem

    vit = _pretrain(tmp_path / "vit", "timm:vit_tiny_patch16_224",
                    {"patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}, limit=40, batch=16)
    meta = _check_library_export(vit, tmp_path / "v", "timm", None)
    assert meta["architecture"] == ("net = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=0, "
                                    "in_chans=1, patch_size=4, depth=1, embed_dim=32, num_heads=2, img_size=8, "
                                    "dynamic_img_size=True)")


def test_export_torchvision_vit_round_trip(tmp_path) -> None:
    """torchvision's smallest ViT is ViT-B (86 M parameters; its builders fix depth and width, so backbone.params
    cannot shrink it): exported from a run loaded in memory, without training or a run directory (two builds)."""
    from selfsup.eval.export import export_encoder
    from selfsup.train.build import build_encoder
    from selfsup.train.rundir import LoadedRun

    cfg = config_from_dict({"backbone": "torchvision:vit_b_32", "data": {"name": "digits", "image_size": 32}})
    run = LoadedRun(cfg, build_encoder(cfg, 1, 32).eval(), {"in_chans": 1, "image_size": 32, "mean": [0.5], "std": [0.25]})
    weights, sidecar = export_encoder(run, tmp_path / "vit.pt", "torchvision")
    x = torch.randn(2, 1, 32, 32)  # at 32 px ViT-B/32 sees a single patch
    with torch.no_grad():
        torch.testing.assert_close(_rebuild_from_sidecar(weights)(x), run.encoder(x))
    meta = json.loads(sidecar.read_text())
    assert meta["constructor"]["kwargs"] == {"weights": None, "image_size": 32}
    assert meta["constructor"]["replace"] == [["conv_proj", "torch.nn.Conv2d(1, 768, 32, 32, 0, bias=True)"],
                                              ["heads.head", "torch.nn.Identity()"]]
    with pytest.raises(ConfigError, match="is a torchvision model .* export it with --format torchvision"):
        export_encoder(run, tmp_path / "timm.pt", "timm")


def test_export_refuses_a_library_format_for_selfsup_networks(run_dir, tmp_path, capsys) -> None:
    assert main(["export", str(run_dir), "--format", "torchvision", "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "small_resnet' is selfsup's own network, not a torchvision model" in err and "--format pt" in err


# ----------------------------------------------------------------------------------------------- bad runs


def test_a_run_without_its_encoder_is_a_clear_error(run_dir, tmp_path, capsys) -> None:
    broken = _copy_run(run_dir, tmp_path / "unfinished")
    (broken / "encoder.pt").unlink()
    with pytest.raises(CheckpointError, match="no encoder.pt: pretraining did not finish"):
        load_run(broken)
    for argv in (["export", str(broken)], ["evaluate", str(broken)],
                 ["embed", str(broken), "--data", str(tmp_path), "--out", str(tmp_path / "x.npz")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "no encoder.pt" in err and "Traceback" not in err
    with pytest.raises(CheckpointError, match="not found"):
        load_run(tmp_path / "no_such_run")


def test_a_run_from_another_version_is_a_clear_error(run_dir, tmp_path) -> None:
    old = _copy_run(run_dir, tmp_path / "old")
    env = json.loads((old / "env.json").read_text())
    # what the run pretrained on is recorded with it
    assert sum(env["pretraining_class_counts"].values()) == env["pretraining_images"] > 0
    env["versions"]["selfsup"] = "0.0.1"
    (old / "env.json").write_text(json.dumps(env))
    meta = json.loads((old / "encoder.json").read_text())
    del meta["in_chans"]
    (old / "encoder.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"encoder.json lacks in_chans \(written by selfsup 0.0.1\)"):
        load_run(old)

    future = _copy_run(run_dir, tmp_path / "future")
    (future / "config.yaml").write_text((future / "config.yaml").read_text() + "hyperdrive: {warp: 9}\n")
    with pytest.raises(CheckpointError, match="(?s)cannot be read by selfsup .*unknown key 'hyperdrive'"):
        load_run(future)

    other = _copy_run(run_dir, tmp_path / "other")
    torch.save({"conv.weight": torch.zeros(1)}, other / "encoder.pt")
    with pytest.raises(CheckpointError, match="does not fit backbone 'small_resnet'"):
        load_run(other)


def test_export_vit_with_registers_and_layer_scale_round_trip(tmp_path) -> None:
    """DINOv2's ViT options change the parameters: the recorded timm constructor has the register tokens and
    LayerScale, so the weights load strict and give the run's outputs (issue #19)."""
    run_dir = _pretrain(tmp_path / "vit", "vit_tiny", {"depth": 1, "embed_dim": 32, "num_heads": 2, "registers": 2,
                                                        "layer_scale": 1e-5}, limit=40, batch=16)
    meta = _check_library_export(run_dir, tmp_path / "v", "timm", "torchvision")
    assert meta["constructor"]["kwargs"]["reg_tokens"] == 2 and meta["constructor"]["kwargs"]["init_values"] == 1e-5
