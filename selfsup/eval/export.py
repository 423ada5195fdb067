"""Export a run's encoder as a plain state dict (``selfsup export``), loadable without selfsup.

The keys are always those of the library the encoder came from, without selfsup's wrapper prefix
``net.``: torchvision's models (``resnet18``/``resnet50`` and every ``torchvision:NAME``), timm's
(every ``timm:NAME``, and timm's ``VisionTransformer`` for the ``vit_tiny``/``vit_small`` ViTs), or
:class:`selfsup.nn.backbones.SmallResNet` (a plain ``nn.Module`` whose short definition can be copied).

Formats: ``pt`` (``torch.save``) and ``safetensors`` write those weights; ``torchvision`` and ``timm``
write the same weights (``.pt``, or safetensors when ``--out`` ends in ``.safetensors``) after checking
that they come from that library, so a run trained with a ``timm:`` backbone is never handed out as a
torchvision model. ``onnx`` writes the encoder as an ONNX graph (:mod:`selfsup.eval.export_onnx`). A JSON file
beside the weights records the library, the exact constructor call that
``load_state_dict(..., strict=True)`` accepts them into (classifier removed, stem as trained, input
channels and size), and the normalisation the encoder expects (mean/std of the pretraining data).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from selfsup import __version__
from selfsup.config import ConfigError
from selfsup.nn.adapters import LibraryBackbone
from selfsup.nn.vit import is_vit
from selfsup.train.checkpoint import CheckpointError, atomic_save
from selfsup.train.rundir import LoadedRun

# format → default file suffix; torchvision/timm are checked library formats written as .pt
FORMATS = {"pt": ".pt", "safetensors": ".safetensors", "torchvision": ".pt", "timm": ".pt", "onnx": ".onnx"}
LIBRARY_FORMATS = ("torchvision", "timm")


@dataclasses.dataclass
class Constructor:
    """How to build, without selfsup, the module the exported weights load into (strict):
    ``net = call(*args, **kwargs)``, then each (dotted path, expression) in ``replace`` assigned in order."""

    library: str  # "torchvision", "timm" or "selfsup"
    call: str
    args: list[Any]
    kwargs: dict[str, Any]
    replace: list[tuple[str, str]]

    def code(self) -> str:
        """The Python statements, e.g. ``net = torchvision.models.resnet18(weights=None); net.fc = torch.nn.Identity()``."""
        arguments = ", ".join([repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()])
        return "; ".join([f"net = {self.call}({arguments})"] + [f"{_attr_path(p)} = {e}" for p, e in self.replace])

    def to_dict(self) -> dict[str, Any]:
        return {"call": self.call, "args": self.args, "kwargs": self.kwargs, "replace": [list(r) for r in self.replace]}


def _attr_path(path: str) -> str:
    """``"classifier.3"`` → ``"net.classifier[3]"`` (a Sequential's numbered children are indexed)."""
    return "net" + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in path.split("."))


def plain_module(encoder: nn.Module) -> nn.Module:
    """The module whose keys the export uses: the torchvision/timm model inside selfsup's wrapper."""
    return encoder.net if isinstance(encoder, LibraryBackbone) else encoder


def plain_state_dict(encoder: nn.Module) -> dict[str, Tensor]:
    """Contiguous, unshared CPU copies (safetensors refuses views and shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in plain_module(encoder).state_dict().items()}


def constructor(run: LoadedRun) -> Constructor:
    """The constructor the run's encoder weights load into, without selfsup."""
    enc, meta = run.encoder, run.meta
    if isinstance(enc, LibraryBackbone):
        if enc.library == "torchvision":
            module = "torchvision.models.video" if getattr(enc, "input_kind", "images") == "clips" else "torchvision.models"
            return Constructor("torchvision", f"{module}.{enc.arch}", [], {"weights": None, **enc.kwargs},
                               list(enc.replaced))
        return Constructor("timm", "timm.create_model", [enc.arch], {"pretrained": False, **enc.kwargs}, list(enc.replaced))
    if is_vit(enc):
        blk = enc.blocks[0]
        kwargs = {"img_size": meta["image_size"], "patch_size": enc.patch_size, "in_chans": meta["in_chans"],
                  "num_classes": 0, "embed_dim": enc.embed_dim, "depth": len(enc.blocks), "num_heads": blk.attn.num_heads,
                  "mlp_ratio": blk.mlp.fc1.out_features / enc.embed_dim, "class_token": True,
                  "global_pool": "token" if enc.pool_kind == "cls" else "avg", "fc_norm": False}
        if enc.num_registers:  # DINOv2's options change the parameters (stochastic depth does not)
            kwargs["reg_tokens"] = enc.num_registers
        if not isinstance(blk.ls1, nn.Identity):
            # any value builds the LayerScale parameters the weights load into; the run's keeps it exact
            kwargs["init_values"] = float(run.cfg.backbone.params.get("layer_scale") or 1e-5)
        return Constructor("timm", "timm.models.vision_transformer.VisionTransformer", [], kwargs, [])
    return Constructor("selfsup", f"{type(enc).__module__}.{type(enc).__name__}", [],
                       {"in_chans": meta["in_chans"], **run.cfg.backbone.params}, [])


