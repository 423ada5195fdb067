"""Evaluate a run's encoder on frozen features, beside raw-pixel and random-encoder baselines.

Protocols: ``knn`` (weighted kNN, k = 20, T = 0.07) and ``linear`` (logistic regression on
standardised features). Both baselines are measured in the same call on the same split, so a
table never compares against a number from elsewhere. Raw pixels are the evaluation view area-averaged
to at most 32×32 (``monitor.features.RAW_PIXELS_MAX_SIDE``; Fashion-MNIST and CIFAR unchanged), so the
baseline of a large folder of big images fits in memory. ``finetune`` (asked for by name) trains the
encoder end to end with a linear head, beside the same architecture trained from scratch on the
same labels with the same recipe (:mod:`selfsup.eval.finetune`).

``split="val"`` evaluates on the images the run held out of pretraining (``data.val_size``, drawn with the
run's seed) and fits on every other labelled training image: figures to choose a recipe by, with the test
split kept for the final ones.

Frozen-feature results also describe the test split's embeddings of the encoder and of each
baseline (dimension and effective rank, RankMe): a collapsed encoder shows there as a low rank.
``selfsup bench`` calls :func:`evaluate_run` for every method, so its figures and ``selfsup
evaluate``'s come from one code path and are written by one writer (:func:`write_eval_result`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from selfsup.config import ConfigError
from selfsup.data import DataError, ImageSet, load_dataset, pretraining_holdout
from selfsup.data.clips import ClipSet, for_encoder, is_clips
from selfsup.data.annotations import dense_config, is_dense_source, load_dense
from selfsup.data.dense import DenseSet, check_dense, dense_label_subset
from selfsup.eval.dense import DENSE_PROTOCOLS, DenseSettings
from selfsup.eval.dense_eval import run_dense_protocol
from selfsup.data.splits import parse_fraction, sample_indices, stratified_subset
from selfsup.monitor.features import extract_features, pixel_features
from selfsup.eval.finetune import FinetuneSettings, check_layer_decay, finetune_accuracy
from selfsup.monitor.diagnostics import effective_rank
from selfsup.monitor.knn import knn_accuracy
from selfsup.eval.linear import linear_probe
from selfsup.train.build import build_encoder
from selfsup.train.checkpoint import atomic_save
from selfsup.train.rundir import LoadedRun, load_run

PROTOCOLS = ("knn", "linear")
"""The default protocols (frozen features)."""
ALL_PROTOCOLS = PROTOCOLS + ("finetune",)
BASELINES = ("raw_pixels", "random_encoder")
"""The frozen baselines, measured beside the encoder in the same call."""
CLIP_BASELINES = BASELINES + ("single_frame", "shuffled_frames")
"""A clip encoder's: also ``single_frame`` (the centre frame's pixels, as raw pixels: appearance alone) and
``shuffled_frames`` (the encoder itself on the same clips with their frames in a fixed shuffled order: what it
makes of the clip without the frames' order). An encoder that only matches ``single_frame`` on a motion label has
learned appearance, not motion."""
SPLITS = ("test", "val")
"""What is evaluated on: the dataset's test split, or the images the run held out of pretraining."""


def _check_compatible(images: ImageSet, meta: dict[str, Any]) -> None:
    if images.channels != meta["in_chans"]:
        raise DataError(f"the encoder takes {meta['in_chans']}-channel images, the evaluation data has "
                        f"{images.channels}; use data with the same channels")


def protocol_result(protocol: str, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                    num_classes: int, seed: int = 0) -> dict[str, float]:
    """``{"accuracy": …}``; the linear probe adds the L2 strength its path chose (``"l2"``)."""
    if protocol == "knn":
        return {"accuracy": knn_accuracy(train_x, train_y, test_x, test_y, num_classes)}
    if protocol == "linear":
        return linear_probe(train_x, train_y, test_x, test_y, num_classes, seed=seed)
    raise ConfigError([f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}"])


def evaluate_features(protocol: str, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                      num_classes: int, seed: int = 0) -> float:
    return protocol_result(protocol, train_x, train_y, test_x, test_y, num_classes, seed)["accuracy"]


def evaluate_run(run_dir: str | Path, protocols: Sequence[str] = PROTOCOLS, data: str | None = None,
                 data_root: str | None = None, labels: str | None = None, device: str = "cpu",
                 seed: int = 0, write: bool = True, finetune_settings: FinetuneSettings | None = None, *,
                 eval_limit: int | None = None, baselines: bool = True,
                 source: str = "selfsup evaluate", split: str = "test",
                 dense_settings: DenseSettings | None = None, target: str | None = None) -> list[dict[str, Any]]:
    """One result dict per protocol; each is also written to ``RUN/eval_<protocol>[_<labels>].json``.

    ``labels`` is a fraction (``"1%"``) or a few-shot count (``"5-shot"``) of the training split,
    drawn class by class with ``seed``. Features are extracted only for what the protocols need.

    - ``eval_limit``: fit on a random subset of that many labelled training images (drawn with
      ``seed``, before ``labels``), to bound the cost on a large dataset; the test split stays whole.
    - ``baselines=False``: the encoder alone; no random encoder, raw pixels or training from scratch
      (the results' ``baselines`` are empty), for a caller that needs only the encoder's figures.
    - ``source``: what produced the figures, stored in each result (the HTML report states it).
    - ``split="val"``: test on the run's held-out images (:func:`~selfsup.data.pretraining_holdout`) and fit on
      the rest of the labelled training split, for choosing settings without touching the test split; the
      results are written to ``eval_<protocol>[_<labels>]_val.json``.

    ``target``: which labels the image-level protocols predict — the class (``None``) or another label the data
    carries (a clip set's ``extra_labels``: ``direction``, ``family`` on Moving Fashion-MNIST); results and their
    files name it. A clip encoder is evaluated on the clip it was trained on (``encoder.json``'s ``clip``), beside
    :data:`CLIP_BASELINES`.

    A ``knn``/``linear`` result's ``test_embeddings`` holds, per feature set (``selfsup`` and each
    baseline), the dimension and effective rank of the test split's features.

    The dense protocols (:data:`~selfsup.eval.dense.DENSE_PROTOCOLS`: ``segmentation``, ``detection`` and their
    ``_finetune`` variants, :mod:`selfsup.eval.dense`) read dense annotations instead: the run's own data when it
    has them (``fashion-mnist-scenes``) or ``data`` (a VOC-style folder, a COCO source), at the encoder's image
    size; their result holds ``metric`` (mIoU or AP) and ``score`` instead of ``accuracy``, with
    ``dense_settings`` as the recipe.
    """
    unknown = [p for p in protocols if p not in ALL_PROTOCOLS + DENSE_PROTOCOLS]
    if unknown:
        raise ConfigError([f"unknown protocol(s) {', '.join(unknown)}; choose from "
                           f"{', '.join(ALL_PROTOCOLS + DENSE_PROTOCOLS)}"])
    if split not in SPLITS:
        raise ConfigError([f"unknown split {split!r}; choose from {', '.join(SPLITS)}"])
    if split == "val" and data:
        raise ConfigError(["--split val evaluates on the images the run held out of its own pretraining data; "
                           "it cannot be combined with --data (evaluate another dataset on its test split)"])
    dense = [p for p in protocols if p in DENSE_PROTOCOLS]
    if dense and split == "val":
        raise ConfigError([f"--split val is for the image-level protocols; {', '.join(dense)} score the test split"])
    run = load_run(run_dir, device)
    common = {"method": run.cfg.method.name, "backbone": run.cfg.backbone.name,
              "pretraining_epochs": run.cfg.train.epochs, "labels": labels or "100%", "seed": seed, "split": split,
              "source": source}
    done: dict[str, dict[str, Any]] = {}
    if dense:
        for result in _evaluate_dense(run, dense, data, data_root, labels, device, seed, eval_limit, baselines,
                                      dense_settings, common):
            done[result["protocol"]] = result
            examples = result.pop("_examples")
            if write:
                write_eval_result(run_dir, result["protocol"], labels, result, seed, split)
                write_examples(run_dir, result["protocol"], labels, examples, seed)
    flat = [p for p in protocols if p not in DENSE_PROTOCOLS]
    if flat:
        for result in _evaluate_flat(run, run_dir, flat, data, data_root, labels, device, seed, write,
                                     finetune_settings, eval_limit, baselines, source, split, target):
            done[result["protocol"]] = result
    return [done[p] for p in protocols]


def _evaluate_flat(run: LoadedRun, run_dir: str | Path, protocols: Sequence[str], data: str | None,
                   data_root: str | None, labels: str | None, device: str, seed: int, write: bool,
                   finetune_settings: FinetuneSettings | None, eval_limit: int | None, baselines: bool, source: str,
                   split: str, target: str | None = None) -> list[dict[str, Any]]:
    """The image-level protocols (knn, linear, finetune) of :func:`evaluate_run`."""
    if "finetune" in protocols and finetune_settings:
        check_layer_decay(run.encoder, finetune_settings)  # before any feature extraction or training
    data_cfg = run.cfg.data.labelled()
    if data:
        # another dataset at the encoder's size; the run's cache settings (data.cache_dir, ...) still apply
        data_cfg = dataclasses.replace(data_cfg, name=data, root=data_root, image_size=run.meta["image_size"])
    train, test = load_dataset(data_cfg)
    if split == "val":
        train, test = _heldout_split(train, run)
    train, test = (_as_evaluated(s, run.meta, target) for s in (train, test))
    if train.labels is None or test.labels is None or len(test) == 0:
        raise DataError(f"{data_cfg.name} has no labelled test split to evaluate on (image folders need class subfolders)")
    _check_compatible(train, run.meta)
    if eval_limit:
        train = train.subset(sample_indices(len(train), eval_limit, seed))
    amount = parse_fraction(labels) if labels else None
    # an int is a shot count: 1-shot must subsample even though 1 == 1.0
    if amount is not None and (isinstance(amount, int) or amount != 1.0):
        train = train.subset(stratified_subset(train.labels, amount, seed, classes=train.classes))
    mean, std = run.meta["mean"], run.meta["std"]
    random_encoder = None
    if baselines:
        torch.manual_seed(seed)  # the same random weights for every run of this backbone and seed
        random_encoder = build_encoder(run.cfg, run.meta["in_chans"], run.meta["image_size"]).to(device)
    extractors = {
        "selfsup": lambda s: extract_features(run.encoder, s, mean, std, device),
        "random_encoder": lambda s: extract_features(random_encoder, s, mean, std, device),
        "raw_pixels": lambda s: pixel_features(s, mean, std),
        "single_frame": lambda s: pixel_features(s.with_eval(frames="centre"), mean, std),
        "shuffled_frames": lambda s: extract_features(run.encoder, s.with_eval(frames="shuffled"), mean, std, device),
    }
    features: dict[str, list[Tensor]] = {}
    outcomes: dict[tuple[str, str], dict[str, float]] = {}

    def feature_pair(name: str) -> list[Tensor]:
        if name not in features:
            features[name] = [extractors[name](s) for s in (train, test)]
        return features[name]

    def outcome(protocol: str, name: str) -> dict[str, float]:
        if (protocol, name) not in outcomes:
            tr, te = feature_pair(name)
            outcomes[protocol, name] = protocol_result(protocol, tr, train.labels, te, test.labels,
                                                       train.num_classes, seed)
        return outcomes[protocol, name]

    def accuracy(protocol: str, name: str) -> float:
        return outcome(protocol, name)["accuracy"]

    ranks: dict[str, dict[str, Any]] = {}

    def test_embeddings(name: str) -> dict[str, Any]:
        if name not in ranks:
            te = feature_pair(name)[1]
            ranks[name] = {"dim": int(te.shape[1]), "effective_rank": effective_rank(te)}
        return ranks[name]

    names = ("selfsup",) + ((CLIP_BASELINES if is_clips(train) else BASELINES) if baselines else ())
    results = []
    for protocol in protocols:
        common = {"method": run.cfg.method.name, "backbone": run.cfg.backbone.name, "dataset": data_cfg.name,
                  "pretraining_epochs": run.cfg.train.epochs, "labels": labels or "100%", "seed": seed,
                  "split": split, "n_train": len(train), "n_test": len(test), "source": source,
                  **({"target": target} if target else {})}
        if protocol == "finetune":
            result = _finetune(run, train, test, seed, device, finetune_settings or FinetuneSettings(), baselines)
            # the frozen baselines of a fine-tune result are linear probes on the same labels
            result["baselines"].update({name: accuracy("linear", name) for name in names[1:]})
            result.update(common)
        else:
            result = {"protocol": protocol, "accuracy": accuracy(protocol, "selfsup"),
                      "baselines": {name: accuracy(protocol, name) for name in names[1:]},
                      "test_embeddings": {name: test_embeddings(name) for name in names}, **common}
            if protocol == "linear":  # the L2 strength each probe's path chose on its held-out 10%
                result["l2"] = {name: outcome(protocol, name)["l2"] for name in names}
        results.append(result)
        if write:
            write_eval_result(run_dir, protocol, labels, result, seed, split, target)
    return results


def _as_evaluated(data: ImageSet | ClipSet, meta: dict[str, Any], target: str | None) -> ImageSet | ClipSet:
    """The evaluation data as the encoder sees it (a clip set with the encoder's training clip as its view,
    :func:`~selfsup.data.clips.for_encoder`), labelled by ``target`` when one is named."""
    data = for_encoder(data, meta)
    if target:
        if not hasattr(data, "with_labels"):
            raise DataError(f"--target {target}: {data.name} has only its class labels")
        data = data.with_labels(target)
    return data


def _evaluate_dense(run: LoadedRun, protocols: Sequence[str], data: str | None, data_root: str | None,
                    labels: str | None, device: str, seed: int, eval_limit: int | None, baselines: bool,
                    settings: DenseSettings | None, common: dict[str, Any]) -> list[dict[str, Any]]:
    """The dense protocols of :func:`evaluate_run`; each result carries its report examples under ``_examples``."""
    data_cfg = dense_config(run.cfg.data, data, data_root, run.meta["image_size"])
    if data is None and not is_dense_source(data_cfg.name):
        raise DataError(f"{', '.join(protocols)} need dense annotations; the run was pretrained on {data_cfg.name!r}, "
                        "which has none: pass --data fashion-mnist-scenes, a VOC-style folder or a COCO source")
    train, test = load_dense(data_cfg)
    if len(test) == 0 or len(train) == 0:
        raise DataError(f"{data_cfg.name}: the dense protocols need annotated training and test images "
                        f"({len(train)} and {len(test)} here)")
    channels = run.meta["in_chans"]
    if train.images.channels != channels:
        train, test = _with_channels(train, channels), _with_channels(test, channels)
    if eval_limit:
        train = train.subset(sample_indices(len(train), eval_limit, seed))
    amount = parse_fraction(labels) if labels else None
    if amount is not None and (isinstance(amount, int) or amount != 1.0):
        train = train.subset(dense_label_subset(train, amount, seed))
    results = []
    for protocol in protocols:
        check_dense(train, protocol)
        result, examples = run_dense_protocol(run, protocol, train, test, seed, device, settings, baselines)
        result.update(common, dataset=data_cfg.name, n_train=len(train), n_test=len(test), _examples=examples)
        results.append(result)
    return results


def _with_channels(dense: DenseSet, channels: int) -> DenseSet:
    return dataclasses.replace(dense, images=dense.images.with_channels(channels))


def write_examples(run_dir: str | Path, protocol: str, labels: str | None, examples: Any, seed: int = 0) -> Path:
    """``RUN/eval_<protocol>[_<labels>][_seed<S>]_examples.pt``: the test images, truths and predictions the
    report draws (tensors and lists of tensors: loadable with ``weights_only``)."""
    path = eval_result_path(run_dir, protocol, labels, seed, "test", suffix="_examples.pt")
    atomic_save(examples, path)
    return path


def _heldout_split(train: ImageSet, run: LoadedRun) -> tuple[ImageSet, ImageSet]:
    """(every labelled training image the run did not hold out, the held-out ones)."""
    val = pretraining_holdout(train, run.cfg.data, run.cfg.train.seed)
    if len(val) == 0:
        raise DataError(f"the run held out no images (data.val_size: {run.cfg.data.val_size}); --split val needs a "
                        "run pretrained with data.val_size > 0")
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[val] = False
    return train.subset(keep.nonzero().flatten()), train.subset(val)


def write_eval_result(run_dir: str | Path, protocol: str, labels: str | None, result: dict[str, Any],
                      seed: int = 0, split: str = "test", target: str | None = None) -> Path:
    """``RUN/eval_<protocol>[_<target>][_<labels>][_val][_seed<S>].json`` (``1%`` → ``1pct``; seed 0 unnamed), the
    files the report reads: another seed's, split's or target's result sits beside seed 0's test result on the class
    instead of replacing it."""
    path = eval_result_path(run_dir, protocol if not target else f"{protocol}_{target}", labels, seed, split)
    path.write_text(json.dumps(result, indent=2))
    return path


def eval_result_path(run_dir: str | Path, protocol: str, labels: str | None, seed: int, split: str,
                     suffix: str = ".json") -> Path:
    name = "" if not labels else f"_{str(labels).replace('%', 'pct')}"
    name += "_val" if split == "val" else ""
    name += f"_seed{seed}" if seed else ""
    return Path(run_dir) / f"eval_{protocol}{name}{suffix}"


def _finetune(run: LoadedRun, train: ImageSet, test: ImageSet, seed: int, device: str,
              settings: FinetuneSettings, scratch: bool = True) -> dict[str, Any]:
    """The pretrained encoder (a copy: the run's stays untouched) and, with ``scratch``, a from-scratch
    one with the same recipe."""
    mean, std, d = run.meta["mean"], run.meta["std"], run.meta.get("num_features")
    # fresh modules loaded from the weights: the run's encoder stays untouched, and a module that went
    # through inference-mode feature extraction cannot be trained further
    pretrained = build_encoder(run.cfg, run.meta["in_chans"], run.meta["image_size"]).to(device)
    pretrained.load_state_dict(run.encoder.state_dict())
    d = d or pretrained.num_features
    ft = finetune_accuracy(pretrained, d, train, test, mean, std, settings, seed, device)
    if not scratch:
        return {"protocol": "finetune", "accuracy": ft["accuracy"], "baselines": {},
                "settings": settings.to_dict(len(train)), "time_s": {"pretrained": ft["time_s"]}}
    # from scratch: the same recipe, and (when it differs) the default recipe at the same budget; the
    # baseline is the better of the two, so a knob that only hurts random weights cannot flatter the margin
    scratch_runs = []
    for recipe in dict.fromkeys([settings, settings.for_scratch()]):
        torch.manual_seed(seed)
        scratch = build_encoder(run.cfg, run.meta["in_chans"], run.meta["image_size"]).to(device)
        scratch_runs.append({**finetune_accuracy(scratch, d, train, test, mean, std, recipe, seed, device),
                             "lr": recipe.lr, "head_init": recipe.head_init, "layer_decay": recipe.layer_decay})
    best = max(r["accuracy"] for r in scratch_runs)
    return {"protocol": "finetune", "accuracy": ft["accuracy"], "baselines": {"from_scratch": best},
            "margin_over_scratch": ft["accuracy"] - best, "settings": settings.to_dict(len(train)),
            "from_scratch_recipes": scratch_runs,
            "time_s": {"pretrained": ft["time_s"], "from_scratch": sum(r["time_s"] for r in scratch_runs)}}


def format_table(results: list[dict[str, Any]]) -> str:
    header = ["protocol", "dataset", "labels", "metric", f"selfsup ({results[0]['method']})" if results else "selfsup",
              "random encoder", "raw pixels"]
    pct = lambda value: "-" if value is None else f"{100 * value:.2f}%"
    rows = [[r["protocol"], _dataset_label(r), r["labels"], r.get("metric", "accuracy"), pct(r.get("score", r.get("accuracy"))),
             pct(r["baselines"].get("random_encoder")), pct(r["baselines"].get("raw_pixels"))] for r in results]
    for key, head in (("from_scratch", "from scratch (fine-tuned)"), ("single_frame", "single frame"),
                      ("shuffled_frames", "shuffled frames")):
        if any(key in r["baselines"] for r in results):
            header.append(head)
            for row, r in zip(rows, results):
                row.append(pct(r["baselines"].get(key)))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _dataset_label(result: dict[str, Any]) -> str:
    """The dataset, marked when the figures come from the run's held-out images instead of the test split."""
    name = f"{result['dataset']} (held-out val)" if result.get("split") == "val" else result["dataset"]
    return f"{name} → {result['target']}" if result.get("target") else name
