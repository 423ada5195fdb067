"""``selfsup bench``: several methods under one budget, one results table (markdown, JSON, bar chart).

The budget is the same for every method: each starts from its recipe
``configs/<method>_fashion_mnist.yaml`` (or the library defaults when it has none, flagged in the
table) with ``--data``, ``--epochs``, ``--limit`` and ``--batch-size`` put over it. Every method runs
in its own subprocess (``python -m selfsup.bench SPEC``), so its peak memory is its own: the maximum
resident set size of that process up to the end of pretraining (``getrusage``), and on CUDA
``torch.cuda.max_memory_allocated``.

Evaluation, after pretraining, is :func:`selfsup.eval.evaluate.evaluate_run` — what ``selfsup
evaluate`` runs — on the dataset's labelled train/test split (not the pretraining ``limit``): kNN and
a linear probe on frozen features, the effective rank of the test embeddings, and optionally
fine-tuning with 1% and 10% of the labels, each written to the run directory's ``eval_*.json``.
Each evaluation measures its baselines in the same call: a randomly initialised encoder of the
method's backbone (the same weights for every method on that backbone: one seed), the normalised
raw pixels, and fine-tuning from scratch. The reference rows of the table are read from them: one
random-init row per distinct backbone, one raw-pixel row.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from selfsup.config import ConfigError, find_recipe, load_config
from selfsup.data import DataError
from selfsup.eval.dense import DENSE_PROTOCOLS, DenseSettings
from selfsup.eval.evaluate import evaluate_run
from selfsup.eval.finetune import FinetuneSettings
from selfsup.eval.pretext import held_out_pretext_accuracy
from selfsup.methods import get_method
from selfsup.methods.registry import check_method_params
from selfsup.report.bench_table import FINETUNE_FRACTIONS, cell, markdown_table, plot_results, settings_text
from selfsup.report.curves import split_metrics
from selfsup.train.device import resolve_device
from selfsup.train.loop import pretrain
from selfsup.train.rundir import read_metrics


@dataclasses.dataclass
class Budget:
    """What every method gets: epochs over the first ``limit`` training images, at ``batch_size``."""

    epochs: int | None = None
    limit: int | None = None
    batch_size: int | None = None

    @staticmethod
    def parse(text: str) -> "Budget":
        """``"epochs=1,limit=3000[,batch_size=128]"`` (the ``--budget`` form)."""
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


DENSE_LABELS = ("1%", "10%", "100%")
"""The label fractions of the dense protocols' columns."""


@dataclasses.dataclass
class BenchSpec:
    """One method's job (JSON on its subprocess's command line)."""

    method: str
    recipe: str | None
    overrides: dict[str, Any]
    run_dir: str
    result_path: str
    finetune: tuple[str, ...] = ()
    """Label fractions to fine-tune with, e.g. ``("1%", "10%")``; empty: no fine-tuning."""
    finetune_steps: int | None = None
    eval_limit: int | None = None
    baselines: bool = True
    """Measure the random-encoder, raw-pixel and from-scratch baselines beside the method."""
    source: str = "selfsup bench"
    """What the run's ``eval_*.json`` say produced them."""
    dense: tuple[str, ...] = ()
    """Dense protocols (``segmentation``, ``detection``, their ``_finetune`` variants) to score, at each of
    ``dense_labels``."""
    dense_labels: tuple[str, ...] = DENSE_LABELS
    dense_steps: int | None = None
    resume: bool = False
    """Continue the run directory's pretraining from its last checkpoint (``selfsup bench --resume``) instead of
    starting it again."""

    def settings(self) -> dict[str, Any]:
        """What the row was measured with (stored in it as ``spec``): a ``--resume`` keeps a finished row only
        when these are the same."""
        return {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(self))).items() if k != "resume"}


def recipe_for(method: str, config_dir: str | Path, data: str | None = None) -> Path | None:
    """The method's tuned recipe in ``config_dir`` (the bench compares methods at their tuned budgets): for the named
    dataset ``data`` when it has one (``<method>_fashion_mnist_scenes.yaml``), else its Fashion-MNIST recipe."""
    own = find_recipe(method, data, [Path(config_dir)]) if data else None
    return own or find_recipe(method, "fashion-mnist", [Path(config_dir)])


