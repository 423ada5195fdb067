"""Distillation from a frozen teacher (``distill``): SEED's queue loss and the normalised MSE against naive float64
references written from the papers, analytic cases and gradcheck; the teacher frozen (no gradient, not in the
optimiser, eval mode, unchanged by training), kept out of ``encoder.pt`` and inside the checkpoint; teachers read from
a run directory and from ``selfsup export`` files, recorded by absolute path and SHA-256; inputs the teacher was not
trained on renormalised, re-channelled and resized; bad teachers refused in one line."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from selfsup.cli import main
from selfsup.config import ConfigError, OptimConfig, load_config
from selfsup.losses.teacher import normalized_mse, queue_distillation_loss
from selfsup.methods import METHODS
from selfsup.methods.base import make_progress, run_after_step
from selfsup.nn.backbones import build_backbone
from selfsup.nn.encoder_file import EncoderFileError, find_encoder
from selfsup.nn.weights import file_sha256
from selfsup.train.build import build_method, resolve_config
from selfsup.train.checkpoint import safe_load
from selfsup.train.optim import build_optimizer

F64 = torch.float64
Distill = METHODS["distill"].cls


# ------------------------------------------------------------------------------------------------ losses

def naive_seed(s: torch.Tensor, t: torch.Tensor, queue: torch.Tensor, tau_s: float, tau_t: float) -> torch.Tensor:
    """SEED (arXiv:2101.04731), literally: for each image i, D⁺ = [t̂_i, q_1 … q_K]; p^T_j ∝ exp(t̂_i·d_j/τ_T),
    p^S_j ∝ exp(ŝ_i·d_j/τ_S); the loss is −Σ_j p^T_j log p^S_j averaged over the batch."""
    total = s.new_zeros(())
    for i in range(s.shape[0]):
        si, ti = s[i] / s[i].norm(), t[i] / t[i].norm()
        d = [ti] + [queue[k] for k in range(queue.shape[0])]
        zt = sum(math.exp(float(torch.dot(ti, dj)) / tau_t - 1 / tau_t) for dj in d)  # shifted: τ_T may be 1e-4
        log_zs = torch.log(sum(torch.exp(torch.dot(si, dj) / tau_s) for dj in d))
        for dj in d:
            p_t = math.exp(float(torch.dot(ti, dj)) / tau_t - 1 / tau_t) / zt
            total = total - p_t * (torch.dot(si, dj) / tau_s - log_zs)
    return total / s.shape[0]


@pytest.mark.parametrize("b,d,k,tau_s,tau_t", [(3, 4, 5, 0.2, 1e-4), (4, 6, 0, 0.2, 0.01), (5, 3, 7, 0.5, 0.1),
                                               (2, 8, 3, 1.0, 1.0)])
def test_queue_loss_matches_seed_reference(b, d, k, tau_s, tau_t):
    s, t = torch.randn(b, d, dtype=F64), torch.randn(b, d, dtype=F64)
    queue = F.normalize(torch.randn(k, d, dtype=F64), dim=1)
    torch.testing.assert_close(queue_distillation_loss(s, t, queue, tau_s, tau_t), naive_seed(s, t, queue, tau_s, tau_t))


def test_queue_loss_of_a_student_equal_to_its_teacher_is_the_teachers_entropy():
    t = torch.randn(6, 5, dtype=F64)
    queue = F.normalize(torch.randn(9, 5, dtype=F64), dim=1)
    tau = 0.3
    logits = torch.cat([torch.ones(6, 1, dtype=F64), F.normalize(t, dim=1) @ queue.T], dim=1) / tau
    entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(queue_distillation_loss(3 * t, t, queue, tau, tau), entropy)  # scale-free
    # with nothing queued the teacher's own embedding is the only candidate: nothing to match, zero loss
    assert float(queue_distillation_loss(torch.randn(4, 5), torch.randn(4, 5), torch.zeros(0, 5))) == 0.0


def test_queue_loss_is_lowest_where_the_student_matches_the_teacher():
    t = torch.randn(8, 6, dtype=F64)
    queue = F.normalize(torch.randn(20, 6, dtype=F64), dim=1)
    matched = queue_distillation_loss(t, t, queue, 0.2, 1e-4)
    assert all(float(queue_distillation_loss(torch.randn(8, 6, dtype=F64), t, queue, 0.2, 1e-4)) > float(matched)
               for _ in range(5))


def test_normalized_mse_reference_and_analytic_cases():
    s, t = torch.randn(7, 5, dtype=F64), torch.randn(7, 5, dtype=F64)
    naive = sum(float(((s[i] / s[i].norm() - t[i] / t[i].norm()) ** 2).sum()) for i in range(7)) / 7
    torch.testing.assert_close(normalized_mse(s, t), torch.tensor(naive, dtype=F64))
    torch.testing.assert_close(normalized_mse(s, t), (2 - 2 * F.cosine_similarity(s, t, dim=1)).mean())
    assert float(normalized_mse(t, t)) == pytest.approx(0, abs=1e-12)
    assert float(normalized_mse(2.5 * t, t)) == pytest.approx(0, abs=1e-12)  # a positive rescaling changes nothing
    assert float(normalized_mse(-t, t)) == pytest.approx(4)


def test_gradcheck():
    s = torch.randn(3, 4, dtype=F64, requires_grad=True)
    t = torch.randn(3, 4, dtype=F64)
    queue = F.normalize(torch.randn(5, 4, dtype=F64), dim=1)
    assert torch.autograd.gradcheck(lambda x: queue_distillation_loss(x, t, queue, 0.3, 0.1), (s,))
    assert torch.autograd.gradcheck(lambda x: normalized_mse(x, t), (s,))


def test_losses_refuse_mismatched_widths():
    with pytest.raises(ValueError, match="teacher's width"):
        normalized_mse(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="queue must be"):
        queue_distillation_loss(torch.randn(4, 5), torch.randn(4, 5), torch.randn(3, 4))


def test_bf16_inputs_give_an_fp32_loss():
    s, t = torch.randn(4, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    assert queue_distillation_loss(s, t, F.normalize(torch.randn(6, 8), dim=1)).dtype == torch.float32


# ------------------------------------------------------------------------------------------------ the method

def _student(in_chans: int = 1, size: int = 16) -> torch.nn.Module:
    return build_backbone("small_resnet", in_chans, size, widths=[8, 16])


def _views(n: int = 8, c: int = 1, size: int = 16) -> list[torch.Tensor]:
    return [torch.randn(n, c, size, size), torch.randn(n, c, size, size)]


@pytest.mark.parametrize("loss,ssl", [("queue", 0.0), ("mse", 0.0), ("queue", 1.0)])
def test_teacher_takes_no_gradient_stays_in_eval_and_is_unchanged(loss, ssl):
    teacher = build_backbone("small_resnet", 1, 16, widths=[8, 16, 32])
    method = Distill(_student(), teacher=teacher, loss=loss, queue_size=16, proj_hidden=16, ssl_weight=ssl)
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    opt = build_optimizer(method, OptimConfig(name="adamw"), 1e-2)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in method.teacher.parameters())
    assert (method.ssl_projector is not None) == bool(ssl)
    method.train()
    assert method.training and not method.teacher.training
    for step in range(3):
        progress = make_progress(method, step, 10, 0, 10)
        total, logs = method.training_step(_views(), progress)
        opt.zero_grad()
        total.backward()
        assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
        opt.step()
        run_after_step(method, progress, logs)
    for k, v in method.teacher.state_dict().items():  # weights and BatchNorm statistics alike
        torch.testing.assert_close(v, before[k], msg=k)
    assert {"distill_loss", "teacher_cos", "z", "z_pair"} <= set(logs) and ("ssl_loss" in logs) == bool(ssl)
    if loss == "queue":
        assert int(method.queue.count) == 16  # 3 steps × 16 views, wrapped
    else:
        assert method.queue is None


def test_queue_loss_first_step_uses_the_batch_then_the_queue():
    method = Distill(_student(), teacher=build_backbone("small_resnet", 1, 16, widths=[8, 16]), queue_size=64,
                     proj_hidden=16)
    progress = make_progress(method, 0, 10, 0, 10)
    loss, logs = method.training_step(_views(), progress)
    assert float(loss.detach()) > 0  # not the zero of an empty candidate set
    run_after_step(method, progress, logs)
    raw = logs["teacher_raw"]
    torch.testing.assert_close(method.queue.contents(), raw)  # stored uncentred, centred at use
    torch.testing.assert_close(method.teacher_center, raw.mean(0))  # the first step: its own batch mean


def test_teacher_embeddings_are_centred_by_a_running_mean():
    teacher = build_backbone("small_resnet", 1, 16, widths=[8, 16])
    method = Distill(_student(), teacher=teacher, loss="mse", proj_hidden=16, center_momentum=0.9)
    means = []
    for step in range(3):
        progress = make_progress(method, step, 10, 0, 10)
        views = _views()
        center = method.center(progress, method.teacher_embeddings(torch.cat(views)))
        _, logs = method.training_step(views, progress)
        torch.testing.assert_close(center, logs["teacher_raw"].mean(0) if step == 0 else method.teacher_center)
        run_after_step(method, progress, logs)
        means.append(logs["teacher_raw"].mean(0))
    torch.testing.assert_close(method.teacher_center, 0.9 * (0.9 * means[0] + 0.1 * means[1]) + 0.1 * means[2])
    # the loss compares the student with the centred teacher embedding
    progress = make_progress(method, 3, 10, 0, 10)
    views = _views()
    x = torch.cat(views)
    method.eval()  # fixed BatchNorm statistics, so the student's forward below is the step's
    loss, logs = method.training_step(views, progress)
    torch.testing.assert_close(loss, normalized_mse(method.projector(method.backbone(x)),
                                                    logs["teacher_raw"] - method.teacher_center))
    plain = Distill(_student(), teacher=teacher, loss="mse", proj_hidden=16, center_teacher=False)
    assert not plain.center(progress, torch.randn(4, teacher.num_features)).any()


def test_views_are_renormalised_re_channelled_and_resized_for_the_teacher():
    seen: list[torch.Tensor] = []
    teacher = build_backbone("small_resnet", 3, 24, widths=[8, 16])
    teacher.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    run_mean, run_std = [0.3], [0.2]
    method = Distill(_student(1, 16), teacher=teacher, proj_hidden=16, input_mean=run_mean, input_std=run_std)
    assert method.channel_map == "repeat" and method.teacher_size == 24
    images = torch.rand(4, 1, 16, 16)
    x = (images - 0.3) / 0.2
    got = method.teacher_input(x)
    # a module teacher has no recorded normalisation: the views go as they are, only re-channelled and resized
    expected = F.interpolate(x.expand(-1, 3, -1, -1), size=(24, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, expected)
    method.training_step([x, x], make_progress(method, 0, 10, 0, 10))
    assert seen[-1].shape == (8, 3, 24, 24)


def test_renormalisation_to_the_teachers_statistics(tmp_path):
    source = _export_like(tmp_path, in_chans=3, size=16, mean=[0.5, 0.4, 0.3], std=[0.25, 0.2, 0.1])
    method = Distill(_student(3, 16), teacher=str(source), proj_hidden=16, input_mean=[0.1, 0.2, 0.3],
                     input_std=[0.3, 0.3, 0.3])
    images = torch.rand(2, 3, 16, 16)
    x = (images - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / 0.3
    want = (images - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.25, 0.2, 0.1]).view(1, 3, 1, 1)
    torch.testing.assert_close(method.teacher_input(x), want)
    grey = Distill(_student(3, 16), teacher=str(_export_like(tmp_path / "g", 1, 16, [0.5], [0.25])), proj_hidden=16,
                   input_mean=[0.1, 0.2, 0.3], input_std=[0.3, 0.3, 0.3])
    assert grey.channel_map == "luminance"
    lum = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    torch.testing.assert_close(grey.teacher_input(x), (lum - 0.5) / 0.25)


def test_unadaptable_channels_and_bad_teachers_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="data has 1 channel.*teacher takes 2"):
        Distill(_student(), teacher=build_backbone("small_resnet", 2, 16, widths=[8]), proj_hidden=16)
    with pytest.raises(ValueError, match="distill needs a teacher"):
        Distill(_student())
    with pytest.raises(ValueError, match="num_features"):
        Distill(_student(), teacher=torch.nn.Conv2d(1, 2, 3))
    with pytest.raises(EncoderFileError, match="no such file or directory"):
        find_encoder(tmp_path / "missing")
    (tmp_path / "bare.pt").write_bytes(b"")
    with pytest.raises(EncoderFileError, match="bare.pt.json beside it"):
        find_encoder(tmp_path / "bare.pt")
    (tmp_path / "enc.onnx").write_bytes(b"")
    with pytest.raises(EncoderFileError, match="ONNX"):
        find_encoder(tmp_path / "enc.onnx")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}")
    with pytest.raises(EncoderFileError, match="not a finished selfsup run.*resume"):
        find_encoder(tmp_path / "run")


def test_a_recorded_sha_that_no_longer_matches_is_refused(tmp_path):
    path = _export_like(tmp_path, 1, 16, [0.5], [0.25])
    resolved = Distill.resolve_params({"teacher": str(path)})
    assert resolved["teacher"] == str(path.resolve()) and resolved["teacher_sha256"] == file_sha256(path)
    assert Distill.resolve_params(resolved) == resolved
    with pytest.raises(ValueError, match="has SHA-256 .* not the 0+ this config records"):
        Distill.resolve_params({"teacher": str(path), "teacher_sha256": "0" * 64})
    with pytest.raises(ValueError, match="by path"):
        Distill.resolve_params({"teacher": torch.nn.Identity()})


def test_build_method_passes_the_runs_normalisation(tmp_path):
    path = _export_like(tmp_path, 1, 8, [0.5], [0.25])
    cfg = load_config(None, {"method.name": "distill", "method.params.teacher": str(path),
                             "method.params.proj_hidden": 16, "backbone.name": "small_resnet",
                             "backbone.params.widths": [8, 16]})
    model = build_method(cfg, 1, 16, stats=([0.1], [0.3]))
    assert model.renormalise and model.teacher_size == 8
    torch.testing.assert_close(model.input_mean.flatten(), torch.tensor([0.1]))
    torch.testing.assert_close(model.teacher_std.flatten(), torch.tensor([0.25]))


def _export_like(folder: Path, in_chans: int, size: int, mean: list[float], std: list[float]) -> Path:
    """A file laid out as `selfsup export` writes it (weights + ENC.pt.json), from a fresh small_resnet."""
    folder.mkdir(parents=True, exist_ok=True)
    enc = build_backbone("small_resnet", in_chans, size, widths=[8, 16])
    path = folder / "enc.pt"
    torch.save(enc.state_dict(), path)
    path.with_name("enc.pt.json").write_text(json.dumps({
        "backbone": "small_resnet", "backbone_params": {"widths": [8, 16]}, "in_chans": in_chans, "image_size": size,
        "num_features": enc.num_features, "mean": mean, "std": std}))
    return path


# ------------------------------------------------------------------------------------------------ end to end

TINY = ["--data", "digits", "--epochs", "1", "--batch-size", "32", "--limit", "100", "--threads", "1",
        "--no-progress", "--backbone", "small_resnet", "--set", "train.knn_every=0", "--set", "data.val_size=20"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    """A 1-epoch SimCLR teacher on digits (8 px), wider than the students below, and its exports."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["pretrain", "--method", "simclr", *TINY, "--set", "backbone.params.widths=[8,16,32]",
                 "--set", "method.params.proj_hidden=16", "--out", str(out)]) == 0
    for fmt in ("pt", "safetensors"):
        assert main(["export", str(out), "--format", fmt, "--out", str(out.parent / f"enc.{fmt}")]) == 0
    return out


