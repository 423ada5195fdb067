"""Export a run's encoder as a plain state dict (``.pt``) or safetensors (``selfsup export``).

The keys are those of the architecture the encoder came from, so the file loads without selfsup:
torchvision's ``resnet18``/``resnet50`` (selfsup's wrapper prefix ``net.`` is stripped), timm's
``VisionTransformer`` for the ViTs, and :class:`selfsup.nn.backbones.SmallResNet` (a plain
``nn.Module`` whose short definition can be copied). A JSON file beside the weights records how
to build that module and the normalisation the encoder expects (mean/std of the pretraining data).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from selfsup import __version__
from selfsup.config import ConfigError
from selfsup.train.rundir import LoadedRun
from selfsup.nn.backbones import TorchvisionResNet
from selfsup.train.checkpoint import CheckpointError, atomic_save

FORMATS = {"pt": ".pt", "safetensors": ".safetensors"}


def plain_module(encoder: nn.Module) -> nn.Module:
    """The module whose keys the export uses: the torchvision ResNet inside selfsup's wrapper."""
    return encoder.net if isinstance(encoder, TorchvisionResNet) else encoder


def plain_state_dict(encoder: nn.Module) -> dict[str, Tensor]:
    """Contiguous, unshared CPU copies (safetensors refuses views and shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in plain_module(encoder).state_dict().items()}


def architecture(run: LoadedRun) -> str:
    """How to build, without selfsup, a module that ``load_state_dict`` accepts these weights into."""
    enc, meta = run.encoder, run.meta
    c = meta["in_chans"]
    if isinstance(enc, TorchvisionResNet):
        arch = run.cfg.backbone.name
        if isinstance(enc.net.maxpool, nn.Identity):
            stem = f"net.conv1 = torch.nn.Conv2d({c}, 64, 3, 1, 1, bias=False); net.maxpool = torch.nn.Identity(); "
        elif c != 3:
            stem = f"net.conv1 = torch.nn.Conv2d({c}, 64, 7, 2, 3, bias=False); "
        else:
            stem = ""
        return f"net = torchvision.models.{arch}(weights=None); {stem}net.fc = torch.nn.Identity()"
    if hasattr(enc, "patch_embed") and hasattr(enc, "blocks"):
        blk = enc.blocks[0]
        mlp_ratio = blk.mlp.fc1.out_features / enc.embed_dim
        pool = "token" if getattr(enc, "pool_kind", "cls") == "cls" else "avg"
        return (f"net = timm.models.vision_transformer.VisionTransformer(img_size={meta['image_size']}, "
                f"patch_size={enc.patch_size}, in_chans={c}, num_classes=0, embed_dim={enc.embed_dim}, "
                f"depth={len(enc.blocks)}, num_heads={blk.attn.num_heads}, mlp_ratio={mlp_ratio:g}, "
                f"class_token=True, global_pool='{pool}', fc_norm=False)")
    params = ", ".join(f"{k}={v!r}" for k, v in run.cfg.backbone.params.items())
    return (f"net = selfsup.nn.backbones.{type(enc).__name__}(in_chans={c}{', ' + params if params else ''}) "
            "(a plain nn.Module: copy its definition to use it without selfsup)")


def export_metadata(run: LoadedRun) -> dict[str, Any]:
    m = run.meta
    return {"format": "selfsup-encoder", "selfsup_version": __version__, "method": run.cfg.method.name,
            "backbone": run.cfg.backbone.name, "backbone_params": run.cfg.backbone.params,
            "in_chans": m["in_chans"], "image_size": m["image_size"], "num_features": m.get("num_features"),
            "mean": m["mean"], "std": m["std"], "architecture": architecture(run),
            "input": "float images in [0, 1], normalised per channel with (x - mean) / std"}


def resolve_format(fmt: str | None, out: str | Path | None) -> str:
    if fmt is None:
        suffix = Path(out).suffix.lower() if out else ""
        return "safetensors" if suffix == ".safetensors" else "pt"
    if fmt not in FORMATS:
        raise ConfigError([f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}"])
    return fmt


def export_encoder(run: LoadedRun, out: str | Path, fmt: str | None = None) -> tuple[Path, Path]:
    """Write the weights to ``out`` and their description to ``out`` + ``.json``; returns both paths."""
    out = Path(out)
    fmt = resolve_format(fmt, out)
    state = plain_state_dict(run.encoder)
    meta = export_metadata(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
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
