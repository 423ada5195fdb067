"""Initialise a backbone from a weights file users already have: a state dict saved from torchvision or timm, from
a selfsup backbone or run (``encoder.pt``), or written by ``selfsup export``.

Reading is safe: ``.safetensors`` through the safetensors library, everything else (``.pt``, ``.pth``, ``.bin``)
with ``torch.load(weights_only=True)``, so a file carrying pickled code is refused, never run.

Keys are matched in the layout of the backbone's library (a ``torchvision:``/``timm:`` backbone's ``net``, selfsup's
own networks as they are). A file whose tensors sit under one prefix (``module.`` of DDP, ``state_dict.``/``model.``
of a training checkpoint, selfsup's ``net.``) is unwrapped when exactly one prefix fits the backbone best, and
said so. Loading is strict: every backbone tensor must come from the file with its shape, except that

- a classifier the file holds (``fc.*``, ``classifier.*``, ``head.*``, ``heads.*`` with no counterpart in the
  backbone) is dropped, since selfsup's backbones have none;
- the input conv is adapted to the data's channels with timm's ``adapt_input_conv`` (3 → 1: the RGB filters
  summed, so a grey image x gives what (x, x, x) gave; 3 → N: repeated and scaled by 3/N);
- a ViT's absolute position embedding is resampled to the backbone's patch grid (timm's
  ``resample_abs_pos_embed``, bicubic) when the file was trained at another image size.

``ignore`` names key prefixes neither taken nor required (those parts keep their fresh initialisation);
``strict=False`` loads what fits and lists the rest. Each departure from a plain strict load is one line of
:attr:`LoadedWeights.notes`.
"""
from __future__ import annotations

import hashlib
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from selfsup.nn.adapters import LibraryBackbone

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
CLASSIFIER_PREFIXES = ("fc", "classifier", "head", "heads")
"""Where torchvision's and timm's classification models keep their classifier."""
MIN_UNWRAP_SHARE = 0.5
"""A prefix is stripped only when the tensors under it cover at least this share of the backbone's."""


class WeightsError(ValueError):
    """A weights file that cannot initialise this backbone; the message (one line) says why and what to do."""


@dataclass
class LoadedWeights:
    """What :func:`load_weights` did: tensors copied out of the backbone's, and each departure from a strict load."""

    path: Path
    loaded: int
    total: int
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"loaded {self.loaded} of the backbone's {self.total} tensors from {self.path}"


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shorten(items: Iterable[str], n: int = 4) -> str:
    items = list(items)
    head = ", ".join(items[:n])
    return head + (f" and {len(items) - n} more" if len(items) > n else "")


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(map(str, t.shape)) + ")"


# ---------------------------------------------------------------------------------------------------- reading


def _is_safetensors(path: Path) -> bool:
    """By suffix, or by content: an 8-byte little-endian header length, then the JSON header."""
    if path.suffix.lower() == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < path.stat().st_size