def export_metadata(run: LoadedRun, file_format: str = "pt") -> dict[str, Any]:
    m = run.meta
    ctor = constructor(run)
    architecture = ctor.code()
    if ctor.library == "selfsup":
        architecture += " (a plain nn.Module: copy its definition to use it without selfsup)"
    return {"format": "selfsup-encoder", "selfsup_version": __version__, "method": run.cfg.method.name,
            "backbone": run.cfg.backbone.name, "backbone_params": run.cfg.backbone.params,
            "in_chans": m["in_chans"], "image_size": m["image_size"], "num_features": m.get("num_features"),
            "mean": m["mean"], "std": m["std"], "file_format": file_format, "library": ctor.library,
            "architecture": architecture, "constructor": ctor.to_dict(),
            "input": "float images in [0, 1], normalised per channel with (x - mean) / std"}


def resolve_format(fmt: str | None, out: str | Path | None) -> str:
    if fmt is None:
        suffix = Path(out).suffix.lower() if out else ""
        return {".safetensors": "safetensors", ".onnx": "onnx"}.get(suffix, "pt")
    if fmt not in FORMATS:
        raise ConfigError([f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}"])
    return fmt


def check_library(run: LoadedRun, fmt: str) -> None:
    """``--format torchvision``/``timm`` only for weights that load into that library's constructor."""
    if fmt not in LIBRARY_FORMATS:
        return
    ctor = constructor(run)
    if ctor.library == fmt:
        return
    name = run.cfg.backbone.name
    if ctor.library == "selfsup":
        raise ConfigError([f"--format {fmt}: this run's backbone {name!r} is selfsup's own network, not a {fmt} model; "
                           "export it with --format pt or safetensors (the JSON beside the weights says how to build it)"])
    raise ConfigError([f"--format {fmt}: this run's backbone {name!r} is a {ctor.library} model (its weights load into "
                       f"{ctor.call}), not a {fmt} one; export it with --format {ctor.library}"])


def export_encoder(run: LoadedRun, out: str | Path, fmt: str | None = None) -> tuple[Path, Path]:
    """Write the weights to ``out`` and their description to ``out`` + ``.json``; returns both paths."""
    out = Path(out)
    fmt = resolve_format(fmt, out)
    if fmt == "onnx":
        from selfsup.eval.export_onnx import export_onnx

        return export_onnx(run, out, export_metadata(run, "onnx"))
    check_library(run, fmt)
    container = "safetensors" if fmt == "safetensors" or (fmt in LIBRARY_FORMATS and out.suffix.lower() == ".safetensors") else "pt"
    state = plain_state_dict(run.encoder)
    meta = export_metadata(run, container)
    out.parent.mkdir(parents=True, exist_ok=True)
    if container == "safetensors":
        from safetensors.torch import save_file

        # safetensors metadata is str → str
        try:
            save_file(state, str(out), metadata={k: json.dumps(v) for k, v in meta.items()})
        except OSError as exc:
            raise CheckpointError(f"could not write {out}: {exc}") from None
    else:
        atomic_save(state, out)
    sidecar = out.with_name(out.name + ".json")
    sidecar.write_text(json.dumps(meta, indent=2))
    return out, sidecar
