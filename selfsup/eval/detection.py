"""Object detection: train torchvision's FCOS on labelled boxes, score it with COCO's AP (pycocotools).

Boxes are scored in each test image's original pixels (detections found on the letterboxed evaluation view are
mapped back), so COCO's small / medium / large areas mean what they mean on COCO. Crowd boxes (COCO ``iscrowd``,
VOC ``difficult``) are never trained on and are scored as COCO scores them: a detection on one is neither a hit nor
a false positive. Classes that no test box shows are left out of the mean, as pycocotools does.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from selfsup.data.dense import DenseSet
from selfsup.eval.dense import DenseSettings, fit, test_views
from selfsup.nn.dense_heads import build_fcos
from selfsup.views.dense import unletterbox_boxes

COCO_STATS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100", "AR_small",
              "AR_medium", "AR_large")


def build_detector(encoder: nn.Module, in_chans: int, image_size: int, num_classes: int, mean: Sequence[float],
                   std: Sequence[float], settings: DenseSettings, finetune: bool) -> nn.Module:
    return build_fcos(encoder, in_chans, image_size, num_classes, mean, std, freeze=not finetune,
                      levels=settings.detector_levels, width=settings.width)


def train_detector(model: nn.Module, train: DenseSet, settings: DenseSettings, seed: int,
                   device: torch.device) -> dict[str, Any]:
    """FCOS's own losses (focal classification, GIoU regression, centreness), summed; in place
    (:func:`~selfsup.eval.dense.fit`). Images whose crop kept no box train as negatives."""
    def loss_of(views, labels):
        targets = [{"boxes": b.to(device), "labels": lab.to(device)} for b, lab in zip(views.boxes, labels)]
        return sum(model(list(views.images), targets).values())

    return fit(model, train, settings, seed, device, loss_of)


def _sizes(test: DenseSet) -> Tensor:
    """(N, 2) original (width, height); without recorded sizes, the square records' side."""
    if test.sizes is not None:
        return test.sizes
    side = test.images.stored_size
    aspect = test.images.aspect if test.images.aspect is not None else torch.ones(len(test))
    return torch.stack([(aspect * side).round().long(), torch.full((len(test),), side)], dim=1)


def coco_ground_truth(test: DenseSet) -> dict[str, Any]:
    """The test split's boxes as a COCO dataset dict (pixels of each original image)."""
    sizes = _sizes(test)
    images, annotations = [], []
    for i in range(len(test)):
        w, h = sizes[i].tolist()
        images.append({"id": i, "width": w, "height": h})
        boxes, labels, crowd = test.boxes_of(i)
        for b, lab, c in zip(boxes.tolist(), labels.tolist(), crowd.tolist()):
            x0, y0, x1, y1 = b[0] * w, b[1] * h, b[2] * w, b[3] * h
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(lab),
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": int(c)})
    categories = [{"id": c, "name": name} for c, name in enumerate(test.classes) if c > 0]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_scores(ground_truth: dict[str, Any], detections: list[dict[str, Any]], classes: Sequence[str]) -> dict[str, Any]:
    """COCOeval's twelve numbers (AP at IoU .50:.95, .50, .75, by area; AR) and the AP of each class."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        if not detections or not ground_truth["annotations"]:
            return {**{k: 0.0 for k in COCO_STATS}, "per_class_ap": {}, "detections": len(detections)}
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {k: max(0.0, float(v)) for k, v in zip(COCO_STATS, ev.stats)}  # -1: no box of that size
    precision = ev.eval["precision"][:, :, :, 0, -1]  # IoU × recall × class, all areas, 100 detections
    per_class = {}
    for k, cat in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        per_class[classes[cat]] = float(np.mean(p[p > -1])) if (p > -1).any() else None
    return {**stats, "per_class_ap": per_class, "detections": len(detections)}


@torch.no_grad()
def score_detector(model: nn.Module, test: DenseSet, device: torch.device,
                   examples: int = 8) -> tuple[dict[str, Any], dict[str, Any]]:
    """COCO scores on the whole test split, and the first ``examples`` images' views with their truth and
    detections (view pixels) for the report."""
    size = test.images.image_size
    sizes = _sizes(test)
    results: list[dict[str, Any]] = []
    shown: dict[str, list] = {"images": [], "truth": [], "truth_labels": [], "boxes": [], "labels": [], "scores": []}
    model.eval()
    for idx, views, truth_labels, _ in test_views(test, size, device, batch_size=32):
        outputs = model(list(views.images))
        for j, (i, out) in enumerate(zip(idx.tolist(), outputs)):
            w, h = sizes[i].tolist()
            boxes = unletterbox_boxes(out["boxes"].cpu().float(), views.crops[j].cpu(), size, w, h)
            for b, s, lab in zip(boxes.tolist(), out["scores"].tolist(), out["labels"].tolist()):
                results.append({"image_id": i, "category_id": int(lab), "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                                "score": float(s)})
            if len(shown["images"]) < examples:
                shown["images"].append((views.images[j] * 255).round().to(torch.uint8).cpu())
                shown["truth"].append(views.boxes[j])
                shown["truth_labels"].append(truth_labels[j])
                shown["boxes"].append(out["boxes"].cpu())
                shown["labels"].append(out["labels"].cpu())
                shown["scores"].append(out["scores"].cpu())
    return coco_scores(coco_ground_truth(test), results, test.classes), shown