def _tensors(obj: Any, prefix: str = "") -> dict[str, Tensor]:
    """Every tensor in nested dicts, under dotted keys; other values (epochs, lists, strings) are skipped."""
    out: dict[str, Tensor] = {}
    if isinstance(obj, Tensor):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}{k}."))
    return out


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file, by dotted key (a checkpoint's nested dicts flattened: ``model.conv1.weight``)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}" if not path.exists() else f"{path} is not a file")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError, and OSError
            raise WeightsError(f"{path} is not a readable safetensors file: {str(exc).splitlines()[0]}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        bad = re.search(r"invalid load key[^.\n]*|Unsupported operand \d+", str(exc))
        if bad:  # not a pickle at all
            raise WeightsError(f"{path} is not a PyTorch ({'/'.join(TORCH_SUFFIXES)}) or safetensors weights file "
                               f"(truncated or of another format?): {bad.group(0)}") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
        what = f" ({found.group(1)})" if found else f" ({detail.group(1).strip()})" if detail else ""
        raise WeightsError(f"refusing {path}: it holds pickled Python objects{what}, which loading would run as code "
                           "(selfsup reads weights with torch.load(weights_only=True)); save the model's state_dict() "
                           "(tensors only) or convert it to safetensors") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise WeightsError(f"{path} is not a PyTorch ({'/'.join(TORCH_SUFFIXES)}) or safetensors weights file "
                           f"(truncated or of another format?): {str(exc).splitlines()[0]}") from None
    tensors = _tensors(obj)
    if not tensors:
        raise WeightsError(f"{path} holds no tensors (it is a {type(obj).__name__}); a state dict is a mapping of "
                           "parameter names to tensors, e.g. torch.save(model.state_dict(), PATH)")
    return tensors


# ---------------------------------------------------------------------------------------------------- matching


def _matching_prefix(keys: list[str], wanted: set[str], path: Path) -> str:
    """The prefix whose removal makes the most file keys backbone keys: ``""`` unless another one covers at least
    half of the backbone's keys and beats no prefix; two prefixes that fit equally well are refused."""
    score: dict[str, int] = {"": sum(k in wanted for k in keys)}
    for k in keys:
        parts = k.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i]) + "."
            score[prefix] = score.get(prefix, 0) + (k[len(prefix):] in wanted)
    best = max(score.values())
    if best <= score[""] or best < MIN_UNWRAP_SHARE * len(wanted):
        return ""
    tied = sorted(p for p, s in score.items() if s == best)
    if len(tied) > 1:
        raise WeightsError(f"{path} holds several sets of tensors that fit this backbone equally well (under "
                           f"{_shorten(repr(p) for p in tied)}): save the one you want as its own state dict")
    return tied[0]


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p.rstrip(".") + ".") for p in prefixes)


def _adapt_input_conv(key: str, value: Tensor, own: Tensor, in_chans: int, first_conv: str | None) -> tuple[Tensor, str] | None:
    """The file's input conv for ``in_chans`` channels (timm's ``adapt_input_conv``), when only that differs."""
    if (key != first_conv or value.dim() != 4 or own.shape[1] != in_chans or value.shape[1] == in_chans
            or value.shape[:1] + value.shape[2:] != own.shape[:1] + own.shape[2:]):
        return None
    from timm.models import adapt_input_conv

    src = value.shape[1]
    how = "the filters summed over the file's channels, so a grey image x gives what (x, x, x) gave" if in_chans == 1 \
        else f"the filters repeated and scaled by {src}/{in_chans}"
    return (adapt_input_conv(in_chans, value, base_chans=src),
            f"{key}: the file's {src} input channels adapted to the data's {in_chans} ({how}; timm's adapt_input_conv)")


def _resample_pos_embed(key: str, value: Tensor, own: Tensor, module: nn.Module) -> tuple[Tensor, str] | None:
    """A ViT's absolute position embedding (timm layout ``pos_embed``: 1 × tokens × D) resampled to the backbone's
    patch grid, when the file was trained at another image size."""
    grid = getattr(getattr(module, "patch_embed", None), "grid_size", None)
    if key != "pos_embed" or grid is None or value.dim() != 3 or value.shape[2] != own.shape[2]:
        return None
    prefix = 0 if getattr(module, "no_embed_class", False) else int(getattr(module, "num_prefix_tokens", 0))
    if own.shape[1] != prefix + grid[0] * grid[1]:
        return None
    side = math.isqrt(value.shape[1] - prefix)
    if side * side != value.shape[1] - prefix:
        return None
    from timm.layers import resample_abs_pos_embed

    resampled = resample_abs_pos_embed(value, new_size=list(grid), old_size=[side, side], num_prefix_tokens=prefix)
    return resampled, (f"pos_embed: resampled from the file's {side}×{side} patch grid to the backbone's "
                       f"{grid[0]}×{grid[1]} (bicubic, timm's resample_abs_pos_embed)")


def _replaced_hint(keys: list[str], backbone: nn.Module) -> str:
    """Why a mismatched tensor differs when selfsup rebuilt that module for the data (a ResNet's small-image stem)."""
    replaced = dict(getattr(backbone, "replaced", []) or [])
    hit = next((p for p in replaced if any(_under(k, [p]) for k in keys)), None)
    if hit is None:
        return ""
    if hit == "conv1" and "maxpool" in replaced:
        return ("; conv1 is selfsup's small-image stem (a 3×3 stride-1 conv, on at ≤ 64 px): set "
                "backbone.params.small_images=false to keep the file's stem, or backbone.weights_ignore=[conv1] to "
                "train it from scratch")
    return f"; selfsup rebuilt {hit} for this data ({replaced[hit]})"


