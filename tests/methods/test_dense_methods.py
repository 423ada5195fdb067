"""DenseCL and VICRegL as methods: their steps against the reference computations written out by hand from the
backbone's maps (1×1 convolutions for DenseCL's dense head, the boxes' cell centres for VICRegL), queues and the
in-batch first step, λ warm-up, α by backbone kind, multi-crop, ViT backbones, settings refused before training,
and two-process parity over a queue push (the registry-wide tests cover gradients, EMA and parity of one step)."""
from __future__ import annotations

import dataclasses
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import TINY_BACKBONES
from spawned import gloo_group
from selfsup.config import ConfigError, ModelConfig, RunConfig
from selfsup.losses.dense import vicregl_global_loss, vicregl_local_loss
from selfsup.methods import METHODS
from selfsup.methods.base import finish_step, make_progress
from selfsup.nn.backbones import build_backbone
from selfsup.train.build import build_method, check_run
from selfsup.views import make_views, resolve_sizes

SIZE = 16


def tiny(name: str, backbone: str = "small_resnet", **params):
    cls = METHODS[name].cls
    bb = build_backbone(backbone, 1, SIZE, **TINY_BACKBONES[backbone])
    return cls(bb, **{**cls.spec.test_params, **params})


def views_of(method, n: int = 8, recipe=None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, SIZE, SIZE), generator=g, dtype=torch.uint8)
    torch.manual_seed(seed + 1)
    return make_views(images, recipe or resolve_sizes(method.spec.views, SIZE), [0.5], [0.25], with_boxes=True)


def small_resnet_map(backbone, x):
    """The last map of selfsup's small_resnet, by hand (stem, then every stage), and its global average."""
    m = backbone.stages(backbone.stem(x))
    return m, m.mean(dim=(2, 3))


def as_conv(linear: torch.nn.Linear) -> torch.nn.Conv2d:
    """The 1×1 convolution computing ``linear`` at every location (the reference's DenseCLNeck.mlp2 layers)."""
    conv = torch.nn.Conv2d(linear.in_features, linear.out_features, 1).double()
    conv.weight.data.copy_(linear.weight.data[:, :, None, None])
    conv.bias.data.copy_(linear.bias.data)
    return conv


# --- DenseCL ----------------------------------------------------------------------------------------

def reference_densecl(method, x_q, x_k, queue, queue2):
    """densecl.py ``forward_train`` (eval-mode BN, so the key shuffle changes nothing), written out on the method's
    weights in float64: backbone maps, the neck as fc and conv1×1 layers, the correspondence from backbone features,
    MoCo's logits against ``queue`` / ``queue2`` (C × K, the reference's layout), or with no queue the in-batch form
    (other images' keys and pooled dense keys as negatives)."""
    def encode(backbone, proj, dense_proj, x):
        fmap, pooled = small_resnet_map(backbone, x)
        q = proj(pooled)
        grid = as_conv(dense_proj[2])(F.relu(as_conv(dense_proj[0])(fmap)))  # conv-ReLU-conv: B × D × S × S
        pooled2 = grid.mean(dim=(2, 3))
        return (F.normalize(q, dim=1), F.normalize(grid.flatten(2), dim=1), F.normalize(pooled2, dim=1),
                F.normalize(fmap.flatten(2), dim=1))

    q, q_grid, _, q_b = encode(method.backbone, method.projector, method.dense_projector, x_q)
    k, k_grid, k2, k_b = encode(method.key_backbone, method.key_projector, method.key_dense_projector, x_k)
    tau = method.temperature
    ind = torch.matmul(q_b.permute(0, 2, 1), k_b).max(dim=2)[1]
    indexed = torch.gather(k_grid, 2, ind.unsqueeze(1).expand(-1, k_grid.size(1), -1))
    l_pos_dense = (q_grid * indexed).sum(1).view(-1, 1)
    q_flat = q_grid.permute(0, 2, 1).reshape(-1, q_grid.size(1))
    b, s2 = q.shape[0], q_grid.shape[2]
    if queue is None:
        logits = q @ k.T / tau
        single = F.cross_entropy(logits, torch.arange(b))
        own = torch.arange(b).repeat_interleave(s2)
        l_neg_dense = (q_flat @ k2.T).masked_fill(F.one_hot(own, b).bool(), float("-inf"))
    else:
        single = F.cross_entropy(torch.cat([(q * k).sum(1, keepdim=True), q @ queue], 1) / tau, torch.zeros(b, dtype=torch.long))
        l_neg_dense = q_flat @ queue2
    dense = F.cross_entropy(torch.cat([l_pos_dense, l_neg_dense], 1) / tau, torch.zeros(b * s2, dtype=torch.long))
    return single, dense, k, k2


