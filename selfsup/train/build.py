"""From a validated config to the model and view recipe of a run (shared by pretrain and evaluate)."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from torch import nn

from selfsup import distributed as dist
from selfsup.config import AUTO, BackboneConfig, ConfigError, ModelConfig, RunConfig
from selfsup.data import ImageSet
from selfsup.methods import check_method_params, get_method
from selfsup.methods.base import MethodSpec, resolved_params, run_checks
from selfsup.methods.registry import method_params
from selfsup.nn.backbones import BackboneError, build_backbone, check_backbone_name
from selfsup.nn.weights import WeightsError, file_sha256, load_weights
from selfsup.train.checkpoint import CheckpointError
from selfsup.train.micro import micro_problems
from selfsup.views import ViewRecipe, apply_overrides, resolve_sizes
from selfsup.views.clips import ClipRecipe, apply_clip_overrides, resolve_clip_sizes

log = logging.getLogger("selfsup")


def check_names(cfg: RunConfig) -> None:
    """Cheap checks that need no data: the method, its parameters, the backbone name."""
    problems: list[str] = []
    try:
        cfg.method.params = check_method_params(cfg.method.name, cfg.method.params)
    except ConfigError as exc:
        problems += exc.problems
    try:
        if cfg.backbone.name != AUTO:
            check_backbone_name(cfg.backbone.name)
    except BackboneError as exc:
        problems.append(str(exc))
    if problems:
        raise ConfigError(problems)


VIT_PATCHES = (4, 8, 16)


def auto_backbone(method: str, image_size: int) -> ModelConfig:
    """The backbone of ``backbone: auto`` (the default), chosen for the method and the resolution.

    A method that needs a ViT (``spec.default_backbone``, the masked methods) gets it with the smallest patch of
    4/8/16 that divides the image into at most 256 patches (28 px → 4, 64 → 8, 224 → 16). Others get a CNN: the
    small residual CNN up to 64 px (stride-1 stem up to 32 px, stride 2 above: the resolution it was tuned at),
    and torchvision's ResNet-18 with its standard stem beyond (STL-10 and ImageNet-scale images: the SimCLR /
    BYOL baseline network).
    """
    spec = get_method(method).spec
    default = spec.default_backbone
    if spec.inputs == "clips":  # the method names its video backbone (a 3-D CNN, or the tubelet ViT)
        return ModelConfig(default or "small_r3d", {"patch_size": 8} if default == "video_vit" else {})
    if default is not None:
        if default.startswith("vit"):
            patch = next((p for p in VIT_PATCHES if image_size % p == 0 and (image_size // p) ** 2 <= 256), None)
            return ModelConfig(default, {} if patch is None else {"patch_size": patch})
        return ModelConfig(default)
    if image_size <= 64:
        return ModelConfig("small_resnet", {"stem_stride": 1 if image_size <= 32 else 2})
    return ModelConfig("torchvision:resnet18", {"small_images": False})


def resolve_config(cfg: RunConfig, train: ImageSet) -> RunConfig:
    """The config with every ``auto`` setting decided for this data, the weights file (when given) recorded by
    absolute path and SHA-256, and the method's parameters as its ``resolve_params`` records them (a distillation
    teacher's path and SHA-256); the run directory stores this one."""
    try:
        params = resolved_params(get_method(cfg.method.name).cls, cfg.method.params)
    except ValueError as exc:
        raise ConfigError([f"method {cfg.method.name!r}: {exc}"]) from None
    cfg = dataclasses.replace(cfg, backbone=resolve_weights(cfg.backbone),
                              method=dataclasses.replace(cfg.method, params=params))
    if cfg.backbone.name != AUTO:
        return cfg
    auto = auto_backbone(cfg.method.name, train.image_size)
    params = {**auto.params, **cfg.backbone.params}  # settings the user gave win
    log.info("backbone: %s %s (auto: for %s at %d px; --backbone NAME picks another)", auto.name, params or "",
             cfg.method.name, train.image_size)
    return dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, name=auto.name, params=params))


