"""benchmarks/collect_results.py: one table from the per-family bench folders."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

spec = importlib.util.spec_from_file_location("collect_results", Path(__file__).parents[1] / "benchmarks" / "collect_results.py")
collect = importlib.util.module_from_spec(spec)
spec.loader.exec_module(collect)


def _bench(rows: list[dict]) -> dict:
    return {"budget_text": "10 epoch(s) on all training images", "rows": rows}


def test_collects_every_folder_into_one_table(tmp_path: Path) -> None:
    random_cnn = {"method": "random init (small_resnet)", "family": "reference", "knn": 0.778, "linear": 0.83}
    raw = {"method": "raw pixels", "family": "reference", "knn": 0.857, "linear": 0.844}
    tables = {folder: _bench([dict(random_cnn), dict(raw)]) for folder in collect.BENCH_FOLDERS}
    tables["distillation_redundancy"]["rows"].insert(0, {"method": "byol", "family": "self-distillation", "knn": 0.86,
                                                         "linear": 0.88})
    tables["masked"]["rows"][0]["finetune_1%"] = 0.732  # the one folder that fine-tuned this reference
    tables["simclr"]["rows"].insert(0, {"method": "simclr", "family": "contrastive", "epochs": 10, "knn": 0.84,
                                        "linear": 0.88, "wall_time_s": 540.0, "images_per_s": 1100.0})
    tables["pretext"]["rows"][:0] = [{"method": "rotation", "family": "pretext", "epochs": 10, "knn": 0.88, "linear": 0.89},
                                     {"method": "jigsaw", "family": "pretext", "error": "boom"}]
    tables["contrastive_clustering"]["rows"][:0] = [
        {"method": "swav", "family": "clustering", "knn": 0.8, "linear": 0.86},
        {"method": "mocov2", "family": "contrastive", "knn": 0.82, "linear": 0.87},
        {"method": "simclr", "family": "contrastive", "knn": 0.1, "linear": 0.1}]  # already taken from "simclr"
    for folder, results in tables.items():
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)  # nested folders (vicreg/quiet_rerun) after their parent
        (tmp_path / folder / "results.json").write_text(json.dumps(results))
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "byol_1pct.json").write_text(json.dumps(
        {"method": "byol", "backbone": "small_resnet", "labels": "1%", "n_train": 600, "accuracy": 0.8043,
         "baselines": {"from_scratch": 0.7706, "raw_pixels": 0.7716, "random_encoder": 0.7017}}))
    (tmp_path / "finetune" / "byol_1pct_ld.json").write_text(json.dumps(  # a changed recipe: its own row, not the †
        {"method": "byol", "backbone": "small_resnet", "labels": "1%", "n_train": 600, "accuracy": 0.9,
         "baselines": {"from_scratch": 0.78}, "settings": {"head_init": "linear_probe", "layer_decay": 0.75}}))
    assert collect.main(["--root", str(tmp_path)]) == 0
    table = (tmp_path / "RESULTS.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    methods = [line.split(" | ")[0][2:] for line in lines]
    # families in order, best linear first within a family; a method in two folders taken from the first
    assert methods[1:6] == ["simclr", "mocov2", "swav", "byol", "rotation"]
    assert "| byol | self-distillation | – | – | 86.0% | 88.0% | 80.4% † |" in table  # its fine-tune from evaluate
    assert "| simclr | contrastive | – | 10 | 84.0% | 88.0% | – | – | 1100 | 9.0 | [simclr](simclr/) |" in table
    # identical reference figures from several folders appear once
    assert methods.count("random init (small_resnet)") == 1 and methods.count("raw pixels") == 1
    assert "| random init (small_resnet) | 77.8% | 83.0% | 73.2% |" in table  # merged from the duplicates
    assert "| byol | small_resnet | – | 1% | 0 | 600 | 80.4% | 77.1% | +3.37 | 77.2% | 70.2% |" in table
    assert "| byol (linear_probe head, layer decay 0.75) | small_resnet | – | 1% | 0 | 600 | 90.0% | 78.0% | +12.00 |" in table
    assert "jigsaw" in table.split("Registered but not in the table:")[1]  # its row failed
    assert json.loads((tmp_path / "RESULTS.json").read_text())["rows"][0]["method"] == "simclr"
    assert (tmp_path / "RESULTS.png").stat().st_size > 1000


def test_rows_short_of_their_recipe_are_marked() -> None:
    """‡ marks a --limit budget and fewer epochs than the recipe's YAML says, not a budget's wording."""
    dccae = {"method": "dccae", "recipe": "configs/dccae_fashion_mnist.yaml"}  # the recipe: 10 epochs
    assert collect.short_of_recipe({**dccae, "epochs": 2}, {"epochs": 2, "limit": None})
    assert not collect.short_of_recipe({**dccae, "epochs": 10}, {"epochs": None, "limit": None})
    assert collect.short_of_recipe({**dccae, "epochs": 10}, {"epochs": None, "limit": 20000})
    assert not collect.short_of_recipe({"method": "x", "recipe": "configs/missing.yaml", "epochs": 1}, {})
