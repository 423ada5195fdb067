"""``selfsup report``: the HTML page, its pictures, and a look at it in headless Chromium."""
from __future__ import annotations

import base64
import functools
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup.cli import main
from selfsup.monitor.collapse import CollapseMonitor
from selfsup.report.html import ReportOptions, write_report
from selfsup.train.checkpoint import CheckpointError

FAST = ReportOptions(map_size=300, bank_size=500, queries=4, neighbors=5)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished tiny run on digits, with one collapse warning (thresholds no run meets) and a method picture."""
    from selfsup.config import load_config
    from selfsup.train import loop, setup

    cfg = load_config(None, {"method.name": "simclr", "data.name": "digits", "data.limit": 320,
                             "backbone.name": "small_resnet", "backbone.widths": [8, 16, 32], "train.epochs": 2,
                             "train.batch_size": 32, "train.threads": 1, "train.log_every": 2,
                             "train.progress": False, "train.device": "cpu"})
    out = tmp_path_factory.mktemp("report") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(setup, "CollapseMonitor", functools.partial(CollapseMonitor, spread_fraction=0.999, min_rank=1e9))
        loop.pretrain(cfg, out)
    img = Image.fromarray((np.indices((40, 120)).sum(0) % 2 * 255).astype(np.uint8))
    img.save(out / "reconstructions.png")
    return out


@pytest.fixture(scope="module")
def report(run_dir: Path) -> Path:
    """The report of that run, written once for the tests that read it."""
    return write_report(run_dir, options=FAST)


def _embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_is_self_contained_with_every_section(run_dir: Path, report: Path) -> None:
    assert report == run_dir / "report" / "index.html"
    page = report.read_text()
    for section in ("Summary", "Collapse monitor", "Loss and learning rate", "Online kNN accuracy",
                    "Diagnostics over training", "Embedding map and retrieval", "The method's own pictures", "Config"):
        assert f"<h2>{section}</h2>" in page
    pngs = _embedded_pngs(page)
    assert len(pngs) == 6  # loss/lr, kNN, diagnostics, map, retrieval and the run's reconstructions.png
    assert all(p.startswith(b"\x89PNG") for p in pngs)
    assert "<img" in page and 'src="http' not in page and 'src="file' not in page
    for name in ("loss_lr", "knn", "diagnostics", "embedding_map", "retrieval"):
        assert (run_dir / "report" / f"{name}.png").stat().st_size > 5000
    assert "COLLAPSE WARNING" in page and 'class="warn"' in page
    assert "simclr (contrastive)" in page and "arXiv:2002.05709" in page
    assert "reconstructions.png" in page


def test_retrieval_and_map_pictures_have_the_expected_size(report: Path) -> None:
    with Image.open(report.parent / "retrieval.png") as grid, Image.open(report.parent / "embedding_map.png") as m:
        assert grid.size == (int(1.15 * 6 * 100), int(1.3 * 4 * 100))  # (k + 1) columns × 4 queries at 100 dpi
        assert m.size == (750, 650)


def test_report_of_an_unfinished_run_still_has_its_curves(run_dir: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial, ignore=shutil.ignore_patterns("report", "encoder.pt"))
    (partial / "eval_finetune_1pct.json").write_text(json.dumps(
        {"protocol": "finetune", "dataset": "digits", "labels": "1%", "accuracy": 0.8125,
         "baselines": {"from_scratch": 0.5, "raw_pixels": 0.25, "random_encoder": 0.375}}))
    page = write_report(partial, options=FAST).read_text()
    assert "Embedding pictures skipped" in page and "encoder.pt" in page
    assert len(_embedded_pngs(page)) == 4  # three curve figures and the method's picture
    # evaluation results are listed with their baselines
    assert "<td>finetune</td><td>digits</td><td>1%</td><td>accuracy</td><td>81.25%</td><td>37.50%</td><td>25.00%</td><td>50.00%</td>" in page


def test_report_rejects_what_is_not_a_run(tmp_path: Path, capsys) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        write_report(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="not a selfsup run directory"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert "not a selfsup run directory" in capsys.readouterr().err


def test_report_cli_curves_only(run_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["report", str(run_dir), "--out", str(tmp_path / "cli"), "--no-embeddings"]) == 0
    assert "index.html" in capsys.readouterr().out
    page = (tmp_path / "cli" / "index.html").read_text()
    assert "Embedding map" not in page and len(_embedded_pngs(page)) == 4


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed (Debian: apt-get install -y "
                    "chromium, or `make chromium`); the screenshot check needs it")
def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    """Open the page the way a person would and check the screenshot shows something, not a blank page."""
    shot = tmp_path / "screenshot.png"
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,3000",
                        report.resolve().as_uri()], capture_output=True, timeout=120, check=False)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert shot.is_file(), "Chromium wrote no screenshot"
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.shape == (3000, 1200)
    inked = (pixels < 200).mean()
    assert pixels.std() > 20 and inked > 0.03, f"screenshot looks blank (std {pixels.std():.1f}, inked {inked:.3f})"
    # the plots render: the top of the page (text) and further down (figures) both have ink
    assert (pixels[:600] < 200).mean() > 0.01 and (pixels[1200:2400] < 200).mean() > 0.02


def test_report_of_a_method_without_embeddings_or_knn(tmp_path: Path) -> None:
    """A pretext/MIM-style run: no logs['z'] (no diagnostics), no kNN monitor, a skipped NaN step."""
    run = tmp_path / "mae_like"
    run.mkdir()
    (run / "config.yaml").write_text("method: {name: mae}\ntrain: {epochs: 1}\n")
    records = [{"step": s, "epoch": 1, "loss": 1.0 / s, "lr": 0.01 * s} for s in range(1, 6)]
    records += [{"step": 6, "epoch": 1, "skipped": True, "loss": float("nan"), "lr": 0.06},
                {"step": 6, "epoch": 1, "loss": 0.2, "images_per_s": 10.0, "knn": None, "epoch_time_s": 1.0,
                 "skipped_steps": 1}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    page = write_report(run, options=ReportOptions(embeddings=False)).read_text()
    assert "No collapse monitoring: this method logs no embeddings" in page
    assert "mae (masked-modelling)" in page and len(_embedded_pngs(page)) == 3


def test_report_draws_attention_maps_and_reconstructions_of_a_vit_run(tmp_path: Path) -> None:
    """A masked method on a ViT: the report draws CLS attention per head and the MAE reconstructions
    from the trained model (decoder from the last checkpoint), and embeds both."""
    from selfsup.config import load_config
    from selfsup.train import loop

    cfg = load_config(None, {"method.name": "mae", "data.name": "digits", "data.limit": 256,
                             "backbone.name": "vit_tiny", "backbone.depth": 2, "backbone.embed_dim": 32,
                             "backbone.num_heads": 2, "method.decoder_dim": 16, "method.decoder_depth": 1,
                             "method.decoder_heads": 2, "train.epochs": 1, "train.batch_size": 64,
                             "train.threads": 1, "train.progress": False, "train.device": "cpu"})
    run = tmp_path / "run"
    loop.pretrain(cfg, run)
    page = write_report(run, options=FAST).read_text()
    out = run / "report"
    for name in ("attention.png", "reconstructions.png"):
        assert (out / name).is_file() and name in page
        with Image.open(out / name) as im:
            assert im.size[0] > 300
    assert "Model pictures skipped" not in page


def test_report_of_a_colorization_run_on_unlabelled_rgb_photos(tmp_path: Path) -> None:
    """Colorization on the sample-photo crops (RGB, no labels): the report draws its grid of grey
    inputs, predicted colours and originals from the trained model."""
    from selfsup.config import load_config
    from selfsup.train import loop

    cfg = load_config(None, {"method.name": "colorization", "method.out_size": 4, "method.hidden": 32,
                             "data.name": "sample-photos", "data.limit": 256, "backbone.name": "small_resnet",
                             "backbone.widths": [8, 16], "train.epochs": 1, "train.batch_size": 64,
                             "train.threads": 1, "train.progress": False, "train.device": "cpu"})
    run = tmp_path / "run"
    loop.pretrain(cfg, run)
    page = write_report(run, options=FAST).read_text()
    grid = run / "report" / "colorization.png"
    assert grid.is_file() and "colorization.png" in page
    with Image.open(grid) as im:
        assert im.mode in ("RGB", "RGBA") and im.size[0] > 300


def test_cls_attention_is_a_distribution_over_tokens() -> None:
    import torch

    from selfsup.nn.backbones import build_backbone
    from selfsup.report.attention import cls_attention

    vit = build_backbone("vit_tiny", 1, 28, depth=2, embed_dim=32, num_heads=2)
    maps = cls_attention(vit, torch.randn(3, 1, 28, 28))
    assert maps.shape == (3, 2, 7, 7)
    assert (maps >= 0).all() and (maps.sum(dim=(2, 3)) < 1).all()  # the rest is the CLS token's attention to itself
    # the same weights as timm's own unfused attention applies in that block (its attn_drop sees them)
    vit.eval()
    seen = []
    attn = vit.blocks[-1].attn
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        vit(x)
    handle.remove()
    torch.testing.assert_close(cls_attention(vit, x), seen[0][:, :, 0, 1:].reshape(3, 2, 7, 7))


def test_cls_attention_of_a_register_vit_is_the_encoders_own() -> None:
    """With register tokens the blocks see [CLS, registers, patches] (issue #19): the maps are the weights the
    last block applies from CLS to the patches, past the registers, on the training grid and on another one."""
    import torch

    from selfsup.nn.backbones import build_backbone
    from selfsup.report.attention import cls_attention

    vit = build_backbone("vit_tiny", 1, 28, depth=2, embed_dim=32, num_heads=2, registers=3, layer_scale=1e-5).eval()
    attn = vit.blocks[-1].attn
    attn.fused_attn = False
    seen = []
    handle = attn.attn_drop.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    for size, grid in ((28, 7), (12, 3)):
        x = torch.randn(2, 1, size, size)
        seen.clear()
        with torch.no_grad():
            vit(x)
        maps = cls_attention(vit, x)
        assert maps.shape == (2, 2, grid, grid)
        torch.testing.assert_close(maps, seen[0][:, :, 0, 4:].reshape(2, 2, grid, grid))
        # the rest of each row goes to CLS itself and to the three registers
        torch.testing.assert_close(maps.sum(dim=(2, 3)) + seen[0][:, :, 0, :4].sum(-1), torch.ones(2, 2))
    handle.remove()
