"""The ViT backbones' names (``vit_tiny``, ``vit_small``), the checks masked methods make of a backbone, and
fixed sin-cos position embeddings. The model itself, on timm's ``VisionTransformer``, is
:class:`selfsup.nn.vit_model.ViT` (its docstring describes it); this module imports it only when a ViT is built
or checked, so that importing selfsup — every command's start — does not import timm (about 2 s: timm pulls in
torchvision and torch._dynamo)."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from selfsup.nn.adapters import LibraryBackbone
from selfsup.nn.backbones import register_backbone

if TYPE_CHECKING:
    from selfsup.nn.vit_model import ViT


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(N,) positions → (N, dim): half sines, half cosines over geometric frequencies 1/10000^(2i/dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.to(torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _spread(n: int, extent: int) -> Tensor:
    """Positions of n cells spread over ``extent`` unit cells: (i + ½)·extent/n − ½ (i itself when n = extent)."""
    if n == extent:
        return torch.arange(n, dtype=torch.float64)
    return (torch.arange(n, dtype=torch.float64) + 0.5) * (extent / n) - 0.5


def sincos_pos_embed_2d(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False,
                        extent: int | tuple[int, int] | None = None) -> Tensor:
    """Fixed 2-D sin-cos position embeddings, (h·w, D) in raster order, or (1 + h·w, D) with a zero row
    for the CLS token first. Half the channels encode the row, half the column (MAE's layout).

    ``extent`` (H, W): spread the h×w cells over an H×W grid's range of positions (see the module docstring:
    the positions a local crop gets); by default cell (i, j) is at position (i, j)."""
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    eh, ew = (gh, gw) if extent is None else (extent, extent) if isinstance(extent, int) else extent
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embeddings need embed_dim divisible by 4, got {embed_dim}")
    rows = _spread(gh, eh).repeat_interleave(gw)
    cols = _spread(gw, ew).repeat(gh)
    emb = torch.cat([_sincos_1d(embed_dim // 2, rows), _sincos_1d(embed_dim // 2, cols)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb])
    return emb.float()


VIT_NAMES = ("vit_tiny", "vit_small")


def is_vit(module: object) -> bool:
    """Whether ``module`` is selfsup's :class:`~selfsup.nn.vit_model.ViT`, without importing timm: until
    ``vit_model`` has been imported, no ViT can exist."""
    vit_model = sys.modules.get("selfsup.nn.vit_model")
    return vit_model is not None and isinstance(module, vit_model.ViT)


def require_vit(backbone: nn.Module, method: str) -> ViT:
    """The backbone, if it is a :class:`ViT`; otherwise the ValueError every masked method raises."""
    if isinstance(backbone, LibraryBackbone):  # a timm/torchvision ViT lacks the patch-level API used here
        raise ValueError(f"{method}: masked methods need selfsup's own ViT backbone ({', '.join(VIT_NAMES)}), which "
                         f"exposes the patch grid and encodes a subset of patches; {backbone.name} does not. Use "
                         f"--backbone {VIT_NAMES[-1]} (backbone.params: patch_size, depth, embed_dim, num_heads)")
    if not is_vit(backbone):
        raise ValueError(f"{method}: masked methods need a ViT backbone ({', '.join(VIT_NAMES)}); "
                         f"got {type(backbone).__name__}")
    return backbone


def require_registers(backbone: nn.Module, method: str, count: int | None = None) -> ViT:
    """The backbone, if it is a :class:`ViT` with register tokens (``count`` of them when given); otherwise
    a ValueError saying how to build one."""
    vit = require_vit(backbone, method)
    if vit.num_registers == 0 or (count is not None and vit.num_registers != count):
        want = count if count is not None else 4
        raise ValueError(f"{method}: needs a ViT with {count if count is not None else 'register'} register tokens, "
                         f"this one has {vit.num_registers}; build it with registers={want} "
                         f"(e.g. --set backbone.params.registers={want})")
    return vit


def without_drop_path(module: nn.Module) -> nn.Module:
    """Turn off stochastic depth in place (every timm ``DropPath`` rate set to 0) and return the module.

    For a teacher made by ``frozen_copy`` of a student built with ``drop_path``: iBOT's and DINOv2's teachers
    run without it, whatever train/eval mode the loop puts them in."""
    from timm.layers import DropPath

    for m in module.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
    return module


@register_backbone("vit_tiny")
def vit_tiny(in_chans: int, image_size: int, depth: int = 12, embed_dim: int = 192, num_heads: int = 3,
             patch_size: int = 4, pool: str = "cls", layer_scale: float | None = None, drop_path: float = 0.0,
             registers: int = 0) -> ViT:
    """ViT-Ti (DeiT, arXiv:2012.12877): width 192, 3 heads; ``depth`` lowered for CPU recipes.
    ``layer_scale``, ``drop_path``, ``registers``: DINOv2's options (module docstring); off by default."""
    from selfsup.nn.vit_model import ViT

    return ViT(in_chans, image_size, patch_size, embed_dim, depth, num_heads, pool=pool, layer_scale=layer_scale,
               drop_path=drop_path, registers=registers)


@register_backbone("vit_small")
def vit_small(in_chans: int, image_size: int, depth: int = 12, embed_dim: int = 384, num_heads: int = 6,
              patch_size: int = 4, pool: str = "cls", layer_scale: float | None = None, drop_path: float = 0.0,
              registers: int = 0) -> ViT:
    """ViT-S (DeiT, arXiv:2012.12877): width 384, 6 heads. ``layer_scale``, ``drop_path``, ``registers`` as
    :func:`vit_tiny`."""
    from selfsup.nn.vit_model import ViT

    return ViT(in_chans, image_size, patch_size, embed_dim, depth, num_heads, pool=pool, layer_scale=layer_scale,
               drop_path=drop_path, registers=registers)