def test_densecl_steps_are_the_reference_forward():
    """The first step (empty queues: in-batch negatives), then one with the queues holding that step's keys."""
    method = tiny("densecl", queue_size=32).double().eval()
    views, _ = views_of(method)
    x_q, x_k = (v.double() for v in views)
    with torch.no_grad():
        single, dense, k, k2 = reference_densecl(method, x_q, x_k, None, None)
        loss, logs = method.training_step([x_q, x_k], make_progress(method, 0, 10, 0, 10))
        torch.testing.assert_close(logs["loss_global"], single)
        torch.testing.assert_close(logs["loss_dense"], dense)
        torch.testing.assert_close(loss, 0.5 * single + 0.5 * dense)
        method.after_step(make_progress(method, 0, 10, 0, 10), logs)
        torch.testing.assert_close(method.queue.contents(), k)  # unit keys, as the reference enqueues
        torch.testing.assert_close(method.dense_queue.contents(), k2)
        single, dense, _, _ = reference_densecl(method, x_q, x_k, k.T, k2.T)
        loss, logs = method.training_step([x_q, x_k], make_progress(method, 1, 10, 0, 10))
        torch.testing.assert_close(loss, 0.5 * single + 0.5 * dense)


def test_densecl_dense_weight_warms_up_from_zero():
    """λ = 0 before ``warmup_steps`` (the reference's DenseCLWarmupHook): the loss is the global one and the dense
    head gets no gradient; from then on (1 − λ)·global + λ·dense."""
    method = tiny("densecl", warmup_steps=3, dense_weight=0.3)
    views, _ = views_of(method)
    torch.manual_seed(0)
    loss, logs = method.training_step(views, make_progress(method, 2, 10, 0, 10))
    assert torch.equal(loss, logs["loss_global"] * 1.0)
    loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in method.dense_projector.parameters())
    loss, logs = method.training_step(views, make_progress(method, 3, 10, 0, 10))
    torch.testing.assert_close(loss, 0.7 * logs["loss_global"] + 0.3 * logs["loss_dense"])


def test_densecl_on_a_vit_backbone():
    """The patch tokens of selfsup's ViT as the map (4×4 at 16 px, patch 4); gradients reach the dense head."""
    method = tiny("densecl", backbone="vit_tiny")
    views, _ = views_of(method)
    loss, logs = method.training_step(views, make_progress(method, 0, 10, 0, 10))
    loss.backward()
    assert torch.isfinite(loss) and logs["new_dense_keys"].shape == (8, 16)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.dense_projector.parameters())


# --- VICRegL ----------------------------------------------------------------------------------------

def cell_centres(box, side):
    """The image points of a side×side map's cells, row-major, by loops (the reference's _location_to_NxN_grid
    in image units, mirrored where the width is negative)."""
    out = torch.empty(box.shape[0], side * side, 2)
    for b, (cx, cy, w, h) in enumerate(box.tolist()):
        for i in range(side):
            for j in range(side):
                out[b, i * side + j] = torch.tensor([cx + ((j + 0.5) / side - 0.5) * w, cy + ((i + 0.5) / side - 0.5) * h])
    return out


