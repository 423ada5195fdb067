"""``torchvision:NAME`` and ``timm:NAME`` backbones: any classification model either library constructs,
built without weights, its classifier removed, as a backbone with timm's contract
(``forward(x)``: (B, C, H, W) → (B, num_features)).

- torchvision: ``torchvision.models.get_model(NAME, weights=None, **params)``; the head (``fc``,
  ``classifier``, ``heads`` or ``head``) loses its final ``nn.Linear`` (and a dropout just before it),
  so pre-logits layers stay (MobileNetV3's 1280-wide layer, ConvNeXt's norm, MaxViT's tanh layer) and
  ``num_features`` is that Linear's ``in_features``. ``in_chans`` ≠ 3 replaces the first ``nn.Conv2d``
  with one of the same shape taking ``in_chans`` channels (every classification model in torchvision
  0.29 except SqueezeNet, whose classifier is a conv). ViTs get ``image_size=``, MaxViT ``input_size=``.
- timm: ``timm.create_model(NAME, pretrained=False, num_classes=0, in_chans=C, **params)``, plus
  ``img_size=image_size`` for models timm marks ``fixed_input_size`` (ViTs, Swin, …), so their
  position embeddings fit, and ``dynamic_img_size=True`` where the model takes it (ViT, Swin, EVA), so
  multi-crop's smaller views run too; ``num_features`` is timm's ``head_hidden_size`` (what ``forward``
  returns).
- ``small_images`` (both libraries, ResNet classes only): a 3×3 stride-1 stem conv and no max-pool,
  the CIFAR variant of SimCLR (arXiv:2002.05709 §B.9); default on at ≤ 64 px, as ``resnet18``.

Resolution. These networks were designed for 224 px and downsample 32×: most CNNs still run on tiny
images (ResNet without the small stem, RegNet, EfficientNet, MobileNet, ShuffleNet, MNASNet, Swin run
at 8 px), but their last maps are then 1×1 and most of the compute is spent on padding; others stop
(measured minimums: GoogLeNet 15 px, DenseNet 29, ConvNeXt 32, VGG 32, AlexNet 63, Inception-v3 75,
MaxViT multiples of 224). ViTs take any multiple of their patch size (timm: ``patch_size`` can be set;
torchvision's are fixed at 14/16/32). Below ~96 px prefer a ResNet with the small stem, selfsup's
``small_resnet`` or its ``vit_tiny``/``vit_small`` with patch 4.

A dry-run forward of a (1, C, S, S) zero tensor at build time (eval mode, no grad, so no batch-norm
statistics or random state change) turns "this image is too small for the network" and a wrong
head into a clear error. It costs one single-image forward, 15–45% of the model's build time on one
CPU thread (measured on a loaded 2-core machine: 33 ms for ResNet-18 at 32 px, ~0.3 s for ResNet-50
at 64 or 224 px and ViT-S/16 at 224 px, 0.9 s for torchvision's ViT-B/16 at 224 px).
"""
from __future__ import annotations

import difflib
from typing import Any, Callable

import torch
from torch import Tensor, nn

LIBRARIES = ("torchvision", "timm")
SMALL_IMAGE_MAX = 64  # small_images' default: on at ≤ this many pixels
# Constructor arguments selfsup sets itself: no weights are ever downloaded, the head is removed, the
# input channels and size come from the data.
RESERVED = {
    "torchvision": {"weights", "progress", "num_classes", "image_size", "input_size"},
    "timm": {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
             "num_classes", "in_chans", "img_size"},
}
# torchvision models whose default setting is wrong for a backbone: auxiliary classifiers change what
# forward returns in training; an explicit init silences torchvision's warning about its default.
TORCHVISION_DEFAULTS = {"googlenet": {"aux_logits": False, "init_weights": True},
                        "inception_v3": {"aux_logits": False, "init_weights": True}}


