"""The drawing half of ``selfsup bench``: its results JSON as a markdown table and a bar chart."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from selfsup.report.bench_table import cell, markdown_table, plot_results

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


def _results(rows: list[dict], **extra) -> dict:
    return {"budget_text": "1 epoch(s)", "data": "digits", "torch": "x", "platform": "y", "finetune": False,
            "rows": rows, **extra}


@pytest.mark.parametrize("folder", sorted(p.parent.relative_to(BENCHMARKS).as_posix()
                                          for p in BENCHMARKS.rglob("results.json") if p.with_suffix(".md").is_file()))
def test_committed_bench_tables_are_redrawn_unchanged(folder: str) -> None:
    """Older results JSON (``"finetune": false``/``true``, rows from separate reference jobs) still draw
    exactly the committed table."""
    results = json.loads((BENCHMARKS / folder / "results.json").read_text())
    assert markdown_table(results) == (BENCHMARKS / folder / "results.md").read_text()


def test_table_flags_methods_without_a_recipe_and_hides_finetune_columns(tmp_path: Path) -> None:
    results = _results([{"method": "vicreg", "family": "redundancy-reduction", "recipe": "library defaults",
                         "epochs": 1, "knn": 0.5, "linear": 0.625, "effective_rank": 3.0, "collapse_warnings": 1}])
    table = markdown_table(results)
    assert "fine-tune" not in table.split("\n\n")[1]
    assert "| vicreg | redundancy-reduction | 1 | – | – | – | 50.0% | 62.5% | 3.0 | 1 |" in table
    assert "no configs/vicreg_fashion_mnist.yaml; ran with the library defaults" in table
    with Image.open(plot_results(results, tmp_path / "r.png")) as chart:
        assert chart.size[0] == 800


def test_table_shows_only_the_finetune_fractions_asked_for() -> None:
    row = {"method": "mae", "family": "masked-modelling", "epochs": 3, "knn": 0.5, "linear": 0.6, "finetune_1%": 0.7}
    results = _results([row])
    header = markdown_table({**results, "finetune": ["1%"]}).split("\n\n")[1].splitlines()[0]
    assert "fine-tune 1%" in header and "fine-tune 10%" not in header
    both = markdown_table({**results, "finetune": True}).split("\n\n")[1].splitlines()[0]  # results.json before fractions
    assert "fine-tune 1% | fine-tune 10%" in both


def test_pretext_column_shows_only_when_a_row_has_it() -> None:
    rows = [{"method": "rotation", "family": "pretext", "knn": 0.4, "pretext_acc": 0.625},
            {"method": "simclr", "family": "contrastive", "knn": 0.5}]
    table = markdown_table(_results(rows))
    assert "| pretext acc. |" in table and "| 62.5% |" in table and "pretext acc.: the pretext method's" in table
    assert "pretext acc." not in markdown_table(_results(rows[1:]))


def test_errors_and_missing_fractions_are_noted_under_the_table(tmp_path: Path) -> None:
    rows = [{"method": "simclr", "family": "contrastive", "knn": 0.5, "finetune_1%": None,
             "finetune_1%_error": "label fraction 0.01 leaves class 3 with no example"},
            {"method": "jigsaw", "family": "pretext", "error": "DataError: no images"}]
    table = markdown_table(_results(rows, finetune=["1%"], settings={"data.long_tail": 10}, threads=1))
    assert table.startswith("Budget: 1 epoch(s); data: digits; data.long_tail=10; torch x; y; 1 thread(s)\n")
    assert "- simclr, fine-tune 1%: label fraction 0.01 leaves class 3" in table
    assert "- jigsaw: DataError: no images" in table and "| jigsaw | pretext | – |" in table
    with Image.open(plot_results(_results(rows[1:]), tmp_path / "failed.png")) as chart:  # nothing to draw: a note
        assert chart.size[0] == 800


def test_cells() -> None:
    assert cell("knn", 0.12345) == "12.3%" and cell("knn", None) == "–"
    assert cell("images_per_s", 1234.56) == "1235" and cell("wall_time_s", 12.34) == "12.3"
    assert cell("epochs", 3) == "3"
