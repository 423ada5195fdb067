"""The dense protocols: their scores against hand-computed cases and pycocotools' own conventions, label subsets
that leave no class without an example, and every protocol end to end on small procedural scenes (frozen encoders
stay unchanged, the run's encoder is never touched, a trained head beats the trivial prediction)."""
from __future__ import annotations


import pytest
import torch

from conftest import TINY_BACKBONES
from selfsup.config import ModelConfig, RunConfig
from selfsup.data.dense import IGNORE, DenseSet, dense_label_subset
from selfsup.data.imageset import ImageSet
from selfsup.data.scenes import SceneSettings, make_scenes
from selfsup.eval.dense import DENSE_PROTOCOLS, DenseSettings
from selfsup.eval.dense_eval import run_dense_protocol
from selfsup.eval.detection import coco_ground_truth, coco_scores
from selfsup.eval.segmentation import confusion, scores
from selfsup.train.build import build_encoder
from selfsup.train.rundir import LoadedRun


# ------------------------------------------------------------------------------------------------- scores


def test_segmentation_scores_follow_the_confusion_matrix():
    truth = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    m = confusion(pred, truth, 4)
    assert int(m.sum()) == 7  # the ignored pixel is not scored
    s = scores(m, ["bg", "a", "b", "never"])
    # bg: TP 1, FP 1 (a 2 predicted as 0), FN 1 → 1/3; a: TP 3, FP 1, FN 0 → 3/4; b: TP 1, FN 1 → 1/2
    assert s["per_class_iou"] == {"bg": pytest.approx(1 / 3), "a": pytest.approx(3 / 4), "b": pytest.approx(1 / 2),
                                  "never": None}
    assert s["mIoU"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)  # a class never present nor predicted: no IoU
    assert s["pixel_accuracy"] == pytest.approx(5 / 7)