def _distill(out: Path, teacher: Path | str, *extra: str) -> int:
    return main(["pretrain", "--method", "distill", "--teacher", str(teacher), *TINY,
                 "--set", "backbone.params.widths=[8,16]", "--set", "method.params.proj_hidden=16",
                 "--set", "method.params.queue_size=64", "--out", str(out), *extra])


def test_distill_from_a_run_directory_records_the_teacher_and_keeps_it_out_of_encoder_pt(teacher_run, tmp_path,
                                                                                         caplog):
    out = tmp_path / "student"
    with caplog.at_level("INFO", logger="selfsup"):
        assert _distill(out, teacher_run) == 0
    sha = file_sha256(teacher_run / "encoder.pt")
    assert any(str(teacher_run) in r.message and sha in r.message for r in caplog.records)
    params = yaml.safe_load((out / "config.yaml").read_text())["method"]["params"]
    assert params["teacher"] == str(teacher_run.resolve()) and params["teacher_sha256"] == sha
    student = build_backbone("small_resnet", 1, 8, widths=[8, 16])
    encoder = safe_load(out / "encoder.pt")
    assert set(encoder) == set(student.state_dict())  # the student alone
    model_state = safe_load(out / "checkpoints" / "last.pt")["model"]
    teacher_state = safe_load(teacher_run / "encoder.pt")
    assert {k[len("teacher."):] for k in model_state if k.startswith("teacher.")} == set(teacher_state)
    for k, v in teacher_state.items():  # in the checkpoint, and untouched by training
        torch.testing.assert_close(model_state[f"teacher.{k}"], v, msg=k)
    assert "queue.rows" in model_state
    # continued for one more epoch: the method rebuilt from its config, the checkpoint loaded strictly
    assert _distill(out, teacher_run, "--epochs", "2") == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"] == 2


