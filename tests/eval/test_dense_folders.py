"""The dense protocols end to end through the CLI on small real annotated folders the tests write: a COCO source
(train.json / test.json; polygons, RLE, a crowd region; mixed sizes and formats; a class only in the test split;
an image without boxes) and a Pascal VOC folder (palette masks, instance masks, XML boxes, a corrupt image). Each:
pretrain on the folder's training images, evaluate every dense protocol, draw the report. Bad input: one clear line
and exit status 2, with what was already written kept."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from annotated_folders import (Drawn, coco_annotation, draw_image, make_voc, polygon, rle,  # noqa: E402
                               write_coco)

from selfsup.cli import main  # noqa: E402

PROTOCOLS = "segmentation,segmentation_finetune,detection,detection_finetune"
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 12, "name": "kite"}]


def _coco_folder(root: Path) -> Path:
    """16 training and 6 test images of mixed sizes and formats; kites (category 12) only in the test split."""
    images, anns = {"train": [], "test": []}, {"train": [], "test": []}
    for k in range(22):
        split = "train" if k < 16 else "test"
        w, h = 48 + 6 * (k % 5), 40 + 5 * (k % 4)
        suffix = ("jpg", "png")[k % 2]
        rects = [] if k == 3 else [(1 + k % 2, (4, 4, w // 2, h // 2)), (2 - k % 2, (w // 2 + 2, h // 2, w - 4, h - 3))]
        if split == "test" and k % 2:
            rects.append((3, (w // 2, 3, w - 3, h // 2 - 2)))
        d = Drawn(f"i{k}", f"i{k}.{suffix}", (w, h), rects, grey=k == 5)
        draw_image(root / "images" / d.file, d, "RGBA" if k == 7 else "L" if k == 5 else "RGB")
        images[split].append({"id": k + 1, "file_name": d.file, "width": w, "height": h})
        for j, (cls, box) in enumerate(d.rects):
            cat = (3, 7, 12)[cls - 1]
            seg = polygon(*box) if j % 2 == 0 else rle((w, h), box)
            anns[split].append(coco_annotation(100 * k + j + 1, k + 1, cat, box, seg))
    anns["train"].append(coco_annotation(9999, 1, 7, (1, 1, 8, 8), rle((48, 40), (1, 1, 8, 8)), crowd=1))
    for split in ("train", "test"):
        write_coco(root / f"{split}.json", images[split], anns[split], CATEGORIES)
    return root


def _cli(*args: str) -> int:
    return main([str(a) for a in args])


def _pretrain_and_evaluate(folder: Path, run: Path, capsys) -> list[dict]:
    assert _cli("pretrain", "--method", "simclr", "--data", folder, "--epochs", 1, "--batch-size", 4, "--set",
                "data.image_size=32", "--set", "data.val_size=0", "--out", run, "--no-progress", "--threads", 1) == 0
    capsys.readouterr()
    assert _cli("evaluate", run, "--protocol", PROTOCOLS, "--data", folder, "--dense-steps", 3, "--threads", 1,
                "--json") == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["protocol"] for r in results] == PROTOCOLS.split(",")
    for r in results:
        assert 0 <= r["score"] <= 1 and r["metric"] in ("mIoU", "AP")
        assert (run / f"eval_{r['protocol']}.json").is_file() and (run / f"eval_{r['protocol']}_examples.pt").is_file()
    assert _cli("report", run, "--no-embeddings") == 0
    for p in PROTOCOLS.split(","):
        assert (run / "report" / f"eval_{p}.png").stat().st_size > 1000
    assert "Segmentation and detection on test images" in (run / "report" / "index.html").read_text()
    return results


@pytest.mark.slow
def test_a_coco_source_end_to_end(tmp_path, capsys):
    folder = _coco_folder(tmp_path / "coco")
    results = _pretrain_and_evaluate(folder, tmp_path / "run", capsys)
    seg = results[0]
    assert seg["classes"] == ["background", "cat", "dog", "kite"] and seg["n_train"] == 16 and seg["n_test"] == 6
    # the kite class, never in a training mask, is still scored on the test split (its IoU exists, here 0)
    assert seg["details"]["selfsup"]["per_class_iou"]["kite"] is not None
    det = results[2]
    assert set(det["details"]["selfsup"]["per_class_ap"]) == {"cat", "dog", "kite"}


@pytest.mark.slow
def test_a_voc_folder_end_to_end(tmp_path, capsys):
    folder = make_voc(tmp_path / "voc")
    results = _pretrain_and_evaluate(folder, tmp_path / "run", capsys)
    assert results[0]["n_train"] == 5 and results[0]["n_test"] == 2  # the corrupt training image skipped


def test_bad_dense_input_is_one_line_and_keeps_what_was_written(tmp_path, capsys):
    folder = make_voc(tmp_path / "voc")
    run = tmp_path / "run"
    assert _cli("pretrain", "--method", "simclr", "--data", folder, "--epochs", 1, "--batch-size", 4, "--set",
                "data.image_size=32", "--set", "data.val_size=0", "--out", run, "--no-progress", "--threads", 1) == 0
    kept = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    # a COCO file naming images that are not there
    bad = write_coco(tmp_path / "bad" / "instances.json",
                     [{"id": 1, "file_name": "missing.jpg", "width": 40, "height": 30}],
                     [coco_annotation(1, 1, 3, (2, 2, 20, 20))], CATEGORIES)
    (tmp_path / "bad" / "other.png").write_bytes(b"")
    assert _cli("evaluate", run, "--protocol", "segmentation", "--data", bad, "--dense-steps", 2) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("selfsup: error:") and "missing.jpg" in err[0]
    # dense protocols on a run without dense data, and an unknown protocol
    assert _cli("evaluate", run, "--protocol", "segmentation", "--data", "digits") == 2
    assert "no dense annotations" in capsys.readouterr().err
    assert _cli("evaluate", run, "--protocol", "segmentaton") == 2
    assert "unknown protocol" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == kept


@pytest.mark.slow
def test_a_detector_on_a_backbone_without_maps_is_one_clear_line(tmp_path, capsys):
    folder = make_voc(tmp_path / "voc")
    run = tmp_path / "run"
    assert _cli("pretrain", "--method", "simclr", "--data", folder, "--backbone", "torchvision:vit_b_32", "--epochs", 1,
                "--batch-size", 4, "--set", "data.image_size=32", "--set", "data.val_size=0", "--out", run,
                "--no-progress", "--threads", 1) == 0
    capsys.readouterr()
    assert _cli("evaluate", run, "--protocol", "detection", "--data", folder, "--dense-steps", 2) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gives no spatial feature map" in err[0] and "timm" in err[0]


def test_the_cli_runs_as_a_module_with_dense_help():
    out = subprocess.run([sys.executable, "-m", "selfsup.cli", "evaluate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "segmentation_finetune" in out.stdout and "--dense-steps" in out.stdout
