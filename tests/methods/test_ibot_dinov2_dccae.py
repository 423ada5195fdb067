"""iBOT, DINOv2 and DCCAE at the method level (issue #19): what each loss term reads, the teacher targets, the
centres, heads shared or untied, the schedules, and clear errors for bad settings. The registry-wide checks
(finite loss, gradients, EMA, a few steps lower the loss) are in test_methods.py; two-process parity in
tests/test_distributed.py."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_BACKBONES
from selfsup.config import ConfigError, load_config
from selfsup.losses.cca import dccae_loss
from selfsup.losses.distillation import koleo_loss
from selfsup.methods import METHODS
from selfsup.methods import dinov2 as dinov2_module
from selfsup.methods import ibot as ibot_module
from selfsup.methods.base import make_progress, run_after_step
from selfsup.methods.dccae import DCCAE
from selfsup.methods.dinov2 import DINOv2
from selfsup.methods.ibot import IBOT
from selfsup.methods.masked_distillation import student_outputs
from selfsup.nn.backbones import build_backbone
from selfsup.nn.masking import blockwise_masks
from selfsup.views import make_views
from test_methods import IMAGE_SIZE, tiny_method, tiny_recipe

B = 8


def tiny_vit(**kw):
    return build_backbone("vit_tiny", 1, IMAGE_SIZE, **{**TINY_BACKBONES["vit_tiny"], **kw})


def views_for(method, b: int = B, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, 1, IMAGE_SIZE, IMAGE_SIZE), generator=g, dtype=torch.uint8)
    torch.manual_seed(seed)
    return make_views(images, tiny_recipe(method), [0.5], [0.25])


def fixed_masks(method, b: int = B, seed: int = 0) -> torch.Tensor:
    """(2B, L) masks with every image masked (so every image has patch-loss terms)."""
    g = torch.Generator().manual_seed(seed)
    masks = blockwise_masks(2 * b, method.backbone.grid_size, (0.2, 0.5), 1.0, generator=g)
    assert masks.any(dim=1).all()
    method.draw_masks = lambda batch, grid, device: masks.to(device)
    return masks


PATCH_LOSS = {"ibot": "patch_loss", "dinov2": "ibot_loss"}
CLS_LOSS = {"ibot": "cls_loss", "dinov2": "dino_loss"}
MODULE = {"ibot": ibot_module, "dinov2": dinov2_module}


@pytest.mark.parametrize("name", ["ibot", "dinov2"])
def test_patch_loss_reads_the_teacher_only_where_the_student_was_masked(name, monkeypatch):
    """Changing the teacher's outputs at the patches the student saw leaves the loss unchanged; changing them at
    the masked patches changes the patch term (and only it)."""
    method = tiny_method(name)
    views = views_for(method)
    masks = fixed_masks(method)
    progress = make_progress(method, 5, 100, 0, 10)
    _, base = method.training_step(views, progress)
    original = MODULE[name].teacher_tokens

    def perturbed(where: torch.Tensor):
        def teacher_tokens(teacher, vs):
            out = original(teacher, vs).clone()
            patches = out[:, 1:]
            patches[where] += 3 * torch.randn_like(patches[where])
            return out
        return teacher_tokens

    monkeypatch.setattr(MODULE[name], "teacher_tokens", perturbed(~masks))
    _, visible = method.training_step(views, progress)
    torch.testing.assert_close(visible[PATCH_LOSS[name]], base[PATCH_LOSS[name]])
    torch.testing.assert_close(visible[CLS_LOSS[name]], base[CLS_LOSS[name]])
    monkeypatch.setattr(MODULE[name], "teacher_tokens", perturbed(masks))
    _, hidden = method.training_step(views, progress)
    assert abs(float(hidden[PATCH_LOSS[name]]) - float(base[PATCH_LOSS[name]])) > 1e-4
    torch.testing.assert_close(hidden[CLS_LOSS[name]], base[CLS_LOSS[name]])


def test_dinov2_teacher_targets_are_sinkhorn_normalised():
    """Rows are distributions; columns converge to equal shares: N/K of the 2B [CLS] rows and M/K' of the M masked
    tokens (many iterations); DINOv2's 3 iterations come close (the loss-level test bounds how close)."""
    method = DINOv2(tiny_vit(), **{**DINOv2.spec.test_params, "sinkhorn_iterations": 60})
    views = views_for(method)
    masks = fixed_masks(method)
    cls, patch = method.teacher_targets(views, masks, 0.07)
    n, k = cls.shape
    m, kp = patch.shape
    assert (n, k, m, kp) == (2 * B, 64, int(masks.sum()), 48)
    for q, rows, cols in ((cls, n, k), (patch, m, kp)):
        torch.testing.assert_close(q.sum(dim=1), torch.ones(rows), rtol=0, atol=1e-5)
        torch.testing.assert_close(q.sum(dim=0), torch.full((cols,), rows / cols), rtol=1e-3, atol=1e-5)
    method.sinkhorn_iterations = 3
    cls3, _ = method.teacher_targets(views, masks, 0.07)
    assert (cls3.sum(dim=0) / (n / k) - 1).abs().max() < 0.6
    assert (cls3.sum(dim=0).max() / cls3.sum(dim=0).min()) < (cls.shape[0])  # far from one prototype taking all