def target_module(backbone: nn.Module) -> nn.Module:
    """The module whose keys a weights file uses: the torchvision/timm model inside selfsup's wrapper, else the
    backbone itself (what ``selfsup export`` writes too)."""
    return backbone.net if isinstance(backbone, LibraryBackbone) else backbone


def load_weights(backbone: nn.Module, path: str | Path, *, strict: bool = True, ignore: Iterable[str] = (),
                 in_chans: int | None = None) -> LoadedWeights:
    """Copy the tensors of the weights file at ``path`` into ``backbone`` (in place); see the module docstring.

    Raises :class:`WeightsError` (one line) for a missing or unreadable file, pickled code, and, when ``strict``,
    any backbone tensor the file lacks, any file tensor the backbone lacks, and any shape that differs.
    """
    path = Path(path)
    ignore = [str(p) for p in ignore]
    module = target_module(backbone)
    own = {k: v for k, v in module.state_dict().items() if not _under(k, ignore)}
    in_chans = in_chans if in_chans is not None else getattr(backbone, "in_chans", None)
    tensors = read_weights(path)
    notes: list[str] = []

    prefix = _matching_prefix(list(tensors), set(own), path)
    if prefix:
        others = sum(not k.startswith(prefix) for k in tensors)
        notes.append(f"took the tensors under {prefix!r}" + (f" ({others} other tensor(s) of the file ignored: a "
                     "wrapped checkpoint)" if others else " (the prefix removed from every key)"))
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    skipped = [k for k in tensors if _under(k, ignore)]
    if skipped:
        notes.append(f"weights_ignore: {len(skipped)} tensor(s) of the file not taken ({_shorten(skipped)})")
    tensors = {k: v for k, v in tensors.items() if not _under(k, ignore)}
    head = [k for k in tensors if k not in own and k.split(".", 1)[0] in CLASSIFIER_PREFIXES]
    if head:
        notes.append(f"dropped the file's classifier ({_shorten(head)}): selfsup's backbones end at the pooled features")
        tensors = {k: v for k, v in tensors.items() if k not in head}

    first_conv = next((k for k, v in own.items() if v.dim() == 4), None)
    mismatched: list[str] = []
    for key in [k for k in tensors if k in own and tensors[k].shape != own[k].shape]:
        adapted = (_adapt_input_conv(key, tensors[key], own[key], in_chans, first_conv) if in_chans else None) \
            or _resample_pos_embed(key, tensors[key], own[key], module)
        if adapted is not None:
            tensors[key], note = adapted
            notes.append(note)
        else:
            mismatched.append(key)
    missing = [k for k in own if k not in tensors and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in tensors if k not in own]
    fits = {k: v for k, v in tensors.items() if k in own and k not in mismatched}
    name = getattr(backbone, "name", None) or type(backbone).__name__
    problems = []
    if missing:
        problems.append(f"{len(missing)} backbone tensor(s) missing from the file ({_shorten(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} file tensor(s) the backbone does not have ({_shorten(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} of another shape ("
                        + _shorten(f"{k}: file {_shape(tensors[k])}, backbone {_shape(own[k])}" for k in mismatched)
                        + ")")
    if not fits:
        raise WeightsError(f"{path} does not fit backbone {name}: none of its {len(tensors)} tensor(s) matches one of "
                           f"the backbone's by name and shape (the file's keys look like {_shorten(list(tensors), 3)}; "
                           f"the backbone's like {_shorten(list(own), 3)}): is it another architecture?")
    if problems and strict:
        raise WeightsError(f"{path} does not fit backbone {name}: " + "; ".join(problems) + _replaced_hint(
            mismatched, backbone) + ". Is it the right architecture? backbone.weights_ignore=[PREFIX] leaves a part at "
            "its initialisation; backbone.weights_strict=false loads what fits")
    if problems:
        notes.append("weights_strict=false: " + "; ".join(problems) + " — those backbone tensors keep their "
                     "initialisation")
    with torch.no_grad():
        module.load_state_dict(fits, strict=False)
    return LoadedWeights(path, len(fits), len(module.state_dict()), notes)
