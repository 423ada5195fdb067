"""Backbones: a small residual CNN for CPU runs, torchvision ResNets with a small-image stem, and any
torchvision or timm model by prefixed name (``torchvision:resnet50``, ``timm:vit_small_patch16_224``;
see :mod:`selfsup.nn.adapters`).

Contract (as timm's): every backbone is an ``nn.Module`` whose ``forward(x)`` maps
(B, C, H, W) → (B, num_features) pooled features, with ``num_features`` as an attribute.
Backbones are registered by name or resolved by prefix; ``build_backbone`` is the one way to make one,
``check_backbone_name`` the one way to ask whether a name is valid. Video backbones (clips (B, C, T, H, W),
``input_kind = "clips"``) are registered and built the same way; they live in :mod:`selfsup.nn.video`.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.nn.adapters import LibraryBackbone, build_library_backbone, close_names, library_name_problem, split_name
from selfsup.nn.small_map_conv import SmallMapConv2d

BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str):
    def wrap(fn):
        BACKBONES[name] = fn
        return fn

    return wrap


class BasicBlock(nn.Module):
    """Pre-activation-free basic residual block (He et al. 2016, arXiv:1512.03385); its convs run as GEMMs
    where their output is 2×2 or smaller (:mod:`selfsup.nn.small_map_conv`), exactly as ``nn.Conv2d``."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = SmallMapConv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = SmallMapConv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(SmallMapConv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class _FlattenKeepingLayout(torch.autograd.Function):
    """``x.flatten(1)`` (channel-major) whose gradient comes back in ``x``'s memory format."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.shape, ctx.channels_last = x.shape, _channels_last(x)
        return x.flatten(1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.reshape(ctx.shape)
        return grad.contiguous(memory_format=torch.channels_last) if ctx.channels_last else grad


class SmallResNet(nn.Module):
    """A residual CNN sized for CPU pretraining on 28×28–64×64 images.

    A 3×3 stem conv (stride ``stem_stride``: 1 keeps full resolution, 2 halves it and makes the
    network about 2.5× cheaper on 28×28 inputs), then one stage per further width, each halving the
    resolution, global average pooling. The default (32, 64, 128, 256) has 1.2 M parameters.

    ``pooled_stages`` = n > 1 concatenates the global average pools of the last n stages (the stem counts
    as one), so ``num_features`` is the sum of their widths: the embedding keeps mid-level features
    beside the last stage's (as pretext-task papers probe the best layer, not only the last). On the
    Fashion-MNIST rotation recipe, 2 stages tied 1 on the linear probe and lost 0.6 kNN (benchmarks/recipe_screen/).

    ``pool_grid`` = g > 1 average-pools each pooled map to a g×g grid instead of one value per channel and
    flattens it (channel-major), so ``num_features`` is g² times larger: the embedding keeps where on the
    image a feature fired, which matters for centred, aligned images (at 28 px with ``stem_stride`` 2 the
    last map is 2×2, so g = 2 keeps it whole).
    """

    def __init__(self, in_chans: int = 1, widths: tuple[int, ...] = (32, 64, 128, 256), blocks: int = 1,
                 stem_stride: int = 1, pooled_stages: int = 1, pool_grid: int = 1):
        super().__init__()
        if stem_stride not in (1, 2):
            raise ValueError(f"small_resnet: stem_stride must be 1 or 2, got {stem_stride!r}")
        if len(widths) < 1 or any(int(w) < 1 for w in widths):
            raise ValueError(f"small_resnet: widths must be a non-empty list of positive integers, got {widths!r}")
        if not 1 <= pooled_stages <= len(widths):
            raise ValueError(f"small_resnet: pooled_stages must be 1–{len(widths)} (one per width), got {pooled_stages!r}")
        if isinstance(pool_grid, bool) or not isinstance(pool_grid, int) or not 1 <= pool_grid <= 8:
            raise ValueError(f"small_resnet: pool_grid must be an integer 1–8 (cells per side), got {pool_grid!r}")
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, stem_stride, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths[1:]):
            for j in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if j == 0 else 1))
                cin = w
        self.stages = nn.Sequential(*layers)
        self.blocks, self.pooled_stages, self.pool_grid = blocks, pooled_stages, pool_grid
        self.num_features = sum(int(w) for w in widths[len(widths) - pooled_stages:]) * pool_grid ** 2

    def _pool(self, x: Tensor) -> Tensor:
        # Both forms send the gradient back in x's memory format: a channels-last map given a contiguous
        # gradient sends ReLU's and BatchNorm's backward down slow mixed-layout kernels (10-20x, measured on CPU)
        if self.pool_grid == 1:
            if _channels_last(x):  # (N, H·W, C) averaged over positions: a channels-last gradient
                return x.permute(0, 2, 3, 1).flatten(1, 2).mean(1)
            return x.mean(dim=(2, 3))
        if x.shape[-2:] != (self.pool_grid, self.pool_grid):  # a map that is already the grid is kept whole
            x = F.adaptive_avg_pool2d(x, self.pool_grid)
        return _FlattenKeepingLayout.apply(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        if self.pooled_stages == 1:
            return self._pool(self.stages(x))
        pools = [self._pool(x)]
        for i, block in enumerate(self.stages):
            x = block(x)
            if (i + 1) % self.blocks == 0:  # the end of a stage
                pools.append(self._pool(x))
        return torch.cat(pools[len(pools) - self.pooled_stages:], dim=1)

    def forward_maps(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(pooled features as :meth:`forward` gives them, [the stem's map, then each stage's], shallow to deep):
        the maps dense protocols and dense methods read (:mod:`selfsup.nn.feature_maps`), from one pass."""
        x = self.stem(x)
        maps = [x]
        for i, block in enumerate(self.stages):
            x = block(x)
            if (i + 1) % self.blocks == 0:
                maps.append(x)
        pooled = [self._pool(m) for m in maps[len(maps) - self.pooled_stages:]]
        return (pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)), maps