class LibraryBackbone(nn.Module):
    """A torchvision or timm model (``self.net``) without its classifier; ``forward`` → (B, num_features).

    ``kwargs`` are the library constructor's arguments besides those fixed by the library
    (``weights=None`` / ``pretrained=False``), and ``replaced`` the modules swapped after construction,
    as (dotted path, Python expression) in order: together the exact recipe to rebuild ``net`` without
    selfsup, which ``selfsup export`` records.
    """

    def __init__(self, net: nn.Module, num_features: int, library: str, arch: str, kwargs: dict[str, Any],
                 replaced: list[tuple[str, str]], in_chans: int, image_size: int, patch_size: int | None = None):
        super().__init__()
        self.net = net
        self.in_chans = in_chans
        self.image_size = image_size  # the size it was built (and dry-run) for
        self.patch_size = patch_size  # a ViT's: every input size must be a multiple of it
        self.num_features = num_features
        self.library = library
        self.arch = arch
        self.kwargs = kwargs
        self.replaced = replaced

    @property
    def name(self) -> str:
        return f"{self.library}:{self.arch}"

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def input_problem(self, size: int) -> str | None:
        """Why (B, C, size, size) inputs cannot go through this network, or None. For views of another size
        than the one it was built for (multi-crop's local views): costs one single-image forward."""
        if size == self.image_size:
            return None
        if self.patch_size and size % self.patch_size:
            return f"{self.name}: {size}px views are not a multiple of its patch size {self.patch_size}"
        error = _forward_error(self.net, self.in_chans, size, self.num_features)
        return f"{self.name} cannot take {size}×{size} views: {error}" if error else None


# ------------------------------------------------------------------------------------------------ names


def split_name(name: str) -> tuple[str | None, str]:
    """``"timm:resnet50"`` → ``("timm", "resnet50")``; an unprefixed name → ``(None, name)``."""
    lib, sep, arch = name.partition(":")
    return (lib, arch) if sep else (None, name)


def library_models(library: str) -> list[str]:
    """Every classification model name the library constructs."""
    if library == "torchvision":
        import torchvision

        return torchvision.models.list_models(module=torchvision.models)
    import timm

    return timm.list_models()


def close_names(arch: str, library: str | None = None) -> list[str]:
    """Up to five ``library:NAME`` spellings close to ``arch`` (in one library, or in both)."""
    pool: dict[str, list[str]] = {}
    for lib in [library] if library else LIBRARIES:
        for n in library_models(lib):
            pool.setdefault(n, []).append(f"{lib}:{n}")
    return [q for m in difflib.get_close_matches(arch, list(pool), n=5, cutoff=0.6) for q in pool[m]]


def library_name_problem(name: str) -> str | None:
    """Why ``torchvision:NAME``/``timm:NAME`` cannot be built (naming close names), or None when it can."""
    lib, arch = split_name(name)
    if lib not in LIBRARIES:
        return f"unknown backbone library {lib!r} in {name!r}; use torchvision:NAME or timm:NAME"
    if lib == "timm" and "." in arch:
        return (f"{name!r} names pretrained weights ({arch.split('.', 1)[1]!r}); selfsup builds models without "
                f"weights and downloads nothing: use timm:{arch.split('.', 1)[0]}")
    if arch in library_models(lib):
        return None
    near = close_names(arch, lib)
    hint = f"; close names: {', '.join(near)}" if near else f"; see {lib}'s model list ({_list_call(lib)})"
    return f"{lib} has no model {arch!r}{hint}"


def _list_call(library: str) -> str:
    return "torchvision.models.list_models(module=torchvision.models)" if library == "torchvision" else "timm.list_models()"


# -------------------------------------------------------------------------------------------- surgery


