"""Pretrained initialisation (``backbone.weights``, ``--weights``): state dicts from torchvision, timm and selfsup
exports load into the matching backbone; strict errors name what does not fit; classifier keys are dropped, the input
conv adapted, a ViT's position embedding resampled; pickled code is refused; a run records the file's path and
SHA-256, keeps a finished run when the file is bad, and a resumed run continues from its checkpoint.

Backbones are tiny or built without training; the two runs are one epoch on 100 of scikit-learn's 8×8 digits.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from selfsup.cli import main
from selfsup.config import ConfigError, config_from_dict, load_config
from selfsup.nn.weights import WeightsError, load_weights, read_weights
from selfsup.train.build import build_method
from selfsup.train.checkpoint import CheckpointError

TINY = {"widths": [8, 16]}


pytestmark = pytest.mark.usefixtures("one_thread")


def _backbone(overrides: dict, in_chans: int = 3, size: int = 32, **kw) -> torch.nn.Module:
    """The backbone of a new run's method, built (and initialised from its weights) as pretraining builds it."""
    cfg = load_config(None, {"method.proj_hidden": 16, "method.proj_dim": 8, **overrides})
    return build_method(cfg, in_chans, size, **kw).backbone


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys) -> bool:
    return all(torch.equal(a[k], b[k]) for k in keys)


# --------------------------------------------------------------------------------------- library layouts


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_torchvision_state_dict_loads_into_its_backbone(tmp_path, suffix, caplog) -> None:
    import torchvision
    from safetensors.torch import save_file

    net = torchvision.models.resnet18(weights=None)
    state = net.state_dict()
    path = tmp_path / f"r18{suffix}"
    torch.save(state, path) if suffix == ".pt" else save_file(state, str(path))
    with caplog.at_level("INFO", logger="selfsup"):
        backbone = _backbone({"backbone.name": "torchvision:resnet18", "backbone.weights": str(path),
                              "backbone.small_images": False})
    got = backbone.net.state_dict()
    assert set(got) == set(state) - {"fc.weight", "fc.bias"} and _equal(got, state, got)
    assert "dropped the file's classifier (fc." in caplog.text  # safetensors lists keys sorted
    assert "loaded 120 of the backbone's 120 tensors" in caplog.text


def test_a_timm_state_dict_loads_into_its_backbone(tmp_path) -> None:
    import timm

    state = timm.create_model("resnet18", pretrained=False).state_dict()
    torch.save(state, tmp_path / "timm.pth")
    backbone = _backbone({"backbone.name": "timm:resnet18", "backbone.weights": str(tmp_path / "timm.pth"),
                          "backbone.small_images": False})
    got = backbone.net.state_dict()
    assert _equal(got, state, got) and "fc.weight" not in got


