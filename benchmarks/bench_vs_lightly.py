"""selfsup's SimCLR against lightly's, side by side in one run, on Fashion-MNIST.

Both train the identical backbone (selfsup's small CNN, the default recipe's widths) at batch 256 on
28×28 images with the same optimiser settings, projection head shape, temperature and augmentation
parameters, for the same number of epochs, alternating epoch by epoch so machine noise hits both.

- selfsup: its own training step — batched augmentation on the device (``selfsup.views``), SimCLR,
  at the recipe's precision as the training loop resolves it (``auto``: bf16 autocast on CPUs with
  native bf16, fp32 elsewhere).
- lightly: ``SimCLRTransform`` in a torch DataLoader, ``SimCLRProjectionHead``, ``NTXentLoss``, its LARS,
  in fp32 as its examples train (``--lightly-precision bf16`` gives it the same autocast instead).

Printed: images/s per epoch (median), wall time, and kNN / linear-probe accuracy on the test set,
evaluated by the same code. lightly is not a dependency of selfsup: the script installs it (without
its training-framework dependencies, which these three parts do not import) into
``benchmarks/_scratch/`` on first use.

    python benchmarks/bench_vs_lightly.py --epochs 3 [--limit 20000] [--workers 0,2] [--seed 0]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SCRATCH = Path(__file__).parent / "_scratch" / "lightly"


def import_lightly():
    if not SCRATCH.exists():
        SCRATCH.mkdir(parents=True)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(SCRATCH),
                               "lightly==1.6.0", "lightning-utilities"])
    sys.path.insert(0, str(SCRATCH))
    import lightly
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    from lightly.utils.lars import LARS as LightlyLARS

    return lightly.__version__, NTXentLoss, SimCLRProjectionHead, SimCLRTransform, LightlyLARS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", default="0,2", help="lightly DataLoader worker counts to try (best is kept)")
    parser.add_argument("--lightly-precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--seed", type=int, default=0, help="initial weights (identical for both) and sampling")
    parser.add_argument("--out", default="benchmarks/results_vs_lightly.json")
    args = parser.parse_args()

    from PIL import Image

    from selfsup.config import load_config
    from selfsup.data import load_dataset
    from selfsup.monitor.features import extract_features
    from selfsup.monitor.knn import knn_accuracy
    from selfsup.eval.linear import linear_probe
    from selfsup.methods.base import Progress
    from selfsup.train.build import build_method, view_recipe
    from selfsup.train.loop import resolve_precision
    from selfsup.train.optim import build_optimizer, set_optim_values
    from selfsup.schedules import scaled_lr, warmup_cosine
    from selfsup.views import make_views

    version, NTXentLoss, SimCLRProjectionHead, SimCLRTransform, LightlyLARS = import_lightly()
    cfg = load_config("configs/simclr_fashion_mnist.yaml", {"train.batch_size": args.batch_size,
                                                             "train.epochs": args.epochs})
    train, test = load_dataset(cfg.data)
    train = train.head(args.limit)
    mean, std = train.mean_std()
    b = args.batch_size
    steps = len(train) // b
    total = steps * args.epochs
    lr = scaled_lr(cfg.optim.lr, b, cfg.optim.lr_scaling)
    warmup = int(cfg.optim.warmup_epochs * steps)
    channels_last = True
    ours_amp = resolve_precision(cfg.train.precision, torch.device("cpu"))
    theirs_amp = torch.bfloat16 if args.lightly_precision == "bf16" else None

    def autocast(dtype):
        return torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()

    # --- selfsup
    torch.manual_seed(args.seed)
    ours = build_method(cfg, 1, 28).to(memory_format=torch.channels_last)
    ours_opt = build_optimizer(ours, cfg.optim, lr)
    recipe = view_recipe(cfg, type(ours), 28)

    # --- lightly, around an identically initialised backbone
    torch.manual_seed(args.seed)
    theirs_backbone = build_method(cfg, 1, 28).backbone.to(memory_format=torch.channels_last)
    p = cfg.method.params
    theirs_head = SimCLRProjectionHead(theirs_backbone.num_features, p["proj_hidden"], p["proj_dim"])
    theirs_loss = NTXentLoss(temperature=p["temperature"])
    theirs_params = list(theirs_backbone.parameters()) + list(theirs_head.parameters())
    theirs_opt = LightlyLARS(theirs_params, lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    v = cfg.views
    transform = SimCLRTransform(input_size=28, min_scale=v["scale"][0], cj_prob=0.8, cj_strength=0.5,
                                random_gray_scale=0.2, gaussian_blur=v.get("blur_p", 0.5), hf_prob=0.5,
                                normalize={"mean": mean, "std": std})

    class PILDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(train)

        def __getitem__(self, i):
            return transform(Image.fromarray(train.images[i, 0].numpy(), mode="L"))

    def lightly_epoch(epoch: int, workers: int) -> float:
        loader = torch.utils.data.DataLoader(PILDataset(), batch_size=b, shuffle=True, drop_last=True,
                                             num_workers=workers, persistent_workers=False)
        theirs_backbone.train(), theirs_head.train()
        t0 = time.perf_counter()
        for i, (x0, x1) in enumerate(loader):
            for g in theirs_opt.param_groups:
                g["lr"] = warmup_cosine(epoch * steps + i, total, warmup, lr)
            x = torch.cat([x0, x1]).contiguous(memory_format=torch.channels_last)
            with autocast(theirs_amp):
                z = theirs_head(theirs_backbone(x))
                z0, z1 = z.chunk(2)
                loss = theirs_loss(z0, z1)
            theirs_opt.zero_grad()
            loss.backward()
            theirs_opt.step()
        return steps * b / (time.perf_counter() - t0)

    def selfsup_epoch(epoch: int) -> float:
        ours.train()
        order = torch.randperm(len(train))
        t0 = time.perf_counter()
        for i in range(steps):
            step = epoch * steps + i
            set_optim_values(ours_opt, warmup_cosine(step, total, warmup, lr), lr)
            with torch.no_grad():
                views = make_views(train.images[order[i * b : (i + 1) * b]], recipe, mean, std)
            views = [x.contiguous(memory_format=torch.channels_last) for x in views]
            with autocast(ours_amp):
                loss, _ = ours.training_step(views, Progress(step, total, epoch, steps))
            ours_opt.zero_grad()
            loss.backward()
            ours_opt.step()
        return steps * b / (time.perf_counter() - t0)

    workers = [int(w) for w in args.workers.split(",")]
    speed = {"selfsup": [], "lightly": []}
    lightly_by_workers: dict[int, list[float]] = {w: [] for w in workers}
    wall = {"selfsup": 0.0, "lightly": 0.0}
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        speed["selfsup"].append(selfsup_epoch(epoch))
        wall["selfsup"] += time.perf_counter() - t0
        w = workers[epoch % len(workers)]
        t0 = time.perf_counter()
        ips = lightly_epoch(epoch, w)
        wall["lightly"] += time.perf_counter() - t0
        lightly_by_workers[w].append(ips)
        speed["lightly"].append(ips)
        print(f"epoch {epoch + 1}: selfsup {speed['selfsup'][-1]:.0f} img/s, lightly ({w} workers) {ips:.0f} img/s",
              flush=True)

    def accuracy(backbone) -> dict[str, float]:
        tr = extract_features(backbone, train, mean, std, channels_last=channels_last)
        te = extract_features(backbone, test, mean, std, channels_last=channels_last)
        return {"knn": knn_accuracy(tr, train.labels, te, test.labels, 10),
                "linear": linear_probe(tr, train.labels, te, test.labels, 10)["accuracy"]}

    results = {"selfsup": accuracy(ours.backbone), "lightly": accuracy(theirs_backbone)}
    by_workers = {str(k): statistics.median(v) for k, v in lightly_by_workers.items() if v}
    best_lightly = max(by_workers.values())  # compare against lightly's best loader setting
    ratio = statistics.median(speed["selfsup"]) / best_lightly
    summary = {"lightly_version": version, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "seed": args.seed,
               "precision": {"selfsup": str(ours_amp or "fp32"), "lightly": str(theirs_amp or "fp32")},
               "epochs": args.epochs, "train_images": len(train), "batch_size": b,
               "images_per_s": {"selfsup": statistics.median(speed["selfsup"]), "lightly": best_lightly},
               "lightly_images_per_s_by_workers": by_workers,
               "wall_s": wall, "accuracy": results, "speed_ratio": ratio}
    print(f"\n| library | images/s (median) | train wall s | kNN | linear |\n|---|---|---|---|---|")
    for k in ("selfsup", "lightly"):
        print(f"| {k} | {summary['images_per_s'][k]:.0f} | {wall[k]:.0f} | {100 * results[k]['knn']:.2f}% "
              f"| {100 * results[k]['linear']:.2f}% |")
    print(f"\nselfsup / lightly images/s: {ratio:.2f}× (lightly {version}, {torch.get_num_threads()} threads; "
          f"precision selfsup {summary['precision']['selfsup']}, lightly {summary['precision']['lightly']})")
    Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
