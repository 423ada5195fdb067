"""The ``selfsup`` command: pretrain, evaluate, methods.

Every error a user can act on (bad config, missing data, unreadable checkpoint, diverging run)
is printed as one clear message without a traceback, with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

from selfsup.config import ConfigError, load_config, parse_override

# (flag, dotted config key, type, help) — flags override the YAML recipe.
PRETRAIN_FLAGS: list[tuple[str, str, type, str]] = [
    ("--method", "method.name", str, "registered method name (see `selfsup methods`)"),
    ("--data", "data.name", str, "fashion-mnist, digits, cifar10, cifar100, or a path (image folder / CIFAR batches)"),
    ("--data-root", "data.root", str, "folder holding a named dataset's files"),
    ("--backbone", "backbone.name", str, "small_resnet (default), resnet18, resnet50"),
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
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    out = args.out or f"runs/{cfg.method.name}"
    summary = pretrain(cfg, out, overwrite=args.overwrite)
    knn = summary.get("knn")
    print(f"done: {out}  final loss {summary.get('loss', float('nan')):.4f}"
          + (f"  online kNN {100 * knn:.2f}%" if knn is not None else ""))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from selfsup.eval.evaluate import evaluate_run, format_table

    protocols = [p.strip() for p in args.protocol.split(",") if p.strip()]
    results = evaluate_run(args.run_dir, protocols, data=args.data, data_root=args.data_root, labels=args.labels,
                           device=args.device, seed=args.seed)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    else:
        print(format_table(results))
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
    e.add_argument("--protocol", default="knn,linear", help="knn, linear, or a comma-separated list")
    e.add_argument("--labels", help="label fraction ('1%%', '10%%') or few-shot count ('5-shot')")
    e.add_argument("--data", help="evaluate on another dataset (transfer)")
    e.add_argument("--data-root")
    e.add_argument("--device", default="cpu")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=cmd_evaluate)

    m = sub.add_parser("methods", help="list the registered methods")
    m.set_defaults(func=cmd_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from selfsup.data import DataError
    from selfsup.nn.backbones import BackboneError
    from selfsup.train.checkpoint import CheckpointError
    from selfsup.train.loop import TrainingError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, TrainingError, BackboneError) as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        return _error("interrupted; run the same command to resume from the last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
