"""Experiment trackers: TensorBoard, MLflow and W&B (offline) fed the records ``metrics.jsonl`` gets.

``metrics.jsonl`` stays the run's record; a tracker is a view of it for the tools teams already use. The one
writer, :class:`~selfsup.train.rundir.MetricsLog`, forwards each record to :class:`Trackers`, which logs its
scalars at ``record["step"]``: step records under their own names (``loss``, ``lr``, the method's terms,
diagnostics), epoch summaries under ``epoch/`` and skipped steps under ``skipped/``. At the start the resolved
config is logged (MLflow parameters with dotted keys, a TensorBoard text, the W&B config); at the end of
pretraining ``encoder.pt``, ``encoder.json`` and ``config.yaml`` are logged as MLflow (and W&B) artifacts, and
``selfsup report`` adds the report to the same MLflow run (:func:`log_report`).

Only rank 0 tracks. ``RUN/tracking.json`` names what a run logs to, so a resumed run continues the same MLflow
run (and W&B id) and writes TensorBoard events to the same folder. A resumed run drops the lines of
``metrics.jsonl`` after its checkpoint; TensorBoard hides the events past that step (``purge_step``), MLflow and
W&B cannot un-log, so their histories keep both values of a step logged twice.

The packages are imported only when a run names their tracker (importing selfsup must stay cheap); a missing
package or an MLflow store that cannot be written is one clear line before anything is built or deleted. A
tracker that fails during training is warned about once and dropped: the run and ``metrics.jsonl`` go on.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable

from selfsup.config import ConfigError, RunConfig

log = logging.getLogger("selfsup")
TRACKING_FILE = "tracking.json"
# the Python module each tracker imports and the package that provides it
_NEEDS = {"tensorboard": [("tensorboard", "tensorboard")], "mlflow": [("mlflow", "mlflow-skinny")],
          "wandb": [("wandb", "wandb")]}
_SQL_NEEDS = [("sqlalchemy", "SQLAlchemy"), ("alembic", "alembic")]  # MLflow's SQLite store
_MLFLOW_PARAM_MAX = 6000  # MLflow's longest parameter value


def check_trackers(cfg: RunConfig, run_dir: Path) -> None:
    """Refuse, in one line each, a tracker whose package is missing and a local MLflow store that cannot be
    written — called before the run builds or deletes anything."""
    names = list(dict.fromkeys(cfg.train.loggers))
    uri = mlflow_uri(cfg, run_dir)
    missing: dict[str, list[str]] = {}
    for name in names:
        needs = _NEEDS[name] + (_SQL_NEEDS if name == "mlflow" and uri.startswith("sqlite:") else [])
        for module, package in needs:
            if not _installed(module):
                missing.setdefault(name, []).append(package)
    problems = []
    if missing:
        packages = sorted({p for ps in missing.values() for p in ps})
        extra = ("pip install wandb" if set(missing) == {"wandb"} else
                 "install the 'track' extra: pip install 'selfsup[track]' (in a checkout: pip install -e '.[track]')"
                 + ("; and pip install wandb" if "wandb" in missing else ""))
        problems.append(f"train.loggers: {' and '.join(missing)} need{'s' if len(missing) == 1 else ''} the Python "
                        f"package{'s' if len(packages) > 1 else ''} {', '.join(packages)}, not installed here; {extra}")
    if "mlflow" in names:
        store = _local_store(uri)
        why = _unwritable(store) if store is not None else None
        if why:
            problems.append(f"train.tracking_uri: the MLflow store {uri} cannot be written ({why}); choose another "
                            "with --set train.tracking_uri=sqlite:///PATH/mlflow.db, or leave it unset for one in "
                            "the run directory")
    if problems:
        raise ConfigError(problems)


def mlflow_uri(cfg: RunConfig, run_dir: Path) -> str:
    """``train.tracking_uri``, or by default an SQLite store in the run directory (MLflow's recommended backend;
    its plain-folder store now needs an opt-in)."""
    return cfg.train.tracking_uri or f"sqlite:///{(run_dir / 'mlruns' / 'mlflow.db').resolve()}"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None (import blocked)
        return False


def _local_store(uri: str) -> Path | None:
    """The file (SQLite) or folder (file store) a local MLflow URI writes; None for a server."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    if uri.startswith("file:"):
        return Path(uri[len("file:"):].removeprefix("//"))
    return Path(uri) if "://" not in uri else None


