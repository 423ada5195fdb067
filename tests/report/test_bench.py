"""``selfsup bench``: the benchmark matrix end to end on digits, its budget, its table and its errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from selfsup.cli import main
from selfsup.config import ConfigError
from selfsup.methods import get_method
from selfsup.report.bench import BenchSpec, Budget, markdown_table, plot_results, run_bench, run_one

TINY = ("simclr", "byol")


@pytest.fixture()
def recipes(tmp_path: Path) -> Path:
    """Tiny recipes (the methods' own test_params, a narrow backbone) so each run takes seconds."""
    folder = tmp_path / "configs"
    folder.mkdir()
    for name in TINY:
        recipe = {"method": {"name": name, "params": dict(get_method(name).spec.test_params)},
                  "backbone": {"name": "small_resnet", "params": {"widths": [8, 16, 32]}},
                  "train": {"epochs": 3, "batch_size": 32, "log_every": 2}}
        (folder / f"{name}_fashion_mnist.yaml").write_text(yaml.safe_dump(recipe))
    return folder


def test_bench_end_to_end_on_digits(recipes: Path, tmp_path: Path, capsys, digits) -> None:
    out = tmp_path / "bench"
    rc = main(["bench", "--methods", ",".join(TINY), "--data", "digits", "--budget", "epochs=1,limit=256",
               "--config-dir", str(recipes), "--threads", "1", "--finetune", "--finetune-steps", "2",
               "--no-baseline", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    results = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == list(TINY)
    for name in TINY:
        r = rows[name]
        assert r["family"] == get_method(name).family and r["epochs"] == 1  # the budget overrides the recipe's 3
        assert r["wall_time_s"] > 0 and r["images_per_s"] > 0 and r["peak_memory_mb"] > 50
        for key in ("knn", "linear", "finetune_1%", "finetune_10%"):
            assert 0.0 <= r[key] <= 1.0
        assert r["knn"] > 0.3  # well above chance (10%) on digits even after a few steps
        assert 1.0 <= r["effective_rank"] <= r["feature_dim"] == 32
        assert r["finetune_1%_labels"] == 10 and r["n_test"] == len(digits[1])
        assert (out / "runs" / name / "encoder.pt").is_file() and (out / "logs" / f"{name}.log").is_file()
    assert results["budget"] == {"epochs": 1, "limit": 256, "batch_size": None}
    table = (out / "results.md").read_text()
    assert "| method | family | epochs | wall time (s) | images/s | peak mem (MB) | kNN | linear | fine-tune 1% |" in table
    assert "1 epoch(s) on the first 256 training images" in table and "| simclr | contrastive | 1 |" in table
    assert table in printed
    with Image.open(out / "results.png") as chart:
        assert chart.size[0] == 800 and chart.size[1] > 150


def test_budget_parsing_and_overrides() -> None:
    b = Budget.parse("epochs=2, limit=3000,batch-size=64")
    assert b == Budget(2, 3000, 64)
    assert b.overrides() == {"train.epochs": 2, "data.limit": 3000, "train.batch_size": 64}
    assert Budget(epochs=1).overrides() == {"train.epochs": 1}
    assert "each recipe's batch size" in Budget(1, 10).describe()
    for bad in ("epochs=0.5", "steps=3", "epochs"):
        with pytest.raises(ConfigError, match="--budget expects"):
            Budget.parse(bad)


def test_unknown_method_or_bad_recipe_fails_before_any_training(recipes: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown method 'simclrr'.*did you mean 'simclr'"):
        run_bench(["simclr", "simclrr"], tmp_path / "b", Budget(1, 64), data="digits", config_dir=recipes)
    with pytest.raises(ConfigError, match="empty"):
        run_bench([" "], tmp_path / "b", Budget())
    (recipes / "simclr_fashion_mnist.yaml").write_text("method: {name: simclr, params: {temprature: 0.1}}\n")
    with pytest.raises(ConfigError, match="no parameter 'method.params.temprature'"):
        run_bench(["simclr"], tmp_path / "b", Budget(1, 64), data="digits", config_dir=recipes)
    with pytest.raises(ConfigError, match="--finetune fractions must be among 1%, 10%; got 5%"):
        run_bench(["simclr"], tmp_path / "b", Budget(1, 64), data="digits", config_dir=recipes, finetune=["1%", "5%"])
    assert not (tmp_path / "b" / "runs").exists()


def test_a_failing_method_is_a_row_with_its_error(recipes: Path, tmp_path: Path) -> None:
    results = run_bench(["simclr"], tmp_path / "b", Budget(1, 64), data=str(tmp_path / "no-such-data"),
                        config_dir=recipes, threads=1, baseline=False)
    (row,) = results["rows"]
    assert "no-such-data" in row["error"] and "DataError" in row["error"]
    assert "simclr: DataError" in (tmp_path / "b" / "results.md").read_text()


def test_table_flags_methods_without_a_recipe_and_hides_finetune_columns(tmp_path: Path) -> None:
    results = {"budget_text": "1 epoch(s)", "data": "digits", "torch": "x", "platform": "y", "finetune": False,
               "rows": [{"method": "vicreg", "family": "redundancy-reduction", "recipe": "library defaults",
                         "epochs": 1, "knn": 0.5, "linear": 0.625, "effective_rank": 3.0, "collapse_warnings": 1}]}
    table = markdown_table(results)
    assert "fine-tune" not in table.split("\n\n")[1]
    assert "| vicreg | redundancy-reduction | 1 | – | – | – | 50.0% | 62.5% | 3.0 | 1 |" in table
    assert "no configs/vicreg_fashion_mnist.yaml; ran with the library defaults" in table
    with Image.open(plot_results(results, tmp_path / "r.png")) as chart:
        assert chart.size[0] == 800


def test_table_shows_only_the_finetune_fractions_asked_for() -> None:
    row = {"method": "mae", "family": "masked-modelling", "epochs": 3, "knn": 0.5, "linear": 0.6, "finetune_1%": 0.7}
    results = {"budget_text": "3 epoch(s)", "data": "digits", "torch": "x", "platform": "y", "rows": [row]}
    header = markdown_table({**results, "finetune": ["1%"]}).split("\n\n")[1].splitlines()[0]
    assert "fine-tune 1%" in header and "fine-tune 10%" not in header
    both = markdown_table({**results, "finetune": True}).split("\n\n")[1].splitlines()[0]  # results.json before fractions
    assert "fine-tune 1% | fine-tune 10%" in both


def test_reference_row_is_a_random_encoder_evaluated_the_same_way(recipes: Path, tmp_path: Path) -> None:
    """What the extra subprocess of the matrix does for its random-init / from-scratch row (run here in-process)."""
    spec = BenchSpec("random init (small_resnet)", str(recipes / "simclr_fashion_mnist.yaml"),
                     {"data.name": "digits", "train.threads": 1, "train.device": "cpu"}, str(tmp_path / "r"),
                     str(tmp_path / "r.json"), finetune=("1%", "10%"), finetune_steps=2, eval_limit=300, baseline=True)
    row = run_one(spec)
    assert row["family"] == "reference" and row["epochs"] == 0 and "wall_time_s" not in row
    assert row["n_eval_train"] == 300 and 0 <= row["knn"] <= 1 and 0 <= row["finetune_10%"] <= 1
    # 1% of 300 labels leaves classes empty: that cell is empty with the reason, the row still stands
    assert row["finetune_1%"] is None and "leaves class" in row["finetune_1%_error"]
    assert not (tmp_path / "r").exists()  # nothing pretrained


def test_one_random_init_row_per_distinct_backbone(recipes: Path, tmp_path: Path) -> None:
    """Methods on different backbones each get their own architecture's random encoder to beat."""
    from selfsup.report.bench import _random_init_jobs

    def spec(name: str, widths: list[int]) -> BenchSpec:
        return BenchSpec(name, str(recipes / f"{name}_fashion_mnist.yaml"),
                         {"backbone.params.widths": widths}, str(tmp_path / name), str(tmp_path / f"{name}.json"))

    from selfsup.config import load_config

    def random_rows(*jobs: BenchSpec):
        return _random_init_jobs(jobs, [load_config(j.recipe, j.overrides).backbone for j in jobs], tmp_path)

    same = random_rows(spec("simclr", [8, 16, 32]), spec("byol", [8, 16, 32]))
    assert [j.method for j in same] == ["random init (small_resnet)", "raw pixels"] and same[0].baseline
    assert same[1].raw_pixels and not same[0].raw_pixels
    two = random_rows(spec("simclr", [8, 16, 32]), spec("byol", [8, 16]))
    assert [j.method for j in two] == ["random init (small_resnet widths=8-16-32)",
                                       "random init (small_resnet widths=8-16)", "raw pixels"]
    assert len({j.run_dir for j in two}) == 3 and all(j.baseline for j in two)


def test_bench_figures_are_written_into_each_run_for_the_report(recipes: Path, tmp_path: Path) -> None:
    """Each method's kNN/linear/fine-tune land in its run directory as the files `selfsup evaluate` writes,
    against the random encoder of its own backbone, raw pixels and from-scratch training of the same bench."""
    from selfsup.config import load_config
    from selfsup.report.bench import _random_init_jobs, write_run_evaluations
    from selfsup.report.html import _eval_results

    jobs = [BenchSpec(name, str(recipes / f"{recipe}_fashion_mnist.yaml"), {"backbone.params.widths": widths},
                      str(tmp_path / name), str(tmp_path / f"{name}.json")) for name, recipe, widths in
            (("simclr", "simclr", [8, 16, 32]), ("byol", "byol", [8, 16]), ("swav", "simclr", [8, 16]))]
    backbones = [load_config(j.recipe, j.overrides).backbone for j in jobs]
    for j in jobs[:2]:
        Path(j.run_dir).mkdir()
    rows = [{"method": "simclr", "backbone": "small_resnet", "knn": 0.8, "linear": 0.85, "finetune_1%": 0.7,
             "finetune_1%_labels": 18, "n_eval_train": 1797, "n_test": 100},
            {"method": "byol", "knn": 0.6, "linear": 0.65, "finetune_1%": 0.5},
            {"method": "swav", "error": "DataError: no images"}]
    # the reference jobs in another order than the methods' backbones: rows are matched by backbone, not order
    ref_jobs = _random_init_jobs(jobs, backbones, tmp_path)
    ref_jobs = [ref_jobs[1], ref_jobs[2], ref_jobs[0]]
    refs = [{"method": "random init (b)", "knn": 0.1, "linear": 0.15, "finetune_1%": 0.05},
            {"method": "raw pixels", "knn": 0.5, "linear": 0.55},
            {"method": "random init (a)", "knn": 0.3, "linear": 0.4, "finetune_1%": 0.2}]
    results = {"data": "digits", "budget_text": "1 epoch(s)", "finetune": ["1%"], "settings": {"data.long_tail": 10}}
    write_run_evaluations(jobs, rows, backbones, ref_jobs, refs, results)
    knn = json.loads((tmp_path / "simclr" / "eval_knn.json").read_text())
    assert knn["accuracy"] == 0.8 and knn["baselines"] == {"random_encoder": 0.3, "raw_pixels": 0.5}
    assert knn["source"] == "selfsup bench (1 epoch(s))" and knn["settings"] == {"data.long_tail": 10}
    ft = json.loads((tmp_path / "simclr" / "eval_finetune_1pct.json").read_text())
    assert ft["labels"] == "1%" and ft["n_train"] == 18 and ft["baselines"] == {"from_scratch": 0.2}
    byol = json.loads((tmp_path / "byol" / "eval_linear.json").read_text())
    assert byol["baselines"] == {"random_encoder": 0.15, "raw_pixels": 0.55}  # its own (narrower) backbone's row
    assert not (tmp_path / "swav").exists()  # a failed method gets no files
    page = _eval_results(tmp_path / "simclr")
    assert "80.00%" in page and "30.00%" in page and "20.00%" in page and "From selfsup bench (1 epoch(s))" in page


def test_raw_pixel_row_evaluates_the_pixels(recipes: Path, tmp_path: Path) -> None:
    spec = BenchSpec("raw pixels", str(recipes / "simclr_fashion_mnist.yaml"),
                     {"data.name": "digits", "train.threads": 1, "train.device": "cpu"}, str(tmp_path / "r"),
                     str(tmp_path / "r.json"), finetune=True, eval_limit=300, baseline=True, raw_pixels=True)
    row = run_one(spec)
    assert row["family"] == "reference" and row["backbone"] == "none"
    assert row["feature_dim"] == 64 and row["knn"] > 0.8 and row["linear"] > 0.8  # 8×8 digits separate on pixels
    assert "finetune_10%" not in row  # nothing to fine-tune


def test_pretext_rows_carry_their_held_out_pretext_accuracy(tmp_path: Path) -> None:
    """A pretext method's row has its accuracy on its own task over the test images; the column shows
    only when some row has it."""
    recipe = tmp_path / "rotation.yaml"
    recipe.write_text(yaml.safe_dump({"method": {"name": "rotation"},
                                      "backbone": {"name": "small_resnet", "params": {"widths": [8, 16, 32]}},
                                      "train": {"epochs": 1, "batch_size": 32, "log_every": 2}}))
    spec = BenchSpec("rotation", str(recipe), {"data.name": "digits", "data.limit": 256, "train.threads": 1,
                                               "train.device": "cpu"}, str(tmp_path / "r"), str(tmp_path / "r.json"),
                     eval_limit=300)
    row = run_one(spec)
    assert 0.25 < row["pretext_acc"] <= 1.0  # above the 1-in-4 chance after a few steps on digits
    results = {"budget_text": "1 epoch(s)", "data": "digits", "torch": "x", "platform": "y", "finetune": False,
               "rows": [row, {"method": "simclr", "family": "contrastive", "knn": 0.5}]}
    table = markdown_table(results)
    assert "| pretext acc. |" in table and f"| {100 * row['pretext_acc']:.1f}% |" in table
    assert "pretext acc." not in markdown_table({**results, "rows": results["rows"][1:]})


def test_extra_settings_reach_every_job_and_the_table_header(recipes: Path, tmp_path: Path, monkeypatch) -> None:
    """``selfsup bench --set KEY=VALUE`` (e.g. a long-tailed pretraining set) goes into every method's
    config and is stated in the table's header."""
    import selfsup.report.bench as bench

    seen, real_run = [], bench.subprocess.run

    def fake_run(cmd, **kw):  # the method's job is recorded, not run; other subprocesses (platform) still run
        if "selfsup.report.bench" not in cmd:
            return real_run(cmd, **kw)
        seen.append(json.loads(cmd[-1]))
        return type("Done", (), {"returncode": 1})()

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    main(["bench", "--methods", "simclr", "--data", "digits", "--config-dir", str(recipes), "--no-baseline",
          "--set", "data.long_tail=10", "--out", str(tmp_path / "b")])
    assert seen and seen[0]["overrides"]["data.long_tail"] == 10
    assert "data: digits; data.long_tail=10;" in (tmp_path / "b" / "results.md").read_text()
