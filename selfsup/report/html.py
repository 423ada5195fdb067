"""``selfsup report RUN``: one self-contained HTML page about a run, and the PNGs behind it.

The page (``RUN/report/index.html``) embeds every picture as a base64 data URI, so it can be mailed
or archived alone; the same PNGs lie beside it in ``RUN/report/``. Sections: summary, loss and
learning rate, online kNN, collapse diagnostics (with any warnings), a 2-D map of test embeddings,
a nearest-neighbour retrieval grid, the method's own pictures (any ``RUN/*.png``, e.g.
``reconstructions.png``), evaluation results (``RUN/eval_*.json``) and the resolved config.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import json
import logging
from pathlib import Path
from typing import Any

from selfsup.data import DataError, load_dataset
from selfsup.data.clips import for_encoder, is_clips
from selfsup.eval.run_warnings import run_warning
from selfsup.monitor.diagnostics import effective_rank
from selfsup.monitor.features import eval_images, extract_features
from selfsup.report import curves, embeddings
from selfsup.report.dense import dense_pictures
from selfsup.train.checkpoint import CheckpointError
from selfsup.train.rundir import read_metrics

log = logging.getLogger("selfsup")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; background: #fff; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 19px; border-bottom: 1px solid #ddd; padding-bottom: 3px; }
table { border-collapse: collapse; font-size: 14px; } td, th { padding: 3px 12px 3px 0; text-align: left; }
th { color: #555; font-weight: 600; } img { max-width: 100%; border: 1px solid #eee; }
.warn { background: #fdecea; border-left: 4px solid #d62728; padding: 8px 12px; margin: 8px 0; font-size: 14px; }
.ok { background: #eaf7ea; border-left: 4px solid #2ca02c; padding: 8px 12px; margin: 8px 0; font-size: 14px; }
.note { color: #666; font-size: 13px; } pre { background: #f6f6f6; padding: 10px; font-size: 12px; overflow-x: auto; }
"""


@dataclasses.dataclass
class ReportOptions:
    map_method: str = "tsne"
    """``tsne`` (scikit-learn) or ``umap`` (needs umap-learn)."""
    map_size: int = 2000
    """Test images on the 2-D map."""
    bank_size: int = 10000
    """Training images searched for the retrieval grid."""
    queries: int = 10
    """Test queries in the retrieval grid: the first image of each class, up to this many."""
    neighbors: int = 8
    embeddings: bool = True
    """False skips the map and the retrieval grid (no encoder or data needed)."""
    device: str = "cpu"
    seed: int = 0


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _fmt(value: Any, pct: bool = False, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{100 * value:.2f}%" if pct else f"{value:.{digits}f}"
    return str(value)


def _summary(run_dir: Path, m: curves.Metrics, cfg: dict[str, Any], env: dict[str, Any]) -> str:
    last = m.epochs[-1] if m.epochs else {}
    last_step = m.steps[-1] if m.steps else {}
    method = cfg.get("method", {}).get("name", "?")
    try:
        from selfsup.methods import get_method

        info = get_method(method)
        family, paper = info.family, info.paper
    except Exception:  # a run from a method not registered in this install still gets its report
        family, paper = "?", "?"
    epochs_total = cfg.get("train", {}).get("epochs", "?")
    rows = [("method", f"{method} ({family})"), ("paper", paper), ("backbone", cfg.get("backbone", {}).get("name")),
            ("data", cfg.get("data", {}).get("name")), ("epochs", f"{last.get('epoch', 0)} of {epochs_total}"),
            ("final loss (epoch mean)", _fmt(last.get("loss"), digits=4)),
            ("online kNN (last epoch)", _fmt(last.get("knn"), pct=True)),
            ("spread / healthy", f"{_fmt(last_step.get('spread'), digits=4)} / {_fmt(last_step.get('spread_healthy'), digits=4)}"),
            ("effective rank (batch)", _fmt(last_step.get("rank"), digits=1)),
            ("images/s (last epoch)", _fmt(last.get("images_per_s"), digits=0)),
            ("skipped steps (NaN/Inf)", len(m.skipped)), ("device", env.get("device", "?")),
            ("torch", env.get("versions", {}).get("torch", "?")), ("run directory", run_dir.name)]
    return _table(rows)


def _warnings_html(m: curves.Metrics) -> str:
    if not m.steps or "spread" not in m.steps[-1]:
        return '<p class="note">No collapse monitoring: this method logs no embeddings.</p>'
    if not m.warnings:
        return '<div class="ok">No collapse warning: spread and effective rank stayed above their thresholds.</div>'
    return "".join(f'<div class="warn">{html.escape(w["message"])}</div>' for w in m.warnings)


CLIP_COLUMNS = (("single_frame", "single frame"), ("shuffled_frames", "shuffled frames"))
"""A clip encoder's own baselines, shown where a result has them."""


def _eval_results(run_dir: Path) -> str:
    rows, sources, results = [], [], []
    for path in sorted(run_dir.glob("eval_*.json")):
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    clip_columns = [(k, h) for k, h in CLIP_COLUMNS if any(k in r.get("baselines", {}) for r in results)]
    for r in results:
        base = r.get("baselines", {})
        sources.append(r.get("source", "selfsup evaluate"))
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
            r.get("protocol") + (f" ({r['target']})" if r.get("target") else ""),
            f"{r.get('dataset')} (held-out val)" if r.get("split") == "val" else r.get("dataset"),
            f"{r.get('labels')} (seed {r['seed']})" if r.get("seed") else r.get("labels"),
            r.get("metric", "accuracy"), _fmt(r.get("score", r.get("accuracy")), pct=True),
            _fmt(base.get("random_encoder"), pct=True), _fmt(base.get("raw_pixels"), pct=True),
            _fmt(base.get("from_scratch"), pct=True), *(_fmt(base.get(k), pct=True) for k, _ in clip_columns))) + "</tr>")
    if not rows:
        return '<p class="note">No evaluation yet: run <code>selfsup evaluate RUN</code>.</p>'
    head = "".join(f"<th>{h}</th>" for h in ("protocol", "dataset", "labels", "metric", "selfsup", "random encoder",
                                              "raw pixels", "from scratch", *(h for _, h in clip_columns)))
    note = f'<p class="note">From {html.escape(", ".join(dict.fromkeys(sources)))}.</p>'
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>{note}"


