"""Video backbones: torchvision's video classifiers by name, two small 3D residual CNNs for CPU runs, and a
per-frame encoder that runs any image backbone on every frame.

Contract (the image contract with one more axis): ``forward(x)`` maps clips x of shape (B, C, T, H, W)
(torchvision's video layout: C channels, T frames) to pooled features (B, num_features); every video backbone
has integer ``num_features``, ``in_chans``, ``image_size`` (H = W it was built and dry-run for) and
``min_frames`` (the fewest frames it takes), and ``input_kind = "clips"``. Image backbones have no
``input_kind``: code asks ``getattr(backbone, "input_kind", "images")``.

- ``torchvision:NAME`` for NAME in ``torchvision.models.list_models(module=torchvision.models.video)``
  (R3D-18, MC3-18, R(2+1)D-18, S3D, Swin3D, MViT), built without weights, head removed
  (:func:`build_torchvision_video`).
- ``small_r3d`` / ``small_r2plus1d``: :class:`SmallR3D`, 3×3×3 or (2+1)D residual blocks.
- ``per_frame``: :class:`PerFrame`, an image backbone applied to each frame, mean-pooled over time.

:mod:`selfsup.nn.backbones` imports this module at its end (so the registered names exist whenever
``build_backbone`` does) and routes video ``torchvision:`` names here.
"""
from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from selfsup.nn.adapters import (LibraryBackbone, _first_line, _forward_error, _remove_torchvision_head, _set,
                                  smallest_working, split_name)
from selfsup.nn.backbones import BackboneError, build_backbone, register_backbone

CLIPS = "clips"  # the value of ``input_kind`` on every video backbone
MAX_FRAMES = 64  # the dry run's search for the fewest frames a network takes stops here
MAX_SIZE = 512  # ... and for the smallest frame size
RESERVED = {"weights", "progress", "num_classes"}  # selfsup sets these: no weights, no classifier


def _clip_shape_problem(x: Tensor, name: str, in_chans: int, min_frames: int,
                        fixed: tuple[int, int] | None = None) -> str | None:
    """Why ``x`` is not a clip batch this backbone takes (wrong rank, channels, too few frames), or None."""
    if x.dim() != 5:
        return (f"{name} takes clips (B, C, T, H, W), got a {x.dim()}-d tensor of shape {tuple(x.shape)}"
                + ("; images (B, C, H, W) need an image backbone, or x.unsqueeze(2) for one-frame clips"
                   if x.dim() == 4 else ""))
    if x.shape[1] != in_chans:
        return f"{name} was built for {in_chans}-channel clips, got {x.shape[1]} channels (shape {tuple(x.shape)})"
    if fixed is not None and (x.shape[2], x.shape[3], x.shape[4]) != (fixed[0], fixed[1], fixed[1]):
        return (f"{name} takes {fixed[0]}-frame {fixed[1]}×{fixed[1]} clips only (torchvision builds it for one "
                f"input size), got {x.shape[2]} frames of {x.shape[3]}×{x.shape[4]}")
    if x.shape[2] < min_frames:
        return f"{name} needs clips of at least {min_frames} frames, got {x.shape[2]}"
    return None


# ------------------------------------------------------------------------------ torchvision video models


def torchvision_video_models() -> list[str]:
    """Names of torchvision's video classifiers (``torchvision.models.video``)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models.video)


def is_torchvision_video(name: str) -> bool:
    """``torchvision:NAME`` where NAME is one of torchvision's video models (checks nothing else)."""
    lib, arch = split_name(name)
    return lib == "torchvision" and arch in torchvision_video_models()


def close_video_names(name: str) -> list[str]:
    """``torchvision:NAME`` spellings of video models close to ``name``'s model part."""
    arch = split_name(name)[1]
    return [f"torchvision:{m}" for m in difflib.get_close_matches(arch, torchvision_video_models(), n=3, cutoff=0.6)]


