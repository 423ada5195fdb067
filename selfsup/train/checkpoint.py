"""Checkpoints: written atomically, loaded safely.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over
the old one, so a crash or a full disk at any moment leaves the previous complete checkpoint in
place. Loading uses ``torch.load(weights_only=True)``: tensors, numbers, strings and containers
only, so a file carrying pickled code is refused instead of executed.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or must not be loaded; the message says why."""


def atomic_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            kept = "the previous checkpoint is intact" if path.exists() else "no earlier checkpoint existed"
            raise CheckpointError(f"could not write {path} ({exc.strerror or exc}); {kept}") from exc
        raise


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain data "
            f"(possibly code), which weights-only loading does not run. Detail: {str(exc).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {exc}") from None


def check_compatible(ckpt: dict, method: str, backbone: str) -> None:
    """Refuse a checkpoint of another method or backbone, naming the mismatch."""
    meta = ckpt.get("meta", {}) if isinstance(ckpt, dict) else {}
    problems = []
    if meta.get("format") != FORMAT_VERSION:
        problems.append(f"format version {meta.get('format')!r} (this selfsup reads {FORMAT_VERSION})")
    if meta.get("method") != method:
        problems.append(f"method {meta.get('method')!r}, not {method!r}")
    if meta.get("backbone") != backbone:
        problems.append(f"backbone {meta.get('backbone')!r}, not {backbone!r}")
    if problems:
        raise CheckpointError("checkpoint does not match this run: it was written for " + "; ".join(problems))