def test_dinov2_loss_is_its_weighted_terms_and_koleo_reads_the_backbone_cls_per_view():
    method = tiny_method("dinov2")
    views = views_for(method)
    masks = fixed_masks(method)
    progress = make_progress(method, 5, 100, 0, 10)
    loss, logs = method.training_step(views, progress)
    torch.testing.assert_close(loss.detach(), logs["dino_loss"] + logs["ibot_loss"] + 0.1 * logs["koleo_loss"])
    s = student_outputs(method.backbone, method.mask_token, method.dino_head, method.ibot_head, views, masks, False)
    first, second = s.cls_features.chunk(2)
    torch.testing.assert_close(logs["koleo_loss"], (koleo_loss(first) + koleo_loss(second)).detach())
    torch.testing.assert_close(s.cls_features, method.backbone.cls_output(
        method.backbone.encode_with_mask_tokens(torch.cat(views[:2]), masks, method.mask_token)))


def test_ibot_loss_weights_and_centres():
    method = tiny_method("ibot")
    views = views_for(method)
    fixed_masks(method)
    progress = make_progress(method, 5, 100, 0, 10)
    loss, logs = method.training_step(views, progress)
    torch.testing.assert_close(loss.detach(), logs["cls_loss"] + logs["patch_loss"])  # λ1 = λ2 = 1
    method.patch_loss_weight = 0.0
    torch.testing.assert_close(method.training_step(views, progress)[0].detach(), logs["cls_loss"])
    # centres: c ← 0.9·c + 0.1·mean; [CLS] over the 2B global outputs, patches over every token of them
    run_after_step(method, progress, logs)
    torch.testing.assert_close(method.center, 0.1 * logs["teacher_cls"].mean(dim=0, keepdim=True))
    torch.testing.assert_close(method.patch_center, 0.1 * logs["teacher_patch"].mean(dim=(0, 1), keepdim=True))
    assert logs["teacher_cls"].shape == (2 * B, 64) and logs["teacher_patch"].shape == (2 * B, 16, 64)


def test_heads_shared_in_ibot_untied_in_dinov2():
    ibot = IBOT(tiny_vit(), out_dim=64, hidden=32, bottleneck=16)
    assert ibot.patch_head is None and len(ibot.ema_pairs()) == 2  # one head for [CLS] and patches (paper)
    untied = IBOT(tiny_vit(), out_dim=64, hidden=32, bottleneck=16, shared_head=False, patch_out_dim=24)
    assert untied.patch_head.last_layer.weight.shape == (24, 16) and len(untied.ema_pairs()) == 3
    dinov2 = DINOv2(tiny_vit(), out_dim=64, patch_out_dim=24, hidden=32, bottleneck=16)
    assert dinov2.ibot_head is not None and len(dinov2.ema_pairs()) == 3
    assert dinov2.ibot_head.last_layer.weight.shape == (24, 16)
    assert DINOv2(tiny_vit(), out_dim=64, hidden=32, bottleneck=16, shared_head=True).ibot_head is None
    # DINOv2's heads learn their last layer's magnitude; iBOT's recipe (norm_last_layer false) too
    assert dinov2.dino_head.last_layer.parametrizations.weight.original0.requires_grad
    # the teachers run without stochastic depth
    m = DINOv2(tiny_vit(drop_path=0.5), out_dim=64, patch_out_dim=24, hidden=32, bottleneck=16)
    assert m.teacher_backbone.blocks[-1].drop_path1.drop_prob == 0.0
    assert m.backbone.blocks[-1].drop_path1.drop_prob == 0.5