def _load_for_pictures(run_dir: Path, opts: ReportOptions):
    """(the run's encoder and config, its train split, its test split — the train split when there is
    none), or the reason they cannot be had (missing data, an unfinished run) as a string."""
    from selfsup.train.rundir import load_run

    try:
        run = load_run(run_dir, opts.device)
        train, test = (for_encoder(s, run.meta) for s in load_dataset(run.cfg.data.labelled()))
    except (CheckpointError, DataError) as exc:
        return str(exc)
    return run, train, test if len(test) else train


def _embedding_pictures(run, train, test, out: Path, opts: ReportOptions) -> tuple[list[Path], str]:
    """(map, retrieval) PNGs and a line about them."""
    mean, std = run.meta["mean"], run.meta["std"]
    sub = test.subset(embeddings.sample_indices(len(test), opts.map_size, opts.seed))
    feats = extract_features(run.encoder, sub, mean, std, opts.device)
    method = opts.map_method
    coords = embeddings.project_2d(feats, method, opts.seed)
    name = "UMAP" if method == "umap" else "t-SNE"
    paths = [embeddings.plot_map(coords, sub.labels, test.classes, out / "embedding_map.png",
                                 f"{name} of {len(sub)} test embeddings ({run.cfg.method.name}), coloured by class")]
    bank = train.head(opts.bank_size)
    bank_feats = extract_features(run.encoder, bank, mean, std, opts.device)
    q_idx = embeddings.pick_queries(test, opts.queries, opts.seed)
    q_feats = extract_features(run.encoder, test.subset(q_idx), mean, std, opts.device)
    sims, idx = embeddings.nearest(bank_feats, q_feats, opts.neighbors)
    paths.append(embeddings.plot_retrieval(test, q_idx, bank, sims, idx, out / "retrieval.png"))
    note = (f"Map of {len(sub)} test images ({name} of l2-normalised encoder features, "
            f"{feats.shape[1]}-D, effective rank {effective_rank(feats):.1f}). Retrieval: one test query per class, "
            f"its {idx.shape[1]} nearest of {len(bank)} training images by cosine similarity (value under each); "
            "green frame = same class, red = another class.")
    return paths, note


def _model_pictures(run, test, run_dir: Path, out: Path, opts: ReportOptions) -> tuple[list[Path], str]:
    """The trained model's own pictures, drawn on a few test images: reconstructions for methods that
    reconstruct (MAE, SimMIM; the whole method, decoder included, from ``checkpoints/last.pt``), the
    colorization grid (grey input, predicted colours, originals) and
    CLS attention maps for ViT encoders. A missing or mismatched checkpoint gives a note, not an error."""
    from selfsup.train.rundir import load_method
    from selfsup.methods import get_method
    from selfsup.nn.vit import is_vit
    from selfsup.report.attention import save_attention_maps
    from selfsup.report.colorization import FILENAME as COLORIZATION_PNG, save_colorization_grid
    from selfsup.report.reconstructions import save_method_pictures
    from selfsup.views.clips import center_clip

    mean, std = run.meta["mean"], run.meta["std"]
    pictures = get_method(run.cfg.method.name).spec.pictures
    if is_clips(test):  # clips: reconstructions as frame strips; attention and colorization are for still images
        if "reconstructions" not in pictures:
            return [], ""
        idx = embeddings.pick_queries(test, 4, opts.seed)
        clips = center_clip(test.batch(idx), test.aspect_at(idx), test.image_size, *test.eval_clip, test.channels)
        try:
            method = load_method(run, run_dir, opts.device)
        except CheckpointError as exc:
            return [], f"the method's own pictures skipped: {str(exc).splitlines()[0]}"
        return [save_method_pictures(method, clips, out, mean, std, opts.seed)], ""
    images = eval_images(test, embeddings.pick_queries(test, 8, opts.seed))
    paths, note = [], ""
    if is_vit(run.encoder):
        paths.append(save_attention_maps(run.encoder, images, out / "attention.png", mean, std))
    if pictures:
        try:
            method = load_method(run, run_dir, opts.device)
        except CheckpointError as exc:
            note = f"the method's own pictures skipped: {str(exc).splitlines()[0]}"
        else:
            if "reconstructions" in pictures:
                paths.append(save_method_pictures(method, images, out, mean, std, opts.seed))
            if "colorization" in pictures:
                paths.append(save_colorization_grid(method, images, mean, std, out / COLORIZATION_PNG,
                                                    f"colorization on {run.cfg.data.name} test images"))
    return paths, note


