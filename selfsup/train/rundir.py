"""The run directory: resolved config, environment, metrics log and the resume decision."""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from selfsup.config import ConfigError, RunConfig

# Keys that may differ between a run and its resumption without changing what is computed.
RESUME_FREE_KEYS = {("train", "progress"), ("train", "log_every"), ("train", "device"), ("train", "threads"),
                    ("train", "stop_on_collapse")}


def versions() -> dict[str, str]:
    import numpy
    import torchvision

    from selfsup import __version__

    return {"selfsup": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__}


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
            if path + (k,) in RESUME_FREE_KEYS:
                continue
            out += _differences(a.get(k), b.get(k), path + (k,))
        return out
    return [] if a == b else [f"{'.'.join(map(str, path))}: {a!r} → {b!r}"]


def check_resumable(run_dir: Path, cfg: RunConfig) -> None:
    """A run directory with a checkpoint may only be resumed with the same config."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError([f"{run_dir} has checkpoints but no config.yaml; use another --out"])
    saved = yaml.safe_load(saved_path.read_text())
    diff = _differences(saved, cfg.to_dict())
    if diff:
        raise ConfigError([f"{run_dir} holds a run with a different config; resume it with the same settings, "
                           "or choose another --out (or pass --overwrite to start it again). Differences: "
                           + "; ".join(diff)])


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line; on resume, lines after the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
