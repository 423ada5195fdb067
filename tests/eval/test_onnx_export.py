"""``selfsup export --format onnx``: the graph ONNX Runtime runs gives PyTorch's features at two batch sizes (the batch
axis is dynamic) for selfsup's CNN and ViT, a torchvision and a timm backbone; the sidecar says how to feed it.

Encoders are built in memory (as ``load_run`` returns them) except one real 1-epoch run through the command line.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selfsup.config import ConfigError, config_from_dict
from selfsup.eval.export import export_encoder
from selfsup.train.build import build_encoder
from selfsup.train.rundir import LoadedRun, load_run

BATCHES = (1, 5)


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(backbone: dict, in_chans: int, size: int) -> LoadedRun:
    cfg = config_from_dict({"backbone": backbone})
    encoder = build_encoder(cfg, in_chans, size).eval()
    meta = {"in_chans": in_chans, "image_size": size, "mean": [0.5] * in_chans, "std": [0.25] * in_chans,
            "num_features": encoder.num_features}
    return LoadedRun(cfg, encoder, meta)


def _check_onnx(run: LoadedRun, path: Path) -> dict:
    """ONNX Runtime on ``path`` against the run's encoder at each of BATCHES; returns the sidecar."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"] and [o.name for o in session.get_outputs()] == ["features"]
    c, s = run.meta["in_chans"], run.meta["image_size"]
    for batch in BATCHES:
        x = torch.rand(batch, c, s, s)
        with torch.no_grad():
            expected = run.encoder(x).numpy()
        got = session.run(["features"], {"images": x.numpy()})[0]
        assert got.shape == (batch, run.encoder.num_features)
        assert abs(got - expected).max() < 1e-4
    return json.loads(path.with_name(path.name + ".json").read_text())


@pytest.mark.parametrize("backbone, in_chans, size", [
    ({"name": "small_resnet", "params": {"widths": [8, 16, 32]}}, 1, 16),
    ({"name": "torchvision:resnet18"}, 3, 32),
    ({"name": "timm:resnet18"}, 3, 32),
    ({"name": "vit_tiny", "params": {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 4}}, 1, 16),
], ids=["small_resnet", "torchvision", "timm", "vit_tiny"])
def test_onnx_matches_pytorch_at_two_batch_sizes(backbone, in_chans, size, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    run = _run(backbone, in_chans, size)
    out, sidecar = export_encoder(run, tmp_path / "enc.onnx", "onnx")
    assert out == tmp_path / "enc.onnx" and not (tmp_path / "enc.onnx.data").exists()  # one file for small models
    meta = _check_onnx(run, out)
    assert sidecar == tmp_path / "enc.onnx.json"
    assert meta["file_format"] == "onnx" and meta["mean"] == run.meta["mean"] and meta["image_size"] == size
    onnx = meta["onnx"]
    assert onnx["input"] == {"name": "images", "shape": ["N", in_chans, size, size], "dtype": "float32"}
    assert onnx["output"]["shape"] == ["N", run.encoder.num_features] and onnx["opset"] >= 17
    assert onnx["check"]["max_abs_diff"] < 1e-4 and onnx["check"]["batch_sizes"] == [1, 3]


def test_onnx_export_from_the_command_line(tmp_path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    from selfsup.cli import main

    run_dir = tmp_path / "run"
    assert main(["pretrain", "--data", "digits", "--method", "simclr", "--epochs", "1", "--batch-size", "32", "--limit",
                 "100", "--threads", "1", "--no-progress", "--backbone", "small_resnet", "--set", "backbone.widths=[8,16]",
                 "--set", "method.proj_hidden=16", "--set", "train.knn_every=0", "--set", "data.val_size=20",
                 "--out", str(run_dir)]) == 0
    assert main(["export", str(run_dir), "--format", "onnx"]) == 0
    out = run_dir / "export" / "encoder.onnx"
    assert f"wrote {out} (onnx)" in capsys.readouterr().out
    run = load_run(run_dir)
    run.encoder.eval()  # trained batch-norm statistics, as the export used them
    meta = _check_onnx(run, out)
    assert meta["mean"] == run.meta["mean"] and meta["method"] == "simclr"
    embedded = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(embedded["selfsup"])["std"] == meta["std"]  # the normalisation travels inside the file too
    assert main(["export", str(run_dir), "--out", str(tmp_path / "by_suffix.onnx")]) == 0  # format from the suffix
    assert (tmp_path / "by_suffix.onnx").is_file()


def test_without_the_exporter_packages_one_line_names_them_and_the_extra(monkeypatch, tmp_path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ConfigError, match=r"--format onnx needs the package\(s\) onnxscript .* pip install "
                                          r"'selfsup\[onnx\]'"):
        export_encoder(_run({"name": "small_resnet", "params": {"widths": [8, 16]}}, 1, 16), tmp_path / "e.onnx")
    assert not (tmp_path / "e.onnx").exists()