class VideoLibraryBackbone(LibraryBackbone):
    """A torchvision video model (``self.net``) without its classifier: (B, C, T, H, W) → (B, num_features).

    As :class:`~selfsup.nn.adapters.LibraryBackbone` (``kwargs`` and ``replaced`` rebuild ``net`` without
    selfsup; weights load into ``net``), plus ``min_frames`` (the fewest frames it takes, from the build-time
    dry run) and ``fixed_input`` ((frames, size) for MViT, which torchvision builds for one input size).
    """

    input_kind: ClassVar[str] = CLIPS

    def __init__(self, net: nn.Module, num_features: int, arch: str, kwargs: dict[str, Any],
                 replaced: list[tuple[str, str]], in_chans: int, image_size: int, min_frames: int,
                 fixed_input: tuple[int, int] | None = None):
        super().__init__(net, num_features, "torchvision", arch, kwargs, replaced, in_chans, image_size)
        self.min_frames = min_frames
        self.fixed_input = fixed_input

    def forward(self, x: Tensor) -> Tensor:
        problem = _clip_shape_problem(x, self.name, self.in_chans, self.min_frames, self.fixed_input)
        if problem:  # torch's own error would be a pooling-size message deep inside the network
            raise ValueError(problem)
        return self.net(x)

    def input_problem(self, size: int) -> str | None:
        """Why (B, C, min_frames, size, size) clips cannot go through this network, or None (one forward)."""
        if size == self.image_size:
            return None
        if self.fixed_input is not None:
            return f"{self.name} takes {self.fixed_input[1]}×{self.fixed_input[1]} frames only, not {size}×{size}"
        error = _clip_error(self.net, self.in_chans, self.min_frames, size, self.num_features)
        return f"{self.name} cannot take {size}×{size} frames: {error}" if error else None


def _clip_error(net: nn.Module, in_chans: int, frames: int, size: int, num_features: int) -> str | None:
    """Why one (1, C, frames, size, size) zero clip fails or gives other than (1, num_features); None when it
    works (the image adapters' dry run, given frames)."""
    return _forward_error(net, in_chans, size, num_features, frames=frames)


def _conv3d_like(conv: nn.Conv3d, in_chans: int) -> nn.Conv3d:
    """A fresh ``nn.Conv3d`` of ``conv``'s shape taking ``in_chans`` channels."""
    return nn.Conv3d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     bias=conv.bias is not None, padding_mode=conv.padding_mode)


def _conv3d_expr(conv: nn.Conv3d) -> str:
    """The ``torch.nn.Conv3d(...)`` call that makes a module of ``conv``'s shape (for ``replaced``)."""
    return (f"torch.nn.Conv3d({conv.in_channels}, {conv.out_channels}, kernel_size={conv.kernel_size}, "
            f"stride={conv.stride}, padding={conv.padding}, dilation={conv.dilation}, bias={conv.bias is not None})")


def _first_conv3d_for(net: nn.Module, in_chans: int, replaced: list[tuple[str, str]]) -> None:
    """Replace the first ``nn.Conv3d`` (registration order: the input conv of every torchvision video model)
    with one taking ``in_chans`` channels; the dry run confirms it is the one applied first."""
    path, conv = next(((p, m) for p, m in net.named_modules() if isinstance(m, nn.Conv3d)), (None, None))
    if conv is None or conv.in_channels != 3 or conv.groups != 1:
        raise ValueError("it has no plain 3-channel input Conv3d to replace")
    new = _conv3d_like(conv, in_chans)
    _set(net, path, new, replaced, _conv3d_expr(new))


def _remove_video_head(net: nn.Module, replaced: list[tuple[str, str]]) -> int:
    """Remove the classifier; its input width. S3D's classifier is (Dropout, 1×1×1 Conv3d) after a
    (2, 7, 7) average pool and before a mean over (T, H, W): both become Identity, so its forward is the
    global mean of the last map (the same up to edge weighting, and it runs below 224 px)."""
    classifier = getattr(net, "classifier", None)
    if isinstance(classifier, nn.Sequential) and isinstance(classifier[-1], nn.Conv3d):
        _set(net, "avgpool", nn.Identity(), replaced, "torch.nn.Identity()")
        _set(net, "classifier", nn.Identity(), replaced, "torch.nn.Identity()")
        return classifier[-1].in_channels
    return _remove_torchvision_head(net, replaced)  # fc (VideoResNet), head (Swin3D), head.1 (MViT)


def _fixed_input(arch: str) -> tuple[int, int] | None:
    """(frames, size) of a model torchvision builds for one input size (MViT: its builders fix
    ``spatial_size``/``temporal_size``; the weights' metadata records them), else None."""
    if not arch.startswith("mvit"):
        return None
    import torchvision

    meta = torchvision.models.get_model_weights(arch).DEFAULT.meta
    return int(meta["min_temporal_size"]), int(meta["min_size"][0])


