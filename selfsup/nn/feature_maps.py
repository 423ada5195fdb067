"""Feature maps of every backbone: what dense protocols (segmentation, detection) and dense methods (DenseCL,
VICRegL) read instead of the pooled vector, with the pooled features from the same forward pass.

:func:`forward_maps` ``(backbone, x, levels)`` → ``(pooled (B, D), [maps (B, C_i, H_i, W_i)])``, the ``levels``
deepest maps, shallow to deep; ``pooled`` is exactly ``backbone(x)``. By kind of backbone:

- selfsup's ``small_resnet``: the stem's and each stage's output (``SmallResNet.forward_maps``);
- selfsup's ViTs: the patch tokens of the last ``levels`` blocks, through the final norm, reshaped to the patch
  grid (``ViT.forward_maps``; DINOv2's linear protocol reads the last block, or the last four);
- timm models: timm's own ``forward_intermediates`` (CNN stages; ViT, Swin and EVA blocks as NCHW maps, normed
  where the model offers it), the pooled features from ``forward_head(…, pre_logits=True)``;
- torchvision CNNs: the output of the last module to finish at each resolution before the global pooling,
  recorded by forward hooks during the ordinary forward (ResNet: ``layer1``–``layer4``; ConvNeXt, EfficientNet,
  MobileNet, RegNet: their stages). The modules are found once per backbone by a dry run (:func:`map_levels`).

A backbone with no spatial map (torchvision's ViTs and Swin, whose blocks give token sequences or channels-last
tensors) raises :class:`NoFeatureMap`, which names the backbones that have one.
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from selfsup.nn.adapters import LibraryBackbone
from selfsup.nn.vit import is_vit

GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
"""Where a torchvision classifier's trunk ends (a top-level pooling module: ``avgpool``): maps recorded after it are
the head's. Pools inside blocks (squeeze-and-excitation) are not the end."""
TOKEN_ARCHS = ("vit_", "swin_", "swin3d_", "maxvit_")
"""torchvision transformers: their blocks give token sequences or channels-last tensors, not maps."""


class NoFeatureMap(ValueError):
    """The backbone gives no spatial feature map; the message says which backbones do."""


@dataclass(frozen=True)
class MapLevel:
    channels: int
    stride: int
    """Input pixels per map cell (input side / map side)."""


def _no_map(name: str, why: str) -> NoFeatureMap:
    return NoFeatureMap(f"backbone {name} gives no spatial feature map ({why}); segmentation, detection and the "
                        "dense methods need one: use a CNN (small_resnet, resnet18, torchvision:/timm: CNNs), "
                        "selfsup's ViT (vit_tiny, vit_small) or a timm ViT (timm:vit_small_patch16_224)")


def _name(backbone: nn.Module) -> str:
    return getattr(backbone, "name", None) or type(backbone).__name__


# --------------------------------------------------------------------- torchvision (and timm without intermediates)

_HOOK_NODES: "weakref.WeakKeyDictionary[nn.Module, list[tuple[str, int]]]" = weakref.WeakKeyDictionary()


def _record_outputs(net: nn.Module, names: set[str] | None) -> tuple[list[tuple[str, object]], list]:
    """Forward hooks appending (module name, output) for ``names`` (None: every module); returns (records, handles)."""
    records: list[tuple[str, object]] = []
    handles = []
    for name, module in net.named_modules():
        if name and (names is None or name in names):
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, name=name: records.append((name, out))))
    return records, handles


def _hook_nodes(backbone: LibraryBackbone) -> list[tuple[str, int]]:
    """The (module, call) whose output is each level, deepest last, found by one dry run at the size the backbone
    was built for and cached per backbone: for each map side, among the shallowest modules (fewest dots in the
    name) giving a square (1, C, side, side) output before the top-level global pooling, the last to finish — a
    stage, not a layer inside the next stage's first block (which sees the same resolution before it
    downsamples). ``call`` counts the module's earlier calls in one forward: torchvision's blocks reuse one
    ReLU at two resolutions."""
    if backbone in _HOOK_NODES:
        return _HOOK_NODES[backbone]
    net = backbone.net
    if backbone.library == "torchvision" and backbone.arch.startswith(TOKEN_ARCHS):
        raise _no_map(backbone.name, "its blocks give token sequences; timm's version of it gives maps")
    pools = {name for name, m in net.named_children() if isinstance(m, GLOBAL_POOLS)}
    records, handles = _record_outputs(net, None)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            device = next(net.parameters()).device
            net(torch.zeros(1, backbone.in_chans, backbone.image_size, backbone.image_size, device=device))
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    calls: dict[str, int] = {}
    best: dict[int, tuple[int, int, str, int]] = {}  # map side → (depth, position, module, call)
    for position, (name, out) in enumerate(records):
        if name in pools:
            break
        call = calls[name] = calls.get(name, -1) + 1
        if isinstance(out, Tensor) and out.ndim == 4 and out.shape[0] == 1 and out.shape[2] == out.shape[3]:
            depth, side = name.count("."), out.shape[2]
            if side not in best or depth < best[side][0] or (depth == best[side][0] and position > best[side][1]):
                best[side] = (depth, position, name, call)
    nodes, previous = [], -1
    for side in sorted(best, reverse=True):  # a trunk's maps shrink as it runs: a smaller map that finished
        _, position, name, call = best[side]  # before a larger one (an SE block's 1×1) is not a level
        if position > previous:
            nodes.append((name, call))
            previous = position
    if not nodes:
        raise _no_map(backbone.name, "its layers give no (B, C, H, W) output before the pooling")
    _HOOK_NODES[backbone] = nodes
    return nodes


