"""E-SSL (SimCLR + rotation prediction): the loss against a by-hand reference in both rotation sources, the
per-image rotation, the labels, and the recipe checks before training."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_BACKBONES
from selfsup.losses.contrastive import nt_xent
from selfsup.methods.base import Progress
from selfsup.methods.essl import ESSL
from selfsup.methods.rotation import rotate_each
from selfsup.nn.backbones import build_backbone
from selfsup.views import Augment, ViewRecipe, make_views, resolve_sizes

SIZE = 16
PROGRESS = Progress(0, 10, 0, 10)


def method(**kw) -> ESSL:
    backbone = build_backbone("small_resnet", 1, SIZE, **TINY_BACKBONES["small_resnet"])
    return ESSL(backbone, proj_hidden=32, rotation_hidden=32, **kw)


def views(recipe: ViewRecipe, b: int = 8) -> list[torch.Tensor]:
    torch.manual_seed(3)
    images = torch.randint(0, 256, (b, 1, SIZE, SIZE), dtype=torch.uint8)
    return make_views(images, resolve_sizes(recipe, SIZE), [0.5], [0.25])


def test_rotate_each_turns_every_image_by_its_own_quarter_turns():
    x = torch.randperm(5 * 2 * 6 * 6).float().view(5, 2, 6, 6)
    k = torch.tensor([0, 1, 2, 3, 1])
    out = rotate_each(x, k)
    for i in range(5):
        assert torch.equal(out[i], torch.rot90(x[i], int(k[i]), dims=(-2, -1)))


def test_crops_loss_is_nt_xent_plus_weighted_rotation_cross_entropy_over_four_turns_of_each_crop():
    m = method(rotation_weight=0.7, temperature=0.3)
    v = views(m.spec.views)
    assert len(v) == 3 and v[2].shape[-1] == SIZE // 2  # one local crop at half the side (the paper's setting)
    loss, logs = m.training_step(v, PROGRESS)
    # by hand, the same module calls in the same order (BatchNorm in train mode normalises per call)
    z1, z2 = m.projector(m.backbone(torch.cat(v[:2]))).chunk(2)
    crops = torch.cat([torch.rot90(v[2], k, dims=(-2, -1)) for k in range(4)])
    labels = torch.arange(4).repeat_interleave(v[2].shape[0])
    rotation = F.cross_entropy(m.rotation_head(m.backbone(crops)), labels)
    torch.testing.assert_close(loss, nt_xent(z1, z2, 0.3) + 0.7 * rotation)
    torch.testing.assert_close(logs["rotation_loss"], rotation.detach())
    assert 0.0 <= float(logs["pretext_acc"]) <= 1.0


def test_views_loss_rotates_both_views_of_an_image_by_the_same_turn_and_uses_no_extra_images():
    m = method(rotate="views", rotation_weight=0.4)
    recipe = ViewRecipe(globals_=(Augment(), Augment()))
    v = views(recipe)
    torch.manual_seed(11)
    loss, logs = m.training_step(v, PROGRESS)
    torch.manual_seed(11)
    k = torch.randint(4, (v[0].shape[0],))
    feats = m.backbone(torch.cat([rotate_each(v[0], k), rotate_each(v[1], k)]))
    z1, z2 = m.projector(feats).chunk(2)
    rotation = F.cross_entropy(m.rotation_head(feats), k.repeat(2))
    torch.testing.assert_close(loss, nt_xent(z1, z2, 0.5) + 0.4 * rotation)
    torch.testing.assert_close(logs["contrastive_loss"], nt_xent(z1, z2, 0.5).detach())


def test_recipe_checks_and_settings_errors_say_what_to_set():
    with_crops = resolve_sizes(ESSL.spec.views, SIZE)
    without = resolve_sizes(ViewRecipe(globals_=(Augment(), Augment())), SIZE)
    assert method().check_run(1000, 64, with_crops) == []
    assert "views.local_crops ≥ 1" in method().check_run(1000, 64, without)[0]
    assert method(rotate="views").check_run(1000, 64, without) == []
    assert "views.local_crops: 0" in method(rotate="views").check_run(1000, 64, with_crops)[0]
    with pytest.raises(ValueError, match="rotate must be one of crops, views"):
        method(rotate="globals")
    with pytest.raises(ValueError, match="plain SimCLR"):
        method(rotation_weight=0.0)


def test_the_recipe_check_runs_before_training(tmp_path):
    from selfsup.config import ConfigError, load_config
    from selfsup.train.loop import pretrain

    cfg = load_config(None, {"method.name": "essl", "method.params": {"proj_hidden": 16, "rotation_hidden": 16},
                             "backbone.name": "small_resnet", "backbone.params": {"widths": [8, 16]},
                             "data.name": "digits", "views.local_crops": 0, "train.epochs": 1,
                             "train.batch_size": 32, "train.progress": False, "train.device": "cpu"})
    with pytest.raises(ConfigError, match="local_crops"):
        pretrain(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
