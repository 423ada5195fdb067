"""The ``selfsup`` command: pretrain, evaluate, embed, neighbors, export, report, bench, prepare, methods.

Every error a user can act on (bad config, missing data, unreadable checkpoint, diverging run)
is printed as one clear message without a traceback, with exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any, Sequence

from selfsup.config import ConfigError, load_config, parse_override

# (flag, dotted config key, type, help) — flags override the YAML recipe.
PRETRAIN_FLAGS: list[tuple[str, str, type, str]] = [
    ("--method", "method.name", str, "registered method name (see `selfsup methods`)"),
    ("--data", "data.name", str, "fashion-mnist, fashion-mnist-scenes, digits, cifar10, cifar100, or a path (image "
                                 "folder, CIFAR batches, a VOC-style folder or COCO file: its training images)"),
    ("--data-root", "data.root", str, "folder holding a named dataset's files"),
    ("--backbone", "backbone.name", str, "small_resnet (default), resnet18, resnet50, vit_tiny, vit_small, "
                                            "or any torchvision:NAME / timm:NAME model (built without weights)"),
    ("--weights", "backbone.weights", str, "initialise the backbone from a state dict (.pt/.pth/.bin read weights-only, "
                                           ".safetensors) in its library's keys, selfsup's, or a `selfsup export`; "
                                           "a new run only (a resumed one continues from its checkpoint)"),
    ("--teacher", "method.params.teacher", str, "--method distill: the frozen teacher, a run directory or a "
                                                 "`selfsup export` file (its .json beside it)"),
    ("--epochs", "train.epochs", int, "number of epochs"),
    ("--batch-size", "train.batch_size", int, "global batch size (split across processes)"),
    ("--lr", "optim.lr", float, "base learning rate before batch-size scaling"),
    ("--limit", "data.limit", int, "train on the first N images only"),
    ("--seed", "train.seed", int, "random seed"),
    ("--device", "train.device", str, "auto, cpu, cuda, cuda:N"),
    ("--precision", "train.precision", str, "auto, fp32, bf16"),
    ("--threads", "train.threads", int, "CPU threads for torch"),
]


def _error(message: str) -> int:
    print(f"selfsup: error: {message}", file=sys.stderr)
    return 2


def cmd_pretrain(args: argparse.Namespace) -> int:
    from selfsup.train.loop import pretrain

    overrides: dict[str, Any] = {}
    for flag, key, _, _ in PRETRAIN_FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            overrides[key] = value
    if args.no_progress:
        overrides["train.progress"] = False
    for item in args.set or []:
        key, value = parse_override(item)
        overrides[key] = value
    recipe = args.config or _tuned_recipe(overrides)
    native_size = False
    if recipe is None:  # no tuned recipe: defaults that fit the named backbone and the method's paper
        from selfsup.train.paper_recipes import backbone_defaults

        derived, lines = backbone_defaults(overrides)
        native_size = "data.image_size" in derived
        overrides = {**derived, **overrides}
        for line in lines:
            print(f"recipe: {line}", file=sys.stderr)
    cfg = load_config(recipe, overrides)
    if native_size and not args.print_config:
        from selfsup.train.paper_recipes import step_cost_line

        print(step_cost_line(cfg), file=sys.stderr)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    out = args.out or f"runs/{cfg.method.name}"
    from selfsup import distributed

    distributed.init_from_env(cfg.train.device)
    main_process = distributed.is_main()
    try:
        summary = pretrain(cfg, out, overwrite=args.overwrite)
    except BaseException:
        distributed.shutdown()
        raise
    distributed.shutdown(barrier=True)
    if main_process:
        knn = summary.get("knn")
        print(f"done: {out}  final loss {summary.get('loss', float('nan')):.4f}"
              + (f"  online kNN {100 * knn:.2f}%" if knn is not None else ""))
    if distributed.launched_by_torchrun():
        distributed.leave_worker()
    return 0


def _tuned_recipe(overrides: dict[str, Any]) -> str | None:
    """With no --config: the tuned recipe in configs/ for this method and dataset, when one exists (said so)."""
    from selfsup.config import RunConfig, find_recipe

    defaults = RunConfig()
    method = overrides.get("method.name", defaults.method.name)
    data = overrides.get("data.name", defaults.data.name)
    path = find_recipe(method, data)
    if path is not None:
        print(f"recipe: {path} (the tuned settings for {method} on {data}; flags override it, --config picks "
              "another)", file=sys.stderr)
    return str(path) if path else None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from selfsup.eval.evaluate import evaluate_run, format_table

    protocols = [p.strip() for p in args.protocol.split(",") if p.strip()]
    _set_threads(args.threads)
    settings = None
    if (args.finetune_steps is not None or args.finetune_head != "random" or args.finetune_layer_decay != 1.0
            or args.finetune_lr is not None):
        from selfsup.eval.finetune import FinetuneSettings

        settings = FinetuneSettings(head_init=args.finetune_head)
        if args.finetune_lr is not None:
            if not args.finetune_lr > 0:
                raise ConfigError([f"--finetune-lr must be > 0, got {args.finetune_lr}"])
            settings = dataclasses.replace(settings, lr=args.finetune_lr)
        try:
            settings = dataclasses.replace(settings, layer_decay=args.finetune_layer_decay)
        except ValueError as exc:
            raise ConfigError([f"--finetune-layer-decay: {exc}"]) from None
        if args.finetune_steps is not None:
            if args.finetune_steps < 1:
                raise ConfigError([f"--finetune-steps must be ≥ 1, got {args.finetune_steps}"])
            settings = dataclasses.replace(settings, min_steps=args.finetune_steps, max_steps=args.finetune_steps)
    results = evaluate_run(args.run_dir, protocols, data=args.data, data_root=args.data_root, labels=args.labels,
                           device=args.device, seed=args.seed, finetune_settings=settings, split=args.split,
                           dense_settings=_dense_settings(args), target=args.target)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    else:
        print(format_table(results))
    return 0


def _dense_settings(args: argparse.Namespace):
    """The dense protocols' recipe with the flags that change it, or None for the default."""
    if args.dense_steps is None and args.levels is None:
        return None
    from selfsup.eval.dense import DenseSettings

    changes = {}
    if args.dense_steps is not None:
        if args.dense_steps < 1:
            raise ConfigError([f"--dense-steps must be ≥ 1, got {args.dense_steps}"])
        changes.update(min_steps=args.dense_steps, max_steps=args.dense_steps)
    if args.levels is not None:
        if args.levels < 1:
            raise ConfigError([f"--levels must be ≥ 1, got {args.levels}"])
        changes["levels"] = args.levels
    return DenseSettings(**changes)


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        if threads < 1:
            raise ConfigError([f"--threads must be ≥ 1, got {threads}"])
        torch.set_num_threads(threads)


