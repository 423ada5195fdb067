"""``selfsup bench``: several methods under one budget, one results table (markdown, JSON, bar chart).

The budget is the same for every method: each starts from its recipe
``configs/<method>_fashion_mnist.yaml`` (or the library defaults when it has none, flagged in the
table) with ``--data``, ``--epochs``, ``--limit`` and ``--batch-size`` put over it. Every method runs
in its own subprocess, so its peak memory is its own: the maximum resident set size of that process
up to the end of pretraining (``getrusage``), and on CUDA ``torch.cuda.max_memory_allocated``.

Evaluation, after pretraining, on the dataset's labelled train/test split (not the pretraining
``limit``): weighted kNN and a linear probe on frozen features, the effective rank (RankMe) of the
test embeddings, and optionally fine-tuning with 1% and 10% of the labels (``selfsup.eval.finetune``).
Reference rows evaluate a randomly initialised encoder of each backbone the same way (its fine-tune
columns are training from scratch) and the normalised raw pixels (kNN and linear probe only).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Sequence

import torch

log = logging.getLogger("selfsup")

FINETUNE_FRACTIONS = ("1%", "10%")
COLUMNS = [("method", "method"), ("family", "family"), ("epochs", "epochs"), ("wall_time_s", "wall time (s)"),
           ("images_per_s", "images/s"), ("peak_memory_mb", "peak mem (MB)"), ("knn", "kNN"), ("linear", "linear"),
           ("finetune_1%", "fine-tune 1%"), ("finetune_10%", "fine-tune 10%"), ("pretext_acc", "pretext acc."),
           ("effective_rank", "eff. rank"), ("collapse_warnings", "collapse warnings")]
PCT_COLUMNS = {"knn", "linear", "finetune_1%", "finetune_10%", "pretext_acc"}


@dataclasses.dataclass
class Budget:
    """What every method gets: epochs over the first ``limit`` training images, at ``batch_size``."""

    epochs: int | None = None
    limit: int | None = None
    batch_size: int | None = None

    @staticmethod
    def parse(text: str) -> "Budget":
        """``"epochs=1,limit=3000[,batch_size=128]"`` (the ``--budget`` form)."""
        from selfsup.config import ConfigError

        out = Budget()
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            key = key.strip().replace("-", "_")
            if key not in ("epochs", "limit", "batch_size") or not value.strip().isdigit():
                raise ConfigError([f"--budget expects epochs=N,limit=M[,batch_size=B] (positive integers), got {text!r}"])
            setattr(out, key, int(value))
        return out

    def overrides(self) -> dict[str, Any]:
        keys = {"epochs": "train.epochs", "limit": "data.limit", "batch_size": "train.batch_size"}
        return {keys[k]: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def describe(self) -> str:
        e = f"{self.epochs} epoch(s)" if self.epochs else "each recipe's epochs"
        n = f"the first {self.limit} training images" if self.limit else "all training images"
        b = f", batch size {self.batch_size}" if self.batch_size else ", each recipe's batch size"
        return f"{e} on {n}{b}"


@dataclasses.dataclass
class BenchSpec:
    """One subprocess's job (JSON on its command line)."""

    method: str
    recipe: str | None
    overrides: dict[str, Any]
    run_dir: str
    result_path: str
    finetune: tuple[str, ...] = ()
    """Label fractions to fine-tune with, e.g. ``("1%", "10%")``; empty: no fine-tuning."""
    finetune_steps: int | None = None
    eval_limit: int | None = None
    baseline: bool = False
    """Evaluate a randomly initialised encoder of the recipe's backbone instead of pretraining."""
    raw_pixels: bool = False
    """With ``baseline``: evaluate the normalised pixels themselves (no encoder, no fine-tuning)."""
    reference_for: str = ""
    """A random-init row's backbone key (name and settings): the methods on that backbone are measured against it."""


def recipe_for(method: str, config_dir: str | Path) -> Path | None:
    path = Path(config_dir) / f"{method}_fashion_mnist.yaml"
    return path if path.is_file() else None


# ---------------------------------------------------------------- one method, in its own process


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _training_figures(run_dir: Path) -> dict[str, Any]:
    from selfsup.report.curves import split_metrics
    from selfsup.train.rundir import read_metrics

    m = split_metrics(read_metrics(run_dir))
    seconds = sum(r.get("epoch_time_s", 0.0) for r in m.epochs)
    images = sum(r.get("images_per_s", 0.0) * r.get("epoch_time_s", 0.0) for r in m.epochs)
    last = m.epochs[-1] if m.epochs else {}
    return {"images_per_s": images / seconds if seconds else None, "final_loss": last.get("loss"),
            "online_knn": last.get("knn"), "collapse_warnings": len(m.warnings),
            "spread": m.steps[-1].get("spread") if m.steps else None}


