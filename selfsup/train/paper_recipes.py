"""Defaults that fit the backbone a user named, when no tuned recipe exists for the data (an image folder).

``selfsup pretrain --method dino --data FOLDER --backbone timm:vit_small_patch16_224`` used to pick the folder's
automatic 64-px size, 27-px local crops its patch 16 does not divide, and the library's SGD at lr 0.3 — the CNN
setting — for a ViT whose paper trains it with AdamW and a warm-up. With no tuned recipe (``configs/<method>_<data>
.yaml``), :func:`backbone_defaults` now derives from the method and the backbone family:

- **image size** (folders and dense sources only: named datasets have their own): a timm model's own input size
  (its pretrained config, e.g. 224 for ``vit_small_patch16_224``, 288 for ``efficientnet_b3``), 224 for
  torchvision's transformers, which are built for one size; other backbones keep the folder default (64 px);
- **patch**: selfsup's ViTs get the smallest patch of 4/8/16 that cuts the image into at most 256 patches (as
  ``backbone: auto`` does for the masked methods), and multi-crop local views a side that is a multiple of the patch
  (DINO's 96/224 of the global side, rounded to the patch);
- **optimiser**: the method's paper recipe for that family (:data:`VIT_RECIPES`, :data:`CNN_RECIPES`): optimiser,
  base learning rate and its batch-size rule, weight decay (and its end), betas, gradient clipping; the warm-up as
  the same *fraction* of the run as in the paper (e.g. DINO's 10 of 100 epochs → a tenth of the run, at least one
  epoch when the run has more than one).

Everything the user sets (flags, ``--set``) wins over these; each decision is one line at the start of the run.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VIT_PATCHES = (4, 8, 16)
TORCHVISION_TOKEN_ARCHS = ("vit_", "swin_", "maxvit_")
TIMM_VIT_PREFIXES = ("vit", "deit", "eva", "beit", "cait", "xcit", "flexivit", "samvit")


@dataclass(frozen=True)
class PaperRecipe:
    """One method's optimisation in its paper, for one backbone family."""

    source: str
    """Where the numbers come from (paper, arXiv id, section or the reference code)."""
    optim: dict[str, Any]
    warmup_fraction: float = 0.0
    """The paper's warm-up epochs over its total epochs."""
    train: dict[str, Any] = field(default_factory=dict)


