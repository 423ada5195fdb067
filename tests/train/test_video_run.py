"""A video run end to end on Moving Fashion-MNIST: the shared loop pretrains a clip method, ``evaluate`` scores it on
another label beside the clip baselines, the report draws clip strips; and the mismatches between methods, backbones
and data say what to use instead."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import selfsup
from selfsup.config import ConfigError, load_config
from selfsup.data import DataError
from selfsup.data.fashion_mnist import DEFAULT_ROOT
from selfsup.eval.evaluate import CLIP_BASELINES

pytestmark = [pytest.mark.skipif(not Path(DEFAULT_ROOT).exists(),
                                 reason="Fashion-MNIST is not installed (make setup installs dataset-fashion-mnist)"),
              pytest.mark.usefixtures("one_thread")]

TINY = {"data.name": "moving-fashion-mnist", "data.image_size": 48, "data.val_size": 32,
        "data.generator": {"frames": 8, "train_size": 160, "test_size": 64},
        "train.epochs": 1, "train.batch_size": 16, "train.progress": False, "train.knn_every": 1,
        "backbone.params": {"widths": [8, 16, 32]}}


def tiny_config(method: str, **more):
    return load_config(None, {**TINY, "method.name": method, "views.clip_len": 4, "views.stride": 2, **more})


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("video") / "arrow"
    summary = selfsup.pretrain(tiny_config("arrow_of_time"), run)
    return run, summary


def test_a_clip_method_trains_in_the_shared_loop(clip_run):
    run, summary = clip_run
    meta = json.loads((run / "encoder.json").read_text())
    assert meta["inputs"] == "clips" and meta["clip"] == {"clip_len": 4, "stride": 2, "record_frames": 8}
    assert meta["backbone"] == "small_r3d" and meta["in_chans"] == 1
    assert summary["knn"] is not None and 0 <= summary["knn"] <= 1  # the online kNN monitor ran on clips
    assert (run / "checkpoints" / "last.pt").is_file()


def test_evaluate_scores_another_label_beside_the_clip_baselines(clip_run):
    run, _ = clip_run
    knn, linear = selfsup.evaluate_run(run, ["knn", "linear"], target="direction")
    for result in (knn, linear):
        assert result["target"] == "direction" and set(result["baselines"]) == set(CLIP_BASELINES)
        assert 0 <= result["accuracy"] <= 1
    assert (run / "eval_knn_direction.json").is_file() and (run / "eval_linear_direction.json").is_file()
    (by_class,) = selfsup.evaluate_run(run, ["knn"])
    assert "target" not in by_class and (run / "eval_knn.json").is_file()
    with pytest.raises(DataError, match="no 'speed' labels"):
        selfsup.evaluate_run(run, ["knn"], target="speed")


def test_a_clip_encoder_is_not_evaluated_on_still_images(clip_run):
    run, _ = clip_run
    with pytest.raises(DataError, match="trained on clips"):
        selfsup.evaluate_run(run, ["knn"], data="digits")


def test_the_report_draws_clip_strips(clip_run):
    from selfsup.report.html import write_report

    run, _ = clip_run
    page = write_report(run)
    assert (Path(page).parent / "retrieval.png").is_file()


def test_mismatched_methods_backbones_and_data_say_what_to_use(tmp_path):
    with pytest.raises(ConfigError, match="learns from still images, and moving-fashion-mnist holds clips"):
        selfsup.pretrain(load_config(None, {**TINY, "method.name": "simclr"}), tmp_path / "a")
    with pytest.raises(ConfigError, match="learns from clips, and digits holds still images"):
        selfsup.pretrain(load_config(None, {"method.name": "cvrl", "data.name": "digits"}), tmp_path / "b")
    with pytest.raises(ConfigError, match="takes still images and .* learns from clips: use a video backbone"):
        selfsup.pretrain(tiny_config("cvrl", **{"backbone.name": "small_resnet"}), tmp_path / "c")
    assert not (tmp_path / "c" / "checkpoints").exists()


def test_the_report_draws_videomae_reconstructions_as_frame_strips(tmp_path):
    from selfsup.report.html import write_report

    cfg = tiny_config("videomae", **{"backbone.params": {"patch_size": 8, "width": 24, "depth": 1, "heads": 2,
                                                         "frames": 4},
                                     "method.params": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}})
    selfsup.pretrain(cfg, tmp_path / "videomae")
    page = write_report(tmp_path / "videomae")
    assert (Path(page).parent / "reconstructions.png").is_file()
    assert "reconstructions.png" in Path(page).read_text()