def evaluate_encoder(encoder: torch.nn.Module | None, cfg, mean: Sequence[float], std: Sequence[float],
                     spec: BenchSpec, device: str) -> dict[str, Any]:
    """kNN, linear, effective rank of test embeddings, and fine-tune at 1%/10% when asked; with no
    encoder, of the normalised pixels (no fine-tuning)."""
    import copy

    from selfsup.data import DataError, load_dataset
    from selfsup.data.splits import parse_fraction, stratified_subset
    from selfsup.monitor.diagnostics import effective_rank
    from selfsup.eval.evaluate import evaluate_features
    from selfsup.monitor.features import extract_features, pixel_features
    from selfsup.report.embeddings import sample_indices

    train, test = load_dataset(cfg.data.labelled())
    if train.labels is None or test.labels is None or len(test) == 0:
        return {"error": f"{cfg.data.name} has no labelled test split: nothing to evaluate on"}
    if spec.eval_limit:
        train = train.subset(sample_indices(len(train), spec.eval_limit, cfg.train.seed))
    if encoder is None:
        tr, te = pixel_features(train, mean, std), pixel_features(test, mean, std)
    else:
        tr, te = extract_features(encoder, train, mean, std, device), extract_features(encoder, test, mean, std, device)
    out: dict[str, Any] = {"n_eval_train": len(train), "n_test": len(test), "effective_rank": effective_rank(te),
                           "feature_dim": int(te.shape[1])}
    for protocol in ("knn", "linear"):
        out[protocol] = evaluate_features(protocol, tr, train.labels, te, test.labels, train.num_classes, cfg.train.seed)
    if spec.finetune and encoder is not None:
        from selfsup.eval.finetune import FinetuneSettings, finetune_accuracy

        settings = FinetuneSettings()
        if spec.finetune_steps:
            settings = dataclasses.replace(settings, min_steps=spec.finetune_steps, max_steps=spec.finetune_steps)
        for frac in spec.finetune:
            try:
                sub = train.subset(stratified_subset(train.labels, parse_fraction(frac), cfg.train.seed))
            except DataError as exc:  # too few labels for this fraction: an empty cell, the others still count
                out[f"finetune_{frac}"], out[f"finetune_{frac}_error"] = None, str(exc)
                continue
            ft = finetune_accuracy(copy.deepcopy(encoder), int(te.shape[1]), sub, test, mean, std, settings,
                                   cfg.train.seed, device)
            out[f"finetune_{frac}"] = ft["accuracy"]
            out[f"finetune_{frac}_labels"] = len(sub)
    return out


def held_out_pretext_accuracy(run, run_dir: str | Path, device: torch.device) -> float | None:
    """The pretext method's accuracy on its own task over the test split (the train split when there
    is no test split), with its training views; see :mod:`selfsup.eval.pretext`."""
    from selfsup.data import load_dataset
    from selfsup.train.rundir import load_method
    from selfsup.eval.pretext import pretext_accuracy
    from selfsup.methods import get_method
    from selfsup.train.build import view_recipe

    train, test = load_dataset(run.cfg.data.labelled())
    images = test if len(test) else train
    recipe = view_recipe(run.cfg, get_method(run.cfg.method.name).spec, images.image_size)
    return pretext_accuracy(load_method(run, run_dir, device), images, recipe, run.meta["mean"], run.meta["std"],
                            device, seed=run.cfg.train.seed)


def run_one(spec: BenchSpec) -> dict[str, Any]:
    """Pretrain (or build a random encoder), then evaluate; what one bench subprocess does."""
    from selfsup.config import load_config
    from selfsup.train.rundir import load_run
    from selfsup.methods import get_method
    from selfsup.train.loop import pretrain, resolve_device

    cfg = load_config(spec.recipe, spec.overrides)
    device = resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    row: dict[str, Any] = {"method": spec.method, "recipe": spec.recipe or "library defaults",
                           "backbone": cfg.backbone.name, "device": str(device)}
    if spec.baseline:
        from selfsup.data import load_dataset
        from selfsup.train.build import build_encoder

        train, _ = load_dataset(cfg.data)
        torch.manual_seed(cfg.train.seed)
        encoder = None if spec.raw_pixels else build_encoder(cfg, train.channels, train.image_size).to(device)
        mean, std = train.mean_std()
        row.update(family="reference", epochs=0)
        if spec.raw_pixels:
            row["backbone"] = "none"
    else:
        row.update(family=get_method(cfg.method.name).family, epochs=cfg.train.epochs)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        pretrain(cfg, spec.run_dir, overwrite=True)
        row["wall_time_s"] = time.perf_counter() - t0
        row["peak_rss_mb"] = _peak_rss_mb()
        # the figure that limits a run: host memory on the CPU, device memory on a GPU
        row["peak_memory_mb"] = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                                 else row["peak_rss_mb"])
        row.update(_training_figures(Path(spec.run_dir)))
        run = load_run(spec.run_dir, device)
        encoder, mean, std = run.encoder, run.meta["mean"], run.meta["std"]
        if row["family"] == "pretext":
            row["pretext_acc"] = held_out_pretext_accuracy(run, spec.run_dir, device)
    row.update(evaluate_encoder(encoder, cfg, mean, std, spec, str(device)))
    return row


