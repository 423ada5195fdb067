"""Build ``benchmarks/RESULTS.{md,json,png}``: every registered method on Fashion-MNIST in one table.

The figures are not measured here: they are read from the committed outputs of ``selfsup bench``
(one folder per family of methods, each a single command at a stated budget, with its own
reference rows) and of ``selfsup evaluate --protocol finetune`` (``benchmarks/finetune/*.json``).
Run it after adding or rerunning one of those folders:

    python benchmarks/collect_results.py
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

BENCH_FOLDERS = ["vicreg/quiet_rerun", "vicreg", "essl", "simclr", "contrastive_clustering", "distillation_redundancy", "pretext", "masked", "masked/three_epochs",
                 "cca", "self_distillation_masked"]
"""Folders holding one ``results.json`` of ``selfsup bench`` each; a method in two of them is taken from the first."""

FAMILY_ORDER = ["contrastive", "clustering", "self-distillation", "redundancy-reduction", "pretext",
                "masked-modelling", "latent-prediction"]


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _num(value: Any, fmt: str = "{:.0f}") -> str:
    return "–" if value is None else fmt.format(value)


def short_of_recipe(row: dict[str, Any], budget: dict[str, Any]) -> bool:
    """Whether a row ran on less than its recipe: on the first N images (``--limit``), or for fewer epochs
    than the recipe's ``train.epochs`` (its YAML, as the row names it)."""
    if budget.get("limit"):
        return True
    recipe = REPO / row.get("recipe", "")
    if not recipe.is_file() or row.get("epochs") is None:
        return False
    return row["epochs"] < yaml.safe_load(recipe.read_text())["train"]["epochs"]