def resolve_weights(backbone: BackboneConfig) -> BackboneConfig:
    """``backbone.weights`` as an absolute path, with the file's SHA-256 (checked against a recorded one). A file
    that is missing is left for :func:`build_method` to report: a resumed run does not need it."""
    if not backbone.weights:
        return backbone
    path = Path(backbone.weights).expanduser().resolve()
    sha = backbone.weights_sha256
    if path.is_file():
        sha = file_sha256(path)
        if backbone.weights_sha256 and backbone.weights_sha256.lower() != sha:
            raise ConfigError([f"backbone.weights: {path} has SHA-256 {sha}, not the {backbone.weights_sha256} this "
                               "config records: the file changed since; remove backbone.weights_sha256 to use it as "
                               "it is now"])
    return dataclasses.replace(backbone, weights=str(path), weights_sha256=sha)


def build_encoder(cfg: RunConfig, in_chans: int, image_size: int) -> nn.Module:
    backbone = cfg.backbone
    if backbone.name == AUTO:
        auto = auto_backbone(cfg.method.name, image_size)
        backbone = dataclasses.replace(backbone, name=auto.name, params={**auto.params, **backbone.params})
    try:
        return build_backbone(backbone.name, in_chans, image_size, **backbone.params)
    except (BackboneError, TypeError, ValueError) as exc:
        raise ConfigError([f"backbone: {exc}"]) from None


def build_method(cfg: RunConfig, in_chans: int, image_size: int, world: int = 1, weights: bool = True,
                 stats: tuple[list[float], list[float]] | None = None) -> nn.Module:
    """The method around a freshly initialised backbone, or, with ``weights`` and ``backbone.weights`` set, one
    initialised from that file before the method is built (so its teachers copy it); constructor ``ValueError``s
    become config errors. Rebuilding a trained method to load its checkpoint passes ``weights=False``.

    With several processes, a method whose loss compares samples (it takes ``gather``) gathers
    embeddings across them, so its loss is the one of the global batch. ``stats``: the (mean, std) the views are
    normalised with, passed to a method that takes ``input_mean``/``input_std`` (a teacher trained on other data
    renormalises them).
    """
    info = get_method(cfg.method.name)
    backbone = build_encoder(cfg, in_chans, image_size)
    if weights and cfg.backbone.weights:
        init_backbone(backbone, cfg.backbone, in_chans)
    params = dict(cfg.method.params)
    if world > 1 and "gather" in method_params(info.cls):
        params.setdefault("gather", True)
    if stats is not None and "input_mean" in method_params(info.cls):
        params.setdefault("input_mean", list(stats[0]))
        params.setdefault("input_std", list(stats[1]))
    try:
        return info.cls(backbone, **params)
    except (ValueError, TypeError) as exc:
        raise ConfigError([f"method {cfg.method.name!r}: {exc}"]) from None


def init_backbone(backbone: nn.Module, cfg: BackboneConfig, in_chans: int) -> None:
    """Load ``cfg.weights`` into ``backbone`` (:func:`selfsup.nn.weights.load_weights`), saying what was done;
    a file that does not fit is a :class:`CheckpointError` (one line)."""
    try:
        loaded = load_weights(backbone, cfg.weights, strict=cfg.weights_strict, ignore=cfg.weights_ignore,
                              in_chans=in_chans)
    except WeightsError as exc:
        raise CheckpointError(f"backbone.weights: {exc}") from None
    if dist.rank() == 0:
        sha = f" (sha256 {cfg.weights_sha256[:12]}…)" if cfg.weights_sha256 else ""
        log.info("backbone weights: %s%s", loaded.summary(), sha)
        for note in loaded.notes:
            log.info("backbone weights: %s", note)