def _conv_expr(conv: nn.Conv2d) -> str:
    """The ``torch.nn.Conv2d(...)`` call that makes a module of ``conv``'s shape."""
    extra = "" if conv.dilation == (1, 1) else f", dilation={conv.dilation[0]}"
    extra += "" if conv.padding_mode == "zeros" else f", padding_mode={conv.padding_mode!r}"
    pad = conv.padding if isinstance(conv.padding, str) else conv.padding[0]
    return (f"torch.nn.Conv2d({conv.in_channels}, {conv.out_channels}, {conv.kernel_size[0]}, {conv.stride[0]}, "
            f"{pad!r}, bias={conv.bias is not None}{extra})")


def _conv_like(conv: nn.Conv2d, in_chans: int, kernel: int | None = None, stride: int | None = None,
               padding: int | None = None) -> nn.Conv2d:
    """A fresh conv as ``conv`` but for ``in_chans`` inputs (and optionally another kernel/stride/padding)."""
    if type(conv) is not nn.Conv2d or conv.groups != 1 or len(set(conv.kernel_size)) != 1 or len(set(conv.stride)) != 1:
        raise ValueError(f"its first conv ({type(conv).__name__}, groups={conv.groups}, kernel {conv.kernel_size}) "
                         "is not a plain square nn.Conv2d that selfsup can rebuild")
    return nn.Conv2d(in_chans, conv.out_channels, kernel or conv.kernel_size[0], stride or conv.stride[0],
                     conv.padding if padding is None else padding, dilation=conv.dilation,
                     bias=conv.bias is not None, padding_mode=conv.padding_mode)


def _set(net: nn.Module, path: str, module: nn.Module, replaced: list[tuple[str, str]], expr: str) -> None:
    net.set_submodule(path, module, strict=True)  # replace, never add
    replaced.append((path, expr))


def _is_resnet(net: nn.Module) -> bool:
    """A torchvision or timm ResNet class with a single-conv stem (``conv1`` then ``maxpool``)."""
    import timm.models.resnet
    import torchvision

    return (isinstance(net, (torchvision.models.ResNet, timm.models.resnet.ResNet))
            and type(getattr(net, "conv1", None)) is nn.Conv2d)


def _small_stem(net: nn.Module, in_chans: int, replaced: list[tuple[str, str]]) -> None:
    conv = _conv_like(net.conv1, in_chans, kernel=3, stride=1, padding=1)
    _set(net, "conv1", conv, replaced, _conv_expr(conv))
    _set(net, "maxpool", nn.Identity(), replaced, "torch.nn.Identity()")


