"""Experiment trackers (``train.loggers``) fed from the records of ``metrics.jsonl``, read back with each
library's own reader: TensorBoard's ``EventAccumulator`` and MLflow's ``MlflowClient``. A resumed (here:
continued) run goes on in the same MLflow run and TensorBoard folder; ``selfsup report`` adds the report to the
MLflow run; under torchrun only rank 0 writes. A missing package or an unwritable store is one line, exit 2,
before anything is built or deleted; a tracker failing mid-run is dropped with a warning, training goes on.

Tiny digits runs (7 steps per epoch); skipped where the ``track`` extra is not installed."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorboard", reason="the 'track' extra (pip install -e '.[track]') is not installed")
pytest.importorskip("mlflow", reason="the 'track' extra (pip install -e '.[track]') is not installed")

from selfsup import cli  # noqa: E402
from selfsup.config import ConfigError, load_config  # noqa: E402
from selfsup.train import loop, trackers  # noqa: E402
from selfsup.train.rundir import read_metrics  # noqa: E402

SETTINGS = {"method.name": "simclr", "data.name": "digits", "data.limit": 256, "backbone.name": "small_resnet",
            "backbone.widths": [8, 16], "train.batch_size": 32, "train.threads": 1, "train.log_every": 1,
            "train.progress": False, "train.device": "cpu", "train.epochs": 1}
CLI = ["pretrain", "--method", "simclr", "--data", "digits", "--limit", "256", "--epochs", "1", "--batch-size", "32",
       "--threads", "1", "--device", "cpu", "--no-progress", "--set", "backbone.params.widths=[8,16]"]


def _config(**changes):
    return load_config(None, {**SETTINGS, "train.loggers": ["tensorboard", "mlflow"], **changes})


def _events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _mlflow(run_dir: Path):
    from mlflow.tracking import MlflowClient

    saved = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    return MlflowClient(tracking_uri=saved["tracking_uri"]), saved["run_id"]


def _records(run_dir: Path, kind: str) -> list[dict]:
    records = read_metrics(run_dir)
    return [r for r in records if ("epoch_time_s" in r if kind == "epoch" else "lr" in r)]


def test_tensorboard_and_mlflow_get_what_metrics_jsonl_gets(tmp_path, capsys):
    run = tmp_path / "run"
    loop.pretrain(_config(), run)
    steps, epochs = _records(run, "step"), _records(run, "epoch")
    assert len(steps) == 7 and len(epochs) == 1

    acc = _events(run)
    for tag, records, key in (("loss", steps, "loss"), ("lr", steps, "lr"), ("epoch/loss", epochs, "loss"),
                              ("epoch/images_per_s", epochs, "images_per_s")):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [r["step"] for r in records], tag
        for e, r in zip(events, records):  # event files hold float32
            assert math.isclose(e.value, r[key], rel_tol=1e-6, abs_tol=1e-9), (tag, e, r)
    assert "config/text_summary" in acc.Tags()["tensors"]

    client, run_id = _mlflow(run)
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED"
    assert info.data.params["method.name"] == "simclr" and info.data.params["train.batch_size"] == "32"
    assert info.data.params["backbone.params.widths"] == "[8, 16]"
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["loss"]) for r in steps]
    assert [m.value for m in client.get_metric_history(run_id, "epoch/loss")] == [epochs[0]["loss"]]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"encoder.pt", "encoder.json", "config.yaml"}

    # `selfsup report` adds the report to the same MLflow run
    assert cli.main(["report", str(run), "--no-embeddings", "--threads", "1"]) == 0
    assert f"to MLflow run {run_id}" in capsys.readouterr().out
    assert "report/index.html" in {a.path for a in client.list_artifacts(run_id, "report")}

    # continued for a second epoch: the same MLflow run and TensorBoard folder, its steps going on
    loop.pretrain(_config(**{"train.epochs": 2}), run)
    assert _mlflow(run)[1] == run_id and client.get_run(run_id).info.status == "FINISHED"
    steps = _records(run, "step")
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [r["step"] for r in steps] == list(range(1, 15))
    assert [e.step for e in _events(run).Scalars("loss")] == list(range(1, 15))
    assert client.get_run(run_id).data.tags["now.train.epochs"] == "2"  # parameters cannot change; a tag says it
    assert json.loads(client.get_run(run_id).data.tags["selfsup.continued"])["to_epochs"] == 2
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1


def test_resumed_tensorboard_hides_the_steps_metrics_jsonl_dropped(tmp_path, monkeypatch):
    """A run killed one step after its last checkpoint, resumed: TensorBoard shows each step once (the events
    past the checkpoint hidden, ``purge_step``), with the values metrics.jsonl keeps."""
    run = tmp_path / "run"
    cfg = _config(**{"train.loggers": ["tensorboard"], "train.checkpoint_steps": 2, "train.knn_every": 0})

    def killed(self, device):  # after step 5 is logged; the last checkpoint is step 4's
        if self.calls == 4:
            raise KeyboardInterrupt
        self.calls += 1
        return False

    with monkeypatch.context() as m:
        m.setattr(loop._StopFlag, "calls", 0, raising=False)
        m.setattr(loop._StopFlag, "requested", killed)
        with pytest.raises(KeyboardInterrupt):
            loop.pretrain(cfg, run)
    assert [e.step for e in _events(run).Scalars("loss")] == [1, 2, 3, 4, 5]
    loop.pretrain(cfg, run)
    steps = _records(run, "step")
    events = _events(run).Scalars("loss")
    assert [e.step for e in events] == [r["step"] for r in steps] == list(range(1, 8))
    assert all(math.isclose(e.value, r["loss"], rel_tol=1e-6) for e, r in zip(events, steps))


@pytest.mark.parametrize("blocked, package", [("mlflow", "mlflow-skinny"), ("tensorboard", "tensorboard")])
def test_a_missing_package_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys, blocked, package):
    monkeypatch.setitem(sys.modules, blocked, None)  # as if not installed: importing it raises ImportError
    out = tmp_path / "run"
    assert cli.main(CLI + ["--out", str(out), "--set", "train.loggers=[tensorboard,mlflow]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and package in err and "selfsup[track]" in err, err
    assert not out.exists()


def test_importing_selfsup_leaves_the_trackers_unloaded():
    """As tests/test_import_cost.py for timm: the tracker packages load only when a run names them."""
    import subprocess

    code = ("import sys, selfsup.cli, selfsup.train.loop, selfsup.train.trackers; "
            "print(sorted(m for m in ('mlflow', 'tensorboard', 'torch.utils.tensorboard', 'wandb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_unknown_logger_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train.loggers: unknown 'neptune' \(known: tensorboard, mlflow, wandb\)"):
        load_config(None, {"train.loggers": ["mlflow", "neptune"]})


def test_an_unwritable_store_is_one_line_and_keeps_the_finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(CLI + ["--out", str(out)]) == 0
    kept = {p: p.read_bytes() for p in (out / "encoder.pt", out / "checkpoints" / "last.pt", out / "metrics.jsonl")}
    capsys.readouterr()
    (tmp_path / "afile").write_text("not a folder")
    bad = f"sqlite:///{tmp_path}/afile/mlflow.db"
    for extra in ([], ["--overwrite"]):  # resumed or started again: refused before anything is deleted
        code = cli.main(CLI + ["--out", str(out), "--set", "train.loggers=[mlflow]", "--set",
                               f"train.tracking_uri={bad}", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "cannot be written" in err and "is a file" in err, err
        assert {p: p.read_bytes() for p in kept} == kept


def test_a_tracker_that_fails_mid_run_is_dropped_and_training_goes_on(tmp_path, monkeypatch, caplog):
    def broken(self, step, values):
        raise OSError("disk full")

    monkeypatch.setattr(trackers._TensorBoard, "log", broken)
    run = tmp_path / "run"
    with caplog.at_level("WARNING", logger="selfsup"):
        loop.pretrain(_config(**{"train.loggers": ["tensorboard"]}), run)
    assert caplog.text.count("tensorboard: logging failed (OSError: disk full)") == 1
    assert len(_records(run, "step")) == 7 and (run / "encoder.pt").is_file()


@pytest.mark.slow
def test_torchrun_two_processes_write_one_store_from_rank_0(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from test_distributed import _children_output, _torchrun

    out = tmp_path / "run"
    done = _torchrun(out, "--batch-size", "64", "--epochs", "1", "--set", "train.loggers=[tensorboard,mlflow]")
    assert done.returncode == 0, _children_output(done.stderr)
    steps = [r["step"] for r in _records(out, "step")]
    client, run_id = _mlflow(out)
    experiment = client.get_run(run_id).info.experiment_id
    assert len(client.search_runs([experiment])) == 1
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == steps  # each step once: one writer
    assert [e.step for e in _events(out).Scalars("loss")] == steps
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_wandb_offline_keeps_its_run_id_when_continued(tmp_path):
    """W&B (not in the 'track' extra: tested where its package is present) writes offline runs in RUN/wandb; a
    continued run logs under the same id (``wandb sync`` merges them). wandb has no reader for offline files."""
    pytest.importorskip("wandb", reason="wandb is not installed")
    run = tmp_path / "run"
    loop.pretrain(_config(**{"train.loggers": ["wandb"]}), run)
    run_id = json.loads((run / "tracking.json").read_text())["wandb"]["id"]
    loop.pretrain(_config(**{"train.loggers": ["wandb"], "train.epochs": 2}), run)
    assert json.loads((run / "tracking.json").read_text())["wandb"]["id"] == run_id
    folders = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 2 and all((f / f"run-{run_id}.wandb").stat().st_size > 0 for f in folders)