# ---------------------------------------------------------------- one method, in its own process


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _training_figures(run_dir: Path) -> dict[str, Any]:
    m = split_metrics(read_metrics(run_dir))
    seconds = _epoch_seconds(m.epochs)
    images = sum(r.get("images_per_s", 0.0) * r.get("epoch_time_s", 0.0) for r in m.epochs)
    last = m.epochs[-1] if m.epochs else {}
    return {"images_per_s": images / seconds if seconds else None, "final_loss": last.get("loss"),
            "online_knn": last.get("knn"), "collapse_warnings": len(m.warnings),
            "spread": m.steps[-1].get("spread") if m.steps else None}


def _epoch_seconds(epochs: Sequence[dict[str, Any]]) -> float:
    """Training time: the epochs' own times as the run recorded them (also across a resumed run's processes)."""
    return sum(r.get("epoch_time_s", 0.0) for r in epochs)


def _accuracy(result: dict[str, Any], name: str) -> float:
    """``name``'s accuracy in an ``evaluate_run`` result: the encoder's (``selfsup``), a frozen baseline's,
    or in a fine-tune result the random encoder's, that is training from scratch."""
    if name == "selfsup":
        return result["accuracy"]
    return result["baselines"]["from_scratch" if result["protocol"] == "finetune" else name]


def _evaluation_figures(spec: BenchSpec, seed: int, device: str) -> dict[str, Any]:
    """``evaluate_run`` on the run (which writes its ``eval_*.json``), as table figures: the method's,
    and under ``baselines`` those of the random encoder (with fine-tuning from scratch) and raw pixels."""
    kwargs = {"device": device, "seed": seed, "eval_limit": spec.eval_limit, "baselines": spec.baselines,
              "source": spec.source}
    knn, linear = evaluate_run(spec.run_dir, ("knn", "linear"), **kwargs)
    names = ("selfsup", "random_encoder", "raw_pixels") if spec.baselines else ("selfsup",)
    figures = {name: {"n_eval_train": knn["n_train"], "n_test": knn["n_test"],
                      "effective_rank": knn["test_embeddings"][name]["effective_rank"],
                      "feature_dim": knn["test_embeddings"][name]["dim"],
                      "knn": _accuracy(knn, name), "linear": _accuracy(linear, name)} for name in names}
    settings = FinetuneSettings()
    if spec.finetune_steps:
        settings = dataclasses.replace(settings, min_steps=spec.finetune_steps, max_steps=spec.finetune_steps)
    finetuned = names[:2]  # the encoder and, from scratch, the random one (pixels are not fine-tuned)
    for frac in spec.finetune:  # one call per fraction, as `selfsup evaluate --labels F` makes
        try:
            (ft,) = evaluate_run(spec.run_dir, ("finetune",), labels=frac, finetune_settings=settings, **kwargs)
        except DataError as exc:  # too few labels for this fraction: an empty cell, the others still count
            for name in finetuned:
                figures[name].update({f"finetune_{frac}": None, f"finetune_{frac}_error": str(exc)})
            continue
        for name in finetuned:
            figures[name].update({f"finetune_{frac}": _accuracy(ft, name), f"finetune_{frac}_labels": ft["n_train"]})
    dense = DenseSettings() if not spec.dense_steps else DenseSettings(min_steps=spec.dense_steps,
                                                                        max_steps=spec.dense_steps)
    for protocol in spec.dense:
        for frac in spec.dense_labels:
            key = f"{protocol}_{frac}"
            t0 = time.perf_counter()
            (result,) = evaluate_run(spec.run_dir, (protocol,), labels=None if frac == "100%" else frac,
                                     dense_settings=dense, **kwargs)
            figures["selfsup"].update({key: result["score"], f"{key}_labels": result["n_train"],
                                       f"{key}_minutes": (time.perf_counter() - t0) / 60})
            if "random_encoder" in figures:  # the random-init row: a frozen random encoder, or from scratch
                figures["random_encoder"][key] = next(iter(result["baselines"].values()), None)
    row = figures.pop("selfsup")
    if figures:
        row["baselines"] = figures  # for the reference rows; run_bench takes them out of the method's row
    return row