VIT_RECIPES: dict[str, PaperRecipe] = {
    "dino": PaperRecipe("DINO, arXiv:2104.14294 §4 / main_dino.py: AdamW, lr 5e-4 × B/256, wd 0.04 → 0.4 cosine, "
                        "10 of 100 warm-up epochs, gradients clipped at 3.0",
                        {"name": "adamw", "lr": 5e-4, "lr_scaling": "linear", "weight_decay": 0.04,
                         "weight_decay_end": 0.4, "clip_grad": 3.0, "min_lr_ratio": 2e-3}, 10 / 100),
    "ibot": PaperRecipe("iBOT, arXiv:2111.07832 §A / main_ibot.py: DINO's (AdamW, lr 5e-4 × B/256, wd 0.04 → 0.4, "
                        "10 of 100 warm-up epochs, clip 3.0)",
                        {"name": "adamw", "lr": 5e-4, "lr_scaling": "linear", "weight_decay": 0.04,
                         "weight_decay_end": 0.4, "clip_grad": 3.0, "min_lr_ratio": 2e-3}, 10 / 100),
    "dinov2": PaperRecipe("DINOv2, arXiv:2304.07193 §B / ssl_default_config.yaml: AdamW, lr 4e-3 × √(B/1024), "
                          "wd 0.04 → 0.2, 10 of 100 warm-up epochs, clip 3.0",
                          {"name": "adamw", "lr": 4e-3 / 32, "lr_scaling": "sqrt", "weight_decay": 0.04,
                           "weight_decay_end": 0.2, "clip_grad": 3.0}, 10 / 100),
    "mae": PaperRecipe("MAE, arXiv:2111.06377 §A.1: AdamW, betas (0.9, 0.95), lr 1.5e-4 × B/256, wd 0.05, "
                       "40 of 800 warm-up epochs",
                       {"name": "adamw", "lr": 1.5e-4, "lr_scaling": "linear", "weight_decay": 0.05,
                        "betas": [0.9, 0.95]}, 40 / 800),
    "simmim": PaperRecipe("SimMIM, arXiv:2111.09886 §4.1: AdamW, betas (0.9, 0.999), lr 8e-4 × B/2048, wd 0.05, "
                          "10 of 100 warm-up epochs",
                          {"name": "adamw", "lr": 8e-4 / 8, "lr_scaling": "linear", "weight_decay": 0.05}, 10 / 100),
    "msn": PaperRecipe("MSN, arXiv:2204.07141 §C: AdamW, lr 1e-3 (batch 1024: 2.5e-4 × B/256), wd 0.04 → 0.4, "
                       "15 of 300 warm-up epochs",
                       {"name": "adamw", "lr": 2.5e-4, "lr_scaling": "linear", "weight_decay": 0.04,
                        "weight_decay_end": 0.4}, 15 / 300),
    "ijepa": PaperRecipe("I-JEPA, arXiv:2301.08243 §C: AdamW, lr 1e-3 at batch 2048 (1.25e-4 × B/256), "
                         "wd 0.04 → 0.4, 40 of 300 warm-up epochs",
                         {"name": "adamw", "lr": 1.25e-4, "lr_scaling": "linear", "weight_decay": 0.04,
                          "weight_decay_end": 0.4}, 40 / 300),
    "mocov3": PaperRecipe("MoCo v3, arXiv:2104.02057 §4 (ViT): AdamW, lr 1.5e-4 × B/256, wd 0.1, 40 of 300 "
                          "warm-up epochs",
                          {"name": "adamw", "lr": 1.5e-4, "lr_scaling": "linear", "weight_decay": 0.1}, 40 / 300),
}
"""The ViT recipes of the methods whose papers train ViTs."""

_LARS = lambda lr, wd: {"name": "lars", "lr": lr, "lr_scaling": "linear", "weight_decay": wd}  # noqa: E731
_SGD = lambda lr, wd: {"name": "sgd", "lr": lr, "lr_scaling": "linear", "weight_decay": wd, "momentum": 0.9}  # noqa: E731