def _one_image_set(boxes, labels, crowd=None, side=100) -> DenseSet:
    images = ImageSet(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    return DenseSet(images, ["background", "cat", "dog"], boxes=torch.tensor(boxes, dtype=torch.float32) / side,
                    box_labels=torch.tensor(labels), box_start=torch.tensor([0, len(labels)]),
                    box_crowd=None if crowd is None else torch.tensor(crowd), sizes=torch.tensor([[side, side]]))


def test_coco_scores_perfect_partial_and_crowd_cases():
    test = _one_image_set([[10, 10, 50, 50], [60, 60, 90, 90]], [1, 2])
    gt = coco_ground_truth(test)
    assert gt["annotations"][0]["bbox"] == pytest.approx([10, 10, 40, 40])
    det = lambda b, c, s=0.9: {"image_id": 0, "category_id": c, "bbox": b, "score": s}
    perfect = coco_scores(gt, [det([10, 10, 40, 40], 1), det([60, 60, 30, 30], 2)], test.classes)
    assert perfect["AP"] == pytest.approx(1.0) and perfect["AP50"] == pytest.approx(1.0)
    assert perfect["per_class_ap"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    # the dog found with IoU 0.6: a hit at .5, a miss at .75
    shifted = coco_scores(gt, [det([10, 10, 40, 40], 1), det([66, 60, 30, 30], 2)], test.classes)
    assert shifted["AP50"] == pytest.approx(1.0) and shifted["AP75"] < 1.0 and shifted["AP"] < perfect["AP"]
    assert coco_scores(gt, [], test.classes)["AP"] == 0.0
    # a detection on a crowd box is neither a hit nor a false positive
    crowd = _one_image_set([[10, 10, 50, 50], [60, 60, 90, 90]], [1, 1], crowd=[False, True])
    with_crowd = coco_scores(coco_ground_truth(crowd), [det([10, 10, 40, 40], 1), det([60, 60, 30, 30], 1, 0.95)],
                             crowd.classes)
    assert with_crowd["AP"] == pytest.approx(1.0)


# -------------------------------------------------------------------------------------------- label subsets


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(None, SceneSettings(size=32, n_train=96, n_test=24, seed=3))


def test_label_fractions_cover_every_class_and_shots_count_images_per_class(scenes):
    train, _ = scenes
    presence = train.class_presence()
    shown = set(presence.any(0).nonzero().flatten().tolist())
    for fraction in ("1%", "10%"):
        idx = dense_label_subset(train, fraction, seed=0)
        assert set(presence[idx].any(0).nonzero().flatten().tolist()) == shown  # no class left without an example
        assert len(idx) >= max(1, round(float(fraction[:-1]) / 100 * len(train)))
        assert torch.equal(idx, dense_label_subset(train, fraction, seed=0))  # reproducible from its seed
    two = dense_label_subset(train, "2-shot", seed=0)
    assert all(int(presence[two, c].sum()) >= 2 for c in shown)


def test_scenes_are_deterministic_and_annotations_match_their_pixels(scenes):
    train, test = scenes
    again, _ = make_scenes.__wrapped__(None, SceneSettings(size=32, n_train=96, n_test=24, seed=3))
    assert torch.equal(train.images.images, again.images.images) and torch.equal(train.boxes, again.boxes)
    for i in range(10):
        boxes, labels, _ = train.boxes_of(i)
        inst = train.instances.images[i, 0]
        sem = train.masks.images[i, 0]
        for k, (b, lab) in enumerate(zip(boxes, labels)):
            ys, xs = (inst == k + 1).nonzero().T
            assert torch.allclose(b * 32, torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float())
            assert (sem[inst == k + 1] == lab).all()  # an instance's pixels carry its class
    assert (train.images.labels >= 0).all() and train.classes[0] == "background" and test.num_classes == 11


# ------------------------------------------------------------------------------------------------- end to end


def _run(image_size: int) -> LoadedRun:
    cfg = RunConfig(backbone=ModelConfig("small_resnet", dict(TINY_BACKBONES["small_resnet"], stem_stride=1)))
    torch.manual_seed(7)
    encoder = build_encoder(cfg, 1, image_size)
    return LoadedRun(cfg, encoder, {"in_chans": 1, "image_size": image_size, "mean": [0.3], "std": [0.2]})


@pytest.mark.parametrize("protocol", DENSE_PROTOCOLS)
def test_every_dense_protocol_end_to_end_on_scenes(protocol, scenes):
    train, test = scenes
    run = _run(32)
    before = {k: v.clone() for k, v in run.encoder.state_dict().items()}
    settings = DenseSettings(min_steps=6, max_steps=6, batch_size=16, width=32)
    result, examples = run_dense_protocol(run, protocol, train, test, seed=0, settings=settings)
    assert result["metric"] == ("mIoU" if protocol.startswith("segmentation") else "AP")
    baseline = "from_scratch" if protocol.endswith("_finetune") else "random_encoder"
    assert 0 <= result["score"] <= 1 and 0 <= result["baselines"][baseline] <= 1
    assert result["margin"] == pytest.approx(result["score"] - result["baselines"][baseline])
    assert result["details"]["selfsup"]["training"]["steps"] == 6
    assert all(torch.equal(before[k], v) for k, v in run.encoder.state_dict().items())  # the run's encoder untouched
    assert len(examples["images"]) == 8
    if protocol.startswith("segmentation"):
        assert examples["prediction"].shape == examples["truth"].shape == (8, 32, 32)
        assert set(result["details"]["selfsup"]["per_class_iou"]) == set(test.classes)
    else:
        assert {"AP", "AP50", "AP75"} <= set(result["details"]["selfsup"])


def test_a_trained_linear_head_beats_predicting_the_background(scenes):
    train, test = scenes
    settings = DenseSettings(min_steps=150, max_steps=150, batch_size=32, lr=3e-3, levels=3)  # stride 1, 2, 4 maps
    result, _ = run_dense_protocol(_run(32), "segmentation", train, test, seed=0, settings=settings, baselines=False)
    masks = test.masks.images.flatten()
    share = float((masks == 0).float().mean())
    present = len(masks.unique())
    trivial = share / present  # all background: IoU = its pixel share for the background, 0 for the other classes
    # a tiny random encoder on 96 scenes: the head must still find the objects better than saying "background"
    assert result["details"]["selfsup"]["mIoU"] > trivial + 0.01, (result["details"]["selfsup"]["mIoU"], trivial)
