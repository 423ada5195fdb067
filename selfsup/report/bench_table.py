"""The drawing half of ``selfsup bench``: its results JSON as a markdown table and a bar chart.

A results JSON (written by :mod:`selfsup.bench`) holds the budget, the settings and one row per
method, then the reference rows (a random-init encoder per backbone, raw pixels). This module only
reads it: nothing here trains or evaluates. ``benchmarks/collect_results.py`` draws its combined
chart with :func:`plot_results` too, from the committed ``benchmarks/*/results.json``, so older
files (``"finetune": true`` for both fractions) are still read.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from selfsup.report.curves import save_figure

FINETUNE_FRACTIONS = ("1%", "10%")
"""The label fractions a bench can fine-tune with (each its own column)."""
COLUMNS = [("method", "method"), ("family", "family"), ("epochs", "epochs"), ("wall_time_s", "wall time (s)"),
           ("images_per_s", "images/s"), ("peak_memory_mb", "peak mem (MB)"), ("knn", "kNN"), ("linear", "linear"),
           ("finetune_1%", "fine-tune 1%"), ("finetune_10%", "fine-tune 10%"), ("pretext_acc", "pretext acc."),
           ("effective_rank", "eff. rank"), ("collapse_warnings", "collapse warnings")]
PCT_COLUMNS = {"knn", "linear", "finetune_1%", "finetune_10%", "pretext_acc"}


DENSE_NAMES = {"segmentation": "seg. mIoU linear", "segmentation_finetune": "seg. mIoU fine-tuned",
               "detection": "det. AP frozen", "detection_finetune": "det. AP fine-tuned"}


def dense_columns(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(row key, header) of the dense protocols' columns: each protocol at each label fraction."""
    return [(f"{p}_{f}", f"{DENSE_NAMES.get(p, p)} {f}") for p in results.get("dense") or ()
            for f in results.get("dense_labels") or ()]


def finetune_fractions(results: dict[str, Any]) -> tuple[str, ...]:
    """The fine-tuning label fractions of a results JSON (older files stored ``true`` for both)."""
    value = results.get("finetune")
    return FINETUNE_FRACTIONS if value is True else tuple(value or ())


def settings_text(settings: dict[str, Any] | None) -> str:
    """The ``--set`` settings of a bench as the table header, the chart title and the eval files state them."""
    return "".join(f"; {k}={v}" for k, v in (settings or {}).items())


def cell(key: str, value: Any) -> str:
    """One table cell: a percentage for accuracies, mIoU and AP, a dash for a missing figure."""
    if value is None:
        return "–"
    if key in PCT_COLUMNS or key.split("_")[0] in ("segmentation", "detection"):
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.1f}" if key != "images_per_s" else f"{value:.0f}"
    return str(value)


def markdown_table(results: dict[str, Any]) -> str:
    """``results.md``: the budget line, one row per result row, what the columns mean, and notes
    (errors, fractions without enough labels, methods run with the library defaults)."""
    fractions = finetune_fractions(results)
    cols = [(k, h) for k, h in COLUMNS if (not k.startswith("finetune_") or k[len("finetune_"):] in fractions)
            and (k != "pretext_acc" or any(r.get(k) is not None for r in results["rows"]))]
    dense = dense_columns(results)
    if dense:  # before the rank and warnings columns
        cols = cols[:-2] + dense + cols[-2:]
    settings = settings_text(results.get("settings"))
    lines = [f"Budget: {results['budget_text']}; data: {results['data']}{settings}; torch {results['torch']}; "
             f"{results['platform']}" + (f"; {results['threads']} thread(s)" if results.get("threads") else ""), "",
             "| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    notes = []
    for r in results["rows"]:
        lines.append("| " + " | ".join(cell(k, r.get(k)) for k, _ in cols) + " |")
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
    if dense:
        steps = f"{results['dense_steps']} steps each" if results.get("dense_steps") else "steps scaled to the labels"
        lines.append("Dense (selfsup.eval.dense; mIoU and COCO AP on the test split, labels: a covering fraction of the "
                     f"annotated training images, {steps}): seg. linear = BN + 1×1 conv on the frozen last map "
                     "(DINOv2's protocol); fine-tuned = the encoder with a semantic-FPN decoder; det. = torchvision "
                     "FCOS over an FPN of the last levels, frozen or fine-tuned. The random-init row: a frozen random "
                     "encoder for the frozen columns, training from scratch for the fine-tuned ones.")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def plot_results(results: dict[str, Any], path: Path) -> Path:
    """Horizontal grouped bars: one group per method (top to bottom in table order), one bar per accuracy column."""
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
    settings = settings_text(results.get("settings"))
    ax.set_title(textwrap.fill(f"selfsup bench: {results['budget_text']}{settings}", 90), fontsize=9, pad=20 if keys else 6)
    if keys:  # on top of the axes, under the title, clear of the bars
        ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(keys), frameon=False)
    else:
        ax.text(50, y.mean() if len(y) else 0, "no accuracy to show (see results.md)", ha="center", fontsize=8)
    return save_figure(fig, path)

