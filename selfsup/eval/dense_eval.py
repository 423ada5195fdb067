"""One dense protocol on a run's encoder, beside its baseline, as one result (what ``evaluate_run`` writes).

Frozen protocols (``segmentation``, ``detection``) compare with a frozen randomly initialised encoder of the same
architecture (the same weights for every run of that backbone and seed); fine-tuned ones (``*_finetune``) with the
same network trained from scratch with the same recipe, steps, data order and augmentation draws, so the gap is
what pretraining bought. Each encoder is a fresh copy: the run's own is never changed.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from selfsup.data.dense import DenseSet
from selfsup.eval.dense import DENSE_PROTOCOLS, METRICS, DenseSettings
from selfsup.eval.detection import build_detector, score_detector, train_detector
from selfsup.eval.segmentation import build_segmenter, score_segmenter, train_segmenter
from selfsup.train.build import build_encoder
from selfsup.train.rundir import LoadedRun


def _encoder(run: LoadedRun, pretrained: bool, seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)  # a random encoder: the same weights for every run of this backbone and seed
    encoder = build_encoder(run.cfg, run.meta["in_chans"], run.meta["image_size"])
    if pretrained:
        encoder.load_state_dict(run.encoder.state_dict())
    return encoder.to(device)


def _one(run: LoadedRun, protocol: str, pretrained: bool, train: DenseSet, test: DenseSet, seed: int,
         device: torch.device, settings: DenseSettings) -> tuple[dict[str, Any], Any]:
    """(scores and training figures, examples for the report) of one encoder under ``protocol``."""
    finetune = protocol.endswith("_finetune")
    encoder = _encoder(run, pretrained, seed, device)
    mean, std = run.meta["mean"], run.meta["std"]
    size, chans = run.meta["image_size"], run.meta["in_chans"]
    torch.manual_seed(seed)  # the head's initialisation
    if protocol.startswith("segmentation"):
        model = build_segmenter(encoder, chans, size, test.num_classes, settings, finetune)
        fit = train_segmenter(model, train, settings, mean, std, seed, device)
        found, examples = score_segmenter(model, test, mean, std, device)
    else:
        model = build_detector(encoder, chans, size, test.num_classes, mean, std, settings, finetune)
        fit = train_detector(model, train, settings, seed, device)
        found, examples = score_detector(model, test, device)
    return {**found, "training": fit}, examples


def run_dense_protocol(run: LoadedRun, protocol: str, train: DenseSet, test: DenseSet, seed: int = 0,
                       device: torch.device | str = "cpu", settings: DenseSettings | None = None,
                       baselines: bool = True) -> tuple[dict[str, Any], Any]:
    """The result of ``protocol`` (``score`` in ``metric``: mIoU or AP, with every figure under ``details``) and
    the pretrained encoder's example predictions for the report."""
    if protocol not in DENSE_PROTOCOLS:
        raise ValueError(f"not a dense protocol: {protocol!r}")
    settings = settings or DenseSettings()
    device = torch.device(device)
    metric = METRICS[protocol]
    details, examples = {}, None
    details["selfsup"], examples = _one(run, protocol, True, train, test, seed, device, settings)
    baseline = "from_scratch" if protocol.endswith("_finetune") else "random_encoder"
    if baselines:
        details[baseline], _ = _one(run, protocol, False, train, test, seed, device, settings)
    result = {"protocol": protocol, "metric": metric, "score": details["selfsup"][metric],
              "baselines": {k: v[metric] for k, v in details.items() if k != "selfsup"},
              "details": details, "settings": settings.to_dict(len(train)), "classes": list(test.classes),
              "time_s": {k: v["training"]["time_s"] for k, v in details.items()}}
    if baselines:
        result["margin"] = result["score"] - result["baselines"][baseline]
    return result, examples
