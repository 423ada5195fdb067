"""Evaluate a run's encoder on frozen features, beside raw-pixel and random-encoder baselines.

Protocols: ``knn`` (weighted kNN, k = 20, T = 0.07) and ``linear`` (logistic regression on
standardised features). Both baselines are measured in the same call on the same split, so a
table never compares against a number from elsewhere.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from torch import Tensor, nn

from selfsup.config import ConfigError, DataConfig, RunConfig, config_from_dict
from selfsup.data import DataError, ImageSet, load_dataset
from selfsup.data.splits import parse_fraction, stratified_subset
from selfsup.eval.features import extract_features, pixel_features
from selfsup.eval.knn import knn_accuracy
from selfsup.eval.linear import linear_probe
from selfsup.train.build import build_encoder
from selfsup.train.checkpoint import CheckpointError, safe_load

PROTOCOLS = ("knn", "linear")


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
    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    meta = json.loads((run_dir / "encoder.json").read_text())
    if not (run_dir / "encoder.pt").is_file():
        raise CheckpointError(f"{run_dir} has no encoder.pt: pretraining did not finish. Run the same "
                              "`selfsup pretrain` command again to resume it from its last checkpoint.")
    encoder = build_encoder(cfg, meta["in_chans"], meta["image_size"])
    state = safe_load(run_dir / "encoder.pt")
    try:
        encoder.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{run_dir}/encoder.pt does not fit backbone {cfg.backbone.name!r}: "
                              f"{str(exc).splitlines()[0]}") from None
    return LoadedRun(cfg, encoder.to(device), meta)


def _check_compatible(images: ImageSet, meta: dict[str, Any]) -> None:
    if images.channels != meta["in_chans"]:
        raise DataError(f"the encoder takes {meta['in_chans']}-channel images, the evaluation data has "
                        f"{images.channels}; use data with the same channels")


def evaluate_features(protocol: str, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                      num_classes: int, seed: int = 0) -> float:
    if protocol == "knn":
        return knn_accuracy(train_x, train_y, test_x, test_y, num_classes)
    if protocol == "linear":
        return linear_probe(train_x, train_y, test_x, test_y, num_classes, seed=seed)["accuracy"]
    raise ConfigError([f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}"])


def evaluate_run(run_dir: str | Path, protocols: Sequence[str] = PROTOCOLS, data: str | None = None,
                 data_root: str | None = None, labels: str | None = None, device: str = "cpu",
                 seed: int = 0, write: bool = True) -> list[dict[str, Any]]:
    """One result dict per protocol; each is also written to ``RUN/eval_<protocol>.json``."""
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ConfigError([f"unknown protocol(s) {', '.join(unknown)}; choose from {', '.join(PROTOCOLS)}"])
    run = load_run(run_dir, device)
    data_cfg = dataclasses.replace(run.cfg.data, limit=None)
    if data:
        data_cfg = DataConfig(name=data, root=data_root, image_size=run.meta["image_size"])
    train, test = load_dataset(data_cfg)
    if train.labels is None or test.labels is None or len(test) == 0:
        raise DataError(f"{data_cfg.name} has no labelled test split to evaluate on (image folders need class subfolders)")
    _check_compatible(train, run.meta)
    amount = parse_fraction(labels) if labels else None
    if amount is not None and amount != 1.0:
        train = train.subset(stratified_subset(train.labels, amount, seed))
    mean, std = run.meta["mean"], run.meta["std"]
    torch.manual_seed(seed)
    random_encoder = build_encoder(run.cfg, run.meta["in_chans"], run.meta["image_size"]).to(device)
    features = {
        "selfsup": [extract_features(run.encoder, s, mean, std, device) for s in (train, test)],
        "random_encoder": [extract_features(random_encoder, s, mean, std, device) for s in (train, test)],
        "raw_pixels": [pixel_features(s, mean, std) for s in (train, test)],
    }
    results = []
    for protocol in protocols:
        acc = {name: evaluate_features(protocol, tr, train.labels, te, test.labels, train.num_classes, seed)
               for name, (tr, te) in features.items()}
        result = {"protocol": protocol, "accuracy": acc["selfsup"],
                  "baselines": {"raw_pixels": acc["raw_pixels"], "random_encoder": acc["random_encoder"]},
                  "method": run.cfg.method.name, "backbone": run.cfg.backbone.name, "dataset": data_cfg.name,
                  "labels": labels or "100%", "n_train": len(train), "n_test": len(test)}
        results.append(result)
        if write:
            suffix = "" if not labels else f"_{str(labels).replace('%', 'pct')}"
            (Path(run_dir) / f"eval_{protocol}{suffix}.json").write_text(json.dumps(result, indent=2))
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    header = ["protocol", "dataset", "labels", f"selfsup ({results[0]['method']})" if results else "selfsup",
              "random encoder", "raw pixels"]
    rows = [[r["protocol"], r["dataset"], r["labels"], f"{100 * r['accuracy']:.2f}%",
             f"{100 * r['baselines']['random_encoder']:.2f}%", f"{100 * r['baselines']['raw_pixels']:.2f}%"]
            for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