def build_torchvision_video(name: str, in_chans: int, image_size: int, /, **params: Any) -> VideoLibraryBackbone:
    """``torchvision:NAME`` video model without weights (nothing is downloaded) or classifier: R3D-18,
    MC3-18, R(2+1)D-18 (Tran et al. 2018, arXiv:1711.11248), S3D (Xie et al. 2018, arXiv:1712.04851),
    Swin3D (Liu et al. 2022, arXiv:2106.13230), MViT (Fan et al. 2021, arXiv:2104.11227; v2 arXiv:2112.01526).

    ``params`` go to ``torchvision.models.get_model``. ``num_features`` is the removed classifier's input
    width; ``in_chans`` ≠ 3 replaces the first ``nn.Conv3d`` with one of the same shape. A dry run of one
    zero clip finds ``min_frames`` (the fewest frames that run at ``image_size``) and turns a frame size the
    network cannot take into a ``ValueError`` naming the smallest that works. MViT takes 16-frame 224×224
    clips only (refused otherwise, before it is built).
    """
    arch = split_name(name)[1]
    if not is_torchvision_video(name):
        near = close_video_names(name)
        raise ValueError(f"{name!r} is not a torchvision video model"
                         + (f"; close names: {', '.join(near)}" if near else "; see torchvision.models.list_models("
                                                                             "module=torchvision.models.video)"))
    reserved = sorted(set(params) & RESERVED)
    if reserved:
        raise ValueError(f"{name}: backbone.params may not set {', '.join(reserved)}: selfsup builds the model without "
                         "weights (nothing is downloaded), removes its classifier and takes the input channels from the data")
    fixed = _fixed_input(arch)
    if fixed is not None and image_size != fixed[1]:
        raise ValueError(f"{name} takes {fixed[0]}-frame {fixed[1]}×{fixed[1]} clips only (torchvision builds it for one "
                         f"input size), not {image_size}×{image_size}: set data.image_size to {fixed[1]}, or use a model "
                         "for any size (torchvision:r3d_18, torchvision:r2plus1d_18, torchvision:swin3d_t, small_r3d)")
    import torchvision

    try:
        net = torchvision.models.get_model(arch, weights=None, **params)
    except TypeError as exc:  # an argument the constructor does not take
        raise ValueError(f"{name} does not take these backbone.params ({', '.join(params) or 'none'}): {exc}") from None
    except (ValueError, RuntimeError, AssertionError) as exc:
        raise ValueError(f"{name} cannot be built with backbone.params {params}: {_first_line(exc)}") from None
    replaced: list[tuple[str, str]] = []
    if in_chans != 3:
        _first_conv3d_for(net, in_chans, replaced)
    num_features = _remove_video_head(net, replaced)

    def runs(frames: int, size: int) -> bool:
        return _clip_error(net, in_chans, frames, size, num_features) is None

    if fixed is not None:
        error = _clip_error(net, in_chans, fixed[0], image_size, num_features)
        if error:
            raise ValueError(f"{name} does not run on {in_chans}-channel {fixed[0]}-frame {image_size}×{image_size} clips: {error}")
        min_frames = fixed[0]
    else:
        min_frames = smallest_working(lambda t: runs(t, image_size), 1, MAX_FRAMES)
        if min_frames is None:  # no clip length helps: the frames are too small (or something else is wrong)
            error = _clip_error(net, in_chans, MAX_FRAMES, image_size, num_features)
            smallest = smallest_working(lambda s: runs(MAX_FRAMES, s), image_size + 1, MAX_SIZE)
            if smallest is None:
                raise ValueError(f"{name} does not run on {in_chans}-channel clips of {image_size}×{image_size} "
                                 f"frames: {error}")
            frames = smallest_working(lambda t: runs(t, smallest), 1, MAX_FRAMES)
            raise ValueError(f"{name}: {image_size}×{image_size} frames are too small for this network (its "
                             f"downsampling leaves nothing: {error}); it needs at least {smallest}×{smallest} frames "
                             f"(and {frames} frames per clip at that size): set data.image_size, or use a backbone for "
                             "small clips (small_r3d, small_r2plus1d)")
    return VideoLibraryBackbone(net, num_features, arch, dict(params), replaced, in_chans, image_size, min_frames, fixed)


# ----------------------------------------------------------------------------- small 3D CNNs for CPUs


