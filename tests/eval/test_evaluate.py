"""``evaluate_run``'s options for callers such as ``selfsup bench``: a bounded evaluation subset, the
test embeddings' effective rank, the encoder without its baselines, and the source of the figures."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selfsup.config import config_from_dict
from selfsup.eval.evaluate import evaluate_run, format_table
from selfsup.eval.finetune import FinetuneSettings
from selfsup.monitor.diagnostics import effective_rank
from selfsup.monitor.features import extract_features
from selfsup.train.loop import pretrain
from selfsup.train.rundir import load_run

FAST = FinetuneSettings(min_steps=2, max_steps=2, batch_size=32)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One tiny SimCLR epoch on 256 digits."""
    cfg = config_from_dict({
        "method": {"name": "simclr", "params": {"proj_hidden": 32, "proj_dim": 16}},
        "backbone": {"name": "small_resnet", "params": {"widths": [8, 16, 32]}},
        "data": {"name": "digits", "limit": 256},
        "train": {"epochs": 1, "batch_size": 64, "device": "cpu", "progress": False, "knn_every": 0, "threads": 1}})
    out = tmp_path_factory.mktemp("evaluate") / "simclr"
    pretrain(cfg, out)
    return out


def test_eval_limit_fits_on_a_random_subset_before_the_label_fraction(run_dir: Path, digits) -> None:
    train, test = digits
    (knn,) = evaluate_run(run_dir, ["knn"], eval_limit=300, write=False)
    assert knn["n_train"] == 300 and knn["n_test"] == len(test)  # the test split stays whole
    (knn_10,) = evaluate_run(run_dir, ["knn"], labels="10%", eval_limit=300, write=False)
    assert 25 <= knn_10["n_train"] <= 35 and knn_10["labels"] == "10%"
    (whole,) = evaluate_run(run_dir, ["knn"], eval_limit=10 * len(train), write=False)  # more than there is
    assert whole["n_train"] == len(train)


def test_frozen_results_describe_the_test_embeddings_of_each_feature_set(run_dir: Path, digits) -> None:
    knn, linear = evaluate_run(run_dir, ["knn", "linear"], write=False)
    emb = knn["test_embeddings"]
    assert emb == linear["test_embeddings"] and set(emb) == {"selfsup", "raw_pixels", "random_encoder"}
    assert emb["selfsup"]["dim"] == emb["random_encoder"]["dim"] == 32 and emb["raw_pixels"]["dim"] == 64
    run = load_run(run_dir)
    test_features = extract_features(run.encoder, digits[1], run.meta["mean"], run.meta["std"])
    assert emb["selfsup"]["effective_rank"] == pytest.approx(effective_rank(test_features), rel=1e-5)
    for figures in emb.values():
        assert 1.0 <= figures["effective_rank"] <= figures["dim"]
    # the linear result names the L2 strength each probe chose (from the probe's grid), kNN has none
    from selfsup.eval.linear import L2_GRID
    assert set(linear["l2"]) == set(emb) and all(v in L2_GRID for v in linear["l2"].values()) and "l2" not in knn


def test_without_baselines_the_encoder_is_measured_alone(run_dir: Path) -> None:
    knn, ft = evaluate_run(run_dir, ["knn", "finetune"], labels="10%", baselines=False, write=False,
                           finetune_settings=FAST)
    assert knn["baselines"] == {} and set(knn["test_embeddings"]) == {"selfsup"}
    assert ft["baselines"] == {} and 0.0 <= ft["accuracy"] <= 1.0 and "margin_over_scratch" not in ft
    assert ft["settings"]["steps"] == 2
    table = format_table([knn, ft])
    assert "-  " in table.splitlines()[2] and f"{100 * knn['accuracy']:.2f}%" in table


def test_the_source_of_the_figures_is_written(run_dir: Path) -> None:
    (knn,) = evaluate_run(run_dir, ["knn"], eval_limit=200)
    assert knn["source"] == "selfsup evaluate"
    (knn,) = evaluate_run(run_dir, ["knn"], eval_limit=200, source="selfsup bench (1 epoch(s))")
    assert json.loads((run_dir / "eval_knn.json").read_text())["source"] == "selfsup bench (1 epoch(s))"


def test_val_split_tests_on_the_images_the_run_held_out_and_fits_on_every_other(run_dir: Path, digits) -> None:
    """``split="val"``: the run's held-out images (never pretrained on) are the test set, every other labelled
    training image the fit set; the figures match a by-hand kNN on those two sets and go to their own file."""
    from selfsup.data import pretraining_holdout
    from selfsup.monitor.knn import knn_accuracy
    from selfsup.train.setup import prepare_data

    train, _ = digits
    run = load_run(run_dir)
    held = pretraining_holdout(train, run.cfg.data, run.cfg.train.seed)
    assert torch.equal(train.images[held], prepare_data(run.cfg).val.images)  # what pretraining left out
    knn, linear = evaluate_run(run_dir, ["knn", "linear"], split="val")
    assert knn["split"] == linear["split"] == "val"
    assert knn["n_test"] == len(held) == 25 and knn["n_train"] == len(train) - 25
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[held] = False
    feats = extract_features(run.encoder, train, run.meta["mean"], run.meta["std"])
    expected = knn_accuracy(feats[keep], train.labels[keep], feats[held], train.labels[held], train.num_classes)
    assert knn["accuracy"] == pytest.approx(expected)
    assert json.loads((run_dir / "eval_knn_val.json").read_text())["split"] == "val"
    assert "(held-out val)" in format_table([knn, linear])
    (on_test,) = evaluate_run(run_dir, ["knn"], write=False)
    assert on_test["split"] == "test" and on_test["n_test"] == len(digits[1])


def test_val_split_errors_say_what_to_do(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    import yaml

    from selfsup.config import ConfigError
    from selfsup.data import DataError

    with pytest.raises(ConfigError, match="cannot be combined with --data"):
        evaluate_run(run_dir, ["knn"], split="val", data="digits", write=False)
    with pytest.raises(ConfigError, match="unknown split"):
        evaluate_run(run_dir, ["knn"], split="train", write=False)
    no_holdout = tmp_path / "run"
    shutil.copytree(run_dir, no_holdout)
    cfg = yaml.safe_load((no_holdout / "config.yaml").read_text())
    cfg["data"]["val_size"] = 0
    (no_holdout / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(DataError, match="held out no images"):
        evaluate_run(no_holdout, ["knn"], split="val", write=False)
