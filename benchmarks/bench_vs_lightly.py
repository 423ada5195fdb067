"""selfsup's SimCLR against lightly's, side by side in one run, on Fashion-MNIST.

Both train the identical backbone (selfsup's small CNN, the default recipe's widths) at batch 256 on
28×28 images with the same optimiser settings, projection head shape, temperature and augmentation
parameters, for the same number of epochs, alternating epoch by epoch so machine noise hits both.

- selfsup: its own training step — batched augmentation on the device (``selfsup.views``), SimCLR,
  at the recipe's precision as the training loop resolves it (``auto``: bf16 autocast on CPUs with
  native bf16, fp32 elsewhere).
- lightly: ``SimCLRTransform`` in a torch DataLoader, ``SimCLRProjectionHead``, ``NTXentLoss``, its LARS,
  in fp32 as its examples train, and as a second row (its own model, trained alternately too) in bf16 autocast
  where the CPU or GPU computes bf16 natively (``--lightly-precision fp32,bf16`` chooses the rows).
- ``train.compile`` (``--set train.compile=on``) compiles selfsup's step as the training loop does; the first
  step, which compiles, is timed apart and reported, not counted in the epoch's images/s.

Printed: images/s per epoch (median), wall time, and kNN / linear-probe accuracy on the test set,
evaluated by the same code. lightly is not a dependency of selfsup: the script installs it (without
its training-framework dependencies, which these three parts do not import) into
``benchmarks/_scratch/`` on first use (``--no-install``: only use what is there). When lightly cannot be
had, selfsup's row is still measured, the lightly row says why, and the exit status is 3.

    python benchmarks/bench_vs_lightly.py --epochs 3 [--limit 20000] [--workers 0,2] [--seed 0]

On a GPU (``--device cuda``): selfsup's views are made on the GPU from images kept there; lightly's
come from its DataLoader (pinned, persistent workers) and are copied over; both run under the same
autocast; epochs are timed after a device synchronisation; peak GPU memory is recorded per library.
``--set`` changes the recipe, ``--steps-per-epoch`` makes an "epoch" that many batches (drawn over
several passes when the set is small). The GPU check (``benchmarks/gpu_check.sh``) runs SimCLR with
ResNet-18 on 32×32 RGB crops at batch 512, bf16 for both:

    python benchmarks/bench_vs_lightly.py --device cuda --set backbone.name=resnet18 --set backbone.params={} \
        --set data.name=sample-photos --batch-size 512 --lightly-precision bf16 --epochs 3 \
        --steps-per-epoch 100 --workers 12 --no-install --no-eval
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SCRATCH = Path(__file__).parent / "_scratch" / "lightly"
LIGHTLY_REQUIREMENTS = ["lightly==1.6.0", "lightning-utilities"]


def install_lightly() -> None:
    """pip-installs lightly (no dependencies) into ``SCRATCH``; a failed install leaves nothing behind."""
    SCRATCH.parent.mkdir(parents=True, exist_ok=True)
    tmp = SCRATCH.with_name(SCRATCH.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                           str(tmp), *LIGHTLY_REQUIREMENTS])
    shutil.rmtree(SCRATCH, ignore_errors=True)
    tmp.rename(SCRATCH)


def import_lightly(install: bool = True):
    if not (SCRATCH / "lightly").is_dir():
        if not install:
            raise RuntimeError(f"lightly is not in {SCRATCH} and --no-install was given; run "
                               "`bash benchmarks/gpu_check.sh --prepare` (or this script once) where pip works")
        install_lightly()
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
    parser.add_argument("--lightly-precision", default=None,
                        help="comma-separated lightly rows: fp32 and/or bf16 (autocast); default fp32, plus bf16 "
                             "where the device computes bf16 natively")
    parser.add_argument("--seed", type=int, default=0, help="initial weights (identical for both) and sampling")
    parser.add_argument("--out", default="benchmarks/results_vs_lightly.json")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--config", default="configs/simclr_fashion_mnist.yaml", help="the recipe both libraries follow")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    parser.add_argument("--steps-per-epoch", type=int, default=None,
                        help="batches per epoch (default: one pass over the training images)")
    parser.add_argument("--no-eval", action="store_true", help="skip the kNN / linear-probe accuracy")
    parser.add_argument("--no-install", action="store_true", help="never pip-install lightly; use benchmarks/_scratch")
    args = parser.parse_args()
    sys.exit(run(args))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_order(n: int, count: int) -> torch.Tensor:
    """``count`` indices into ``n`` images: whole random permutations, concatenated, cut to ``count``
    (one permutation, as before, when an epoch is at most one pass)."""
    return torch.cat([torch.randperm(n) for _ in range(max(1, math.ceil(count / n)))])[:count]


def run(args: argparse.Namespace) -> int:

    from PIL import Image

    from selfsup.config import compile_mode, load_config, parse_override
    from selfsup.data import load_dataset
    from selfsup.monitor.features import extract_features
    from selfsup.monitor.knn import knn_accuracy
    from selfsup.eval.linear import linear_probe
    from selfsup.methods.base import Progress
    from selfsup.train.build import build_method, view_recipe
    from selfsup.train.device import resolve_precision
    from selfsup.train.optim import build_optimizer, set_optim_values
    from selfsup.schedules import scaled_lr, warmup_cosine
    from selfsup.views import make_views

    try:
        version, NTXentLoss, SimCLRProjectionHead, SimCLRTransform, LightlyLARS = import_lightly(not args.no_install)
        lightly_error = None
    except Exception as exc:  # noqa: BLE001 - any failure to get lightly is reported, selfsup still runs
        version, lightly_error = None, f"lightly unavailable: {type(exc).__name__}: {exc}"
        print(lightly_error, file=sys.stderr, flush=True)
    overrides = dict(parse_override(item) for item in args.set)
    cfg = load_config(args.config, {**overrides, "train.batch_size": args.batch_size, "train.epochs": args.epochs})
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    train, test = load_dataset(cfg.data)
    train = train.head(args.limit)
    mean, std = train.mean_std()
    chans, size = train.channels, train.image_size
    b = args.batch_size
    steps = args.steps_per_epoch or len(train) // b
    total = steps * args.epochs
    lr = scaled_lr(cfg.optim.lr, b, cfg.optim.lr_scaling)
    warmup = int(cfg.optim.warmup_epochs * steps)
    channels_last = True
    ours_amp = resolve_precision(cfg.train.precision, device)
    ours_compile = compile_mode(cfg.train.compile)
    # lightly's rows: fp32 as its examples train; bf16 autocast as a second row where the device computes it natively
    precisions = args.lightly_precision.split(",") if args.lightly_precision else (
        ["fp32", "bf16"] if resolve_precision("auto", device) is not None else ["fp32"])
    names = ["lightly" if prec == "fp32" else f"lightly_{prec}" for prec in precisions]
    peak_mb = {k: 0.0 for k in ["selfsup"] + names}

    def autocast(dtype):
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    # --- selfsup
    torch.manual_seed(args.seed)
    ours = build_method(cfg, chans, size).to(device, memory_format=torch.channels_last)
    ours_opt = build_optimizer(ours, cfg.optim, lr)
    recipe = view_recipe(cfg, ours.spec, size)
    ours_images = train.images.to(device)  # on a GPU the views are made there, from images kept there
    ours_step = ours.training_step
    if ours_compile == "on":  # as the training loop: the whole step
        ours_step = torch.compile(ours.training_step)
    elif ours_compile == "backbone":
        ours.backbone.compile()
    compile_s: list[float] = []

    # --- lightly, one model per precision, each around an identically initialised backbone
    theirs: dict[str, dict] = {}
    for name, prec in zip(names, precisions):
        torch.manual_seed(args.seed)
        backbone = build_method(cfg, chans, size).backbone.to(device, memory_format=torch.channels_last)
        theirs[name] = {"backbone": backbone, "amp": torch.bfloat16 if prec == "bf16" else None}
        if lightly_error is None:
            p = cfg.method.params
            head = SimCLRProjectionHead(backbone.num_features, p["proj_hidden"], p["proj_dim"]).to(device)
            params = list(backbone.parameters()) + list(head.parameters())
            theirs[name].update(head=head, loss=NTXentLoss(temperature=p["temperature"]),
                                opt=LightlyLARS(params, lr=lr, momentum=cfg.optim.momentum,
                                                weight_decay=cfg.optim.weight_decay))
    if lightly_error is None:
        v = cfg.views
        transform = SimCLRTransform(input_size=size, min_scale=v["scale"][0], cj_prob=0.8, cj_strength=0.5,
                                    random_gray_scale=0.2, gaussian_blur=v.get("blur_p", 0.5), hf_prob=0.5,
                                    normalize={"mean": mean, "std": std})

    class PILDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(train)

        def __getitem__(self, i):
            if chans == 1:
                return transform(Image.fromarray(train.images[i, 0].numpy(), mode="L"))
            return transform(Image.fromarray(train.images[i].permute(1, 2, 0).numpy(), mode="RGB"))

    loaders: dict[int, torch.utils.data.DataLoader] = {}

    def lightly_loader(workers: int) -> torch.utils.data.DataLoader:
        dataset = PILDataset()
        # ``steps`` batches an epoch: one pass as always, or --steps-per-epoch's count over several passes
        order = ({"sampler": torch.utils.data.RandomSampler(dataset, num_samples=steps * b)} if args.steps_per_epoch
                 else {"shuffle": True})
        if not cuda:  # the CPU comparison as it always ran: a fresh loader per epoch
            return torch.utils.data.DataLoader(dataset, batch_size=b, drop_last=True, num_workers=workers,
                                               persistent_workers=False, **order)
        if workers not in loaders:  # on a GPU, lightly's best case: pinned batches, workers kept alive
            loaders[workers] = torch.utils.data.DataLoader(dataset, batch_size=b, drop_last=True, num_workers=workers,
                                                           persistent_workers=workers > 0, pin_memory=True, **order)
        return loaders[workers]

    def lightly_epoch(name: str, epoch: int, workers: int) -> float:
        m = theirs[name]
        loader = lightly_loader(workers)
        m["backbone"].train(), m["head"].train()
        _sync(device)
        t0 = time.perf_counter()
        for i, (x0, x1) in enumerate(loader):
            for g in m["opt"].param_groups:
                g["lr"] = warmup_cosine(epoch * steps + i, total, warmup, lr)
            if cuda:
                x0, x1 = x0.to(device, non_blocking=True), x1.to(device, non_blocking=True)
            x = torch.cat([x0, x1]).contiguous(memory_format=torch.channels_last)
            with autocast(m["amp"]):
                z = m["head"](m["backbone"](x))
                z0, z1 = z.chunk(2)
                loss = m["loss"](z0, z1)
            m["opt"].zero_grad()
            loss.backward()
            m["opt"].step()
        _sync(device)
        return steps * b / (time.perf_counter() - t0)

    def selfsup_epoch(epoch: int) -> float:
        """Images/s of one epoch; with train.compile the first step (compilation) is timed apart, in ``compile_s``,
        and the epoch's rate is over the other steps."""
        ours.train()
        order = epoch_order(len(train), steps * b).to(device)
        _sync(device)
        t0 = time.perf_counter()
        timed_steps = steps
        for i in range(steps):
            step = epoch * steps + i
            set_optim_values(ours_opt, warmup_cosine(step, total, warmup, lr), lr)
            with torch.no_grad():
                views = make_views(ours_images[order[i * b : (i + 1) * b]], recipe, mean, std)
            views = [x.contiguous(memory_format=torch.channels_last) for x in views]
            with autocast(ours_amp):
                loss, _ = ours_step(views, Progress(step, total, epoch, steps))
            ours_opt.zero_grad()
            loss.backward()
            ours_opt.step()
            if ours_compile != "off" and step == 0:
                _sync(device)
                compile_s.append(time.perf_counter() - t0)
                t0, timed_steps = time.perf_counter(), steps - 1
        _sync(device)
        return timed_steps * b / (time.perf_counter() - t0)

    def timed(name: str, fn, *a) -> float:
        """Runs one epoch of ``fn``; adds its wall time to ``wall[name]`` and its peak GPU memory to ``peak_mb``."""
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        ips = fn(*a)
        wall[name] += time.perf_counter() - t0
        if cuda:
            peak_mb[name] = max(peak_mb[name], torch.cuda.max_memory_allocated(device) / 2**20)
        return ips

    workers = [int(w) for w in args.workers.split(",")]
    speed: dict[str, list[float]] = {k: [] for k in ["selfsup"] + names}
    lightly_by_workers = {name: {w: [] for w in workers} for name in names}
    wall = {k: 0.0 for k in ["selfsup"] + names}
    load = [os.getloadavg()[0]]
    for epoch in range(args.epochs):
        speed["selfsup"].append(timed("selfsup", selfsup_epoch, epoch))
        if lightly_error is not None:
            print(f"epoch {epoch + 1}: selfsup {speed['selfsup'][-1]:.0f} img/s, lightly not run", flush=True)
            continue
        w = workers[epoch % len(workers)]
        line = [f"epoch {epoch + 1}: selfsup {speed['selfsup'][-1]:.0f} img/s"]
        for name in names:
            ips = timed(name, lightly_epoch, name, epoch, w)
            lightly_by_workers[name][w].append(ips)
            speed[name].append(ips)
            line.append(f"{name} ({w} workers) {ips:.0f} img/s")
        load.append(os.getloadavg()[0])
        print(", ".join(line) + f"  (load average {load[-1]:.1f})", flush=True)

    def accuracy(backbone) -> dict[str, float]:
        tr = extract_features(backbone, train, mean, std, device, channels_last=channels_last)
        te = extract_features(backbone, test, mean, std, device, channels_last=channels_last)
        return {"knn": knn_accuracy(tr, train.labels, te, test.labels, train.num_classes),
                "linear": linear_probe(tr, train.labels, te, test.labels, train.num_classes)["accuracy"]}

    libraries = ["selfsup"] + (names if lightly_error is None else [])
    results = {} if args.no_eval else {k: accuracy(ours.backbone if k == "selfsup" else theirs[k]["backbone"])
                                       for k in libraries}
    by_workers = {name: {str(k): statistics.median(v) for k, v in lightly_by_workers[name].items() if v}
                  for name in names}
    best = {name: max(by_workers[name].values()) if by_workers[name] else None for name in names}  # best loader
    ips = {"selfsup": statistics.median(speed["selfsup"]), **best}
    ratios = {name: ips["selfsup"] / best[name] if best[name] else None for name in names}
    summary = {"lightly_version": version, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "seed": args.seed, "device": str(device), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "cpu_native_bf16": resolve_precision("auto", torch.device("cpu")) is not None,
               "isa_env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                      "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS") if k in os.environ},
               "date": time.strftime("%Y-%m-%d %H:%M %Z"), "load_average": {"start": load[0], "end": load[-1]},
               "precision": {"selfsup": str(ours_amp or "fp32"),
                             **{name: str(theirs[name]["amp"] or "fp32") for name in names}},
               "compile": {"selfsup": ours_compile, "compile_s": compile_s[0] if compile_s else None},
               "epochs": args.epochs, "steps_per_epoch": steps, "train_images": len(train), "batch_size": b,
               "backbone": cfg.backbone.name, "dataset": cfg.data.name, "image_size": size,
               "images_per_s": ips, "lightly_images_per_s_by_workers": by_workers.get("lightly", {}),
               "lightly_bf16_images_per_s_by_workers": by_workers.get("lightly_bf16", {}),
               "wall_s": wall, "accuracy": results, "speed_ratio": ratios.get("lightly"),
               "speed_ratio_vs_lightly_bf16": ratios.get("lightly_bf16")}
    if cuda:
        summary.update(gpu=torch.cuda.get_device_name(device), peak_memory_mb=peak_mb)
    if lightly_error is not None:
        summary["lightly_error"] = lightly_error

    def pct(k: str, protocol: str) -> str:
        return f"{100 * results[k][protocol]:.2f}%" if k in results else "not run"

    print(f"\n| library | precision | images/s (median) | train wall s | kNN | linear |\n|---|---|---|---|---|---|")
    for k in libraries:
        print(f"| {k} | {summary['precision'][k]} | {ips[k]:.0f} | {wall[k]:.0f} | {pct(k, 'knn')} "
              f"| {pct(k, 'linear')} |")
    if lightly_error is not None:
        print(f"| lightly | {lightly_error} | | | |")
        print(f"\nselfsup / lightly images/s: not measured ({lightly_error})")
    else:
        for name in names:
            print(f"selfsup / {name} images/s: {ratios[name]:.2f}× (lightly {version}, {torch.get_num_threads()} "
                  f"threads; precision selfsup {summary['precision']['selfsup']}, {name} "
                  f"{summary['precision'][name]})")
    if compile_s:
        print(f"selfsup compile ({ours_compile}): first step {compile_s[0]:.1f}s, not counted in its images/s")
    Path(args.out).write_text(json.dumps(summary, indent=2))
    return 3 if lightly_error is not None else 0


if __name__ == "__main__":
    main()