@register_backbone("small_resnet")
def small_resnet(in_chans: int, image_size: int, widths: tuple[int, ...] = (32, 64, 128, 256), blocks: int = 1,
                 stem_stride: int = 1, pooled_stages: int = 1, pool_grid: int = 1):
    return SmallResNet(in_chans, tuple(widths), blocks, stem_stride, pooled_stages, pool_grid)


@register_backbone("resnet18")
def resnet18(in_chans: int, image_size: int, small_images: bool | None = None) -> LibraryBackbone:
    """torchvision's ResNet-18 (He et al. 2016, arXiv:1512.03385) without its classifier; ``small_images``
    (default: at ≤ 64 px) swaps the 7×7/2 stem and max-pool for a 3×3/1 conv (SimCLR's CIFAR variant,
    arXiv:2002.05709 §B.9). The same network as ``torchvision:resnet18``."""
    return build_library_backbone("torchvision:resnet18", in_chans, image_size, small_images)


@register_backbone("resnet50")
def resnet50(in_chans: int, image_size: int, small_images: bool | None = None) -> LibraryBackbone:
    """torchvision's ResNet-50, as :func:`resnet18`."""
    return build_library_backbone("torchvision:resnet50", in_chans, image_size, small_images)


class BackboneError(ValueError):
    pass


def check_backbone_name(name: str) -> None:
    """Raise :class:`BackboneError` unless ``build_backbone`` knows ``name``: a registered backbone or
    ``torchvision:NAME``/``timm:NAME`` for a model that library constructs. The error names close names."""
    if not isinstance(name, str) or not name:
        raise BackboneError(f"backbone name must be a non-empty string, got {name!r}")
    if split_name(name)[0] is not None:
        problem = None if _video.is_torchvision_video(name) else library_name_problem(name)
        if problem:
            near_video = _video.close_video_names(name) if name.startswith("torchvision:") else []
            raise BackboneError(problem + (f"; video models: {', '.join(near_video)}" if near_video else ""))
        return
    if name in BACKBONES:
        return
    near = difflib.get_close_matches(name, list(BACKBONES), n=3, cutoff=0.6) + close_names(name) + _video.close_video_names(name)
    hint = f" (did you mean {', '.join(near)}?)" if near else ""
    raise BackboneError(f"unknown backbone {name!r}{hint}; registered: {', '.join(sorted(BACKBONES))}; or any "
                        "torchvision or timm model as torchvision:NAME / timm:NAME")


def build_backbone(name: str, in_chans: int, image_size: int, /, **params) -> nn.Module:
    """A registered backbone, or a torchvision/timm model by prefixed name with ``params`` passed to its
    constructor; unknown names or parameters raise :class:`BackboneError` naming the options. (The input
    channels and size are positional only, so ``params`` naming them gets that error, not a TypeError.)"""
    check_backbone_name(name)
    if split_name(name)[0] is not None:
        build = _video.build_torchvision_video if _video.is_torchvision_video(name) else build_library_backbone
        try:
            return build(name, in_chans, image_size, **params)
        except ValueError as exc:
            raise BackboneError(str(exc)) from None
    fn = BACKBONES[name]
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("in_chans", "image_size")]
    unknown = [k for k in params if k not in allowed]
    if unknown:
        # e.g. registers=4 on a CNN: say which backbones have the option
        elsewhere = sorted(other for other, f in BACKBONES.items()
                           if other != name and all(k in inspect.signature(f).parameters for k in unknown))
        hint = f" ({', '.join(unknown)}: an option of {', '.join(elsewhere)})" if elsewhere else ""
        raise BackboneError(f"backbone {name!r} has no parameter(s) {', '.join(unknown)}; it takes: "
                            f"{', '.join(allowed) or 'none'}{hint}")
    try:
        model = fn(in_chans, image_size, **params)
    except ValueError as exc:  # a backbone's own settings check
        raise BackboneError(str(exc)) from None
    if not isinstance(getattr(model, "num_features", None), int):
        raise BackboneError(f"backbone {name!r} does not report num_features")
    for attr, value in (("in_chans", in_chans), ("image_size", image_size)):
        if not hasattr(model, attr):  # the input it was built for, as LibraryBackbone records it (DCCAE's decoders)
            setattr(model, attr, value)
    return model


# video backbones (small_r3d, small_r2plus1d, per_frame; torchvision:<video model>): imported last, as the module
# registers with register_backbone and builds frames through build_backbone
from selfsup.nn import video as _video  # noqa: E402