def reference_vicregl(method, views, boxes):
    """main_vicregl.py ``forward`` without the classifier: per view one pass, the expander on the pooled features,
    the maps projector on every location (B·H·W rows), α·global + (1 − α)·local."""
    embeddings, maps, locations = [], [], []
    for x, box in zip(views, boxes):
        fmap, pooled = small_resnet_map(method.backbone, x)
        embeddings.append(method.expander(pooled))
        b, c, h, w = fmap.shape
        maps.append(method.maps_projector(fmap.permute(0, 2, 3, 1).reshape(b * h * w, c)).view(b, h * w, -1))
        locations.append(cell_centres(box, h))
    local = vicregl_local_loss(maps, locations, method.num_matches)[0]
    return method.alpha * vicregl_global_loss(embeddings)[0] + (1 - method.alpha) * local


@pytest.mark.parametrize("local_crops", [0, 2])
def test_vicregl_step_is_the_reference_forward(local_crops):
    """Two global views, and multi-crop with two 8-px local crops (2×2 maps, 4 locations each)."""
    method = tiny("vicregl", num_matches=(6, 3))
    recipe = resolve_sizes(method.spec.views, SIZE)
    if local_crops:
        recipe = dataclasses.replace(recipe, local_crops=local_crops, local=dataclasses.replace(recipe.local, size=8))
    views, boxes = views_of(method, recipe=recipe)
    assert len(views) == 2 + local_crops
    torch.manual_seed(0)
    loss, logs = method.training_step(views, make_progress(method, 0, 10, 0, 10), boxes=boxes)
    torch.testing.assert_close(loss, reference_vicregl(method, views, boxes))
    assert {"global_variance", "local_covariance", "z", "z_pair"} <= logs.keys()
    assert method.check_run(1000, 8, recipe) == []


def test_vicregl_alpha_by_backbone_kind():
    assert tiny("vicregl").alpha == 0.75
    assert tiny("vicregl", backbone="vit_tiny").alpha == 0.9
    assert tiny("vicregl", alpha=0.5).alpha == 0.5
    only_global, only_local = tiny("vicregl", alpha=1.0), tiny("vicregl", alpha=0.0)
    assert only_global.maps_projector is None and only_local.expander is None  # nothing left without a gradient
    for method in (only_global, only_local):
        views, boxes = views_of(method)
        loss, _ = method.training_step(views, make_progress(method, 0, 10, 0, 10), boxes=boxes)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None for p in method.parameters())


def test_vicregl_on_a_vit_backbone():
    method = tiny("vicregl", backbone="vit_tiny")
    views, boxes = views_of(method)
    loss, _ = method.training_step(views, make_progress(method, 0, 10, 0, 10), boxes=boxes)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.maps_projector.parameters())


def test_vicregl_needs_boxes_and_enough_locations():
    method = tiny("vicregl", num_matches=(17, 4))
    views, boxes = views_of(method)
    with pytest.raises(ValueError, match="boxes="):
        method.training_step(views, make_progress(method, 0, 10, 0, 10))
    with pytest.raises(ValueError, match="num_matches=17"):  # 4×4 maps: 16 locations
        method.training_step(views, make_progress(method, 0, 10, 0, 10), boxes=boxes)
    recipe = resolve_sizes(method.spec.views, SIZE)
    problems = method.check_run(1000, 8, recipe)
    assert len(problems) == 1 and "keeps 17 location matches" in problems[0] and "16 locations" in problems[0]
    local = dataclasses.replace(recipe, local_crops=2, local=dataclasses.replace(recipe.local, size=8))
    problems = tiny("vicregl", num_matches=(6, 5)).check_run(1000, 8, local)
    assert len(problems) == 1 and "second view" in problems[0] and "only 4 locations" in problems[0]


