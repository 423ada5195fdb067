"""A trained encoder read back whole and frozen: from a selfsup run directory or from a ``selfsup export`` file.

What a distillation teacher is made from (:mod:`selfsup.methods.distill`). Two layouts are read, each a weights
file plus a JSON description of the architecture and the input normalisation:

- a run directory: ``RUN/encoder.pt`` (the backbone's state dict) and ``RUN/encoder.json`` (``backbone``,
  ``params``, ``in_chans``, ``image_size``, ``num_features``, ``mean``, ``std``), as pretraining writes them;
  ``RUN/encoder.pt`` itself names the same run;
- an export: ``ENC.pt`` or ``ENC.safetensors`` and its sidecar ``ENC.pt.json`` (``backbone``,
  ``backbone_params``, ``in_chans``, ``image_size``, ``num_features``, ``mean``, ``std``), as ``selfsup export``
  writes them (in the backbone library's keys).

The architecture is rebuilt with :func:`~selfsup.nn.backbones.build_backbone` and the weights loaded strictly with
:func:`~selfsup.nn.weights.load_weights` (weights-only reads: a file with pickled code is refused). Reading the
JSON alone (:func:`find_encoder`) is cheap: the run's config records the source before anything is built.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from selfsup.nn.backbones import BackboneError, build_backbone
from selfsup.nn.weights import LoadedWeights, WeightsError, file_sha256, load_weights

RUN_FILES = ("encoder.pt", "encoder.json")
DESCRIPTION_KEYS = ("backbone", "in_chans", "image_size", "mean", "std")


class EncoderFileError(ValueError):
    """A path that does not hold a readable encoder; the message (one line) says what is missing and what to give."""


@dataclass(frozen=True)
class EncoderSource:
    """Where an encoder comes from and what it expects: its architecture and the normalisation of its inputs."""

    path: Path
    """As the user named it, made absolute: a run directory or an exported weights file."""
    weights: Path
    """The file holding the weights (``RUN/encoder.pt`` or the export itself): what :meth:`sha256` identifies."""
    backbone: str
    params: dict[str, Any]
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_features: int | None = None
    description: dict[str, Any] = field(default_factory=dict, compare=False)

    def sha256(self) -> str:
        return file_sha256(self.weights)

    def summary(self) -> str:
        width = f", {self.num_features}-d" if self.num_features else ""
        return f"{self.backbone}{width}, {self.in_chans} channel(s) at {self.image_size} px"


def find_encoder(path: str | os.PathLike[str]) -> EncoderSource:
    """The encoder at ``path`` (a run directory, its ``encoder.pt``, or an export with its ``.json`` sidecar),
    described from its JSON without reading the weights. Raises :class:`EncoderFileError`."""
    given = Path(path).expanduser()
    p = given.resolve()
    if not p.exists():
        raise EncoderFileError(f"{given}: no such file or directory; give a selfsup run directory (it holds "
                               "encoder.pt and encoder.json) or a file written by `selfsup export RUN`")
    if p.is_dir():
        missing = [n for n in RUN_FILES if not (p / n).is_file()]
        if missing:
            hint = (" (pretraining did not finish: run the same `selfsup pretrain` again to resume it)"
                    if (p / "config.yaml").is_file() else "")
            raise EncoderFileError(f"{p} is not a finished selfsup run: it has no {' or '.join(missing)}{hint}; "
                                   "give a run directory or a file written by `selfsup export RUN`")
        return _source(p, p / "encoder.pt", p / "encoder.json", "params")
    if p.suffix.lower() == ".onnx":
        raise EncoderFileError(f"{p} is an ONNX graph, which PyTorch cannot train against; give the run directory, or "
                               "export it with `selfsup export RUN --format pt` (or safetensors)")
    sidecar = p.with_name(p.name + ".json")
    if sidecar.is_file():
        return _source(p, p, sidecar, "backbone_params")
    if p.name == "encoder.pt" and (p.parent / "encoder.json").is_file():  # a run's own encoder file
        return _source(p.parent, p, p.parent / "encoder.json", "params")
    raise EncoderFileError(f"{p} has no {sidecar.name} beside it, so its architecture and input normalisation are "
                           "unknown; `selfsup export RUN` writes both files (or give the run directory itself)")


def _source(path: Path, weights: Path, description: Path, params_key: str) -> EncoderSource:
    try:
        meta = json.loads(description.read_text())
    except (OSError, ValueError) as exc:
        raise EncoderFileError(f"{description} cannot be read as JSON: {exc}") from None
    missing = [k for k in DESCRIPTION_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise EncoderFileError(f"{description} lacks {', '.join(missing)}: it was not written by selfsup's pretrain "
                               "or export; re-export the run with `selfsup export RUN`")
    if meta.get("format") == "selfsup-encoder" and meta.get("file_format") == "onnx":
        raise EncoderFileError(f"{weights} is an ONNX export; export the run with --format pt or safetensors")
    return EncoderSource(path=path, weights=weights, backbone=str(meta["backbone"]),
                         params=dict(meta.get(params_key) or {}), in_chans=int(meta["in_chans"]),
                         image_size=int(meta["image_size"]), mean=tuple(float(v) for v in meta["mean"]),
                         std=tuple(float(v) for v in meta["std"]),
                         num_features=meta.get("num_features"), description=meta)


def load_frozen_encoder(source: EncoderSource) -> tuple[nn.Module, LoadedWeights]:
    """The encoder ``source`` describes, with its weights, every parameter frozen and in eval mode: (module, what
    :func:`~selfsup.nn.weights.load_weights` did). Raises :class:`EncoderFileError` (one line)."""
    try:
        encoder = build_backbone(source.backbone, source.in_chans, source.image_size, **source.params)
        loaded = load_weights(encoder, source.weights, strict=True)
    except (BackboneError, WeightsError, TypeError) as exc:
        raise EncoderFileError(f"the encoder at {source.path} cannot be rebuilt: {exc}") from None
    if source.num_features is not None and encoder.num_features != source.num_features:
        raise EncoderFileError(f"{source.path}: rebuilt {source.backbone} gives {encoder.num_features}-d features, "
                               f"its description says {source.num_features}")
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder.eval(), loaded