def run_one(spec: BenchSpec, row: dict[str, Any]) -> dict[str, Any]:
    """Pretrain, then evaluate, filling ``row`` as it goes (so a failure keeps what was measured);
    what one bench subprocess does."""
    cfg = load_config(spec.recipe, spec.overrides)
    device = resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    row.update(method=spec.method, recipe=spec.recipe or "library defaults", backbone=cfg.backbone.name,
               device=str(device), family=get_method(cfg.method.name).family, epochs=cfg.train.epochs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    resumed = spec.resume and (Path(spec.run_dir) / "checkpoints" / "last.pt").is_file()
    t0 = time.perf_counter()
    pretrain(cfg, spec.run_dir, overwrite=not spec.resume)
    row["wall_time_s"] = time.perf_counter() - t0
    row["peak_rss_mb"] = _peak_rss_mb()
    if resumed:  # this process ran only the rest: the epochs' own times, and a peak of the part it ran
        row["resumed"] = True
        row["wall_time_s"] = _epoch_seconds(split_metrics(read_metrics(spec.run_dir)).epochs)
    # the figure that limits a run: host memory on the CPU, device memory on a GPU
    row["peak_memory_mb"] = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                             else row["peak_rss_mb"])
    row.update(_training_figures(Path(spec.run_dir)))
    if row["family"] == "pretext":
        row["pretext_acc"] = held_out_pretext_accuracy(spec.run_dir, device)
    row.update(_evaluation_figures(spec, cfg.train.seed, str(device)))
    return row