@pytest.mark.parametrize("name,params,match", [
    ("densecl", {"dense_weight": 1.5}, "dense_weight"),
    ("densecl", {"warmup_steps": -1}, "warmup_steps"),
    ("densecl", {"temperature": 0.0}, "temperature"),
    ("densecl", {"queue_size": 0}, "queue_size"),
    ("vicregl", {"alpha": 1.5}, "alpha"),
    ("vicregl", {"num_matches": (0, 4)}, "num_matches"),
    ("vicregl", {"var_weight": -1.0}, "var_weight"),
])
def test_constructors_refuse_impossible_settings(name, params, match):
    with pytest.raises(ValueError, match=match):
        tiny(name, **params)
    cfg = RunConfig(method=ModelConfig(name, params), backbone=ModelConfig("small_resnet", {"widths": [8, 16]}))
    with pytest.raises(ConfigError, match=match):  # what `selfsup pretrain` reports before training
        build_method(cfg, 1, SIZE)


@pytest.mark.parametrize("name,params,n_train,match", [
    ("densecl", {"queue_size": 4096}, 1000, r"the queue \(4096 keys\) is larger"),
    ("densecl", {"queue_size": 64, "bn_splits": 8}, 1000, "bn_splits"),
    ("vicregl", {"num_matches": [20, 4]}, 1000, "num_matches"),  # the reference's 20 of a 7×7 map; 16 px gives 4×4
])
def test_check_run_refuses_settings_the_data_or_views_cannot_meet(name, params, n_train, match):
    cfg = RunConfig(method=ModelConfig(name, params), backbone=ModelConfig("small_resnet", {"widths": [8, 16, 32]}))
    cfg.train.batch_size = 8
    model = build_method(cfg, 1, SIZE)
    recipe = resolve_sizes(model.spec.views, SIZE)
    with pytest.raises(ConfigError, match=match):
        check_run(model, cfg, n_train, recipe)


def test_vicregl_takes_the_reference_num_matches_at_28_px():
    """28 px through small_resnet [8, 16, 32] gives 7×7 maps, the reference's ResNet-50 grid at 224: (20, 4) fits."""
    bb = build_backbone("small_resnet", 1, 28, widths=[8, 16, 32])
    method = METHODS["vicregl"].cls(bb, proj_hidden=16, proj_dim=16, maps_hidden=8, maps_dim=8)
    assert method.num_matches == (20, 4) and method.check_run(1000, 8, resolve_sizes(method.spec.views, 28)) == []


# --- two processes over a queue push --------------------------------------------------------------------

WORLD = 2


def _densecl_two_steps(gather: bool, views):
    torch.manual_seed(0)
    method = tiny("densecl", queue_size=64, gather=gather).eval()
    out = []
    for step in range(2):  # the first contrasts in-batch, the second against the gathered pushes
        progress = make_progress(method, step, 10, 0, 10)
        loss, logs = method.training_step(views, progress)
        method.zero_grad()
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}))
        finish_step(method, progress, logs)
    return out, method.dense_queue.contents().clone()


def _densecl_worker(rank: int, port: int, out_dir: str, b: int) -> None:
    with gloo_group(rank, WORLD, port):
        views, _ = views_of(tiny("densecl"), WORLD * b)
        steps, dense_queue = _densecl_two_steps(True, [v[rank * b : (rank + 1) * b] for v in views])
        for loss, grads in steps:
            dist.all_reduce(loss)
            loss /= WORLD
            for g in grads.values():
                dist.all_reduce(g)
                g /= WORLD
        if rank == 0:
            torch.save({"steps": steps, "dense_queue": dense_queue}, os.path.join(out_dir, "dist.pt"))


def test_densecl_two_processes_match_one_across_a_queue_push():
    import socket

    b = 4
    views, _ = views_of(tiny("densecl"), WORLD * b)
    single, single_queue = _densecl_two_steps(False, views)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_densecl_worker, args=(port, out, b), nprocs=WORLD, join=True)
        got = torch.load(os.path.join(out, "dist.pt"), weights_only=True)
    torch.testing.assert_close(got["dense_queue"], single_queue)  # every process pushed the global batch
    for (loss, grads), (ref_loss, ref_grads) in zip(got["steps"], single):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        scale = max(float(g.abs().max()) for g in ref_grads.values())
        for key, g in ref_grads.items():
            torch.testing.assert_close(grads[key], g, rtol=1e-4, atol=1e-6 + 1e-5 * scale, msg=key)
