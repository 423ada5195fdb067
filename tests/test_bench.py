"""``selfsup bench``: the benchmark matrix end to end on digits, its budget, its reference rows, the
run directories' eval files (the ones `selfsup evaluate` writes) and its errors."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from selfsup import bench
from selfsup.bench import BenchSpec, Budget, reference_rows, run_bench, run_one
from selfsup.cli import main
from selfsup.config import ConfigError, load_config
from selfsup.data import DataError
from selfsup.methods import get_method
from selfsup.report.html import _eval_results

TINY = ("simclr", "byol")
BUDGET = ["--budget", "epochs=1,limit=256", "--threads", "1"]


def _write_recipes(folder: Path) -> Path:
    """Tiny recipes (the methods' own test_params, a narrow backbone) so each run takes seconds."""
    folder.mkdir()
    for name in TINY:
        recipe = {"method": {"name": name, "params": dict(get_method(name).spec.test_params)},
                  "backbone": {"name": "small_resnet", "params": {"widths": [8, 16, 32]}},
                  "train": {"epochs": 3, "batch_size": 32, "log_every": 2}}
        (folder / f"{name}_fashion_mnist.yaml").write_text(yaml.safe_dump(recipe))
    return folder


@pytest.fixture()
def recipes(tmp_path: Path) -> Path:
    return _write_recipes(tmp_path / "configs")


@pytest.fixture()
def _restore_threads():
    """run_one sets the recipe's thread count in this process, as it does in its own subprocess."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_bench(tmp_path_factory) -> tuple[int, str, Path]:
    """One real bench of two methods with baselines and fine-tuning: (exit status, printed, folder)."""
    root = tmp_path_factory.mktemp("bench")
    out = root / "bench"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["bench", "--methods", ",".join(TINY), "--data", "digits", *BUDGET,
                   "--config-dir", str(_write_recipes(root / "configs")), "--finetune", "--finetune-steps", "2",
                   "--out", str(out)])
    return rc, printed.getvalue(), out


def test_bench_end_to_end_on_digits(digits_bench, digits) -> None:
    rc, printed, out = digits_bench
    assert rc == 0, printed
    results = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == [*TINY, "random init (small_resnet)", "raw pixels"]
    for name in TINY:
        r = rows[name]
        assert r["family"] == get_method(name).family and r["epochs"] == 1  # the budget overrides the recipe's 3
        assert r["wall_time_s"] > 0 and r["images_per_s"] > 0 and r["peak_memory_mb"] > 50
        for key in ("knn", "linear", "finetune_1%", "finetune_10%"):
            assert 0.0 <= r[key] <= 1.0
        assert r["knn"] > 0.3  # well above chance (10%) on digits even after a few steps
        assert 1.0 <= r["effective_rank"] <= r["feature_dim"] == 32
        assert r["finetune_1%_labels"] == 10 and r["n_test"] == len(digits[1]) == r["n_test"]
        assert r["n_eval_train"] == len(digits[0]) and "baselines" not in r
        assert (out / "runs" / name / "encoder.pt").is_file() and (out / "logs" / f"{name}.log").is_file()
    assert results["budget"] == {"epochs": 1, "limit": 256, "batch_size": None}
    table = (out / "results.md").read_text()
    assert "| method | family | epochs | wall time (s) | images/s | peak mem (MB) | kNN | linear | fine-tune 1% |" in table
    assert "1 epoch(s) on the first 256 training images" in table and "| simclr | contrastive | 1 |" in table
    assert table in printed
    with Image.open(out / "results.png") as chart:
        assert chart.size[0] == 800 and chart.size[1] > 150


def test_reference_rows_are_the_baselines_each_method_measured(digits_bench) -> None:
    """The random-init row is the random encoder of the methods' backbone, evaluated the same way (its
    fine-tune cells: training from scratch); every method on that backbone measured the same one. The
    raw-pixel row: the normalised pixels, kNN and linear only."""
    _, _, out = digits_bench
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    rand, raw = rows["random init (small_resnet)"], rows["raw pixels"]
    assert rand["family"] == raw["family"] == "reference" and rand["epochs"] == 0 and "wall_time_s" not in rand
    assert rand["backbone"] == "small_resnet" and raw["backbone"] == "none"
    assert 1.0 <= rand["effective_rank"] <= rand["feature_dim"] == 32 and raw["feature_dim"] == 64
    assert raw["knn"] > 0.8 and raw["linear"] > 0.8  # 8×8 digits separate on pixels
    assert "finetune_1%" not in raw and 0 <= rand["finetune_1%"] <= 1 and rand["finetune_10%_labels"] > 100
    for name in TINY:
        run = out / "runs" / name
        knn, linear = (json.loads((run / f"eval_{p}.json").read_text()) for p in ("knn", "linear"))
        ft = json.loads((run / "eval_finetune_10pct.json").read_text())
        assert knn["baselines"] == {"raw_pixels": raw["knn"], "random_encoder": rand["knn"]}
        assert linear["baselines"] == {"raw_pixels": raw["linear"], "random_encoder": rand["linear"]}
        assert ft["baselines"]["from_scratch"] == rand["finetune_10%"]


def test_bench_eval_files_equal_what_selfsup_evaluate_writes(digits_bench, tmp_path: Path) -> None:
    """Each method's figures land in its run directory as the files `selfsup evaluate` writes for the
    same run: same names, same keys, same accuracies and baselines; only the source differs."""
    _, _, out = digits_bench
    bench_run = out / "runs" / "simclr"
    run = tmp_path / "simclr"
    shutil.copytree(bench_run, run, ignore=shutil.ignore_patterns("checkpoints", "eval_*.json"))
    threads = torch.get_num_threads()
    try:
        assert main(["evaluate", str(run), "--protocol", "knn,linear", "--threads", "1"]) == 0
        for labels in ("1%", "10%"):
            assert main(["evaluate", str(run), "--protocol", "finetune", "--labels", labels, "--finetune-steps", "2",
                         "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    names = sorted(p.name for p in bench_run.glob("eval_*.json"))
    assert names == sorted(p.name for p in run.glob("eval_*.json")) == [
        "eval_finetune_10pct.json", "eval_finetune_1pct.json", "eval_knn.json", "eval_linear.json"]
    for name in names:
        ours, theirs = (json.loads((d / name).read_text()) for d in (bench_run, run))
        assert ours.keys() == theirs.keys(), name
        assert ours["source"] == "selfsup bench (1 epoch(s) on the first 256 training images, each recipe's batch size)"
        assert theirs["source"] == "selfsup evaluate"
        for key in ours.keys() - {"source", "time_s", "from_scratch_recipes"}:
            assert ours[key] == theirs[key], (name, key)
    page = _eval_results(bench_run)  # the HTML report shows the bench's figures and says where they come from
    assert "From selfsup bench (1 epoch(s) on the first 256 training images" in page


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


def test_a_failed_evaluation_keeps_the_pretraining_figures(recipes: Path, tmp_path: Path, digits,
                                                           _restore_threads) -> None:
    """Pretraining on an unlabelled folder works; evaluating needs labels: the row keeps its wall time
    and says why it has no accuracy."""
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i, image in enumerate(digits[0].images[:80]):
        Image.fromarray(image[0].numpy(), "L").save(folder / f"{i:03d}.png")
    spec = BenchSpec("simclr", str(recipes / "simclr_fashion_mnist.yaml"),
                     {"data.name": str(folder), "train.epochs": 1, "train.threads": 1, "train.device": "cpu"},
                     str(tmp_path / "r"), str(tmp_path / "r.json"))
    with pytest.raises(DataError, match="no labelled test split"):
        bench._child_main([json.dumps(dataclasses.asdict(spec))])
    row = json.loads((tmp_path / "r.json").read_text())
    assert row["wall_time_s"] > 0 and row["family"] == "contrastive" and "knn" not in row
    assert row["error"].startswith("DataError:") and "no labelled test split" in row["error"]


def test_one_method_evaluated_with_too_few_labels_for_a_fraction(recipes: Path, tmp_path: Path,
                                                                 _restore_threads) -> None:
    """What one bench subprocess does (run here in-process): its row and, for the reference rows, the
    random encoder's and raw pixels' figures; a fraction that leaves a class empty is an empty cell
    with its reason, for the method and its from-scratch twin, and the rest of the row stands."""
    spec = BenchSpec("simclr", str(recipes / "simclr_fashion_mnist.yaml"),
                     {"data.name": "digits", "data.limit": 128, "train.epochs": 1, "train.threads": 1,
                      "train.device": "cpu"}, str(tmp_path / "r"), str(tmp_path / "r.json"),
                     finetune=("1%", "10%"), finetune_steps=2, eval_limit=300)
    row = run_one(spec, {})
    assert row["n_eval_train"] == 300 and 0 <= row["knn"] <= 1 and 0 <= row["finetune_10%"] <= 1
    rand, raw = row["baselines"]["random_encoder"], row["baselines"]["raw_pixels"]
    for r in (row, rand):  # 1% of 300 labels leaves classes empty
        assert r["finetune_1%"] is None and "leaves class" in r["finetune_1%_error"]
        assert r["finetune_10%_labels"] == row["finetune_10%_labels"]
    assert 25 <= row["finetune_10%_labels"] <= 35  # 10% of each class of the 300
    assert raw["feature_dim"] == 64 and raw["n_eval_train"] == 300 and "finetune_10%" not in raw
    assert not (tmp_path / "r" / "eval_finetune_1pct.json").exists()
    assert json.loads((tmp_path / "r" / "eval_knn.json").read_text())["n_train"] == 300


def test_no_baseline_measures_the_method_alone(recipes: Path, tmp_path: Path, _restore_threads) -> None:
    spec = BenchSpec("simclr", str(recipes / "simclr_fashion_mnist.yaml"),
                     {"data.name": "digits", "data.limit": 128, "train.epochs": 1, "train.threads": 1,
                      "train.device": "cpu"}, str(tmp_path / "r"), str(tmp_path / "r.json"),
                     finetune=("10%",), finetune_steps=2, eval_limit=300, baselines=False)
    row = run_one(spec, {})
    assert "baselines" not in row and 0 <= row["finetune_10%"] <= 1
    ft = json.loads((tmp_path / "r" / "eval_finetune_10pct.json").read_text())
    assert ft["baselines"] == {} and "margin_over_scratch" not in ft


def test_one_random_init_row_per_distinct_backbone(recipes: Path) -> None:
    """Methods on different backbones each get their own architecture's random encoder to beat, read
    from a finished method on that backbone (matched by backbone, not by order)."""
    def backbone(widths: list[int]):
        return load_config(recipes / "simclr_fashion_mnist.yaml", {"backbone.params.widths": widths}).backbone

    def measured(knn: float) -> dict:
        return {"random_encoder": {"knn": knn, "finetune_1%": knn / 2}, "raw_pixels": {"knn": 0.5}}

    rows = [{"method": "simclr", "recipe": "a.yaml", "device": "cpu"}, {"method": "byol", "error": "boom"},
            {"method": "swav", "recipe": "c.yaml", "device": "cpu"}]
    wide, narrow = backbone([8, 16, 32]), backbone([8, 16])
    same = reference_rows(rows[:1], [wide], [measured(0.3)])
    assert [r["method"] for r in same] == ["random init (small_resnet)", "raw pixels"]
    assert same[0] == {"method": "random init (small_resnet)", "recipe": "a.yaml", "device": "cpu",
                       "family": "reference", "epochs": 0, "backbone": "small_resnet", "knn": 0.3, "finetune_1%": 0.15}
    assert same[1]["backbone"] == "none" and same[1]["knn"] == 0.5 and "finetune_1%" not in same[1]
    # byol (narrow) failed, swav (wide) finished after it: the narrow row comes from nobody, the wide from simclr
    two = reference_rows(rows, [wide, narrow, wide], [measured(0.3), None, measured(0.3)])
    assert [r["method"] for r in two] == ["random init (small_resnet widths=8-16-32)", "raw pixels"]
    two = reference_rows(rows, [narrow, wide, wide], [None, None, measured(0.4)])
    assert [(r["method"], r["knn"]) for r in two] == [("random init (small_resnet widths=8-16-32)", 0.4),
                                                      ("raw pixels", 0.5)]
    three = reference_rows(rows, [wide, narrow, narrow], [measured(0.3), None, measured(0.1)])
    assert [(r["method"], r["knn"], r["recipe"]) for r in three] == [
        ("random init (small_resnet widths=8-16-32)", 0.3, "a.yaml"),
        ("random init (small_resnet widths=8-16)", 0.1, "c.yaml"), ("raw pixels", 0.5, "a.yaml")]
    assert reference_rows(rows[:1], [wide], [None]) == []  # --no-baseline


def test_pretext_rows_carry_their_held_out_pretext_accuracy(tmp_path: Path, _restore_threads) -> None:
    recipe = tmp_path / "rotation.yaml"
    recipe.write_text(yaml.safe_dump({"method": {"name": "rotation"},
                                      "backbone": {"name": "small_resnet", "params": {"widths": [8, 16, 32]}},
                                      "train": {"epochs": 1, "batch_size": 32, "log_every": 2}}))
    spec = BenchSpec("rotation", str(recipe), {"data.name": "digits", "data.limit": 256, "train.threads": 1,
                                               "train.device": "cpu"}, str(tmp_path / "r"), str(tmp_path / "r.json"),
                     eval_limit=300, baselines=False)
    row = run_one(spec, {})
    assert row["family"] == "pretext" and 0.25 < row["pretext_acc"] <= 1.0  # above the 1-in-4 chance on digits


def test_extra_settings_reach_every_job_and_the_table_header(recipes: Path, tmp_path: Path, monkeypatch) -> None:
    """``selfsup bench --set KEY=VALUE`` (e.g. a long-tailed pretraining set) goes into every method's
    config, its eval files' source and the table's header."""
    seen, real_run = [], bench.subprocess.run

    def fake_run(cmd, **kw):  # the method's job is recorded, not run; other subprocesses (platform) still run
        if "selfsup.bench" not in cmd:
            return real_run(cmd, **kw)
        seen.append(json.loads(cmd[-1]))
        return type("Done", (), {"returncode": 1})()

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    main(["bench", "--methods", "simclr", "--data", "digits", "--config-dir", str(recipes), "--no-baseline",
          "--set", "data.long_tail=10", "--out", str(tmp_path / "b")])
    assert seen and seen[0]["overrides"]["data.long_tail"] == 10 and not seen[0]["baselines"]
    assert seen[0]["source"].endswith("each recipe's batch size; data.long_tail=10)")
    assert "data: digits; data.long_tail=10;" in (tmp_path / "b" / "results.md").read_text()


def test_resume_keeps_finished_rows_and_continues_an_unfinished_run(recipes: Path, tmp_path: Path) -> None:
    """A bench call that ended early: --resume keeps the row of a method it finished with the same settings (its
    run untouched), continues an unfinished method's pretraining from its checkpoint, and runs a method whose
    settings changed again."""
    out = tmp_path / "b"
    common = dict(data="digits", config_dir=recipes, threads=1, baseline=False)
    first = run_bench(list(TINY), out, Budget(1, 64), **common)
    simclr_encoder = out / "runs" / "simclr" / "encoder.pt"
    stamp = simclr_encoder.stat().st_mtime_ns
    (out / "runs" / "byol.json").unlink()  # byol "did not finish": its checkpoint stays
    assert (out / "runs" / "byol" / "checkpoints" / "last.pt").is_file()
    again = run_bench(list(TINY), out, Budget(1, 64), resume=True, **common)
    assert simclr_encoder.stat().st_mtime_ns == stamp
    rows = {r["method"]: r for r in again["rows"]}
    assert rows["simclr"]["knn"] == {r["method"]: r for r in first["rows"]}["simclr"]["knn"]
    assert rows["byol"].get("resumed") is True and "error" not in rows["byol"]
    assert rows["byol"]["wall_time_s"] > 0
    changed = run_bench(["simclr"], out, Budget(1, 96), resume=True, **common)  # another budget: run again
    assert simclr_encoder.stat().st_mtime_ns != stamp and "resumed" not in changed["rows"][0]