def test_schedules_and_last_layer_freeze():
    method = DINOv2(tiny_vit(), out_dim=64, patch_out_dim=24, hidden=32, bottleneck=16, freeze_last_layer_epochs=0.5,
                    warmup_teacher_temp_epochs=2)
    start, mid, end = (make_progress(method, s, 100, s // 10, 10) for s in (0, 10, 100))
    assert start.value("teacher_momentum") == pytest.approx(0.992) and end.value("teacher_momentum") == 1.0
    assert start.value("teacher_temp") == pytest.approx(0.04) and mid.value("teacher_temp") == pytest.approx(0.055)
    assert make_progress(method, 20, 100, 2, 10).value("teacher_temp") == pytest.approx(0.07)
    views = views_for(method)
    fixed_masks(method)
    last = [method.dino_head.last_layer.parametrizations.weight.original1,
            method.ibot_head.last_layer.parametrizations.weight.original1]
    for step, frozen in ((4, True), (5, False)):  # the first half epoch of 10 steps
        method.zero_grad()
        method.training_step(views, make_progress(method, step, 100, 0, 10))[0].backward()
        assert all((p.grad.abs().sum() == 0) == frozen for p in last), step
    ibot = tiny_method("ibot")
    p = make_progress(ibot, 0, 100, 0, 10)
    assert set(p.values) == {"teacher_momentum", "teacher_temp", "teacher_patch_temp"}
    assert p.value("teacher_momentum") == pytest.approx(0.996)


# ---------------------------------------------------------------- bad settings


@pytest.mark.parametrize("cls", [IBOT, DINOv2])
@pytest.mark.parametrize("ratio,match", [((0.1, 1.0), r"mask ratio must be in \(0, 1\)"),
                                         ((0.0, 0.5), r"mask ratio must be in \(0, 1\)"),
                                         ((-0.2, 0.3), r"mask ratio must be in \(0, 1\)"),
                                         ((0.5, 0.1), "low ≤ high")])
def test_mask_ratio_outside_the_blockwise_range_is_refused(cls, ratio, match):
    with pytest.raises(ValueError, match=match):
        cls(tiny_vit(), mask_ratio=ratio)


@pytest.mark.parametrize("cls", [IBOT, DINOv2])
def test_mask_probability_must_mask_something(cls):
    with pytest.raises(ValueError, match=r"mask_probability must be in \(0, 1\]"):
        cls(tiny_vit(), mask_probability=0.0)


@pytest.mark.parametrize("name", ["ibot", "dinov2"])
def test_a_cnn_is_refused_naming_a_vit_backbone(name):
    with pytest.raises(ValueError, match=f"{name}: masked methods need a ViT backbone \\(vit_tiny, vit_small\\)"):
        METHODS[name].cls(build_backbone("small_resnet", 1, 16, widths=[8]))
    from selfsup.train.build import build_method

    cfg = load_config(None, {"method.name": name, "backbone.name": "small_resnet"})
    with pytest.raises(ConfigError, match="vit_tiny"):
        build_method(cfg, 1, 28)


def test_dinov2_registers_requested_on_a_backbone_without_them():
    with pytest.raises(ValueError, match="dinov2: needs a ViT with 4 register tokens, this one has 0"):
        DINOv2(tiny_vit(), registers=4)
    with pytest.raises(ValueError, match="registers=4"):
        DINOv2(tiny_vit(registers=2), registers=4)
    method = DINOv2(tiny_vit(registers=4), registers=4, **DINOv2.spec.test_params)
    views = views_for(method)
    fixed_masks(method)
    loss, _ = method.training_step(views, make_progress(method, 0, 10, 0, 10))
    loss.backward()
    assert method.backbone.reg_token.grad.abs().sum() > 0


def test_dinov2_warns_without_layer_scale(caplog):
    with caplog.at_level("WARNING", logger="selfsup"):
        DINOv2(tiny_vit(), **DINOv2.spec.test_params)
    assert "no LayerScale" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="selfsup"):
        DINOv2(tiny_vit(layer_scale=1e-5), **DINOv2.spec.test_params)
    assert "LayerScale" not in caplog.text


# ---------------------------------------------------------------- DCCAE


def tiny_cnn(size: int = IMAGE_SIZE, chans: int = 1):
    return build_backbone("small_resnet", chans, size, widths=[8, 16])


def test_dccae_loss_is_the_dccae_objective_on_the_projections():
    method = DCCAE(tiny_cnn(), proj_dim=4, proj_hidden=16, decoder_hidden=16, lam=0.5).eval()
    x1, x2 = torch.randn(2, 12, 1, IMAGE_SIZE, IMAGE_SIZE)
    loss, logs = method.training_step([x1, x2], make_progress(method, 0, 10, 0, 10))
    h1, h2 = method.encode(x1, 1), method.encode(x2, 2)
    expected, parts = dccae_loss(h1, h2, x1, method.decoder1(h1).view_as(x1), x2, method.decoder2(h2).view_as(x2),
                                 lam=0.5, r1=1e-3, r2=1e-3)
    torch.testing.assert_close(loss, expected)
    assert 0 < float(logs["correlation"]) <= 4 and float(logs["reconstruction"]) > 0
    assert method(x1).shape == (12, 16)  # evaluation reads the backbone


def test_dccae_two_encoders_have_their_own_weights_and_gradients():
    method = DCCAE(tiny_cnn(), proj_dim=4, proj_hidden=16, decoder_hidden=16, shared_encoder=False)
    first = dict(method.backbone.named_parameters())
    second = dict(method.backbone2.named_parameters())
    assert first.keys() == second.keys()
    assert not torch.equal(first["stem.0.weight"], second["stem.0.weight"])  # re-initialised, not a copy
    x1, x2 = torch.randn(2, 12, 1, IMAGE_SIZE, IMAGE_SIZE)
    method.training_step([x1, x2], make_progress(method, 0, 10, 0, 10))[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.backbone2.parameters())
    assert DCCAE(tiny_cnn(), proj_dim=4).backbone2 is None  # shared by default


def test_dccae_refuses_a_decoder_that_does_not_match_the_input():
    from selfsup.methods import get_method
    from selfsup.train.build import build_method, check_run, view_recipe

    cfg = load_config(None, {"method.name": "dccae", "backbone.name": "small_resnet", "backbone.widths": [8, 16],
                             "method.image_size": 32, "method.proj_hidden": 16, "method.decoder_hidden": 16})
    model = build_method(cfg, 1, 28)
    with pytest.raises(ConfigError, match=r"decoders reconstruct 32×32 images \(1 channel\(s\)\) but the views are 28px"):
        check_run(model, cfg, 1000, view_recipe(cfg, get_method("dccae").spec, 28))
    with pytest.raises(ValueError, match="in_chans=3 but the backbone takes 1-channel images"):
        DCCAE(tiny_cnn(), in_chans=3)
    with pytest.raises(ValueError, match="pass in_chans= and image_size="):
        DCCAE(_bare_backbone())
    method = DCCAE(tiny_cnn(), proj_dim=4, proj_hidden=16, decoder_hidden=16)
    with pytest.raises(ValueError, match=r"decoders reconstruct \(1, 16, 16\) inputs"):
        method.training_step([torch.randn(8, 1, 20, 20)] * 2, make_progress(method, 0, 10, 0, 10))


def _bare_backbone() -> torch.nn.Module:
    """A backbone built outside build_backbone: no record of its input."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    net.num_features = 8
    return net


def test_dccae_needs_a_batch_larger_than_its_projection():
    from selfsup.methods import get_method
    from selfsup.train.build import build_method, check_run, view_recipe

    cfg = load_config(None, {"method.name": "dccae", "backbone.name": "small_resnet", "backbone.widths": [8, 16],
                             "method.proj_dim": 32, "method.proj_hidden": 16, "method.decoder_hidden": 16,
                             "train.batch_size": 32})
    model = build_method(cfg, 1, 28)
    with pytest.raises(ConfigError, match="CCA needs a batch larger than proj_dim = 32"):
        check_run(model, cfg, 1000, view_recipe(cfg, get_method("dccae").spec, 28))
    method = DCCAE(tiny_cnn(), proj_dim=8, proj_hidden=16, decoder_hidden=16)
    with pytest.raises(ValueError, match="CCA needs a batch larger than proj_dim = 8, got 8"):
        method.training_step([torch.randn(8, 1, IMAGE_SIZE, IMAGE_SIZE)] * 2, make_progress(method, 0, 10, 0, 10))