def _unwritable(path: Path) -> str | None:
    """Why ``path`` cannot be created or written, without creating anything; None when it can."""
    folder = path.parent
    while not folder.exists():
        if folder == folder.parent:
            return f"no folder of {path} exists"
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"cannot write in {folder}: {exc.strerror or exc}"
    return None


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one ``metrics.jsonl`` record, named as the trackers log them (``epoch/…`` for an epoch
    summary, ``skipped/…`` for a skipped step); ``step`` and ``epoch`` are the x-axis, not metrics."""
    prefix = "epoch/" if "epoch_time_s" in record else "skipped/" if record.get("skipped") else ""
    return {prefix + k: float(v) for k, v in record.items()
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The config as ``{"optim.lr": "0.3", ...}``: MLflow parameters are flat strings."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, name + "."))
        else:
            out[name] = (value if isinstance(value, str) else json.dumps(value))[:_MLFLOW_PARAM_MAX]
    return out


class Trackers:
    """The enabled trackers of one run (rank 0): each record goes to each; one that fails is dropped."""

    def __init__(self, backends: dict[str, Any]):
        self.backends = backends

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        for name, backend in list(self.backends.items()):
            if values:
                self._call(name, backend.log, int(record.get("step", 0)), values)
            if "continued" in record and name in self.backends:
                self._call(name, backend.note, "continued", json.dumps(record["continued"]), int(record["step"]))

    def close(self, artifacts: list[Path] | None = None, status: str = "FINISHED") -> None:
        """Log ``artifacts`` (when pretraining finished) and end each tracker's run with ``status``
        (MLflow's: ``FINISHED``, ``KILLED`` for a stopped, resumable run, ``FAILED``)."""
        for name, backend in list(self.backends.items()):
            self._call(name, backend.close, [p for p in artifacts or [] if p.is_file()], status)
        self.backends = {}

    def _call(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # a tracker must never stop training; metrics.jsonl has everything
            log.warning("%s: logging failed (%s: %s); it is off for the rest of this run, metrics.jsonl goes on",
                        name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self.backends.pop(name, None)


def open_trackers(cfg: RunConfig, run_dir: Path, step: int, resuming: bool) -> Trackers | None:
    """The trackers ``train.loggers`` names, started (or, resuming, continued from ``RUN/tracking.json``) with
    the config logged; None when there are none. A store that cannot be opened is one line (ConfigError)."""
    names = list(dict.fromkeys(cfg.train.loggers))
    if not names:
        return None
    path = run_dir / TRACKING_FILE
    saved = json.loads(path.read_text()) if resuming and path.is_file() else {}
    backends: dict[str, Any] = {}
    for name in names:
        try:
            backends[name] = _BACKENDS[name](cfg, run_dir, step, saved.get(name))
        except Exception as exc:
            for opened in backends.values():
                opened.close([], "FAILED")
            where = f" at {mlflow_uri(cfg, run_dir)}" if name == "mlflow" else ""
            raise ConfigError([f"train.loggers: {name} could not start{where}: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}"]) from None
    path.write_text(json.dumps({**saved, **{n: b.state for n, b in backends.items()}}, indent=2))
    return Trackers(backends)


class _TensorBoard:
    """Event files in ``RUN/tensorboard`` (``tensorboard --logdir RUN/tensorboard``)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, step: int, saved: dict | None):
        from torch.utils.tensorboard import SummaryWriter

        # resumed: events past the checkpoint's step, which metrics.jsonl dropped, are hidden from TensorBoard
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1 if saved is not None else None)
        self.writer.add_text("config", "".join(f"    {ln}\n" for ln in cfg.to_yaml().splitlines()), step)
        self.state = {"log_dir": "tensorboard"}

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def note(self, key: str, text: str, step: int) -> None:
        self.writer.add_text(key, text, step)

    def close(self, artifacts: list[Path], status: str) -> None:
        self.writer.close()


class _MLflow:
    """An MLflow run: parameters (the config, dotted keys), metrics, and the encoder and config as artifacts."""

    def __init__(self, cfg: RunConfig, run_dir: Path, step: int, saved: dict | None):
        logging.getLogger("alembic").setLevel(logging.WARNING)  # its migrations' lines when a store is created
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = mlflow_uri(cfg, run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        run_id = saved.get("run_id") if saved and saved.get("tracking_uri") == uri else None
        existing: dict[str, str] = {}
        if run_id:
            try:
                existing = dict(self.client.get_run(run_id).data.params)
                self.client.update_run(run_id, status="RUNNING")
            except MlflowException:
                log.warning("MLflow run %s is not in %s: starting a new MLflow run", run_id, uri)
                run_id = None
        if not run_id:
            experiment = self.client.get_experiment_by_name(cfg.train.experiment)
            experiment_id = (experiment.experiment_id if experiment else
                             self.client.create_experiment(cfg.train.experiment, _artifact_location(uri)))
            run_id = self.client.create_run(experiment_id, run_name=run_dir.resolve().name, tags={
                "mlflow.source.name": "selfsup pretrain", "selfsup.run_dir": str(run_dir.resolve())}).info.run_id
        self.run_id = run_id
        params = flat_params(cfg.to_dict())
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(run_id, params=new[i:i + 100])
        for key, value in params.items():  # parameters cannot change: a continued run's new values are tags
            if key in existing and existing[key] != value:
                self.client.set_tag(run_id, f"now.{key}", value)
        self.state = {"tracking_uri": uri, "run_id": run_id}

    def log(self, step: int, values: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def note(self, key: str, text: str, step: int) -> None:
        self.client.set_tag(self.run_id, f"selfsup.{key}", text[:5000])

    def close(self, artifacts: list[Path], status: str) -> None:
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status)


def _artifact_location(uri: str) -> str | None:
    """An SQLite store keeps its artifacts in ``artifacts/`` beside it (MLflow's default is ``./mlruns`` in the
    working directory); other stores decide for themselves."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "artifacts").as_uri()
    return None


class _Wandb:
    """A W&B run in offline mode (``RUN/wandb``; ``wandb sync`` uploads it later)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, step: int, saved: dict | None):
        import uuid

        import wandb

        run_id = (saved or {}).get("id") or uuid.uuid4().hex[:8]
        self.run = wandb.init(mode="offline", dir=str(run_dir), project=cfg.train.experiment,
                              name=run_dir.resolve().name, id=run_id, config=cfg.to_dict(),
                              settings=wandb.Settings(quiet=True))  # no run summary table at the end
        self.state = {"id": run_id, "project": cfg.train.experiment}

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def note(self, key: str, text: str, step: int) -> None:
        self.run.summary[key] = text

    def close(self, artifacts: list[Path], status: str) -> None:
        if artifacts:
            import wandb

            artifact = wandb.Artifact(f"encoder-{self.state['id']}", type="model")
            for path in artifacts:
                artifact.add_file(str(path))
            self.run.log_artifact(artifact)
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


_BACKENDS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb}


def log_report(run_dir: str | Path, report_dir: str | Path) -> str | None:
    """After ``selfsup report``: the report (``index.html`` and its pictures) as artifacts (``report/``) of the
    run's MLflow run, when the run logged to MLflow; a line saying what was done, or None."""
    path = Path(run_dir) / TRACKING_FILE
    saved = json.loads(path.read_text()).get("mlflow") if path.is_file() else None
    if not saved:
        return None
    if not _installed("mlflow"):
        return (f"the run logged to MLflow ({saved['tracking_uri']}) but mlflow is not installed here: the report "
                "was not added to it (pip install 'selfsup[track]')")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    # the page and its pictures only: --out may name a folder that holds other things too
    files = sorted(f for f in Path(report_dir).iterdir() if f.is_file() and f.suffix in (".html", ".png"))
    try:
        client = MlflowClient(tracking_uri=saved["tracking_uri"])
        for f in files:
            client.log_artifact(saved["run_id"], str(f), "report")
    except Exception as exc:  # the report is written; the tracker is a copy
        return f"could not add the report to MLflow run {saved['run_id']}: {str(exc).splitlines()[0]}"
    return f"logged the report to MLflow run {saved['run_id']} ({saved['tracking_uri']}) as report/"