def _child_main(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    spec = BenchSpec(**json.loads(argv[0]))
    row: dict[str, Any] = {"method": spec.method, "family": get_method(spec.method).family, "spec": spec.settings()}
    try:
        run_one(spec, row)
    except Exception as exc:  # recorded in the table, the matrix goes on
        row["error"] = f"{type(exc).__name__}: {exc}"
        Path(spec.result_path).write_text(json.dumps(row, indent=2))
        raise
    Path(spec.result_path).write_text(json.dumps(row, indent=2))
    return 0


# ---------------------------------------------------------------- the matrix


def _backbone_key(backbone: Any) -> str:
    return json.dumps([backbone.name, backbone.params], sort_keys=True, default=str)


def reference_rows(rows: Sequence[dict[str, Any]], backbones: Sequence[Any],
                   baselines: Sequence[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """One random-init row per distinct backbone (name and settings) among the methods, so that every
    method has its own architecture's random encoder to beat (e.g. the CNN and the ViT), and one
    raw-pixel row; read from the baselines of the first finished method on each backbone (every
    method on it measures the same: same weights, same split). ``backbones[i]`` and ``baselines[i]``
    are the resolved backbone config and the measured baselines (None: none) of ``rows[i]``. A
    backbone whose methods all failed has no row: nothing measured its random encoder."""
    measured = list(zip(rows, backbones, baselines))
    keys = list(dict.fromkeys(_backbone_key(bb) for bb in backbones))
    refs, raw = [], None
    for key in keys:
        found = next(((row, bb, b) for row, bb, b in measured if b and _backbone_key(bb) == key), None)
        if found is None:
            continue
        row, bb, figures = found
        label = bb.name
        if len(keys) > 1 and bb.params:
            label += " " + ", ".join(f"{k}={'-'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                                     for k, v in sorted(bb.params.items()))
        common = {"recipe": row.get("recipe"), "device": row.get("device"), "family": "reference", "epochs": 0}
        refs.append({"method": f"random init ({label})", **common, "backbone": bb.name, **figures["random_encoder"]})
        raw = raw or {"method": "raw pixels", **common, "backbone": "none", **figures["raw_pixels"]}
    return refs + ([raw] if raw else [])


def run_bench(methods: Sequence[str], out_dir: str | Path, budget: Budget, data: str | None = None,
              data_root: str | None = None, config_dir: str | Path = "configs", finetune: Sequence[str] = (),
              finetune_steps: int | None = None, eval_limit: int | None = None, device: str | None = None,
              threads: int | None = None, seed: int | None = None, baseline: bool = True,
              extra: dict[str, Any] | None = None, dense: Sequence[str] = (),
              dense_labels: Sequence[str] = DENSE_LABELS, dense_steps: int | None = None,
              resume: bool = False) -> dict[str, Any]:
    """Run every method (one subprocess each), write ``results.{json,md,png}`` in ``out_dir``; returns the JSON.
    ``resume``: keep each method's row that an earlier call into ``out_dir`` finished with the same settings, and
    continue an unfinished method's pretraining from its last checkpoint (its evaluation runs again).
    ``finetune``: label fractions to fine-tune with (a subset of ``FINETUNE_FRACTIONS``); ``baseline``:
    measure the baselines and add the reference rows. ``dense``: dense protocols to score at each of
    ``dense_labels`` (their baselines — minutes each — are measured once per backbone: for its first method, whose
    figures the reference rows read)."""
    finetune = tuple(finetune)
    dense, dense_labels = tuple(dense), tuple(dense_labels)
    problems = [f"unknown dense protocol {p!r}; choose from {', '.join(DENSE_PROTOCOLS)}" for p in dense
                if p not in DENSE_PROTOCOLS]
    problems += [f"dense label amount {f!r} must be a percentage such as 1%, 10% or 100%" for f in dense_labels
                 if not f.endswith("%")]
    if problems:
        raise ConfigError(problems)
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
    source = f"selfsup bench ({budget.describe()}{settings_text(extra)})"
    jobs, backbones = [], []
    for m in methods:
        recipe = recipe_for(m, config_dir, data)
        overrides = {**common, "method.name": m}
        cfg = load_config(recipe, overrides)  # config errors and unknown method params before any training
        check_method_params(cfg.method.name, cfg.method.params)
        # with dense protocols, baselines only for the first method on each backbone (the reference rows read those)
        first = not any(_backbone_key(b) == _backbone_key(cfg.backbone) for b in backbones)
        backbones.append(cfg.backbone)
        jobs.append(BenchSpec(m, str(recipe) if recipe else None, overrides, str(out / "runs" / m),
                              str(out / "runs" / f"{m}.json"), finetune, finetune_steps, eval_limit,
                              baseline and (first or not dense), source, dense, dense_labels, dense_steps))
    rows = []
    for i, spec in enumerate(jobs, 1):
        kept = finished_row(spec.result_path, spec.settings()) if resume else None
        if kept is not None:
            print(f"[{i}/{len(jobs)}] {spec.method}: kept from an earlier call ({spec.result_path})", flush=True)
            rows.append(kept)
            continue
        Path(spec.run_dir).parent.mkdir(parents=True, exist_ok=True)
        Path(spec.result_path).unlink(missing_ok=True)
        started = Path(spec.result_path).with_suffix(".started.json")  # the settings its run directory is for
        spec.resume = resume and started.is_file() and json.loads(started.read_text()) == spec.settings()
        started.write_text(json.dumps(spec.settings(), indent=2))
        log_path = out / "logs" / f"{Path(spec.run_dir).name}.log"
        print(f"[{i}/{len(jobs)}] {spec.method}: pretraining (log: {log_path})", flush=True)
        t0 = time.perf_counter()
        with log_path.open("a" if resume else "w") as logf:
            proc = subprocess.run([sys.executable, "-m", "selfsup.bench", json.dumps(dataclasses.asdict(spec))],
                                  stdout=logf, stderr=subprocess.STDOUT, check=False)  # a failure is a row
        result = Path(spec.result_path)
        row = json.loads(result.read_text()) if result.is_file() else {"method": spec.method}
        if proc.returncode != 0 and "error" not in row:
            tail = log_path.read_text().strip().splitlines()[-1:] or ["no output"]
            row["error"] = f"exit status {proc.returncode}: {tail[0]}"
        rows.append(row)
        print(f"      {time.perf_counter() - t0:.0f}s  {_status(row)}", flush=True)
    settings = {"budget": dataclasses.asdict(budget), "budget_text": budget.describe(),
                "data": common.get("data.name", "each recipe's"), "finetune": list(finetune),
                "dense": list(dense), "dense_labels": list(dense_labels), "dense_steps": dense_steps,
                "finetune_steps": finetune_steps, "eval_limit": eval_limit, "torch": torch.__version__,
                "platform": platform.platform(), "threads": threads, "settings": dict(extra or {})}
    return write_results(out, settings, rows, backbones)


def write_results(out: Path, settings: dict[str, Any], rows: list[dict[str, Any]],
                  backbones: Sequence[Any]) -> dict[str, Any]:
    """``results.{json,md,png}`` in ``out`` from the methods' rows (as their subprocesses wrote them: the
    baselines of the first method on each backbone inside) and the bench's ``settings``; returns the JSON.
    Also what rebuilds the table of a bench whose call ended early from the rows it finished
    (``benchmarks/dense/assemble.py``)."""
    refs = reference_rows(rows, backbones, [row.pop("baselines", None) for row in rows])
    for ref in refs:
        print(f"      {ref['method']}: {_status(ref)}", flush=True)
    results = {**settings, "rows": rows + refs}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_table(results))
    plot_results(results, out / "results.png")
    return results


def finished_row(path: str | Path, settings: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The method's row at ``path`` (``<out>/runs/<method>.json``) when its call finished it (no error), and with
    ``settings``: only when it was measured with them (``BenchSpec.settings``); else None."""
    path = Path(path)
    if not path.is_file():
        return None
    row = json.loads(path.read_text())
    if "error" in row or (settings is not None and row.get("spec") != settings):
        return None
    return row


def _status(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"error: {row['error']}"
    return f"kNN {cell('knn', row.get('knn'))}, linear {cell('linear', row.get('linear'))}"


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