CNN_RECIPES: dict[str, PaperRecipe] = {
    "simclr": PaperRecipe("SimCLR, arXiv:2002.05709 §B.6: LARS, lr 0.3 × B/256, wd 1e-6, 10 of 100 warm-up epochs",
                          _LARS(0.3, 1e-6), 10 / 100),
    "byol": PaperRecipe("BYOL, arXiv:2006.07733 §C: LARS, lr 0.2 × B/256, wd 1.5e-6, 10 of 1000 warm-up epochs",
                        _LARS(0.2, 1.5e-6), 10 / 1000),
    "barlowtwins": PaperRecipe("Barlow Twins, arXiv:2103.03230 §4: LARS, lr 0.2 × B/256 (weights), wd 1.5e-6, "
                               "10 of 1000 warm-up epochs", _LARS(0.2, 1.5e-6), 10 / 1000),
    "vicreg": PaperRecipe("VICReg, arXiv:2105.04906 §4.1: LARS, lr 0.2 × B/256, wd 1e-6, 10 of 1000 warm-up epochs",
                          _LARS(0.2, 1e-6), 10 / 1000),
    "vicregl": PaperRecipe("VICRegL's ResNet-50 command (README): LARS, lr 0.3, wd 1e-6", _LARS(0.3, 1e-6), 10 / 100),
    "swav": PaperRecipe("SwAV, arXiv:2006.09882 §A: LARS, lr 4.8 at batch 4096 (0.3 × B/256), wd 1e-6, "
                        "10 of 800 warm-up epochs (lr 0.3)", _LARS(0.3, 1e-6), 10 / 800),
    "nnclr": PaperRecipe("NNCLR, arXiv:2104.14548 §4: LARS, lr 0.3 × B/256 (4.8 at 4096), wd 1e-6, 10 of 1000 "
                         "warm-up epochs", _LARS(0.3, 1e-6), 10 / 1000),
    "mocov2": PaperRecipe("MoCo v2, arXiv:2003.04297: SGD, lr 0.03 × B/256, wd 1e-4, no warm-up", _SGD(0.03, 1e-4)),
    "densecl": PaperRecipe("DenseCL, arXiv:2011.09157 (MoCo v2's): SGD, lr 0.03 × B/256, wd 1e-4", _SGD(0.03, 1e-4)),
    "simsiam": PaperRecipe("SimSiam, arXiv:2011.10566 §4: SGD, lr 0.05 × B/256, wd 1e-4, no warm-up",
                           _SGD(0.05, 1e-4)),
    "dino": PaperRecipe("DINO's ResNet-50 recipe (arXiv:2104.14294, README): SGD, lr 0.03 × B/256, wd 1e-4, "
                        "10 of 100 warm-up epochs", _SGD(0.03, 1e-4), 10 / 100),
    "mocov3": PaperRecipe("MoCo v3, arXiv:2104.02057 (ResNet-50): LARS, lr 0.3 × B/256, wd 1.5e-6, 10 of 100 "
                          "warm-up epochs", _LARS(0.3, 1.5e-6), 10 / 100),
}
"""CNN recipes of the joint-embedding methods (what their papers train ResNets with)."""


def _arch(backbone: str) -> tuple[str | None, str]:
    lib, sep, arch = backbone.partition(":")
    return (lib, arch) if sep else (None, backbone)


def is_vit_name(backbone: str) -> bool:
    """Whether a backbone name is a vision transformer (selfsup's, timm's ViT families, torchvision's)."""
    lib, arch = _arch(backbone)
    if lib is None:
        return arch.startswith("vit")
    if lib == "torchvision":
        return arch.startswith(TORCHVISION_TOKEN_ARCHS)
    return arch.startswith(TIMM_VIT_PREFIXES)


def native_image_size(backbone: str) -> int | None:
    """The input size a library model was designed for: timm's pretrained config, 224 for torchvision's
    transformers (built for one size); None for others (any size runs)."""
    lib, arch = _arch(backbone)
    if lib == "timm":
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(arch)
        return int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else None
    if lib == "torchvision" and arch.startswith(TORCHVISION_TOKEN_ARCHS):
        return 224
    return None


def patch_of(backbone: str, params: dict[str, Any]) -> int | None:
    lib, arch = _arch(backbone)
    if "patch_size" in params:
        return int(params["patch_size"])
    found = re.search(r"patch(\d+)", arch) or (re.search(r"_(\d+)$", arch) if lib == "torchvision" else None)
    return int(found.group(1)) if found and is_vit_name(backbone) else None


def _is_path(data: str) -> bool:
    return "/" in data or Path(data).exists()


