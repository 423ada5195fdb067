"""Every recipe in configs/ loads, and the image-folder SEER recipe runs end to end on a tiny folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import selfsup
from selfsup.config import load_config
from selfsup.data import DataError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
SEER = CONFIGS[0].parent / "seer_folder.yaml"


def _folder(root: Path, classes: int = 2, per_class: int = 12) -> Path:
    """Random-coloured PNGs of a few sizes in class subfolders."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(24, 48, size=2))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i:02d}.png")
    return root


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_loads(path):
    load_config(path, {})


def test_seer_recipe_is_swav_on_a_regnety_with_a_3_layer_head_streamed(tmp_path):
    cfg = load_config(SEER, {})
    assert cfg.method.name == "swav" and cfg.backbone.name.startswith("timm:regnety")
    assert cfg.method.params["proj_layers"] == 3
    assert cfg.optim.name == "lars" and cfg.views["local_crops"] > 0 and cfg.data.stream is True
    with pytest.raises(DataError, match="no such path"):  # the placeholder folder: --data is needed
        selfsup.pretrain(cfg, tmp_path / "no_data")


def test_seer_recipe_runs_on_a_folder(tmp_path):
    folder = _folder(tmp_path / "images")
    cfg = load_config(SEER, {"data.name": str(folder), "data.image_size": 32, "train.epochs": 1,
                             "train.batch_size": 8, "train.threads": 1, "train.progress": False,
                             "method.params.num_prototypes": 8, "method.params.proj_hidden": 32})
    selfsup.pretrain(cfg, tmp_path / "run")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["backbone"]["name"] == "timm:regnety_002" and saved["data"]["stream"] is True
    assert (tmp_path / "run" / "encoder.pt").is_file()
