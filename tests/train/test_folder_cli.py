"""Bad input through the CLI on image folders: a file deleted mid-epoch, a folder changed between pretrain and
evaluate, an unknown library backbone, a backbone that cannot take the image size. Each is either handled (a
warning, the run goes on) or one clear ``selfsup: error:`` line with exit status 2 — and never costs a finished
run its checkpoints, even with ``--overwrite``. (The cache's own handling of broken, changed and vanished files
is tested in tests/data/test_folder_cache.py.)"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup.cli import main

PAST_NS = 1_577_836_800 * 10**9  # 2020-01-01: directory times the fast check trusts
TINY = ["--method", "simclr", "--backbone", "small_resnet", "--set", "backbone.params.widths=[8,16]",
        "--set", "method.params.proj_hidden=32", "--set", "data.image_size=16", "--batch-size", "8",
        "--threads", "1", "--no-progress", "--set", "train.knn_every=0", "--set", "train.log_every=1"]


def _folder(root: Path, classes: int = 3, per_class: int = 12) -> Path:
    """Crops of scikit-learn's sample photos (real content) of a few sizes, in class subfolders."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            w, h = int(rng.integers(24, 48)), int(rng.integers(24, 48))
            top, left = int(rng.integers(0, 300)), int(rng.integers(0, 500))
            crop = photos[c % 2][top : top + 3 * h, left : left + 3 * w]
            Image.fromarray(crop).resize((w, h), Image.BICUBIC).save(root / f"c{c}" / f"{i:02d}.png")
    for d in [root, *root.iterdir()]:
        os.utime(d, ns=(PAST_NS, PAST_NS))
    return root


def _pretrain(folder: Path, out: Path, *extra: str) -> int:
    return main(["pretrain", "--data", str(folder), "--out", str(out), *TINY, *extra])


def _one_error_line(capsys, needle: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("selfsup: error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path, dict[str, bytes]]:
    """A labelled folder and a finished 1-epoch run on it, with the bytes of its checkpoint and encoder."""
    root = tmp_path_factory.mktemp("finished")
    folder = _folder(root / "images")
    run = root / "run"
    assert _pretrain(folder, run, "--epochs", "1") == 0
    kept = {name: (run / name).read_bytes() for name in ("checkpoints/last.pt", "encoder.pt")}
    return folder, run, kept


def _intact(run: Path, kept: dict[str, bytes]) -> None:
    for name, data in kept.items():
        assert (run / name).read_bytes() == data, f"{name} was lost or changed"


def test_a_file_deleted_mid_epoch_keeps_training_and_the_next_run_sees_it(tmp_path, monkeypatch, caplog):
    import selfsup.train.loop as loop

    folder = _folder(tmp_path / "images")
    victim = folder / "c1" / "03.png"
    real_step, calls = loop.train_step, []

    def step_then_delete(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            victim.unlink()  # after the first step of epoch 1: the records come from the cache, not the files
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step_then_delete)
    assert _pretrain(folder, tmp_path / "run", "--epochs", "2") == 0
    assert not victim.exists() and len(calls) >= 4
    epochs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "epoch_time_s" in ln]
    assert [e["epoch"] for e in epochs] == [1, 2] and (tmp_path / "run" / "encoder.pt").is_file()
    with caplog.at_level(logging.WARNING):
        assert main(["prepare", str(folder), "--image-size", "16", "--no-progress"]) == 0
    assert "updating the cache of " in caplog.text and "(1 removed)" in caplog.text


def test_a_folder_changed_between_pretrain_and_evaluate_is_evaluated_as_it_is_now(finished, tmp_path, capsys,
                                                                                     caplog):
    folder, run, kept = finished
    changed = tmp_path / "changed"
    changed.mkdir()
    for c in folder.iterdir():  # a copy of the folder the run was trained on, as its config names it
        (changed / c.name).mkdir()
        for f in c.iterdir():
            os.link(f, changed / c.name / f.name)
    assert main(["evaluate", str(run), "--data", str(changed), "--protocol", "knn", "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    (changed / "c0" / "00.png").unlink()
    (changed / "c0" / "01.png").unlink()
    for i in range(3):
        Image.open(folder / "c2" / f"{i:02d}.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
            changed / "c2" / f"new{i}.png")
    with caplog.at_level(logging.WARNING):
        assert main(["evaluate", str(run), "--data", str(changed), "--protocol", "knn", "--json"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert "(3 added, 2 removed)" in caplog.text
    assert after["n_train"] + after["n_test"] == before["n_train"] + before["n_test"] + 1
    _intact(run, kept)


@pytest.mark.parametrize("args, needle", [
    (["--backbone", "timm:resnet_no_such_net"], "no model 'resnet_no_such_net'"),
    (["--backbone", "torchvision:resnet_no_such_net"], "no model 'resnet_no_such_net'"),
    (["--backbone", "timm:vit_tiny_patch16_224", "--set", "data.image_size=40"], "patch"),
    (["--backbone", "torchvision:resnet18", "--set", "data.image_size=4"], "4"),
])
def test_a_backbone_that_cannot_run_is_one_error_line_and_keeps_the_finished_run(finished, capsys, args, needle):
    folder, run, kept = finished
    capsys.readouterr()
    argv = ["pretrain", "--data", str(folder), "--out", str(run), *TINY, *args, "--overwrite"]
    assert main(argv) == 2
    _one_error_line(capsys, needle)
    _intact(run, kept)
