"""Typed run configuration: dataclasses, YAML in and out, validation that lists every problem.

A recipe is data. ``load_config`` merges a YAML file and command-line overrides into one
:class:`RunConfig`, checking unknown keys, wrong types and impossible values together so the
user sees every problem in one message before anything heavy starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


AUTO = "auto"
"""A setting decided for the data at hand when the run starts (``backbone: auto``); the run directory stores
the decision."""

GENERATED = ("moving-fashion-mnist",)
"""The datasets whose generator ``data.generator`` sets (each checks its keys when it loads)."""

VIDEO_KEYS = ("frames", "fps", "short", "frame_fps")
"""The settings ``data.video`` takes (a video folder's records)."""

LOGGERS = ("tensorboard", "mlflow", "wandb")
"""The experiment trackers ``train.loggers`` may name (``selfsup.train.trackers``)."""


class ConfigError(ValueError):
    """A configuration the user must fix; the message lists every problem found (one problem: one line)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1 and "\n" not in self.problems[0]:
            super().__init__(f"invalid configuration: {self.problems[0]}")
        else:
            super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass
class DataConfig:
    name: str = "fashion-mnist"
    """A dataset name (``fashion-mnist``, ``digits``, ``cifar10``, ``cifar100``) or a path
    (an image folder, or a folder of CIFAR python batches)."""
    root: str | None = None
    """Where a named dataset's files lie; ``None`` uses its default location."""
    limit: int | None = None
    """Train on the first N images only (for quick runs)."""
    val_size: int = 5000
    """Images held out of pretraining for the online kNN monitor (at most 10% of the data)."""
    image_size: int | None = None
    """Side length images are resized to (image folders only); ``None`` keeps the dataset's own."""
    long_tail: float | None = None
    """Pretrain on a class-imbalanced subset of the labelled training images: class k of C (in label
    order) keeps ``n · long_tail^(−k/(C−1))`` images, n the smallest class's size, so the first class is
    ``long_tail`` times the last (the CIFAR-LT profile). Evaluation always uses the whole labelled split."""
    cache_dir: str | None = None
    """Where image folders are cached (decoded once, then memory-mapped); ``None`` uses ``$SELFSUP_CACHE``,
    else ``~/.cache/selfsup``. Use a shared filesystem for multi-node runs, a local disk for speed."""
    cache_size: int | None = None
    """Side S of the cached records (the whole image squashed to S×S, aspect ratio kept beside it);
    ``None`` is round(image_size × 4/3), room for random-resized crops. Must be ≥ image_size."""
    cache_check: str = "fast"
    """How a folder is compared with its cache on every use: ``fast`` (one stat per directory: files added,
    removed or renamed) or ``full`` (one stat per file: also files rewritten in place)."""
    memory_budget_gb: float | None = None
    """Image-folder records up to this size are held in RAM, larger ones are read from the memory-mapped
    cache as batches need them; ``None`` is a quarter of this machine's RAM, shared by the processes
    torchrun starts on it."""
    stream: bool | None = None
    """``true``: always read a folder's records from the cache file; ``false``: always load them into RAM;
    ``None``: by ``memory_budget_gb``."""
    generator: dict[str, Any] = field(default_factory=dict)
    """Settings of a procedural dataset's generator, read by ``moving-fashion-mnist`` (``frames``, ``train_size``,
    ``test_size``, ``objects``, ``object_scale``, ``texture``, ``seed``: :mod:`selfsup.data.moving_fashion_mnist`,
    which checks them); empty keeps its defaults."""

    kind: str = AUTO
    """What a folder holds: ``videos`` (video files and/or folders of frame images, read as clips), ``images``, or
    ``auto``: videos when the folder holds a video file (mp4, m4v, mov, avi, webm, mkv), images otherwise. A
    folder of frame folders only looks like an image folder with class sub-folders: give it ``videos``."""
    video: dict[str, Any] = field(default_factory=dict)
    """How a video folder becomes clip records (:func:`~selfsup.data.video_folder.load_video_folder`): ``frames``
    per record (16), ``fps`` they are resampled to (8), ``short`` (``pad`` a video shorter than a record by
    repeating its last frame, or ``skip`` it), ``frame_fps`` (the rate frame folders were taken at; ``fps``)."""

    def labelled(self) -> "DataConfig":
        """The same dataset with every labelled training image: what evaluation fits on (no ``limit``,
        no ``long_tail``)."""
        return dataclasses.replace(self, limit=None, long_tail=None)


@dataclass
class ModelConfig:
    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class BackboneConfig(ModelConfig):
    """The backbone: a name, its constructor's parameters, and optionally a weights file it starts from.

    The weights are loaded when a new run builds its backbone (``selfsup.nn.weights``); a resumed run continues
    from its checkpoint, and evaluation rebuilds the encoder from the run's ``encoder.pt``.
    """

    weights: str | None = None
    """A state dict to initialise the backbone from: ``.pt``/``.pth``/``.bin`` (read with
    ``torch.load(weights_only=True)``) or ``.safetensors``, in the key layout of the backbone's library
    (torchvision/timm), of selfsup, or of ``selfsup export``. The run's resolved config stores its absolute path."""
    weights_strict: bool = True
    """Every backbone tensor must come from the file with its shape (the classifier a torchvision/timm file holds
    is dropped, the input conv adapted to the data's channels); ``false`` loads what fits and lists the rest."""
    weights_ignore: list[str] = field(default_factory=list)
    """Key prefixes (the library's layout, e.g. ``[fc]`` or ``[layer4]``) neither taken from the file nor required
    of it: those parts keep their fresh initialisation."""
    weights_sha256: str | None = None
    """The weights file's SHA-256: recorded by a new run in its resolved config; when given, the file must match."""


WEIGHTS_KEYS = ("weights", "weights_strict", "weights_ignore", "weights_sha256")
"""The backbone's weight options: written to a config only when ``weights`` is set (older run directories, which
lack them, resume unchanged); refused under ``method:``."""


@dataclass
class OptimConfig:
    name: str = "sgd"
    """``sgd``, ``lars`` or ``adamw``."""
    lr: float = 0.3
    """Base learning rate, before scaling by batch size."""
    lr_scaling: str = "linear"
    """``linear`` (lr × B/256), ``sqrt`` (lr × √B, the SimCLR paper's rule for small batches) or ``none``."""
    weight_decay: float = 1e-6
    weight_decay_end: float | None = None
    """Weight decay moves from ``weight_decay`` to this along a cosine over the run (DINO, arXiv:2104.14294:
    0.04 → 0.4); ``None`` keeps it constant."""
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0
    """The cosine schedule ends at ``lr × min_lr_ratio``."""
    clip_grad: float | None = None
    """Clip the global gradient norm to this value; ``None`` disables clipping."""


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256
    seed: int = 0
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""
    precision: str = "auto"
    """``auto`` (bf16 where native: CUDA GPUs that support it, CPUs with AVX-512 BF16/AMX; fp32 elsewhere), ``fp32`` or ``bf16``."""
    channels_last: str = "auto"
    """``auto`` (on for images of 8 px and more, where convolutions are faster channels-last), ``on`` or ``off``."""
    compile: str | bool = "off"
    """torch.compile: ``off``; ``on`` compiles the method's whole training step (forward, loss and, through
    AOTAutograd, backward) on first use, its compile time logged and recorded in ``env.json`` and the first
    epoch's metrics; ``backbone`` compiles only the backbone, in place. ``true``/``false`` mean ``on``/``off``.
    Measured in ``benchmarks/step/README.md``."""
    threads: int | None = None
    """CPU threads for torch; ``None`` uses every core."""
    log_every: int = 20
    knn_every: int = 1
    """Run the online kNN monitor every N epochs (0 disables it)."""
    checkpoint_every: int = 1
    """Write ``checkpoints/epoch_N.pt`` every N epochs (``last.pt`` is written every epoch)."""
    checkpoint_steps: int = 0
    """Also write ``last.pt`` every N optimiser steps within an epoch (0: only at epoch ends)."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a NaN/Inf loss or gradient."""
    micro_batch_size: int | None = None
    """Split each process's batch into chunks of at most this many images (near-equal sizes, none dropped), run one at
    a time, with the whole batch's loss and gradients (``selfsup.train.micro``): GradCache for losses that compare
    samples, plain accumulation for per-sample ones. Memory of a chunk, same steps; BatchNorm's batch statistics
    are a chunk's. ``None``: the whole batch at once. Methods that support neither are refused."""
    stop_on_collapse: bool = False
    """Stop the run when the collapse monitor warns (spread or effective rank low for several logged steps)."""
    progress: bool = True
    loggers: list[str] = field(default_factory=list)
    """Experiment trackers fed the same records as ``metrics.jsonl`` (``selfsup.train.trackers``): ``tensorboard``
    (event files in ``RUN/tensorboard``), ``mlflow`` (``tracking_uri``), ``wandb`` (offline, in ``RUN/wandb``).
    TensorBoard and MLflow come with the ``track`` extra (``pip install 'selfsup[track]'``)."""
    tracking_uri: str | None = None
    """The MLflow store: ``None`` is an SQLite file in the run directory (``RUN/mlruns/mlflow.db``, artifacts beside
    it), else any MLflow tracking URI (``sqlite:///PATH``, ``http://HOST:PORT``)."""
    experiment: str = "selfsup"
    """The MLflow experiment (and W&B project) the run is logged under."""


@dataclass
class RunConfig:
    method: ModelConfig = field(default_factory=lambda: ModelConfig("simclr"))
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(AUTO))
    """``auto``: the method's default backbone (a ViT for masked methods), else the small residual CNN."""
    data: DataConfig = field(default_factory=DataConfig)
    views: dict[str, Any] = field(default_factory=dict)
    """Overrides of the method's view recipe, applied to every view (see ``selfsup.views.Augment``);
    ``local_crops``/``local_size`` set multi-crop."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, BackboneConfig):  # RunConfig(backbone=ModelConfig(...)): no weights
            self.backbone = BackboneConfig(self.backbone.name, dict(self.backbone.params))

    def to_dict(self) -> dict[str, Any]:
        out = _plain(dataclasses.asdict(self))
        if out["backbone"].get("weights") is None:
            for key in WEIGHTS_KEYS:
                out["backbone"].pop(key, None)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _plain(obj: Any) -> Any:
    """Tuples become lists so the dict is YAML- and ``weights_only``-safe."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------- parsing and validation


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            sub: list[str] = []
            out = _coerce(value, arg, where, sub)
            if not sub:
                return out
        problems.append(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            problems.append(f"{where}: expected a list of {len(args)} values, got {value!r}")
            return value
        return tuple(_coerce(v, a, f"{where}[{i}]", problems) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r} (write [{value}] for one item)")
            return value
        (arg,) = typing.get_args(tp)
        return [_coerce(v, arg, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _from_dict(cls: type, data: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(data, dict):
        problems.append(f"{where or 'config'}: expected a mapping, got {data!r}")
        return cls("?") if issubclass(cls, ModelConfig) else cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if cls is ModelConfig and key in WEIGHTS_KEYS:
            problems.append(f"'{path}': weights initialise the backbone, not the method; use backbone.{key} "
                            "(or --weights PATH)")
            continue
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            problems.append(f"unknown key '{path}'{hint}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _from_dict(tp, value, path, problems)
        else:
            kwargs[key] = _coerce(value, tp, path, problems)
    if issubclass(cls, ModelConfig) and "name" not in kwargs:
        problems.append(f"{where}.name: missing")
        kwargs["name"] = "?"
    return cls(**kwargs)


def _model_from_value(value: Any) -> Any:
    """``method: simclr`` is shorthand for ``method: {name: simclr}``."""
    return {"name": value} if isinstance(value, str) else value


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    problems: list[str] = []
    data = dict(data or {})
    defaults = RunConfig()
    for key in ("method", "backbone"):
        if key in data:
            data[key] = _model_from_value(data[key])
            if isinstance(data[key], dict) and "name" not in data[key]:  # only params given: default model
                data[key] = {"name": getattr(defaults, key).name, **data[key]}
    cfg = _from_dict(RunConfig, data, "", problems)
    problems += check_values(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def compile_mode(value: str | bool) -> str | None:
    """``train.compile`` normalised to ``off``, ``on`` or ``backbone`` (``None`` when invalid)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value if value in ("off", "on", "backbone") else None


def check_values(cfg: RunConfig) -> list[str]:
    """Range checks that need no dataset or model; method-specific checks live with the method."""
    p: list[str] = []
    t, o, d = cfg.train, cfg.optim, cfg.data
    if isinstance(t.epochs, int) and t.epochs < 1:
        p.append(f"train.epochs must be ≥ 1, got {t.epochs}")
    if isinstance(t.batch_size, int) and t.batch_size < 2:
        p.append(f"train.batch_size must be ≥ 2, got {t.batch_size}")
    if t.precision not in ("auto", "fp32", "bf16"):
        p.append(f"train.precision must be auto, fp32 or bf16, got {t.precision!r}")
    if compile_mode(t.compile) is None:
        p.append(f"train.compile must be off, on or backbone (or true/false), got {t.compile!r}")
    if t.channels_last not in ("auto", "on", "off"):
        p.append(f"train.channels_last must be auto, on or off, got {t.channels_last!r}")
    if isinstance(t.max_bad_steps, int) and t.max_bad_steps < 1:
        p.append(f"train.max_bad_steps must be ≥ 1, got {t.max_bad_steps}")
    if isinstance(t.checkpoint_steps, int) and t.checkpoint_steps < 0:
        p.append(f"train.checkpoint_steps must be ≥ 0, got {t.checkpoint_steps}")
    if isinstance(t.log_every, int) and t.log_every < 1:
        p.append(f"train.log_every must be ≥ 1, got {t.log_every}")
    unknown = [n for n in t.loggers if n not in LOGGERS] if isinstance(t.loggers, list) else []
    if unknown:
        p.append(f"train.loggers: unknown {', '.join(map(repr, unknown))} (known: {', '.join(LOGGERS)})")
    if t.threads is not None and isinstance(t.threads, int) and t.threads < 1:
        p.append(f"train.threads must be ≥ 1, got {t.threads}")
    if isinstance(t.micro_batch_size, int) and t.micro_batch_size < 1:
        p.append(f"train.micro_batch_size must be ≥ 1 (or null for the whole batch at once), got {t.micro_batch_size}")
    if t.micro_batch_size is not None and compile_mode(t.compile) == "on":
        p.append("train.micro_batch_size runs the step chunk by chunk, which train.compile=on (the whole step as one "
                 "graph) cannot: use train.compile=backbone, or drop one of them")
    if o.name not in ("sgd", "lars", "adamw"):
        p.append(f"optim.name must be sgd, lars or adamw, got {o.name!r}")
    if o.lr_scaling not in ("linear", "sqrt", "none"):
        p.append(f"optim.lr_scaling must be linear, sqrt or none, got {o.lr_scaling!r}")
    if isinstance(o.lr, float) and o.lr <= 0:
        p.append(f"optim.lr must be > 0, got {o.lr}")
    if isinstance(o.weight_decay, float) and o.weight_decay < 0:
        p.append(f"optim.weight_decay must be ≥ 0, got {o.weight_decay}")
    if isinstance(o.weight_decay_end, float) and o.weight_decay_end < 0:
        p.append(f"optim.weight_decay_end must be ≥ 0 or null, got {o.weight_decay_end}")
    if isinstance(o.warmup_epochs, float) and o.warmup_epochs < 0:
        p.append(f"optim.warmup_epochs must be ≥ 0, got {o.warmup_epochs}")
    if isinstance(o.min_lr_ratio, float) and not 0 <= o.min_lr_ratio <= 1:
        p.append(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    if o.clip_grad is not None and isinstance(o.clip_grad, float) and o.clip_grad <= 0:
        p.append(f"optim.clip_grad must be > 0 or null, got {o.clip_grad}")
    if d.limit is not None and isinstance(d.limit, int) and d.limit < 2:
        p.append(f"data.limit must be ≥ 2, got {d.limit}")
    if isinstance(d.val_size, int) and d.val_size < 0:
        p.append(f"data.val_size must be ≥ 0, got {d.val_size}")
    if d.image_size is not None and isinstance(d.image_size, int) and d.image_size < 8:
        p.append(f"data.image_size must be ≥ 8, got {d.image_size}")
    if isinstance(d.long_tail, float) and d.long_tail < 1:
        p.append(f"data.long_tail must be ≥ 1 (largest class over smallest), got {d.long_tail}")
    if d.cache_size is not None and isinstance(d.cache_size, int):
        if d.cache_size < 8:
            p.append(f"data.cache_size must be ≥ 8, got {d.cache_size}")
        elif isinstance(d.image_size, int) and d.cache_size < d.image_size:
            p.append(f"data.cache_size ({d.cache_size}) is smaller than data.image_size ({d.image_size}): every "
                     "view would be enlarged from fewer pixels; make it ≥ the image size or leave it unset")
    if d.cache_check not in ("fast", "full"):
        p.append(f"data.cache_check must be fast or full, got {d.cache_check!r}")
    if isinstance(d.memory_budget_gb, float) and d.memory_budget_gb < 0:
        p.append(f"data.memory_budget_gb must be ≥ 0, got {d.memory_budget_gb}")
    if d.kind not in (AUTO, "images", "videos"):
        p.append(f"data.kind must be auto, images or videos, got {d.kind!r}")
    if isinstance(d.video, dict):
        unknown = sorted(set(d.video) - set(VIDEO_KEYS))
        if unknown:
            p.append(f"data.video has no setting {', '.join(map(repr, unknown))}; it takes {', '.join(VIDEO_KEYS)}")
    if isinstance(d.generator, dict) and d.generator and d.name not in GENERATED:
        p.append(f"data.generator is read only by the generated datasets ({', '.join(GENERATED)}), not by "
                 f"{d.name}: remove it")
    return p + _weights_problems(cfg.backbone)


def _weights_problems(b: BackboneConfig) -> list[str]:
    p: list[str] = []
    if b.weights is None:
        given = [k for k in WEIGHTS_KEYS[1:] if getattr(b, k) != getattr(BackboneConfig("?"), k)]
        if given:
            p.append(f"backbone.{given[0]} is set but backbone.weights is not: give the weights file too")
    elif isinstance(b.weights, str) and not b.weights.strip():
        p.append("backbone.weights must be a file path, got an empty string")
    sha = b.weights_sha256
    if isinstance(sha, str) and not re.fullmatch(r"[0-9a-fA-F]{64}", sha):
        p.append(f"backbone.weights_sha256 must be 64 hexadecimal digits, got {sha!r}")
    return p


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(d, "optim.lr", 0.1)``; ``method.X``/``backbone.X`` for anything but ``name`` (and the backbone's
    weight options, ``WEIGHTS_KEYS``) go to ``params``."""
    keys = dotted.split(".")
    if keys[0] in ("method", "backbone"):
        data[keys[0]] = _model_from_value(data.get(keys[0], {}))
        if len(keys) == 2 and keys[1] not in ("name", "params") + WEIGHTS_KEYS:
            keys = [keys[0], "params", keys[1]]
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError([f"cannot set '{dotted}': '{k}' is not a mapping"])
    node[keys[-1]] = value


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's floats: ``1e-5`` and ``5E3`` are numbers, as a user writing a learning rate means,
    not the strings PyYAML's YAML 1.1 rules make of them (those need a dot: ``1.0e-5``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml_text(text: str) -> Any:
    """Parse YAML text as configs are read (:class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=0.1"`` → ``("optim.lr", 0.1)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError([f"--set expects KEY=VALUE, got {text!r}"])
    key, raw = text.split("=", 1)
    return key.strip(), load_yaml_text(raw)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"])
    try:
        data = load_yaml_text(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path} is not valid YAML: {exc}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping"])
    return data


def recipe_dirs() -> list[Path]:
    """Where tuned recipes are looked up: ``$SELFSUP_RECIPES`` (``:``-separated), ``./configs`` and the
    ``configs/`` folder of the selfsup checkout this package was imported from."""
    dirs = [Path(p) for p in os.environ.get("SELFSUP_RECIPES", "").split(os.pathsep) if p]
    dirs += [Path("configs"), Path(__file__).resolve().parents[1] / "configs"]
    seen, out = set(), []
    for d in dirs:
        key = d.resolve()
        if key not in seen and d.is_dir():
            seen.add(key)
            out.append(d)
    return out


def find_recipe(method: str, dataset: str, dirs: list[Path] | None = None) -> Path | None:
    """The tuned recipe ``<method>_<dataset>.yaml`` (``fashion-mnist`` → ``fashion_mnist``) for a named
    dataset, or None (image folders and paths have no per-dataset recipe)."""
    if not dataset or "/" in dataset or os.sep in dataset or Path(dataset).exists():
        return None
    name = f"{method}_{dataset.replace('-', '_')}.yaml"
    for d in recipe_dirs() if dirs is None else dirs:
        if (Path(d) / name).is_file():
            return Path(d) / name
    return None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """A recipe from YAML (optional), then dotted overrides on top (flags win). An override naming another
    backbone than the recipe's drops the recipe's ``backbone.params`` (they are that backbone's arguments, e.g.
    small_resnet's widths for ``--backbone torchvision:resnet18``), said in the log; ``backbone.params.*``
    overrides still apply."""
    data = read_yaml(path) if path else {}
    backbone = data.get("backbone") if isinstance(data.get("backbone"), dict) else {}
    name = (overrides or {}).get("backbone.name")
    if name is not None and backbone.get("name") not in (None, name) and backbone.get("params"):
        dropped = ", ".join(sorted(backbone.pop("params")))
        logging.getLogger("selfsup").info(f"recipe: {path}'s backbone.params ({dropped}) are {backbone['name']}'s: "
                                          f"not used for {name}")
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return config_from_dict(data)
