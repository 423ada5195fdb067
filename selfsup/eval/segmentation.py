"""Semantic segmentation: train a segmenter on labelled masks, score it on the test split.

Scores (the conventions of mmsegmentation, which DINOv2's and VICRegL's linear protocols report): a confusion
matrix over every scored pixel of the test split (ignored and padding pixels left out), then per class
IoU = TP / (TP + FP + FN), mIoU the mean over classes with a non-empty union (a class neither present nor
predicted has no IoU), pixel accuracy = Σ TP / scored pixels, and mean class accuracy over classes present.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.data.dense import IGNORE, DenseSet
from selfsup.eval.dense import DenseSettings, fit, test_views
from selfsup.monitor.features import eval_mode
from selfsup.nn.dense_heads import LinearSegHead, MapEncoder, SemanticFPNHead, Segmenter
from selfsup.nn.feature_maps import map_levels
from selfsup.views import normalize


def build_segmenter(encoder: nn.Module, in_chans: int, image_size: int, num_classes: int, settings: DenseSettings,
                    finetune: bool) -> Segmenter:
    """Frozen: the linear head on the last ``settings.levels`` maps; fine-tuned: the semantic-FPN decoder on the
    last ``settings.decoder_levels`` (a ViT: its last blocks, all at one stride)."""
    levels = settings.decoder_levels if finetune else settings.levels
    found = map_levels(encoder, in_chans, image_size, levels)
    channels = [lv.channels for lv in found]
    head = SemanticFPNHead(channels, num_classes, settings.width) if finetune else LinearSegHead(channels, num_classes)
    return Segmenter(MapEncoder(encoder, len(found), freeze=not finetune), head)


def train_segmenter(model: Segmenter, train: DenseSet, settings: DenseSettings, mean: Sequence[float],
                    std: Sequence[float], seed: int, device: torch.device) -> dict[str, Any]:
    """Cross-entropy on the scored pixels (ignore index 255); in place (:func:`~selfsup.eval.dense.fit`)."""
    return fit(model, train, settings, seed, device, lambda views, _: F.cross_entropy(
        model(normalize(views.images, mean, std)), views.masks, ignore_index=IGNORE))


def confusion(pred: Tensor, truth: Tensor, num_classes: int) -> Tensor:
    """(num_classes, num_classes) int64 counts, rows the truth, columns the prediction, over scored pixels."""
    keep = truth != IGNORE
    t, p = truth[keep].long(), pred[keep].long()
    inside = t < num_classes
    return torch.bincount(t[inside] * num_classes + p[inside], minlength=num_classes**2).view(num_classes, num_classes)


def scores(matrix: Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """mIoU, per-class IoU (None: empty union), pixel accuracy and mean class accuracy from a confusion matrix."""
    m = matrix.double()
    tp = m.diag()
    union = m.sum(0) + m.sum(1) - tp
    present = m.sum(1)
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(present > 0, tp / present.clamp(min=1), torch.full_like(tp, float("nan")))
    valid = ~torch.isnan(iou)
    return {"mIoU": float(iou[valid].mean()) if valid.any() else float("nan"),
            "per_class_iou": {name: (None if torch.isnan(v) else float(v)) for name, v in zip(classes, iou)},
            "pixel_accuracy": float(tp.sum() / m.sum().clamp(min=1)),
            "mean_class_accuracy": float(acc[~torch.isnan(acc)].mean()) if (~torch.isnan(acc)).any() else float("nan"),
            "scored_pixels": int(m.sum())}


@torch.no_grad()
def score_segmenter(model: nn.Module, test: DenseSet, mean: Sequence[float], std: Sequence[float],
                    device: torch.device, examples: int = 8) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Scores on the whole test split, and the first ``examples`` images' views, truths and predictions (uint8)
    for the report's overlays."""
    size = test.images.image_size
    total = torch.zeros(test.num_classes, test.num_classes, dtype=torch.long)
    shown: dict[str, list[Tensor]] = {"images": [], "truth": [], "prediction": []}
    with eval_mode(model):
        for idx, views, _, _ in test_views(test, size, device):
            pred = model(normalize(views.images, mean, std)).argmax(1)
            total += confusion(pred.cpu(), views.masks.cpu(), test.num_classes)
            left = examples - sum(len(t) for t in shown["images"])
            if left > 0:
                shown["images"].append((views.images[:left] * 255).round().to(torch.uint8).cpu())
                shown["truth"].append(views.masks[:left].clamp(max=255).to(torch.uint8).cpu())
                shown["prediction"].append(pred[:left].to(torch.uint8).cpu())
    return scores(total, test.classes), {k: torch.cat(v) if v else torch.zeros(0) for k, v in shown.items()}