def _r2plus1d_mid(cin: int, cout: int, t: int = 3, d: int = 3) -> int:
    """Channels between the spatial and temporal conv of a (2+1)D conv: the M_i of Tran et al. 2018
    (arXiv:1711.11248, §3.5), which gives it the parameters of the t×d×d 3D conv it replaces."""
    return max(1, (t * d * d * cin * cout) // (d * d * cin + t * cout))


def conv3x3x3(cin: int, cout: int, stride: tuple[int, int, int], factorised: bool) -> nn.Module:
    """A 3×3×3 conv (no bias), or its (2+1)D factorisation: a 1×3×3 spatial conv, BatchNorm, ReLU, a 3×1×1
    temporal conv (Tran et al. 2018, arXiv:1711.11248), spatial stride in the first, temporal in the second.
    (B, cin, T, H, W) → (B, cout, T / stride[0], H / stride[1], W / stride[2]), rounded up."""
    if not factorised:
        return nn.Conv3d(cin, cout, 3, stride, 1, bias=False)
    mid = _r2plus1d_mid(cin, cout)
    return nn.Sequential(nn.Conv3d(cin, mid, (1, 3, 3), (1, stride[1], stride[2]), (0, 1, 1), bias=False),
                         nn.BatchNorm3d(mid), nn.ReLU(inplace=True),
                         nn.Conv3d(mid, cout, (3, 1, 1), (stride[0], 1, 1), (1, 0, 0), bias=False))


class BasicBlock3d(nn.Module):
    """The basic residual block (He et al. 2016, arXiv:1512.03385) with 3×3×3 or (2+1)D convs, as in R3D and
    R(2+1)D (Tran et al. 2018, arXiv:1711.11248); a strided 1×1×1 conv shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: tuple[int, int, int], factorised: bool):
        super().__init__()
        self.conv1 = conv3x3x3(cin, cout, stride, factorised)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = conv3x3x3(cout, cout, (1, 1, 1), factorised)
        self.bn2 = nn.BatchNorm3d(cout)
        self.shortcut = nn.Identity()
        if stride != (1, 1, 1) or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False), nn.BatchNorm3d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallR3D(nn.Module):
    """A 3D residual CNN sized for CPU pretraining on 16-frame 32–64 px clips: R3D (3×3×3 convs) or, with
    ``factorised``, R(2+1)D (Tran et al. 2018, arXiv:1711.11248).

    A 3×3×3 stem conv with stride ``stem_stride`` in space only (1 or 2; time keeps every frame), then one
    stage of ``blocks`` residual blocks per further width, each halving H and W and dividing T by its entry
    of ``temporal_strides`` (default: 1 for the first stage, 2 after, as R3D-18), global average pooling
    over (T, H, W). (B, C, T, H, W) → (B, widths[-1]). Any T ≥ 1 and H, W ≥ 1 run (strided 3×3×3 convs
    with padding 1 round up). The default (32, 64, 128, 256) has 3.4 M parameters (R3D).
    """

    input_kind: ClassVar[str] = CLIPS
    min_frames: int = 1

    def __init__(self, in_chans: int = 1, image_size: int = 64, widths: Sequence[int] = (32, 64, 128, 256),
                 blocks: int = 1, stem_stride: int = 2, temporal_strides: Sequence[int] | None = None,
                 factorised: bool = False):
        super().__init__()
        kind = "small_r2plus1d" if factorised else "small_r3d"
        widths = tuple(int(w) for w in widths) if isinstance(widths, (list, tuple)) else widths
        if not isinstance(widths, tuple) or len(widths) < 1 or any(w < 1 for w in widths):
            raise ValueError(f"{kind}: widths must be a non-empty list of positive integers, got {widths!r}")
        if stem_stride not in (1, 2):
            raise ValueError(f"{kind}: stem_stride must be 1 or 2, got {stem_stride!r}")
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"{kind}: blocks must be a positive integer, got {blocks!r}")
        stages = len(widths) - 1
        strides = tuple(temporal_strides) if temporal_strides is not None else tuple(1 if i == 0 else 2 for i in range(stages))
        if len(strides) != stages or any(s not in (1, 2) for s in strides):
            raise ValueError(f"{kind}: temporal_strides must give 1 or 2 for each of the {stages} stages after the stem "
                             f"(one per width after the first), got {temporal_strides!r}")
        self.in_chans, self.image_size = int(in_chans), int(image_size)
        self.stem = nn.Sequential(conv3x3x3(in_chans, widths[0], (1, stem_stride, stem_stride), factorised),
                                  nn.BatchNorm3d(widths[0]), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        cin = widths[0]
        for w, t in zip(widths[1:], strides, strict=True):
            for j in range(blocks):
                layers.append(BasicBlock3d(cin, w, (t, 2, 2) if j == 0 else (1, 1, 1), factorised))
                cin = w
        self.stages = nn.Sequential(*layers)
        self.num_features = widths[-1]
        self.name = kind

    def forward(self, x: Tensor) -> Tensor:
        problem = _clip_shape_problem(x, self.name, self.in_chans, 1)
        if problem:
            raise ValueError(problem)
        return self.stages(self.stem(x)).mean(dim=(2, 3, 4))


@register_backbone("small_r3d")
def small_r3d(in_chans: int, image_size: int, widths: Sequence[int] = (32, 64, 128, 256), blocks: int = 1,
              stem_stride: int = 2, temporal_strides: Sequence[int] | None = None) -> SmallR3D:
    """:class:`SmallR3D` with 3×3×3 convs (R3D, Tran et al. 2018, arXiv:1711.11248)."""
    return SmallR3D(in_chans, image_size, widths, blocks, stem_stride, temporal_strides, factorised=False)


@register_backbone("small_r2plus1d")
def small_r2plus1d(in_chans: int, image_size: int, widths: Sequence[int] = (32, 64, 128, 256), blocks: int = 1,
                   stem_stride: int = 2, temporal_strides: Sequence[int] | None = None) -> SmallR3D:
    """:class:`SmallR3D` with (2+1)D convs (R(2+1)D, Tran et al. 2018, arXiv:1711.11248)."""
    return SmallR3D(in_chans, image_size, widths, blocks, stem_stride, temporal_strides, factorised=True)


# ---------------------------------------------------------------------------------- per-frame encoder


class PerFrame(nn.Module):
    """An image backbone ``self.frame`` applied to every frame, features mean-pooled over time: the
    single-frame baseline and the encoder of frame-level pretext tasks (order verification, Misra et al. 2016,
    arXiv:1603.08561; arrow of time, Wei et al. 2018). Its weights are an image encoder's (``self.frame``).

    ``frame_features``: (B, C, T, H, W) → (B, T, D); ``forward``: → (B, D), D = the image backbone's
    ``num_features``.
    """

    input_kind: ClassVar[str] = CLIPS
    min_frames: int = 1

    def __init__(self, frame: nn.Module, in_chans: int, image_size: int):
        super().__init__()
        self.frame = frame
        self.in_chans, self.image_size = int(in_chans), int(image_size)
        self.num_features = int(frame.num_features)

    def frame_features(self, x: Tensor) -> Tensor:
        """(B, C, T, H, W) clips → (B, T, num_features): each frame through the image backbone, as one batch."""
        problem = _clip_shape_problem(x, "per_frame", self.in_chans, 1)
        if problem:
            raise ValueError(problem)
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # (B·T, C, H, W), frames of a clip adjacent
        return self.frame(frames).unflatten(0, (b, t))

    def forward(self, x: Tensor) -> Tensor:
        return self.frame_features(x).mean(dim=1)

    def input_problem(self, size: int) -> str | None:
        """The image backbone's answer for frames of ``size``×``size`` (None where it has no such check)."""
        check = getattr(self.frame, "input_problem", None)
        return check(size) if callable(check) else None


@register_backbone("per_frame")
def per_frame(in_chans: int, image_size: int, frame_backbone: str = "small_resnet",
              frame_params: dict[str, Any] | None = None) -> PerFrame:
    """:class:`PerFrame` over ``build_backbone(frame_backbone, in_chans, image_size, **frame_params)``, any
    image backbone selfsup knows (registered, ``torchvision:``/``timm:``)."""
    if not isinstance(frame_backbone, str):
        raise ValueError(f"per_frame: frame_backbone must be an image backbone name, got {frame_backbone!r}")
    if frame_params is not None and not isinstance(frame_params, dict):
        raise ValueError(f"per_frame: frame_params must be a mapping of the frame backbone's parameters, got {frame_params!r}")
    try:
        frame = build_backbone(frame_backbone, in_chans, image_size, **(frame_params or {}))
    except BackboneError as exc:
        raise ValueError(f"per_frame: frame_backbone {frame_backbone!r}: {exc}") from None
    if getattr(frame, "input_kind", "images") != "images":
        raise ValueError(f"per_frame: frame_backbone must be an image backbone, {frame_backbone!r} takes clips")
    return PerFrame(frame, in_chans, image_size)