def test_rgb_filters_are_summed_into_a_one_channel_input_conv(tmp_path, caplog) -> None:
    import torchvision

    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, tmp_path / "r18.bin")
    with caplog.at_level("INFO", logger="selfsup"):
        backbone = _backbone({"backbone.name": "torchvision:resnet18", "backbone.weights": str(tmp_path / "r18.bin"),
                              "backbone.small_images": False}, in_chans=1, size=16)
    torch.testing.assert_close(backbone.net.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(backbone.net.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert "conv1.weight: the file's 3 input channels adapted to the data's 1" in caplog.text


def test_the_small_image_stem_is_named_with_its_two_ways_out(tmp_path) -> None:
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pt")
    base = {"backbone.name": "torchvision:resnet18", "backbone.weights": str(tmp_path / "r18.pt")}
    with pytest.raises(CheckpointError, match=r"conv1.weight: file \(64, 3, 7, 7\), backbone \(64, 3, 3, 3\)\); conv1 "
                                              r"is selfsup's small-image stem .*small_images=false"):
        _backbone(base)
    backbone = _backbone({**base, "backbone.weights_ignore": ["conv1"]})  # the stem keeps its fresh init
    assert torch.equal(backbone.net.layer4[1].bn2.running_var,
                       torch.load(tmp_path / "r18.pt", weights_only=True)["layer4.1.bn2.running_var"])


def test_another_architecture_is_refused_naming_the_keys(tmp_path) -> None:
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(CheckpointError) as err:
        _backbone({"backbone.name": "torchvision:resnet50", "backbone.weights": str(tmp_path / "r18.pt"),
                   "backbone.small_images": False})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("backbone.weights: ") and "does not fit backbone torchvision:resnet50" in msg
    assert "165 backbone tensor(s) missing from the file (layer1.0.conv3.weight, " in msg and "and 161 more" in msg
    assert "23 of another shape (layer1.0.conv1.weight: file (64, 64, 3, 3), backbone (64, 64, 1, 1)" in msg
    with pytest.raises(CheckpointError, match="none of its 120 tensor.* the backbone's like stem.0.weight.*another "
                                              "architecture"):
        _backbone({"backbone.name": "small_resnet", "backbone.params": TINY, "backbone.weights": str(tmp_path / "r18.pt")})


def test_shape_mismatches_are_listed_and_non_strict_loads_the_rest(tmp_path, caplog) -> None:
    from selfsup.nn.backbones import SmallResNet

    state = SmallResNet(3, (8, 16)).state_dict()
    torch.save(state, tmp_path / "small.pt")
    extra = {"backbone.name": "small_resnet", "backbone.params": {"widths": [8, 32]},
             "backbone.weights": str(tmp_path / "small.pt")}
    with pytest.raises(CheckpointError, match=r"15 of another shape \(stages.0.conv1.weight: file \(16, 8, 3, 3\), "
                                              r"backbone \(32, 8, 3, 3\)"):
        _backbone(extra)
    with caplog.at_level("INFO", logger="selfsup"):
        backbone = _backbone({**extra, "backbone.weights_strict": False})
    assert torch.equal(backbone.stem[0].weight, state["stem.0.weight"])
    assert "loaded 9 of the backbone's 24 tensors" in caplog.text
    assert "weights_strict=false: 15 of another shape" in caplog.text


# --------------------------------------------------------------------------------------- selfsup layouts


def test_selfsup_layouts_load_export_and_run_encoder(tmp_path) -> None:
    """A ``selfsup export`` (library keys) and a run's ``encoder.pt`` (selfsup's ``net.`` prefix) both load."""
    from selfsup.eval.export import export_encoder
    from selfsup.train.build import build_encoder
    from selfsup.train.rundir import LoadedRun

    cfg = config_from_dict({"backbone": {"name": "torchvision:resnet18"}})
    source = build_encoder(cfg, 1, 16)
    export_encoder(LoadedRun(cfg, source, {"in_chans": 1, "image_size": 16, "mean": [0.5], "std": [0.2]}),
                   tmp_path / "enc.safetensors", "torchvision")
    torch.save(source.state_dict(), tmp_path / "encoder.pt")  # as a run writes it: net.conv1.weight, ...
    for file in ("enc.safetensors", "encoder.pt"):
        got = _backbone({"backbone.name": "torchvision:resnet18", "backbone.weights": str(tmp_path / file)}, 1, 16)
        assert _equal(got.state_dict(), source.state_dict(), source.state_dict())


def test_a_timm_vit_loads_into_selfsups_vit_with_its_position_embedding_resampled(tmp_path, caplog) -> None:
    from timm.models.vision_transformer import VisionTransformer

    net = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2,
                            class_token=True, global_pool="token", fc_norm=False)
    torch.save(net.state_dict(), tmp_path / "vit.pt")
    vit = {"backbone.name": "vit_tiny", "backbone.params": {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 4},
           "backbone.weights": str(tmp_path / "vit.pt")}
    same = _backbone(vit, 1, 8)
    assert _equal(same.state_dict(), net.state_dict(), same.state_dict())
    with caplog.at_level("INFO", logger="selfsup"):
        bigger = _backbone(vit, 1, 16)  # a 4×4 patch grid from the file's 2×2
    assert bigger.pos_embed.shape == (1, 17, 32) and torch.equal(bigger.blocks[0].attn.qkv.weight,
                                                                   net.blocks[0].attn.qkv.weight)
    assert "dropped the file's classifier (head.weight, head.bias)" in caplog.text
    assert "pos_embed: resampled from the file's 2×2 patch grid to the backbone's 4×4" in caplog.text


# --------------------------------------------------------------------------------------- wrapped and bad files


def test_a_wrapped_checkpoint_is_unwrapped_when_one_prefix_fits(tmp_path, caplog) -> None:
    from selfsup.nn.backbones import SmallResNet

    state = SmallResNet(1, (8, 16)).state_dict()
    wrapped = {"epoch": 7, "state_dict": {f"module.{k}": v for k, v in state.items()}, "optimizer": {"state": {}}}
    torch.save(wrapped, tmp_path / "ckpt.pth")
    with caplog.at_level("INFO", logger="selfsup"):
        got = _backbone({"backbone.name": "small_resnet", "backbone.params": TINY,
                         "backbone.weights": str(tmp_path / "ckpt.pth")}, 1, 16)
    assert _equal(got.state_dict(), state, state)
    assert "took the tensors under 'state_dict.module.' (the prefix removed from every key)" in caplog.text
    torch.save({"teacher": state, "student": state}, tmp_path / "two.pt")
    with pytest.raises(WeightsError, match="several sets of tensors .* 'student.', 'teacher.'"):
        load_weights(SmallResNet(1, (8, 16)), tmp_path / "two.pt")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_bad_files_are_one_clear_line(tmp_path) -> None:
    torch.save({"w": torch.zeros(1), "payload": Evil()}, tmp_path / "evil.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    (tmp_path / "text.pt").write_text("not weights")
    (tmp_path / "text.safetensors").write_text("not weights either")
    cases = {"missing.pt": "weights file not found: ",
             "evil.pt": r"refusing .*evil.pt: it holds pickled Python objects \([\w.]*system\), which loading would run "
                        r"as code \(selfsup reads weights with torch.load\(weights_only=True\)\)",
             "list.pt": "holds no tensors (it is a list); a state dict is a mapping",
             "text.pt": "is not a PyTorch (.pt/.pth/.bin) or safetensors weights file",
             "text.safetensors": "is not a readable safetensors file"}
    for name, needle in cases.items():
        with pytest.raises(WeightsError) as err:
            read_weights(tmp_path / name)
        message = str(err.value)
        assert "\n" not in message and (re.search(needle, message) if name == "evil.pt" else needle in message), message


def test_weights_belong_to_the_backbone_in_the_config() -> None:
    cfg = load_config(None, {"backbone": "small_resnet", "backbone.weights": "w.pt", "backbone.weights_ignore": ["fc"]})
    assert (cfg.backbone.name, cfg.backbone.weights, cfg.backbone.weights_ignore, cfg.backbone.params) == \
        ("small_resnet", "w.pt", ["fc"], {})
    assert config_from_dict({"backbone": {"name": "resnet18", "weights": "w.pt"}}).backbone.weights == "w.pt"
    assert "weights" not in config_from_dict({"backbone": "resnet18"}).to_dict()["backbone"]  # older runs resume
    with pytest.raises(ConfigError, match="'method.weights': weights initialise the backbone, not the method; use "
                                          "backbone.weights"):
        config_from_dict({"method": {"name": "simclr", "weights": "w.pt"}})
    with pytest.raises(ConfigError, match="'method.weights'"):
        load_config(None, {"method.weights": "w.pt"})
    with pytest.raises(ConfigError, match="backbone.weights_strict is set but backbone.weights is not"):
        load_config(None, {"backbone.weights_strict": False})
    with pytest.raises(ConfigError, match=r"backbone.weights_ignore: expected a list, got 'fc' \(write \[fc\]"):
        load_config(None, {"backbone.weights": "w.pt", "backbone.weights_ignore": "fc"})


# --------------------------------------------------------------------------------------- runs


def _args(out: Path, weights: Path, *extra: str) -> list[str]:
    return ["pretrain", "--data", "digits", "--method", "simclr", "--epochs", "1", "--batch-size", "32", "--limit",
            "100", "--threads", "1", "--no-progress", "--backbone", "small_resnet", "--weights", str(weights),
            "--set", "backbone.widths=[8,16]", "--set", "method.proj_hidden=16", "--set", "method.proj_dim=8",
            "--set", "train.knn_every=0", "--set", "data.val_size=20", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def weighted_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A finished 1-epoch run started from a weights file; the file and its state."""
    from selfsup.nn.backbones import SmallResNet

    root = tmp_path_factory.mktemp("weighted")
    state = SmallResNet(1, (8, 16)).state_dict()
    torch.save(state, root / "init.pt")
    assert main(_args(root / "run", root / "init.pt")) == 0
    return root / "run", root / "init.pt", state


def test_a_run_records_the_weights_path_and_checksum(weighted_run) -> None:
    run, weights, _ = weighted_run
    saved = yaml.safe_load((run / "config.yaml").read_text())["backbone"]
    assert saved["weights"] == str(weights.resolve())
    assert saved["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert saved["weights_strict"] is True and saved["weights_ignore"] == []


def test_a_bad_weights_file_leaves_a_finished_run_intact(weighted_run, tmp_path, capsys) -> None:
    run, _, _ = weighted_run
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "other.pt")
    for bad in (tmp_path / "missing.pt", tmp_path / "other.pt"):
        assert main(_args(run, bad, "--overwrite")) == 2
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("selfsup: error:")]
        assert len(lines) == 1 and "backbone.weights: " in lines[0] and "Traceback" not in err, err
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before


def test_a_resumed_run_continues_from_its_checkpoint_not_the_file(weighted_run, tmp_path) -> None:
    import shutil

    from selfsup.nn.backbones import SmallResNet

    src, weights, _ = weighted_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    encoder = torch.load(run / "encoder.pt", weights_only=True)
    changed = tmp_path / "init.pt"
    torch.save(SmallResNet(1, (8, 16)).state_dict(), changed)  # other values at the recorded path
    args = _args(run, changed)
    config = (run / "config.yaml").read_text().replace(str(weights.resolve()), str(changed.resolve()))
    (run / "config.yaml").write_text(config)  # the copy's recorded path is the new file's
    assert main(args) == 0
    again = torch.load(run / "encoder.pt", weights_only=True)
    assert _equal(again, encoder, encoder)


def test_a_resumed_run_needs_no_weights_file(weighted_run, tmp_path) -> None:
    import shutil

    src, weights, _ = weighted_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    gone = tmp_path / "gone.pt"
    shutil.copy(weights, gone)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(weights.resolve()),
                                                                              str(gone.resolve())))
    gone.unlink()
    assert main(_args(run, gone)) == 0