def write_report(run_dir: str | Path, out_dir: str | Path | None = None,
                 options: ReportOptions | None = None) -> Path:
    """Write ``out_dir/index.html`` (default ``RUN/report/``) and its PNGs; returns the HTML path."""
    opts = options or ReportOptions()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}")
    if not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a selfsup run directory (no metrics.jsonl / config.yaml); "
                              "pass the --out folder of `selfsup pretrain`")
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    import yaml

    cfg_text = (run_dir / "config.yaml").read_text()
    cfg = yaml.safe_load(cfg_text) or {}
    env = json.loads((run_dir / "env.json").read_text()) if (run_dir / "env.json").is_file() else {}
    m = curves.split_metrics(read_metrics(run_dir))
    method = cfg.get("method", {}).get("name", "?")

    parts = [f"<h1>selfsup run report: {html.escape(method)}</h1>",
             f'<p class="note">{html.escape(str(run_dir.resolve().name))} · {len(m.steps)} logged steps, '
             f"{len(m.epochs)} epochs</p>", "<h2>Summary</h2>", _summary(run_dir, m, cfg, env),
             "<h2>Collapse monitor</h2>", _warnings_html(m),
             "<h2>Loss and learning rate</h2>", _img(curves.plot_loss_lr(m, out / "loss_lr.png"), "loss and lr"),
             "<h2>Online kNN accuracy</h2>", _img(curves.plot_knn(m, out / "knn.png"), "online kNN"),
             "<h2>Diagnostics over training</h2>",
             '<p class="note">Spread: std of l2-normalised embeddings, healthy ≈ 1/√D, → 0 under complete collapse. '
             "Effective rank (RankMe): falls under dimensional collapse. Alignment/uniformity: Wang &amp; Isola 2020. "
             "Energy gap: mean cosine of positive pairs minus that of the other pairs in the batch.</p>",
             _img(curves.plot_diagnostics(m, out / "diagnostics.png"), "diagnostics")]
    own = sorted(p for p in run_dir.glob("*.png"))
    if opts.embeddings:
        loaded = _load_for_pictures(run_dir, opts)
        parts.append("<h2>Embedding map and retrieval</h2>")
        weak = run_warning(run_dir)  # the neighbours below are only as good as the encoder
        if weak:
            parts.append(f'<div class="warn">{html.escape(weak)}</div>')
        if isinstance(loaded, str):
            skipped = html.escape(f"Embedding pictures skipped: {loaded} (the model's own pictures too)")
            parts.append(f'<p class="note">{skipped}</p>')
        else:
            run, train, test = loaded
            pics, note = _embedding_pictures(run, train, test, out, opts)
            parts += [f'<p class="note">{html.escape(note)}</p>'] + [_img(p, p.stem) for p in pics]
            drawn, note = _model_pictures(run, test, run_dir, out, opts)
            own += [p for p in drawn if p.name not in {q.name for q in own}]
            if note:
                parts.append(f'<p class="note">{html.escape(note)}</p>')
    if own:
        parts.append("<h2>The method's own pictures</h2>")
        for p in own:
            parts += [f'<p class="note">{html.escape(p.name)}</p>', _img(p, p.stem)]
    dense = dense_pictures(run_dir, out)
    if dense:
        parts.append("<h2>Segmentation and detection on test images</h2>")
        for p, caption in dense:
            parts += [f'<p class="note">{html.escape(p.name)}: {html.escape(caption)}</p>', _img(p, p.stem)]
    parts += ["<h2>Evaluation</h2>", _eval_results(run_dir),
              "<h2>Config</h2>", f"<details><summary>config.yaml</summary><pre>{html.escape(cfg_text)}</pre></details>"]
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>selfsup report: {html.escape(method)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