def _hooked_maps(backbone: LibraryBackbone, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    nodes = _hook_nodes(backbone)
    records, handles = _record_outputs(backbone.net, {name for name, _ in nodes})
    try:
        pooled = backbone.net(x)
    finally:
        for h in handles:
            h.remove()
    outputs: dict[str, list[Tensor]] = {}
    for name, out in records:
        outputs.setdefault(name, []).append(out)
    return pooled, [outputs[name][call] for name, call in nodes]


# --------------------------------------------------------------------------------------------------- timm


def _has_intermediates(net: nn.Module) -> bool:
    return callable(getattr(net, "forward_intermediates", None)) and callable(getattr(net, "forward_head", None))


def _timm_maps(net: nn.Module, x: Tensor, levels: int) -> tuple[Tensor, list[Tensor]]:
    params = inspect.signature(net.forward_intermediates).parameters
    kwargs = {"norm": True} if "norm" in params else {}
    final, maps = net.forward_intermediates(x, indices=levels, intermediates_only=False, **kwargs)
    return net.forward_head(final, pre_logits=True), list(maps)


def _timm_depth(net: nn.Module) -> int:
    """How many maps timm's ``forward_intermediates`` can give (its blocks or stages)."""
    for attr in ("blocks", "stages", "layers"):
        seq = getattr(net, attr, None)
        if isinstance(seq, (nn.Sequential, nn.ModuleList)):
            return len(seq)
    return len(getattr(net, "feature_info", [])) or 4


# --------------------------------------------------------------------------------------------------- entry points


def forward_maps(backbone: nn.Module, x: Tensor, levels: int = 1) -> tuple[Tensor, list[Tensor]]:
    """``(backbone(x), [the levels deepest maps, shallow to deep])`` from one forward pass (module docstring)."""
    if levels < 1:
        raise ValueError(f"levels must be ≥ 1, got {levels}")
    if is_vit(backbone):
        return backbone.forward_maps(x, min(levels, len(backbone.blocks)))
    maps_of = getattr(backbone, "forward_maps", None)
    if callable(maps_of):  # SmallResNet
        pooled, maps = maps_of(x)
        return pooled, maps[-levels:]
    if isinstance(backbone, LibraryBackbone):
        if backbone.library == "timm" and _has_intermediates(backbone.net):
            return _timm_maps(backbone.net, x, min(levels, _timm_depth(backbone.net)))
        pooled, maps = _hooked_maps(backbone, x)
        return pooled, maps[-levels:]
    raise _no_map(_name(backbone), "selfsup does not know where its maps are")


def map_levels(backbone: nn.Module, in_chans: int, image_size: int, levels: int = 1) -> list[MapLevel]:
    """Channels and stride of each map :func:`forward_maps` gives at ``levels``, from one dry run (eval mode, no
    grad: no BatchNorm statistics change). Raises :class:`NoFeatureMap` for a backbone without one."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            device = next(backbone.parameters()).device
            _, maps = forward_maps(backbone, torch.zeros(1, in_chans, image_size, image_size, device=device), levels)
    except NoFeatureMap:
        raise
    except (RuntimeError, ValueError, AssertionError, IndexError, TypeError) as exc:
        raise _no_map(_name(backbone), f"its intermediate outputs could not be read: {str(exc).splitlines()[0]}") from None
    finally:
        backbone.train(was_training)
    if not maps or any(m.ndim != 4 or m.shape[-1] != m.shape[-2] for m in maps):
        raise _no_map(_name(backbone), "its intermediate outputs are not square (B, C, H, W) maps")
    return [MapLevel(int(m.shape[1]), max(1, round(image_size / m.shape[-1]))) for m in maps]


def max_levels(backbone: nn.Module) -> int:
    """How many levels :func:`forward_maps` can give at most (ViT: its depth; CNNs: their stages)."""
    if is_vit(backbone):
        return len(backbone.blocks)
    if hasattr(backbone, "forward_maps"):
        return len(getattr(backbone, "stages", [])) // max(1, getattr(backbone, "blocks", 1)) + 1
    if isinstance(backbone, LibraryBackbone):
        if backbone.library == "timm" and _has_intermediates(backbone.net):
            return _timm_depth(backbone.net)
        return len(_hook_nodes(backbone))
    raise _no_map(_name(backbone), "selfsup does not know where its maps are")