def backbone_defaults(overrides: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Config values (dotted keys) derived from the method and the named backbone, for a run with no tuned recipe,
    and one line per decision; keys the user set in ``overrides`` are never touched (module docstring)."""
    from selfsup.config import RunConfig
    from selfsup.methods import get_method

    d = RunConfig()
    method = overrides.get("method.name", d.method.name)
    backbone = overrides.get("backbone.name", d.backbone.name)
    data = str(overrides.get("data.name", d.data.name))
    given = set(overrides)
    out: dict[str, Any] = {}
    lines: list[str] = []
    if backbone == "auto":
        return out, lines
    vit = is_vit_name(backbone)
    size = overrides.get("data.image_size")
    native = native_image_size(backbone)
    if size is None and native and _is_path(data):
        out["data.image_size"] = size = native
        lines.append(f"image size {native} px: {backbone}'s own input size (its pretrained config); "
                     "--set data.image_size=N for another")
    params = {k[len("backbone.params."):]: v for k, v in overrides.items() if k.startswith("backbone.params.")}
    lib, _ = _arch(backbone)
    if lib is None and vit and "patch_size" not in params and isinstance(size, int):
        patch = next((p for p in VIT_PATCHES if size % p == 0 and (size // p) ** 2 <= 256), None)
        if patch:
            out["backbone.params.patch_size"] = patch
            params["patch_size"] = patch
            lines.append(f"patch {patch}: the smallest of 4/8/16 that cuts {size}-px images into at most 256 patches")
    spec = get_method(method).spec
    patch = patch_of(backbone, params)
    if getattr(spec.views, "local_crops", 0) and patch and isinstance(size, int) and "views.local_size" not in given:
        local = max(patch, round(size * spec.views.local_size_ratio / patch) * patch)
        out["views.local_size"] = local
        lines.append(f"local crops {local} px: {spec.views.local_size_ratio:.3f} of the {size}-px views, rounded to "
                     f"a multiple of the patch {patch}")
    recipe = (VIT_RECIPES if vit else CNN_RECIPES).get(method)
    if recipe is None or any(k.startswith("optim.") for k in given):
        if recipe is None and not any(k.startswith("optim.") for k in given):
            lines.append(f"optimiser: the library defaults (no {'ViT' if vit else 'CNN'} recipe of {method} is known "
                         "here; --set optim.* to choose)")
        return out, lines
    out.update({f"optim.{k}": v for k, v in recipe.optim.items()})
    epochs = int(overrides.get("train.epochs", d.train.epochs))
    warmup = 0.0 if not recipe.warmup_fraction else max(min(1.0, epochs / 2), round(recipe.warmup_fraction * epochs, 2))
    out["optim.warmup_epochs"] = warmup
    lines.append(f"optimiser: {method}'s {'ViT' if vit else 'CNN'} recipe for {backbone} — {recipe.source}; "
                 f"warm-up {warmup:g} of {epochs} epochs")
    return out, lines


def step_cost_line(cfg: Any, in_chans: int = 3) -> str:
    """One line on what a training step of ``cfg`` costs on this CPU: the backbone's multiply-adds for every view
    of a batch (forward and backward ≈ 3 forwards; torch's ``FlopCounterMode`` on one image per view size) against
    this machine's fp32 matmul rate (measured here on a 1024² product), and how to lower it."""
    import time

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from selfsup.methods import get_method
    from selfsup.train.build import build_encoder
    from selfsup.views import apply_overrides, resolve_sizes

    size = cfg.data.image_size
    encoder = build_encoder(cfg, in_chans, size).eval()
    recipe = resolve_sizes(apply_overrides(get_method(cfg.method.name).spec.views, cfg.views), size)
    sizes = [g.size for g in recipe.globals_] + [recipe.local.size] * recipe.local_crops
    flops = 0.0
    with torch.no_grad():
        for s in set(sizes):
            counter = FlopCounterMode(display=False)
            with counter:
                encoder(torch.zeros(1, in_chans, s, s))
            flops += counter.get_total_flops() * sizes.count(s)
    step = 3 * flops * cfg.train.batch_size
    a = torch.randn(1024, 1024)
    a @ a
    t0 = time.perf_counter()
    for _ in range(5):
        a @ a
    rate = 5 * 2 * 1024**3 / (time.perf_counter() - t0)
    return (f"cost: ≈ {step / 1e12:.2f} TFLOP per step of batch {cfg.train.batch_size} in the backbone alone "
            f"({len(sizes)} views at {'/'.join(map(str, sorted(set(sizes), reverse=True)))} px): ≥ {step / rate:.1f} s "
            f"a step on this CPU at its {rate / 1e9:.0f} GFLOP/s fp32 matmul rate; --set data.image_size=N (cost ∝ N²) "
            "or a smaller --batch-size lowers it")