def test_a_changed_teacher_refuses_the_resume(teacher_run, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_run, teacher, ignore=shutil.ignore_patterns("checkpoints", "export"))
    out = tmp_path / "student"
    assert _distill(out, teacher, "--set", "method.params.loss=mse") == 0
    state = torch.load(teacher / "encoder.pt", weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, teacher / "encoder.pt")
    capsys.readouterr()
    assert _distill(out, teacher, "--set", "method.params.loss=mse", "--epochs", "2") == 2
    assert "teacher_sha256" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_distill_from_an_exported_file_at_another_image_size(teacher_run, tmp_path, fmt):
    """The teacher was trained at 8 px; the student runs at 16 px and the teacher sees the views resized to 8."""
    path = teacher_run.parent / f"enc.{fmt}"
    out = tmp_path / "student"
    assert _distill(out, path, "--set", "data.image_size=16", "--set", "method.params.ssl_weight=0.5") == 0
    params = yaml.safe_load((out / "config.yaml").read_text())["method"]["params"]
    assert params["teacher"] == str(path.resolve()) and params["teacher_sha256"] == file_sha256(path)
    assert json.loads((out / "encoder.json").read_text())["image_size"] == 16
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("ssl_loss" in m and "teacher_cos" in m for m in metrics)


def test_cli_errors_name_the_teacher(tmp_path, capsys):
    assert main(["pretrain", "--method", "distill", *TINY, "--out", str(tmp_path / "a")]) == 2
    assert "distill needs a teacher" in capsys.readouterr().err
    assert _distill(tmp_path / "b", tmp_path / "nowhere") == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["pretrain", "--method", "simclr", "--teacher", "x", *TINY, "--out", str(tmp_path / "c")]) == 2
    assert "has no parameter 'method.params.teacher'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_resolve_config_records_the_teacher(tmp_path):
    from selfsup.data.load import load_digits

    path = _export_like(tmp_path, 1, 8, [0.5], [0.25])
    cfg = load_config(None, {"method.name": "distill", "method.params.teacher": str(path)})
    resolved = resolve_config(cfg, load_digits()[0])
    assert resolved.method.params["teacher_sha256"] == file_sha256(path)
    with pytest.raises(ConfigError, match="method 'distill': .*no such file"):
        resolve_config(load_config(None, {"method.name": "distill", "method.params.teacher": "nope"}),
                       load_digits()[0])