def view_recipe(cfg: RunConfig, spec: MethodSpec, image_size: int, frames: int | None = None) -> ViewRecipe | ClipRecipe:
    """The method's views with the run's overrides. Overrides cannot change the number of global views; local
    crops are accepted only by methods whose own recipe has them (multi-crop methods: SwAV, DINO, …), so a
    two-view method is never handed extra views it would silently ignore. A clip method's views are checked
    against the records' ``frames``."""
    if isinstance(spec.views, ClipRecipe):
        return resolve_clip_sizes(apply_clip_overrides(spec.views, cfg.views), image_size, frames or 0)
    recipe = apply_overrides(spec.views, cfg.views)
    if recipe.local_crops and not spec.views.local_crops:
        raise ConfigError([f"{cfg.method.name} takes exactly {len(recipe.globals_)} view(s) and no local crops; "
                           f"remove views.local_crops={recipe.local_crops}"])
    return resolve_sizes(recipe, image_size)


def check_inputs(cfg: RunConfig, spec: MethodSpec, data_kind: str) -> None:
    """A method that takes clips given images, or the other way round: one line saying what to use."""
    if spec.inputs == data_kind:
        return
    if spec.inputs == "clips":
        raise ConfigError([f"{cfg.method.name} learns from clips, and {cfg.data.name} holds still images: use "
                           "--data moving-fashion-mnist or a folder of videos"])
    raise ConfigError([f"{cfg.method.name} learns from still images, and {cfg.data.name} holds clips: use a video "
                       "method (selfsup methods lists them) or an image dataset"])


def backbone_kind_problems(backbone: nn.Module, name: str, method: nn.Module) -> list[str]:
    """A clip method given an image backbone (or the other way round): what to use instead."""
    takes = getattr(backbone, "input_kind", "images")
    wants = getattr(method, "spec", None) and method.spec.inputs
    if not wants or takes == wants:
        return []
    if wants == "clips":
        return [f"backbone {name!r} takes still images and {type(method).__name__} learns from clips: use a video "
                "backbone (small_r3d, small_r2plus1d, torchvision:r3d_18, video_vit, or per_frame to apply an image "
                "backbone to each frame)"]
    return [f"backbone {name!r} takes clips and {type(method).__name__} learns from still images: use an image backbone"]


def check_batch(cfg: RunConfig, spec: MethodSpec, n_train: int, world: int) -> None:
    b = cfg.train.batch_size
    problems = []
    if b < spec.min_batch_size:
        problems.append(f"batch size {b} is too small for {cfg.method.name} (needs ≥ {spec.min_batch_size})")
    if b % world:
        problems.append(f"batch size {b} is not divisible by the {world} processes")
    if b > n_train:
        problems.append(f"batch size {b} is larger than the {n_train} training images; lower --batch-size or --limit")
    if problems:
        raise ConfigError(problems)


def check_run(model: nn.Module, cfg: RunConfig, n_train: int, recipe: ViewRecipe) -> None:
    """A method's own checks against the data and views (its optional ``check_run``): e.g. a queue larger than
    the dataset, a two-view method given another number of views; and the backbone's against the view sizes
    (``input_problem(size)`` of a torchvision/timm backbone: a ViT's patch size, a fixed input size, downsampling
    that leaves nothing), before a training step fails on them; and ``train.micro_batch_size`` against the method
    (:func:`~selfsup.train.micro.micro_problems`)."""
    problems = [f"{cfg.method.name}: {p}" for p in run_checks(model, n_train, cfg.train.batch_size, recipe)]
    problems += micro_problems(model, cfg.method.name, cfg.train.micro_batch_size,
                               cfg.train.batch_size // dist.world_size())
    problems += backbone_kind_problems(model.backbone, cfg.backbone.name, model)
    backbone_check = getattr(model.backbone, "input_problem", None)
    if isinstance(recipe, ClipRecipe):
        sizes = {recipe.augment.size}
    else:
        sizes = {g.size for g in recipe.globals_} | ({recipe.local.size} if recipe.local_crops else set())
    problems += [p for p in map(backbone_check, sorted(sizes)) if p] if backbone_check else []
    if problems:
        raise ConfigError(problems)