def cmd_embed(args: argparse.Namespace) -> int:
    from selfsup.eval.embed import embed_folder, write_embeddings
    from selfsup.train.rundir import load_run

    _set_threads(args.threads)
    emb = embed_folder(load_run(args.run_dir, args.device), args.data, args.device)
    out = write_embeddings(emb, args.out)
    skipped = f"; skipped {emb.skipped} unreadable file(s)" if emb.skipped else ""
    print(f"wrote {len(emb.paths)} embeddings of dimension {emb.vectors.shape[1]} to {out}{skipped}")
    return 0


def cmd_neighbors(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from selfsup.eval.embed import embed_folder, encode, load_query_clip, load_query_image, takes_clips
    from selfsup.train.rundir import load_run
    from selfsup.eval.neighbors import cosine_topk
    from selfsup.eval.run_warnings import run_warning

    if (args.query is None) == (not args.duplicates):
        raise ConfigError(["give either --query IMAGE or --duplicates"])
    if args.k < 1:
        raise ConfigError([f"--k must be ≥ 1, got {args.k}"])
    _set_threads(args.threads)
    run = load_run(args.run_dir, args.device)
    warning = run_warning(args.run_dir)  # too few steps, or a collapse: said before any result
    if warning:
        print(warning, file=sys.stderr)
    emb = embed_folder(run, args.data, args.device)
    note = f" ({emb.skipped} unreadable file(s) skipped)" if emb.skipped else ""
    if args.duplicates:
        from selfsup.eval.duplicates import find_duplicates, parse_threshold, result_json, result_text
        from selfsup.eval.pixel_check import PixelCheck

        # the pixel check compares still images; clips are grouped on their embeddings alone
        check = None if args.no_pixel_check or takes_clips(run) else PixelCheck(args.pixel_threshold)
        res = find_duplicates(emb.vectors, parse_threshold(args.threshold), emb.images, check)
        if args.json:
            print(json.dumps(result_json(res, emb.paths, emb.skipped, warning), indent=2))
        else:
            print(result_text(res, emb.paths, note), end="")
        return 0
    clips = takes_clips(run)  # a video query: its clips' mean embedding; each hit is a clip of a folder's video
    query = load_query_clip(run, args.query) if clips else load_query_image(run, args.query)
    vector = encode(run, query, args.device)
    vector = torch.nn.functional.normalize(vector, dim=1).mean(0, keepdim=True) if clips else vector
    # the query file itself, when it lies in the folder, is not its own neighbour
    same = {i for i, p in enumerate(emb.paths) if Path(p).resolve() == Path(args.query).resolve()}
    sims, idx = cosine_topk(vector, emb.vectors, args.k + len(same))
    hits = [i for i in idx[0].tolist() if i not in same][: args.k]
    similarity = dict(zip(idx[0].tolist(), sims[0].tolist()))
    start = (lambda i: None) if emb.starts is None else (lambda i: round(float(emb.starts[i]), 3))
    if args.json:
        print(json.dumps({"query": args.query, "skipped": emb.skipped, "warning": warning,
                          "neighbors": [{"path": emb.paths[i], "similarity": similarity[i],
                                         **({"start_s": start(i)} if clips else {})} for i in hits]}, indent=2))
        return 0
    print(f"{len(hits)} nearest neighbours of {args.query} among {len(emb.paths)} {'clips' if clips else 'images'}"
          f"{note}:")
    for rank, i in enumerate(hits, 1):
        at = f"  (from {start(i):g} s)" if clips else ""
        print(f"{rank:>3}  {similarity[i]:.4f}  {emb.paths[i]}{at}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from selfsup.train.rundir import load_run
    from selfsup.eval.export import FORMATS, export_encoder, resolve_format

    fmt = resolve_format(args.format, args.out)
    out = args.out or str(Path(args.run_dir) / "export" / f"encoder{FORMATS[fmt]}")
    weights, sidecar = export_encoder(load_run(args.run_dir), out, fmt)
    print(f"wrote {weights} ({fmt}) and {sidecar} (architecture and normalisation)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from selfsup.report.html import ReportOptions, write_report

    _set_threads(args.threads)
    opts = ReportOptions(map_method=args.map, map_size=args.map_size, embeddings=not args.no_embeddings,
                         device=args.device, seed=args.seed)
    path = write_report(args.run_dir, args.out, opts)
    print(f"wrote {path}")
    from selfsup.train.trackers import log_report

    note = log_report(args.run_dir, path.parent)  # a run that logged to MLflow gets its report there too
    if note:
        print(note)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    # here, not at the top: training and evaluation (torch, timm, matplotlib) load only for the bench
    from selfsup.bench import Budget, run_bench
    from selfsup.report.bench_table import markdown_table

    from selfsup.eval.dense import DENSE_PROTOCOLS

    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    unknown = [p for p in protocols if p not in ("knn", "linear") + DENSE_PROTOCOLS]
    if unknown:
        raise ConfigError([f"--protocols: unknown {', '.join(unknown)}; choose from knn, linear (always measured), "
                           f"{', '.join(DENSE_PROTOCOLS)} (fine-tuning on image labels: --finetune)"])
    dense = [p for p in protocols if p in DENSE_PROTOCOLS]
    if args.dense_steps is not None and args.dense_steps < 1:
        raise ConfigError([f"--dense-steps must be ≥ 1, got {args.dense_steps}"])
    budget = Budget.parse(args.budget) if args.budget else Budget()
    for key in ("epochs", "limit", "batch_size"):
        if getattr(args, key) is not None:
            setattr(budget, key, getattr(args, key))
    results = run_bench(args.methods.split(","), args.out, budget, data=args.data, data_root=args.data_root,
                        config_dir=args.config_dir, finetune=[f.strip() for f in args.finetune.split(",") if f.strip()],
                        finetune_steps=args.finetune_steps, eval_limit=args.eval_limit, device=args.device,
                        threads=args.threads, seed=args.seed, baseline=not args.no_baseline,
                        extra=dict(parse_override(item) for item in args.set or []), dense=dense,
                        dense_labels=[f.strip() for f in args.dense_labels.split(",") if f.strip()],
                        dense_steps=args.dense_steps, resume=args.resume)
    print(markdown_table(results), end="")  # what results.md holds
    return 1 if any("error" in r for r in results["rows"]) else 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from selfsup.data.cache import CacheOptions, prepare_folder

    if args.image_size < 8:
        raise ConfigError([f"--image-size must be ≥ 8, got {args.image_size}"])
    if args.workers is not None and args.workers < 1:
        raise ConfigError([f"--workers must be ≥ 1, got {args.workers}"])
    opts = CacheOptions(args.image_size, args.cache_size, args.cache_dir, "full" if args.verify else "fast",
                        args.workers, not args.no_progress)
    from selfsup.data.video_folder import holds_videos, video_source

    videos = args.kind == "videos" or (args.kind == "auto" and holds_videos(args.folder))
    if videos:  # the cache `--data FOLDER` reads with data.video.frames / fps set alike
        report = prepare_folder(args.folder, opts, video_source(args.frames, args.fps))
    else:
        report = prepare_folder(args.folder, opts)
    m = report.manifest
    skipped = report.skip_reasons()
    n, c, size, _ = m.record_shape
    what = f"clip records of {args.frames} frames at {args.fps:g} fps from {len(m.stored())} videos" if videos else "images"
    print(f"{report.action}: {report.path}")
    print(f"  {n} {what} ({'labelled, ' + str(len(m.classes)) + ' classes' if m.labelled else 'unlabelled'}), "
          f"stored as {c}×{size}×{size} uint8 for {args.image_size} px views; shard {m.shard_bytes / 2**20:,.1f} MiB")
    print(f"  skipped {sum(skipped.values())}" + (": " + ", ".join(f"{k} ×{v}" for k, v in skipped.most_common())
                                                  if skipped else ""))
    work = f"; decoded {report.decoded} file(s), {report.reused} unchanged" if report.action != "reused" else ""
    print(f"  {report.seconds:.2f} s{work}" + ("; every file checked against the folder" if args.verify else ""))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from selfsup.methods import METHODS

    width = max(len(n) for n in METHODS)
    fam = max(len(m.family) for m in METHODS.values())
    for info in sorted(METHODS.values(), key=lambda m: (m.family, m.name)):
        print(f"{info.name.ljust(width)}  {info.family.ljust(fam)}  {info.paper}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfsup", description="Self-supervised pretraining and evaluation of image encoders.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain an encoder without labels")
    p.add_argument("--config", help="YAML recipe (e.g. configs/simclr_fashion_mnist.yaml); flags override it")
    for flag, _, tp, help_text in PRETRAIN_FLAGS:
        p.add_argument(flag, type=tp, help=help_text)
    p.add_argument("--out", help="run directory (default runs/<method>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key, e.g. --set optim.name=lars")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (epoch summaries still print)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_pretrain)

    e = sub.add_parser("evaluate", help="evaluate a run's encoder on frozen features, beside baselines")
    e.add_argument("run_dir")
    e.add_argument("--protocol", default="knn,linear",
                   help="knn, linear, finetune (end to end, beside from-scratch); dense: segmentation (frozen, "
                        "linear head), segmentation_finetune, detection (frozen backbone, FCOS), detection_finetune; "
                        "or a comma-separated list")
    e.add_argument("--labels", help="label fraction ('1%%', '10%%') or few-shot count ('5-shot'; dense protocols: "
                                    "N images showing each class)")
    e.add_argument("--data", help="evaluate on another dataset (transfer); dense protocols: fashion-mnist-scenes, a "
                                  "VOC-style folder, a COCO JSON file or a folder of COCO files")
    e.add_argument("--split", choices=["test", "val"], default="test",
                   help="test: the dataset's test split; val: the images the run held out of pretraining "
                        "(data.val_size), fitting on every other labelled training image (for choosing settings)")
    e.add_argument("--target", metavar="LABELS",
                   help="predict other labels the data carries instead of the class (moving-fashion-mnist: "
                        "direction, family)")
    e.add_argument("--data-root")
    e.add_argument("--device", default="cpu")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument("--threads", type=int, help="CPU threads for torch")
    e.add_argument("--finetune-steps", type=int, help="fine-tuning steps (default: scaled to the label count)")
    e.add_argument("--finetune-head", choices=["random", "linear_probe"], default="random",
                   help="fine-tuning head: random init, or the linear probe's solution (LP-FT, Kumar et al. 2022)")
    e.add_argument("--finetune-lr", type=float, metavar="LR", help="fine-tuning AdamW peak learning rate (default 1e-3)")
    e.add_argument("--finetune-layer-decay", type=float, default=1.0, metavar="DECAY",
                   help="layer-wise learning-rate decay for a ViT (e.g. 0.75 as MAE; 1 = off). With a changed "
                        "recipe, from scratch gets the better of it and the default recipe")
    e.add_argument("--dense-steps", type=int, metavar="N",
                   help="dense protocols: training steps (default: scaled to the label count, 300-800)")
    e.add_argument("--levels", type=int, metavar="N",
                   help="segmentation: feature levels the linear head reads (1: the last map, default; 4: the last "
                        "four concatenated, DINOv2's multi-scale variant)")
    e.set_defaults(func=cmd_evaluate)

    em = sub.add_parser("embed", help="embeddings of a folder of images (or videos, for a clip encoder), with their "
                        "paths (.npz or .parquet)")
    em.add_argument("run_dir")
    em.add_argument("--data", required=True, help="image folder (class subfolders optional); for a clip encoder a "
                    "folder of videos and frame folders: one row per clip, with its start time")
    em.add_argument("--out", required=True, help="output file: .npz (default) or .parquet (needs pyarrow)")
    em.add_argument("--device", default="cpu")
    em.add_argument("--threads", type=int, help="CPU threads for torch")
    em.set_defaults(func=cmd_embed)

    nb = sub.add_parser("neighbors", help="nearest neighbours of an image, or near-duplicate groups, in a folder")
    nb.add_argument("run_dir")
    nb.add_argument("--data", required=True, help="image folder to search (a video folder for a clip encoder)")
    nb.add_argument("--query", help="image file whose neighbours to list (a video file or frame folder for a clip "
                    "encoder: the nearest clips of the folder's videos)")
    nb.add_argument("--duplicates", action="store_true", help="list groups of near-duplicate images")
    nb.add_argument("--threshold", default="auto",
                    help="--duplicates: the cosine similarity every pair in a group reaches, on embeddings centred by "
                         "the folder's mean; or auto (default), from the folder's own distribution: with the pixel "
                         "check, the 10th percentile of each image's nearest-neighbour similarity (nine images in ten "
                         "get a candidate, the pixels judge each); with --no-pixel-check, Q3 + 3 × IQR of the same, "
                         "capped at 0.9999")
    nb.add_argument("--pixel-threshold", type=float, default=0.95,
                    help="--duplicates: the correlation of two images' 32×32 grey thumbnails (whole, 90%% centre crop, "
                         "mirrored) every pair in a group also reaches (default 0.95)")
    nb.add_argument("--no-pixel-check", action="store_true",
                    help="--duplicates: group by the embedding alone (also pictures that only mean the same thing)")
    nb.add_argument("--k", type=int, default=5, help="neighbours per query (default 5)")
    nb.add_argument("--device", default="cpu")
    nb.add_argument("--threads", type=int, help="CPU threads for torch")
    nb.add_argument("--json", action="store_true", help="print the result as JSON")
    nb.set_defaults(func=cmd_neighbors)

    ex = sub.add_parser("export", help="the encoder as a plain state dict (.pt) or safetensors, in its library's keys")
    ex.add_argument("run_dir")
    ex.add_argument("--format", choices=["pt", "safetensors", "torchvision", "timm", "onnx"],
                    help="pt or safetensors (default: from --out's suffix, else pt); torchvision or timm: the same "
                         "weights, checked to load into that library's constructor (written in the JSON beside them); "
                         "onnx: the encoder as an ONNX graph, images (N, C, H, W) -> features (N, D), any batch size "
                         "(needs the extra: pip install 'selfsup[onnx]')")
    ex.add_argument("--out", help="output file (default RUN/export/encoder.pt, or encoder.safetensors / encoder.onnx "
                                  "for --format safetensors / onnx)")
    ex.set_defaults(func=cmd_export)

    rp = sub.add_parser("report", help="an HTML report of a run: curves, diagnostics, embedding map, retrieval")
    rp.add_argument("run_dir")
    rp.add_argument("--out", help="output folder (default RUN/report)")
    rp.add_argument("--map", default="tsne", choices=["tsne", "umap"], help="2-D map method (umap needs umap-learn)")
    rp.add_argument("--map-size", type=int, default=2000, help="test images on the map")
    rp.add_argument("--no-embeddings", action="store_true", help="curves only: no map, no retrieval grid")
    rp.add_argument("--device", default="cpu")
    rp.add_argument("--threads", type=int)
    rp.add_argument("--seed", type=int, default=0)
    rp.set_defaults(func=cmd_report)

    bn = sub.add_parser("bench", help="pretrain and evaluate several methods under one budget; a results table")
    bn.add_argument("--methods", required=True, help="comma-separated method names (see `selfsup methods`)")
    bn.add_argument("--data", help="dataset for every method (default: each recipe's)")
    bn.add_argument("--data-root")
    bn.add_argument("--budget", help="epochs=N,limit=M[,batch_size=B]; --epochs/--limit/--batch-size override it")
    bn.add_argument("--epochs", type=int, help="epochs for every method (default: each recipe's)")
    bn.add_argument("--limit", type=int, help="pretrain on the first N training images")
    bn.add_argument("--batch-size", type=int, help="batch size for every method (default: each recipe's)")
    bn.add_argument("--out", default="runs/bench", help="folder for results.{md,json,png}, runs/ and logs/")
    bn.add_argument("--config-dir", default="configs", help="where <method>_fashion_mnist.yaml recipes lie")
    bn.add_argument("--finetune", nargs="?", const="1%,10%", default="", metavar="FRACTIONS",
                    help="add fine-tuning with these label fractions (default when given alone: 1%%,10%%)")
    bn.add_argument("--finetune-steps", type=int, help="fixed number of fine-tuning steps (default: the recipe's)")
    bn.add_argument("--protocols", default="knn,linear",
                    help="knn,linear (always measured) and dense protocols: segmentation, segmentation_finetune, "
                         "detection, detection_finetune (need dense data: --data fashion-mnist-scenes, a VOC folder "
                         "or a COCO source)")
    bn.add_argument("--dense-labels", default="1%,10%,100%", metavar="FRACTIONS",
                    help="label fractions of the dense protocols' columns (default 1%%,10%%,100%%)")
    bn.add_argument("--dense-steps", type=int, help="dense protocols: fixed training steps (default: scaled to the labels)")
    bn.add_argument("--eval-limit", type=int, help="labelled training images for kNN/linear/fine-tune (default all)")
    bn.add_argument("--no-baseline", action="store_true",
                    help="no random-init / raw-pixel / from-scratch baselines or reference rows")
    bn.add_argument("--resume", action="store_true",
                    help="after a call that ended early: keep the methods it finished with the same settings, "
                         "continue an unfinished method's pretraining from its last checkpoint")
    bn.add_argument("--device")
    bn.add_argument("--threads", type=int, help="CPU threads per method")
    bn.add_argument("--seed", type=int)
    bn.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="any config key for every method, e.g. --set data.long_tail=10")
    bn.set_defaults(func=cmd_bench)

    pr = sub.add_parser("prepare", help="decode an image or video folder into its on-disk cache (or check the cache)")
    pr.add_argument("folder", help="image or video folder (class subfolders optional)")
    pr.add_argument("--image-size", type=int, default=64, help="side of the views trained on (default 64)")
    pr.add_argument("--cache-size", type=int, help="stored side (default image size × 4/3)")
    pr.add_argument("--cache-dir", help="cache root (default $SELFSUP_CACHE, else ~/.cache/selfsup)")
    pr.add_argument("--verify", action="store_true", help="compare every file's size and mtime with the cache "
                                                          "(default: directory times only); update it if stale")
    pr.add_argument("--workers", type=int, help="decoding processes (default: every core)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.add_argument("--kind", choices=("auto", "images", "videos"), default="auto",
                    help="what the folder holds (auto: videos when it holds a video file), as data.kind")
    pr.add_argument("--frames", type=int, default=16, help="videos: frames per clip record (data.video.frames)")
    pr.add_argument("--fps", type=float, default=8.0, help="videos: frame rate records are resampled to (data.video.fps)")
    pr.set_defaults(func=cmd_prepare)

    m = sub.add_parser("methods", help="list the registered methods")
    m.set_defaults(func=cmd_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from selfsup.data import DataError
    from selfsup.nn.backbones import BackboneError
    from selfsup.nn.feature_maps import NoFeatureMap
    from selfsup.train.checkpoint import CheckpointError
    from selfsup.train.loop import TrainingError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, TrainingError, BackboneError, NoFeatureMap) as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        return _error("interrupted; run the same command to resume from the last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
