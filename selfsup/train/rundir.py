"""The run directory, written and read: resolved config, environment, metrics log, the resume decision, and
loading a finished run's encoder (or whole method) back."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn

from selfsup import __version__
from selfsup.config import ConfigError, RunConfig, compile_mode, config_from_dict
from selfsup.train.build import build_encoder, build_method
from selfsup.train.checkpoint import CheckpointError, check_compatible, safe_load

if TYPE_CHECKING:
    from selfsup.train.trackers import Trackers

ENCODER_META_KEYS = ("in_chans", "image_size", "mean", "std")

# Keys that may differ between a run and its resumption without changing what is computed.
# (backbone.weights_sha256: a resumed run continues from its checkpoint; its weights file may have changed or gone.)
RESUME_FREE_KEYS = {("train", "progress"), ("train", "log_every"), ("train", "device"), ("train", "threads"),
                    ("train", "stop_on_collapse"), ("backbone", "weights_sha256"), ("train", "loggers"),
                    ("train", "tracking_uri"), ("train", "experiment")}
# The one key that may grow: the run is then continued for more epochs (check_resumable).
EPOCHS_KEY = ("train", "epochs")


def versions() -> dict[str, str]:
    """Versions of what a run depends on; torchvision's from its package metadata (importing it costs ~1 s)."""
    import importlib.metadata

    import numpy

    try:
        torchvision = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        torchvision = "not installed"
    return {"selfsup": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision, "numpy": numpy.__version__}


def write_env(run_dir: Path, device: torch.device, seed: int, world: int, extra: dict[str, Any]) -> None:
    env = {"versions": versions(), "seed": seed, "device": str(device), "threads": torch.get_num_threads(),
           "world_size": world, "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "command": " ".join(sys.argv), **extra}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    (run_dir / "env.json").write_text(json.dumps(env, indent=2))


def _differences(a: Any, b: Any, path: tuple = ()) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if path + (k,) in RESUME_FREE_KEYS or path + (k,) == EPOCHS_KEY:
                continue
            out += _differences(a.get(k), b.get(k), path + (k,))
        return out
    return [] if a == b else [f"{'.'.join(map(str, path))}: {a!r} → {b!r}"]


def check_resumable(run_dir: Path, cfg: RunConfig) -> int:
    """A run directory with a checkpoint may only be resumed with the same config, except that ``train.epochs``
    may grow (the run is then continued for more epochs: :class:`~selfsup.schedules.Horizon`). Returns the
    saved run's epochs."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError([f"{run_dir} has checkpoints but no config.yaml; use another --out"])
    saved = yaml.safe_load(saved_path.read_text())
    if isinstance(saved, dict) and isinstance(saved.get("train"), dict) and "compile" in saved["train"]:
        saved["train"]["compile"] = compile_mode(saved["train"]["compile"])  # runs saved with compile: true/false
    new = cfg.to_dict()
    new["train"]["compile"] = compile_mode(new["train"]["compile"])
    diff = _differences(saved, new)
    if diff:
        raise ConfigError([f"{run_dir} holds a run with a different config; resume it with the same settings "
                           "(only --epochs may grow, to continue it), or choose another --out (or pass --overwrite "
                           "to start it again). Differences: " + "; ".join(diff)])
    epochs = (saved.get("train") or {}).get("epochs")
    if not isinstance(epochs, int):
        raise ConfigError([f"{saved_path} has no train.epochs; use another --out"])
    if cfg.train.epochs < epochs:
        raise ConfigError([f"{run_dir} holds a run of {epochs} epochs: it can be continued for more epochs, not "
                           f"cut to {cfg.train.epochs}. Pass --epochs {epochs} (or more) to resume it, or choose "
                           "another --out."])
    return epochs


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line; on resume, lines after the checkpoint are dropped.

    The one writer of a run's records: each also goes to the run's experiment trackers, when it has any
    (``trackers``: a :class:`~selfsup.train.trackers.Trackers`, set once they are open)."""

    def __init__(self, path: Path, enabled: bool = True, trackers: Trackers | None = None):
        self.path = path
        self.enabled = enabled
        self.trackers = trackers

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.trackers is not None:
                self.trackers.log(record)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


@dataclasses.dataclass
class LoadedRun:
    cfg: RunConfig
    encoder: nn.Module
    meta: dict[str, Any]


def load_run(run_dir: str | Path, device: torch.device | str = "cpu") -> LoadedRun:
    """The run's config and its final encoder (``encoder.pt``, loaded weights-only)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}")
    for name in ("config.yaml", "encoder.json"):
        if not (run_dir / name).is_file():
            raise CheckpointError(f"{run_dir} is not a selfsup run directory (no {name})")
    try:
        cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
        meta = json.loads((run_dir / "encoder.json").read_text())
    except (ConfigError, yaml.YAMLError, json.JSONDecodeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{run_dir} cannot be read by selfsup {__version__}{_written_by(run_dir)}: "
                              f"{exc}") from None
    missing = [k for k in ENCODER_META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CheckpointError(f"{run_dir}/encoder.json lacks {', '.join(missing)}{_written_by(run_dir)}; "
                              f"re-run `selfsup pretrain` with selfsup {__version__} to evaluate it")
    if not (run_dir / "encoder.pt").is_file():
        raise CheckpointError(f"{run_dir} has no encoder.pt: pretraining did not finish. Run the same "
                              "`selfsup pretrain` command again to resume it from its last checkpoint.")
    encoder = build_encoder(cfg, meta["in_chans"], meta["image_size"])
    state = safe_load(run_dir / "encoder.pt")
    try:
        encoder.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{run_dir}/encoder.pt does not fit backbone {cfg.backbone.name!r}"
                              f"{_written_by(run_dir)}: {str(exc).splitlines()[0]}") from None
    return LoadedRun(cfg, encoder.to(device), meta)


def load_method(run: LoadedRun, run_dir: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """The whole trained method (heads, decoder, classifier) from ``checkpoints/last.pt``, weights-only;
    for what needs more than the encoder (reconstructions, pretext accuracy)."""
    path = Path(run_dir) / "checkpoints" / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: the run kept no training checkpoint")
    method = build_method(run.cfg, run.meta["in_chans"], run.meta["image_size"], weights=False,
                          stats=(run.meta["mean"], run.meta["std"]))
    ckpt = safe_load(path)
    check_compatible(ckpt, run.cfg.method.name, run.cfg.backbone.name)
    try:
        method.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path} does not fit method {run.cfg.method.name!r}: "
                              f"{str(exc).splitlines()[0]}") from None
    return method.to(device)


def _written_by(run_dir: Path) -> str:
    """`` (written by selfsup X)`` from the run's env.json, or nothing when unknown."""
    try:
        version = json.loads((run_dir / "env.json").read_text())["versions"]["selfsup"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return f" (written by selfsup {version})" if version != __version__ else ""