def _first_conv_for(net: nn.Module, in_chans: int, replaced: list[tuple[str, str]]) -> None:
    """Replace the first ``nn.Conv2d`` (in registration order: the input conv of every torchvision
    classifier) with one taking ``in_chans`` channels; the dry run confirms it is the one applied first."""
    path, conv = next(((p, m) for p, m in net.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None or conv.in_channels != 3:
        raise ValueError("it has no 3-channel input conv to replace")
    new = _conv_like(conv, in_chans)
    _set(net, path, new, replaced, _conv_expr(new))


def _remove_torchvision_head(net: nn.Module, replaced: list[tuple[str, str]]) -> int:
    """Replace the head's final Linear (and a dropout just before it) with Identity; its ``in_features``."""
    for attr in ("fc", "classifier", "heads", "head"):
        head = getattr(net, attr, None)
        if isinstance(head, nn.Linear):
            _set(net, attr, nn.Identity(), replaced, "torch.nn.Identity()")
            return head.in_features
        children = list(head.named_children()) if isinstance(head, nn.Sequential) else []
        if children and isinstance(children[-1][1], nn.Linear):  # torchvision ViT names it: heads.head
            width = children[-1][1].in_features
            _set(net, f"{attr}.{children[-1][0]}", nn.Identity(), replaced, "torch.nn.Identity()")
            if len(children) > 1 and isinstance(children[-2][1], nn.Dropout):  # dropped features help no method
                _set(net, f"{attr}.{children[-2][0]}", nn.Identity(), replaced, "torch.nn.Identity()")
            return width
    raise ValueError("its classifier is not a Linear layer in fc/classifier/heads/head (SqueezeNet's is a conv); "
                     "choose another model")


# ------------------------------------------------------------------------------------------- builders


def _torchvision_net(arch: str, in_chans: int, image_size: int, params: dict[str, Any], small: bool | None):
    import torchvision

    kwargs = {**TORCHVISION_DEFAULTS.get(arch, {}), **params, **_torchvision_size(arch, image_size)}
    net = torchvision.models.get_model(arch, weights=None, **kwargs)
    replaced: list[tuple[str, str]] = []
    if _stem_wanted(net, small, image_size, arch):
        _small_stem(net, in_chans, replaced)
    elif in_chans != 3:
        _first_conv_for(net, in_chans, replaced)
    num_features = _remove_torchvision_head(net, replaced)
    return net, num_features, kwargs, replaced


def _torchvision_size(arch: str, image_size: int) -> dict[str, Any]:
    """The size argument of torchvision models built for one input size (their position embeddings or
    window partitions depend on it); other models take any size."""
    if arch.startswith("vit_"):
        patch = int(arch.rsplit("_", 1)[1])  # vit_b_16: patch size 16 (torchvision's own check only asserts)
        if image_size % patch:
            raise ValueError(_patch_problem(f"torchvision:{arch}", image_size, patch))
        return {"image_size": image_size}
    if arch.startswith("maxvit_"):
        return {"input_size": [image_size, image_size]}  # a list, so the recorded kwargs stay plain JSON
    return {}


def _timm_net(arch: str, in_chans: int, image_size: int, params: dict[str, Any], small: bool | None):
    import timm
    from timm.models import get_pretrained_cfg

    kwargs = {"num_classes": 0, "in_chans": in_chans, **params}
    cfg = get_pretrained_cfg(arch)
    if cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = image_size
        # ViTs, Swin and EVA then also run on other multiples of the patch size (multi-crop's local views),
        # resampling their position embeddings; at img_size itself nothing is resampled
        kwargs.setdefault("dynamic_img_size", True)
    try:
        net = timm.create_model(arch, pretrained=False, **kwargs)
    except TypeError as exc:
        if "dynamic_img_size" in params or "dynamic_img_size" not in str(exc):
            raise
        del kwargs["dynamic_img_size"]  # a fixed-size model without the option (LeViT, CoaT, MaxViT, ...)
        net = timm.create_model(arch, pretrained=False, **kwargs)
    replaced: list[tuple[str, str]] = []
    if _stem_wanted(net, small, image_size, arch):
        _small_stem(net, in_chans, replaced)
    return net, int(getattr(net, "head_hidden_size", None) or net.num_features), kwargs, replaced


def _stem_wanted(net: nn.Module, small: bool | None, image_size: int, arch: str) -> bool:
    if small and not _is_resnet(net):
        raise ValueError(f"small_images applies to ResNets with a single-conv stem only; {arch} is a "
                         f"{type(net).__name__}: remove small_images, and give it images at the size it was designed for")
    return _is_resnet(net) and (image_size <= SMALL_IMAGE_MAX if small is None else bool(small))


def _patch_size(net: nn.Module) -> int | None:
    """A ViT's patch size (timm's ``patch_embed.patch_size``, torchvision's ``patch_size``), else None."""
    p = getattr(getattr(net, "patch_embed", None), "patch_size", None) or getattr(net, "patch_size", None)
    return int(p[0] if isinstance(p, (tuple, list)) else p) if p else None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _patch_problem(name: str, image_size: int, patch: int) -> str:
    return (f"{name}: image size {image_size} is not divisible by its patch size {patch}; use an image size that is "
            f"a multiple of {patch} (data.image_size) or a model whose patch size divides {image_size}"
            + (" (timm ViTs: backbone.params.patch_size)" if name.startswith("timm:") else ""))


def _forward_error(net: nn.Module, in_chans: int, size: int, num_features: int, frames: int | None = None) -> str | None:
    """Why one (1, C, S, S) forward — with ``frames``, one (1, C, frames, S, S) clip — fails or gives other than
    (1, num_features); None when it works."""
    was_training = net.training
    net.eval()  # no batch-norm statistics change, no dropout randomness
    shape = (1, in_chans, size, size) if frames is None else (1, in_chans, frames, size, size)
    try:
        with torch.no_grad():
            out = net(torch.zeros(shape, device=next(net.parameters()).device))
    except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
        return _first_line(exc)
    finally:
        net.train(was_training)
    if not isinstance(out, Tensor) or out.shape != (1, num_features):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        return f"its forward gives {shape}, not (1, {num_features}) pooled features"
    return None


def smallest_working(works: Callable[[int], bool], start: int, limit: int) -> int | None:
    """The smallest n ≥ ``start`` with ``works(n)`` (doubling, then bisection; assumes larger always works),
    or None up to ``limit``."""
    if works(start):
        return start
    lo = hi = start  # lo fails
    while True:
        if hi >= limit:
            return None
        lo, hi = hi, min(2 * hi, limit)
        if works(hi):
            break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if works(mid) else (mid, hi)
    return hi


def _smallest_size(net: nn.Module, in_chans: int, size: int, num_features: int, limit: int = 512) -> int | None:
    """The smallest image size above ``size`` whose forward works, or None."""
    return smallest_working(lambda s: _forward_error(net, in_chans, s, num_features) is None, size + 1, limit)


def build_library_backbone(name: str, in_chans: int, image_size: int, /, small_images: bool | None = None,
                           **params: Any) -> LibraryBackbone:
    """``torchvision:NAME`` or ``timm:NAME`` without weights or classifier; ``params`` go to the constructor.

    Raises ``ValueError`` (shown as a config error) for an unknown name, a constructor argument selfsup
    sets itself, an argument the model does not take, an image size the network cannot run (naming the
    smallest that works) or a ViT patch size that does not divide it.
    """
    problem = library_name_problem(name)
    if problem:
        raise ValueError(problem)
    lib, arch = split_name(name)
    reserved = sorted(set(params) & RESERVED[lib])
    if reserved:
        raise ValueError(f"{name}: backbone.params may not set {', '.join(reserved)}: selfsup builds the model without "
                         "weights (nothing is downloaded), removes its classifier and takes the input channels and "
                         "size from the data (set data.image_size to change the size)")
    build = _torchvision_net if lib == "torchvision" else _timm_net
    try:
        net, num_features, kwargs, replaced = build(arch, in_chans, image_size, dict(params), small_images)
    except TypeError as exc:  # an argument the model's constructor does not take
        raise ValueError(f"{name} does not take these backbone.params ({', '.join(params) or 'none'}): {exc}") from None
    except (ValueError, RuntimeError, AssertionError) as exc:  # the library's own checks, e.g. MaxViT's sizes
        msg = _first_line(exc)
        raise ValueError(msg if msg.startswith(name) else f"{name} cannot be built for {in_chans}-channel "
                         f"{image_size}×{image_size} images: {msg}") from None
    patch = _patch_size(net)
    if patch and image_size % patch:
        raise ValueError(_patch_problem(name, image_size, patch))
    error = _forward_error(net, in_chans, image_size, num_features)
    if error:
        smallest = None if patch else _smallest_size(net, in_chans, image_size, num_features)
        if smallest:
            raise ValueError(f"{name}: {image_size}×{image_size} images are too small for this network (its "
                             f"downsampling leaves nothing: {error}); it needs at least {smallest}×{smallest} "
                             "(set data.image_size), or use a backbone for small images (small_resnet, resnet18)")
        raise ValueError(f"{name} does not run on {in_chans}-channel {image_size}×{image_size} images: {error}")
    return LibraryBackbone(net, num_features, lib, arch, kwargs, replaced, in_chans, image_size, patch)