def load_bench_rows(root: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(method rows, reference rows), each with ``source`` (its folder) and ``budget`` added."""
    methods: dict[str, dict[str, Any]] = {}
    references: dict[str, dict[str, Any]] = {}
    for folder in BENCH_FOLDERS:
        path = root / folder / "results.json"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: rerun the `selfsup bench` command in {path.parent}/README.md")
        results = json.loads(path.read_text())
        for row in results["rows"]:
            row = {**row, "source": folder, "budget": results["budget_text"]}
            row["short_budget"] = short_of_recipe(row, results.get("budget") or {})
            if "error" in row:
                continue
            if row.get("family") != "reference":
                methods.setdefault(row["method"], row)
            else:  # the same architecture and seed in two folders: identical figures, one row with all of them
                kept = references.setdefault(f"{row.get('knn'):.6f} {row.get('linear'):.6f}", row)
                kept.update({k: v for k, v in row.items() if kept.get(k) is None})
    rows = sorted(methods.values(), key=lambda r: (FAMILY_ORDER.index(r["family"]) if r["family"] in FAMILY_ORDER
                                                    else len(FAMILY_ORDER), -(r.get("linear") or 0)))
    return rows, list(references.values())


def load_finetune(root: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted((root / "finetune").glob("*.json")):
        r = json.loads(path.read_text())
        out.append({**r, "file": f"finetune/{path.name}"})
    return out


def recipe_changes(finetune: dict[str, Any]) -> str:
    """How a fine-tune's recipe differs from the default: ``""``, or e.g. ``"linear_probe head, layer decay 0.75"``."""
    settings = finetune.get("settings") or {}
    changes = []
    if settings.get("head_init", "random") != "random":
        changes.append(f"{settings['head_init']} head")
    if settings.get("layer_decay", 1.0) != 1.0:
        changes.append(f"layer decay {settings['layer_decay']:g}")
    return ", ".join(changes)


def default_recipe_1pct(finetunes: list[dict[str, Any]]) -> dict[str, float]:
    """Method → accuracy of its 1% fine-tune with the default (random-head) recipe, the bench's own recipe."""
    return {r["method"]: r["accuracy"] for r in finetunes if r.get("labels") == "1%" and not recipe_changes(r)
            and not r.get("seed")}


def markdown(rows: list[dict[str, Any]], refs: list[dict[str, Any]], finetunes: list[dict[str, Any]],
             missing: list[str]) -> str:
    lines = ["# Every method on Fashion-MNIST (collected by `benchmarks/collect_results.py`)", "",
             "One row per registered method, at its recipe (`configs/<method>_fashion_mnist.yaml`) on all 55,000",
             "pretraining images on a 2-core CPU, bf16 autocast; evaluation on the full labelled train split",
             "(60,000) and the 10,000 test images. Each row comes from a `selfsup bench` command whose folder (last",
             "column) holds its README, command, results and chart. One seed per row: differences under ~1 point",
             "are noise. Compare a method with the random encoder of **its own architecture** (reference rows below).", "",
             "| method | family | backbone | epochs | kNN | linear | fine-tune 1% | eff. rank | images/s | pretraining (min) | folder |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    evaluated = default_recipe_1pct(finetunes)
    for r in rows:
        ft = _pct(r.get("finetune_1%"))
        if r.get("finetune_1%") is None and r["method"] in evaluated:
            ft = _pct(evaluated[r["method"]]) + " †"
        epochs = f"{r.get('epochs', '–')}" + (" ‡" if r["short_budget"] else "")
        lines.append(f"| {r['method']} | {r['family']} | {r.get('backbone', '–')} | {epochs} | "
                     f"{_pct(r.get('knn'))} | {_pct(r.get('linear'))} | {ft} | "
                     f"{_num(r.get('effective_rank'))} | {_num(r.get('images_per_s'))} | "
                     f"{_num((r.get('wall_time_s') or 0) / 60 or None, '{:.1f}')} | [{r['source']}]({r['source']}/) |")
    lines += ["", "Fine-tune 1%: the whole encoder and a linear head on 600 labelled images (stratified, seed 0), "
              "300 steps (`selfsup.eval.finetune`); † from `selfsup evaluate` on the same run, same recipe "
              "(table below); – not measured. images/s and minutes: as measured in that folder's run (its README "
              "says when the machine was shared)." + (
                  " ‡ a smaller budget than the recipe's, named in that folder's README (the rows' budget: "
                  + "; ".join(sorted({f"{r['method']}: {r['budget']}" for r in rows if r["short_budget"]})) + ")."
                  if any(r["short_budget"] for r in rows) else "")]
    lines += ["", "Reference rows (no pretraining), evaluated the same way:", "",
              "| reference | kNN | linear | fine-tune 1% (from scratch) | eff. rank | folder |", "|---|---|---|---|---|---|"]
    for r in refs:
        lines.append(f"| {r['method']} | {_pct(r.get('knn'))} | {_pct(r.get('linear'))} | "
                     f"{_pct(r.get('finetune_1%'))} | {_num(r.get('effective_rank'))} | [{r['source']}]({r['source']}/) |")
    if finetunes:
        lines += ["", "## Fine-tuning with few labels (`selfsup evaluate RUN --protocol finetune --labels F`)", "",
                  "The whole pretrained encoder plus a linear head, beside the same architecture trained from scratch",
                  "with the same recipe, steps and data order (stratified label subset drawn with the row's seed, which",
                  "also seeds the heads and augmentations); in the same call, linear",
                  "probes on the same labels over raw pixels and over the frozen random encoder. A recipe change that",
                  "only makes sense for pretrained weights (a probe-initialised head, layer-wise decay) is tried from",
                  "scratch too, and without it: the from-scratch column is the better of the two.", "",
                  "| method | backbone | pretraining epochs | labels | seed | images | fine-tuned | from scratch | gain | raw pixels (linear) | random encoder (linear) | file |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        order = lambda r: (r["method"], recipe_changes(r), -(r.get("pretraining_epochs") or 0), r["labels"],  # noqa: E731
                           r.get("seed", 0))
        for r in sorted(finetunes, key=order):
            b = r.get("baselines", {})
            gain = r["accuracy"] - b["from_scratch"] if b.get("from_scratch") is not None else None
            changes = recipe_changes(r)
            name = f"{r['method']} ({changes})" if changes else r["method"]
            lines.append(f"| {name} | {r.get('backbone', '–')} | {r.get('pretraining_epochs', '–')} | {r['labels']} | "
                         f"{r.get('seed', 0)} | {r.get('n_train', '–')} | "
                         f"{_pct(r['accuracy'])} | {_pct(b.get('from_scratch'))} | "
                         f"{'–' if gain is None else f'{100 * gain:+.2f}'} | {_pct(b.get('raw_pixels'))} | "
                         f"{_pct(b.get('random_encoder'))} | [{r['file']}]({r['file']}) |")
    if missing:
        lines += ["", f"Registered but not in the table: {', '.join(missing)} (colorization needs colour images: "
                      "`configs/colorization_sample_photos.yaml`, grid in [pretext](pretext/))."]
    lines += ["", "Smaller budgets for every method in one command: [two_epochs](two_epochs/) (2 epochs on 10,000 images)",
              "and [tiny_budget](tiny_budget/) (1 epoch on 3,000). Class-imbalanced pretraining: [long_tail](long_tail/).",
              "Step speed on this CPU: [step](step/)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=HERE, help="the benchmarks folder")
    args = parser.parse_args(argv)
    from selfsup.methods import METHODS
    from selfsup.report.bench_table import plot_results

    rows, refs = load_bench_rows(args.root)
    finetunes = load_finetune(args.root)
    missing = sorted(set(METHODS) - {r["method"] for r in rows})
    (args.root / "RESULTS.md").write_text(markdown(rows, refs, finetunes, missing))
    combined = {"rows": rows + refs, "finetune": ["1%"], "sources": BENCH_FOLDERS, "finetune_runs": finetunes}
    (args.root / "RESULTS.json").write_text(json.dumps(combined, indent=2))
    evaluated = default_recipe_1pct(finetunes)
    chart_rows = [{**r, "method": f"{r['method']} ({r.get('epochs')} ep)" if r.get("epochs") else r["method"],
                   "finetune_1%": r.get("finetune_1%") if r.get("finetune_1%") is not None else evaluated.get(r["method"])}
                  for r in rows + refs]
    plot_results({"rows": chart_rows, "budget_text": "each method at its recipe's epochs on all of Fashion-MNIST (RESULTS.md)"},
                 args.root / "RESULTS.png")
    print((args.root / "RESULTS.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