def _child_main(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    spec = BenchSpec(**json.loads(argv[0]))
    try:
        row = run_one(spec)
    except Exception as exc:  # recorded in the table, the matrix goes on
        row = {"method": spec.method, "error": f"{type(exc).__name__}: {exc}"}
        if not spec.baseline:
            from selfsup.methods import get_method

            row["family"] = get_method(spec.method).family
        Path(spec.result_path).write_text(json.dumps(row, indent=2))
        raise
    Path(spec.result_path).write_text(json.dumps(row, indent=2))
    return 0


# ---------------------------------------------------------------- the matrix


def _backbone_key(backbone: Any) -> str:
    return json.dumps([backbone.name, backbone.params], sort_keys=True, default=str)


def _random_init_jobs(jobs: Sequence[BenchSpec], backbones: Sequence[Any], out: Path) -> list[BenchSpec]:
    """One random-init reference row per distinct backbone (name and settings) among the methods, so
    that every method has its own architecture's random encoder to beat (e.g. the CNN and the ViT),
    and one raw-pixel row.
    ``backbones[i]`` is the resolved backbone config of ``jobs[i]``."""
    by_backbone: dict[str, tuple[Any, BenchSpec]] = {}
    for job, bb in zip(jobs, backbones):
        by_backbone.setdefault(_backbone_key(bb), (bb, job))
    refs = []
    for i, (bb, job) in enumerate(by_backbone.values()):
        label = bb.name
        if len(by_backbone) > 1 and bb.params:
            label += " " + ", ".join(f"{k}={'-'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                                     for k, v in sorted(bb.params.items()))
        name = "random_init" if i == 0 else f"random_init_{i}"
        refs.append(dataclasses.replace(job, method=f"random init ({label})", run_dir=str(out / "runs" / name),
                                        result_path=str(out / "runs" / f"{name}.json"), baseline=True,
                                        reference_for=_backbone_key(bb)))
    refs.append(dataclasses.replace(jobs[0], method="raw pixels", run_dir=str(out / "runs" / "raw_pixels"),
                                    result_path=str(out / "runs" / "raw_pixels.json"), baseline=True, raw_pixels=True))
    return refs


def run_bench(methods: Sequence[str], out_dir: str | Path, budget: Budget, data: str | None = None,
              data_root: str | None = None, config_dir: str | Path = "configs", finetune: Sequence[str] = (),
              finetune_steps: int | None = None, eval_limit: int | None = None, device: str | None = None,
              threads: int | None = None, seed: int | None = None, baseline: bool = True,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every method (one subprocess each), write ``results.{json,md,png}`` in ``out_dir``; returns the JSON.
    ``finetune``: label fractions to fine-tune with (a subset of ``FINETUNE_FRACTIONS``)."""
    from selfsup.config import ConfigError, load_config
    from selfsup.methods import get_method
    from selfsup.methods.registry import check_method_params

    finetune = tuple(finetune)
    unknown = [f for f in finetune if f not in FINETUNE_FRACTIONS]
    if unknown:
        raise ConfigError([f"--finetune fractions must be among {', '.join(FINETUNE_FRACTIONS)}; got {', '.join(unknown)}"])

    methods = [m.strip() for m in methods if m.strip()]
    if not methods:
        raise ConfigError(["--methods is empty; give a comma-separated list (see `selfsup methods`)"])
    for m in methods:
        get_method(m)  # an unknown name fails here, before any training
    out = Path(out_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    common: dict[str, Any] = dict(extra or {})
    for key, value in (("data.name", data), ("data.root", data_root), ("train.device", device),
                       ("train.threads", threads), ("train.seed", seed)):
        if value is not None:
            common[key] = value
    common.update(budget.overrides())
    common["train.progress"] = False
    jobs, backbones = [], []
    for m in methods:
        recipe = recipe_for(m, config_dir)
        overrides = {**common, "method.name": m}
        cfg = load_config(recipe, overrides)  # config errors and unknown method params before any training
        check_method_params(cfg.method.name, cfg.method.params)
        backbones.append(cfg.backbone)
        jobs.append(BenchSpec(m, str(recipe) if recipe else None, overrides, str(out / "runs" / m),
                              str(out / "runs" / f"{m}.json"), finetune, finetune_steps, eval_limit))
    n_methods = len(jobs)
    if baseline:
        jobs += _random_init_jobs(jobs, backbones, out)
    rows = []
    for i, spec in enumerate(jobs, 1):
        Path(spec.run_dir).parent.mkdir(parents=True, exist_ok=True)
        Path(spec.result_path).unlink(missing_ok=True)
        log_path = out / "logs" / f"{Path(spec.run_dir).name}.log"
        print(f"[{i}/{len(jobs)}] {spec.method}: {'evaluating' if spec.baseline else 'pretraining'} "
              f"(log: {log_path})", flush=True)
        t0 = time.perf_counter()
        with log_path.open("w") as logf:
            proc = subprocess.run([sys.executable, "-m", "selfsup.report.bench", json.dumps(dataclasses.asdict(spec))],
                                  stdout=logf, stderr=subprocess.STDOUT)
        result = Path(spec.result_path)
        row = json.loads(result.read_text()) if result.is_file() else {"method": spec.method}
        if proc.returncode != 0 and "error" not in row:
            tail = log_path.read_text().strip().splitlines()[-1:] or ["no output"]
            row["error"] = f"exit status {proc.returncode}: {tail[0]}"
        rows.append(row)
        status = f"error: {row['error']}" if "error" in row else \
            f"kNN {_cell('knn', row.get('knn'))}, linear {_cell('linear', row.get('linear'))}"
        print(f"      {time.perf_counter() - t0:.0f}s  {status}", flush=True)
    import platform

    results = {"budget": dataclasses.asdict(budget), "budget_text": budget.describe(),
               "data": common.get("data.name", "each recipe's"), "finetune": list(finetune),
               "finetune_steps": finetune_steps, "eval_limit": eval_limit, "torch": torch.__version__,
               "platform": platform.platform(), "threads": threads, "settings": dict(extra or {}), "rows": rows}
    write_run_evaluations(jobs[:n_methods], rows[:n_methods], backbones, jobs[n_methods:], rows[n_methods:], results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_table(results))
    plot_results(results, out / "results.png")
    return results


def write_run_evaluations(jobs: Sequence[BenchSpec], rows: Sequence[dict[str, Any]], backbones: Sequence[Any],
                          reference_jobs: Sequence[BenchSpec], reference_rows: Sequence[dict[str, Any]],
                          results: dict[str, Any]) -> None:
    """Each method's bench figures as ``RUN/eval_<protocol>[_<labels>].json``, the files `selfsup evaluate`
    writes, so that `selfsup report RUN` shows them; the baselines are the reference rows of the same
    bench (the random encoder of the method's own backbone, raw pixels, training from scratch)."""
    from selfsup.eval.evaluate import write_eval_result

    by_key = {ref.reference_for: row for ref, row in zip(reference_jobs, reference_rows) if ref.reference_for}
    raw = next((row for ref, row in zip(reference_jobs, reference_rows) if ref.raw_pixels), {})
    for spec, row, bb in zip(jobs, rows, backbones):
        if "error" in row or not Path(spec.run_dir).is_dir():
            continue
        rand = by_key.get(_backbone_key(bb), {})
        common = {"method": spec.method, "backbone": row.get("backbone"), "dataset": results["data"],
                  "n_train": row.get("n_eval_train"), "n_test": row.get("n_test"),
                  "source": f"selfsup bench ({results['budget_text']})", "settings": results.get("settings") or {}}
        for protocol in ("knn", "linear"):
            if row.get(protocol) is not None:
                write_eval_result(spec.run_dir, protocol, None, {
                    "protocol": protocol, "accuracy": row[protocol], "labels": "100%",
                    "baselines": {"random_encoder": rand.get(protocol), "raw_pixels": raw.get(protocol)}, **common})
        for frac in finetune_fractions(results):
            if row.get(f"finetune_{frac}") is not None:
                write_eval_result(spec.run_dir, "finetune", frac, {
                    "protocol": "finetune", "accuracy": row[f"finetune_{frac}"], "labels": frac,
                    "baselines": {"from_scratch": rand.get(f"finetune_{frac}")},
                    **common, "n_train": row.get(f"finetune_{frac}_labels")})


def finetune_fractions(results: dict[str, Any]) -> tuple[str, ...]:
    """The fine-tuning label fractions of a results JSON (older files stored ``true`` for both)."""
    value = results.get("finetune")
    return FINETUNE_FRACTIONS if value is True else tuple(value or ())


def _settings_text(results: dict[str, Any]) -> str:
    """The ``--set`` settings of a bench, as the table header and chart title state them."""
    return "".join(f"; {k}={v}" for k, v in (results.get("settings") or {}).items())


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key in PCT_COLUMNS:
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.1f}" if key != "images_per_s" else f"{value:.0f}"
    return str(value)


def markdown_table(results: dict[str, Any]) -> str:
    fractions = finetune_fractions(results)
    cols = [(k, h) for k, h in COLUMNS if (not k.startswith("finetune_") or k[len("finetune_"):] in fractions)
            and (k != "pretext_acc" or any(r.get(k) is not None for r in results["rows"]))]
    settings = _settings_text(results)
    lines = [f"Budget: {results['budget_text']}; data: {results['data']}{settings}; torch {results['torch']}; "
             f"{results['platform']}" + (f"; {results['threads']} thread(s)" if results.get("threads") else ""), "",
             "| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    notes = []
    for r in results["rows"]:
        lines.append("| " + " | ".join(_cell(k, r.get(k)) for k, _ in cols) + " |")
        if "error" in r:
            notes.append(f"- {r['method']}: {r['error']}")
        notes += [f"- {r['method']}, fine-tune {f}: {r[f'finetune_{f}_error']}" for f in fractions
                  if r.get(f"finetune_{f}_error")]
        if r.get("recipe") == "library defaults":
            notes.append(f"- {r['method']}: no configs/{r['method']}_fashion_mnist.yaml; ran with the library defaults")
    lines += ["", "kNN (k = 20, T = 0.07) and linear probe on frozen features over "
              + (f"{results['eval_limit']} labelled training images" if results.get("eval_limit") else "the full labelled train split")
              + "; eff. rank: RankMe of the test embeddings;"
              + (" pretext acc.: the pretext method's accuracy on its own task over the test images;"
                 if any(k == "pretext_acc" for k, _ in cols) else "") + " wall time: pretraining (incl. the online kNN monitor); "
              "peak mem: max RSS of the method's process (CUDA: max allocated)."]
    if fractions:
        lines.append(f"Fine-tune: the whole encoder plus a linear head on a stratified {' / '.join(fractions)} of the labels "
                     "(selfsup.eval.finetune); the random-init row is training from scratch with the same recipe.")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def plot_results(results: dict[str, Any], path: Path) -> Path:
    """Horizontal grouped bars: one group per method (top to bottom in table order), one bar per accuracy column."""
    import numpy as np
    from matplotlib.figure import Figure

    from selfsup.report.curves import save_figure

    rows = results["rows"]
    keys = [k for k in ("knn", "linear", "finetune_1%", "finetune_10%", "pretext_acc")
            if any(r.get(k) is not None for r in rows)]
    height = 0.8 / max(len(keys), 1)
    fig = Figure(figsize=(8.0, 1.5 + max(len(rows), 1) * (0.18 + 0.17 * len(keys))))
    ax = fig.subplots()
    y = np.arange(len(rows))[::-1].astype(float)
    for j, k in enumerate(keys):
        pos = y + ((len(keys) - 1) / 2 - j) * height
        vals = [100 * r[k] if r.get(k) is not None else np.nan for r in rows]
        bars = ax.barh(pos, vals, height, label=dict(COLUMNS)[k])
        ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.1f}" for v in vals], fontsize=7, padding=2)
    for yi, r in zip(y, rows):
        if "error" in r:
            ax.text(1, yi, "failed: see results.md", va="center", fontsize=7, color="#d62728")
    ax.set_yticks(y, [textwrap.fill(r["method"], 26) for r in rows], fontsize=8)
    ax.set(xlabel="test accuracy (%)", xlim=(0, 108))
    settings = _settings_text(results)
    ax.set_title(textwrap.fill(f"selfsup bench: {results['budget_text']}{settings}", 90), fontsize=9, pad=20 if keys else 6)
    if keys:  # on top of the axes, under the title, clear of the bars
        ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(keys), frameon=False)
    else:
        ax.text(50, y.mean() if len(y) else 0, "no accuracy to show (see results.md)", ha="center", fontsize=8)
    return save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
