"""The GPU check: every CUDA-dependent measurement in one call, each part under its own ``timeout``.

Run through ``benchmarks/gpu_check.sh`` (which picks the Python and fails at once where no CUDA device is
visible); ``benchmarks/gpu/README.md`` says how to run it on the device machine. Parts, in order:

  tests       pytest -m cuda tests/test_cuda.py (pretrain on CUDA with bf16 + channels-last, device choice,
              views made on the GPU without host copies, evaluation, CUDA checkpoint resumed on the CPU)
  vs_lightly  SimCLR ResNet-18, 32×32 RGB, batch 512, bf16: selfsup against lightly (benchmarks/bench_vs_lightly.py)
  recipe      the default recipe (configs/simclr_fashion_mnist.yaml), 2 epochs on CUDA: images/s from metrics.jsonl
  nccl        a 2-process torchrun/NCCL pretrain smoke run, when 2 or more GPUs are visible

Each part runs as ``timeout -k 10 S CMD`` in its own process under ``benchmarks/gpu/peak_memory.py``
(peak GPU memory); a part that fails or times out is recorded and the next one runs. The whole check
also keeps to ``--budget`` seconds: a part gets at most what is left, and is skipped when too little is.
Writes one JSON (``--out``) and a log of every part beside it, and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
PEAK = Path(__file__).resolve().parent / "peak_memory.py"
SCRATCH = ROOT / "benchmarks" / "_scratch"
FMNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz")
FMNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CARRIED = SCRATCH / "fashion-mnist"
PARTS = ("tests", "vs_lightly", "recipe", "nccl", "dense")
TIMEOUTS = {"preflight": 60, "tests": 150, "vs_lightly": 150, "recipe": 120, "nccl": 90, "dense": 150}
BUDGET_S = 450  # 7.5 minutes: every part's time, timeouts included, stays inside the 8-minute promise
MIN_PART_S = 20  # a part is not started with less than this left of the budget
SPEED_GOAL = 2.0  # selfsup / lightly images/s
NO_CUDA = ("gpu_check: no CUDA device is visible{why}. Run it on a machine with an NVIDIA GPU: through the "
           "device tool, see benchmarks/gpu/README.md.")


@dataclass
class Part:
    """One part: its command, its timeout, and how to read its figures from its log and files."""

    name: str
    cmd: list[str]
    timeout_s: int
    figures: Callable[[str], dict[str, Any]] = lambda log: {}
    memory_json: Path | None = None
    skip_reason: str | None = None
    """Set when the part does not apply here (one GPU for a 2-GPU run): recorded as skipped."""
    fail_reason: str | None = None
    """Set when the part cannot run for want of something it needs (data not carried): recorded as failed."""
    outputs: tuple[Path, ...] = ()
    """Files the part writes and its figures read: removed first, so a reused --work-dir reports no stale figure."""
    ok_codes: tuple[int, ...] = (0,)


@dataclass
class PartResult:
    name: str
    status: str  # ok | failed | timed out | skipped | partial
    seconds: float = 0.0
    timeout_s: int | None = None
    returncode: int | None = None
    reason: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    peak_memory_mb: float | None = None
    command: list[str] = field(default_factory=list)
    log_tail: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu" / "gpu_check.json"),
                        help="the JSON written (a .log of every part's output is written beside it)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--budget", type=int, default=BUDGET_S, help="seconds for the whole check")
    parser.add_argument("--timeout", action="append", default=[], metavar="PART=SECONDS",
                        help="one part's timeout (defaults: " + ", ".join(f"{k} {v}" for k, v in TIMEOUTS.items()) + ")")
    parser.add_argument("--work-dir", default=None, help="where runs go (default: a new temporary folder)")
    parser.add_argument("--prepare", action="store_true",
                        help="on a machine with the network: put lightly and Fashion-MNIST under benchmarks/_scratch "
                             "for the device machine (carry that folder), then stop")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        parser.error(f"--parts: unknown part(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}")
    args.parts = parts
    timeouts = dict(TIMEOUTS)
    for item in args.timeout:
        name, _, value = item.partition("=")
        if name not in timeouts or not value.isdigit() or int(value) < 1:
            parser.error(f"--timeout {item!r}: expected PART=SECONDS with PART one of {', '.join(timeouts)}")
        timeouts[name] = int(value)
    args.timeouts = timeouts
    if args.budget < MIN_PART_S:
        parser.error(f"--budget must be at least {MIN_PART_S} seconds")
    return args


# ---------------------------------------------------------------- running parts


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _read_peak(path: Path | None) -> float | None:
    """The peak allocated MiB that peak_memory.py wrote (the largest over torchrun's per-rank files)."""
    if path is None:
        return None
    files = sorted(path.parent.glob(path.name.replace("{rank}", "*")))
    peaks = []
    for f in files:
        try:
            value = json.loads(f.read_text()).get("peak_allocated_mb")
        except (OSError, ValueError):
            continue
        if value is not None:
            peaks.append(float(value))
    return max(peaks) if peaks else None


def run_part(part: Part, log_path: Path, seconds_left: float, env: dict[str, str] | None = None) -> PartResult:
    """Runs one part under ``timeout``; never raises for the part's own failure."""
    if part.skip_reason:
        return PartResult(part.name, "skipped", reason=part.skip_reason, command=part.cmd)
    if part.fail_reason:
        print(f"[gpu_check] {part.name}: failed, not run ({part.fail_reason})", flush=True)
        return PartResult(part.name, "failed", reason=part.fail_reason, command=part.cmd)
    timeout_s = int(min(part.timeout_s, seconds_left - 5))
    if timeout_s < MIN_PART_S:
        return PartResult(part.name, "skipped", reason=f"budget spent ({seconds_left:.0f} s left)", command=part.cmd)
    stale = list(part.outputs)
    if part.memory_json is not None:
        stale += part.memory_json.parent.glob(part.memory_json.name.replace("{rank}", "*"))
    for path in stale:
        if path.is_file():
            path.unlink()
    print(f"[gpu_check] {part.name}: started (timeout {timeout_s} s)", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(part.cmd)}\n")
        log.flush()
        try:
            proc = subprocess.run(["timeout", "-k", "10", str(timeout_s), *part.cmd], stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env=env,
                                  timeout=timeout_s + 30)
            code = proc.returncode
        except subprocess.TimeoutExpired:  # `timeout` itself stuck: should not happen, but never hang
            code = 124
        except OSError as exc:
            log.write(f"could not start: {exc}\n")
            code = 127
    seconds = time.perf_counter() - t0
    text = log_path.read_text(errors="replace")
    result = PartResult(part.name, "ok", seconds=seconds, timeout_s=timeout_s, returncode=code, command=part.cmd,
                        peak_memory_mb=_read_peak(part.memory_json))
    if code in (124, 137) or code == -9:
        result.status, result.reason = "timed out", f"still running after {timeout_s} s"
    elif code not in part.ok_codes:
        last = _tail(text, 1).strip()
        result.status, result.reason = "failed", f"exit status {code}" + (f": {last[:160]}" if last else "")
    try:
        result.figures = part.figures(text)
    except Exception as exc:  # noqa: BLE001 - a figure that cannot be read is reported, not fatal
        result.figures = {"figures_error": f"{type(exc).__name__}: {exc}"}
    if result.status == "ok" and result.figures.get("problem"):
        result.status, result.reason = "failed", result.figures["problem"]
    elif result.status == "ok" and result.figures.get("partial"):
        result.status, result.reason = "partial", result.figures["partial"]
    if result.status != "ok":
        result.log_tail = _tail(text)
    print(f"[gpu_check] {part.name}: {result.status} in {seconds:.0f} s"
          + (f" ({result.reason})" if result.reason else ""), flush=True)
    if result.status in ("failed", "timed out"):
        print(_indent(_tail(text, 15)), flush=True)
    return result


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def run_parts(parts: list[Part], log_dir: Path, budget_s: float, env: dict[str, str] | None = None) -> list[PartResult]:
    """Every part in order, each within what is left of ``budget_s``."""
    t0 = time.perf_counter()
    results = []
    for part in parts:
        results.append(run_part(part, log_dir / f"{part.name}.log", budget_s - (time.perf_counter() - t0), env))
    return results


# ---------------------------------------------------------------- reading figures


def pytest_counts(log: str) -> dict[str, Any]:
    """passed/failed/skipped/errors from pytest's closing line; a CUDA test run that passed nothing is a problem."""
    counts = {k: 0 for k in ("passed", "failed", "skipped", "errors")}
    summary = [ln for ln in log.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)", ln)]
    if summary:
        for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary[-1]):
            counts["errors" if word.startswith("error") else word] = int(n)
    if counts["passed"] == 0:
        counts["problem"] = "no CUDA test passed" + (" (all skipped: torch sees no GPU?)" if counts["skipped"] else "")
    elif counts["skipped"]:
        counts["problem"] = f"{counts['skipped']} CUDA test(s) skipped on a GPU machine"
    return counts


def lightly_figures(path: Path) -> dict[str, Any]:
    """The comparison's figures from bench_vs_lightly.py's JSON."""
    if not path.is_file():
        return {"problem": f"{path.name} was not written"}
    s = json.loads(path.read_text())
    ours, theirs = s["images_per_s"]["selfsup"], s["images_per_s"].get("lightly")
    ratio = s.get("speed_ratio")
    out = {"selfsup_images_per_s": ours, "lightly_images_per_s": theirs, "speed_ratio": ratio,
           "goal_ratio": SPEED_GOAL, "goal_met": None if ratio is None else ratio >= SPEED_GOAL,
           "peak_memory_mb": s.get("peak_memory_mb"), "accuracy": s.get("accuracy"),
           "settings": {k: s.get(k) for k in ("backbone", "dataset", "image_size", "batch_size", "epochs",
                                                "steps_per_epoch", "precision", "gpu", "torch", "lightly_version")}}
    if s.get("lightly_error"):
        out["partial"] = s["lightly_error"]
    return out


def recipe_figures(run_dir: Path) -> dict[str, Any]:
    """images/s of a pretrain run from its metrics.jsonl: each epoch's, and the median of the logged step
    windows after the first (which holds start-up)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {"problem": "metrics.jsonl was not written"}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    epochs = [r for r in records if "epoch_time_s" in r]
    windows = [r["images_per_s"] for r in records if "lr" in r and not r.get("skipped")]
    out: dict[str, Any] = {"epoch_images_per_s": [r["images_per_s"] for r in epochs],
                           "step_window_images_per_s_median": statistics.median(windows[1:]) if len(windows) > 1 else None,
                           "final_loss": epochs[-1]["loss"] if epochs else None,
                           "knn": epochs[-1].get("knn") if epochs else None,
                           "skipped_steps": epochs[-1].get("skipped_steps") if epochs else None}
    env_path = run_dir / "env.json"
    if env_path.is_file():
        env = json.loads(env_path.read_text())
        out.update({k: env.get(k) for k in ("device", "gpu", "precision", "channels_last", "world_size")})
    if not epochs:
        out["problem"] = "no epoch finished"
    return out


def dense_figures(results_json: Path) -> dict[str, Any]:
    """The dense part's figures from its bench results: pretraining images/s, and each dense column with its
    minutes."""
    if not results_json.is_file():
        return {"problem": f"{results_json.name} was not written"}
    rows = [r for r in json.loads(results_json.read_text())["rows"] if r.get("family") != "reference"]
    if not rows or "error" in rows[0]:
        return {"problem": rows[0].get("error", "no row") if rows else "no row"}
    row = rows[0]
    return {k: v for k, v in row.items() if k in ("images_per_s", "wall_time_s", "device")
            or k.startswith(("segmentation", "detection"))}


# ---------------------------------------------------------------- the parts


def fashion_mnist_root() -> Path | None:
    """Where Fashion-MNIST lies: the Debian package's folder, or the copy carried in benchmarks/_scratch."""
    for root in (FMNIST_SYSTEM, FMNIST_CARRIED):
        if all((root / f).is_file() for f in FMNIST_FILES):
            return root
    return None


def build_parts(names: list[str], python: str, work: Path, timeouts: dict[str, int], gpus: int) -> list[Part]:
    """The check's parts, as commands run from the repository root."""

    def wrapped(name: str, *target: str) -> tuple[list[str], Path]:
        mem = work / f"{name}.memory.json"
        return [python, str(PEAK), "--json", str(mem), *target], mem

    parts = []
    if "tests" in names:
        cmd, mem = wrapped("tests", "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "cuda",
                           "tests/test_cuda.py")
        parts.append(Part("tests", cmd, timeouts["tests"], pytest_counts, mem))
    if "vs_lightly" in names:
        out = work / "vs_lightly.json"
        cmd, mem = wrapped("vs_lightly", "benchmarks/bench_vs_lightly.py", "--device", "cuda",
                           "--set", "backbone.name=resnet18", "--set", "backbone.params={}",
                           "--set", "data.name=sample-photos", "--batch-size", "512", "--lightly-precision", "bf16",
                           "--epochs", "3", "--steps-per-epoch", "100", "--workers", "12", "--no-install", "--no-eval",
                           "--out", str(out))
        # speed only (--no-eval): the tests part checks that CUDA training learns. Exit 3: lightly could not
        # be had; selfsup's row is still in the JSON
        parts.append(Part("vs_lightly", cmd, timeouts["vs_lightly"], lambda log, out=out: lightly_figures(out), mem,
                          ok_codes=(0, 3), outputs=(out,)))
    if "recipe" in names:
        run = work / "recipe"
        root = fashion_mnist_root()
        cmd, mem = wrapped("recipe", "-m", "selfsup", "pretrain", "--config", "configs/simclr_fashion_mnist.yaml",
                           "--epochs", "2", "--device", "cuda", "--no-progress", "--overwrite", "--out", str(run),
                           *(["--data-root", str(root)] if root else []))
        missing = None if root else (f"Fashion-MNIST not found in {FMNIST_SYSTEM} nor {FMNIST_CARRIED}: run `bash "
                                     "benchmarks/gpu_check.sh --prepare` where the dataset is, and carry benchmarks/_scratch")
        parts.append(Part("recipe", cmd, timeouts["recipe"], lambda log, run=run: recipe_figures(run), mem,
                          fail_reason=missing))
    if "nccl" in names:
        run = work / "nccl"
        mem = work / "nccl.memory.rank{rank}.json"
        cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(PEAK), "--json",
               str(mem), "-m", "selfsup", "pretrain", "--data", "digits", "--device", "cuda", "--epochs", "2",
               "--batch-size", "128", "--no-progress", "--overwrite", "--set", "train.log_every=2", "--out", str(run)]
        skip = None if gpus >= 2 else f"{gpus} CUDA device(s) visible; the 2-process NCCL run needs 2"
        parts.append(Part("nccl", cmd, timeouts["nccl"], lambda log, run=run: recipe_figures(run), mem, skip))
    if "dense" in names:  # DenseCL on the scenes, then the dense protocols on CUDA (selfsup.eval.dense)
        out = work / "dense"
        root = fashion_mnist_root()
        cmd = [python, "-m", "selfsup", "bench", "--methods", "densecl", "--data", "fashion-mnist-scenes", "--limit",
               "4096", "--epochs", "1", "--set", "method.params.queue_size=2048", "--protocols",
               "segmentation,segmentation_finetune,detection_finetune", "--dense-labels", "1%", "--dense-steps", "100",
               "--device", "cuda", "--no-baseline", "--out", str(out), *(["--data-root", str(root)] if root else [])]
        missing = None if root else "Fashion-MNIST not found (the scenes are made of it): see the recipe part"
        parts.append(Part("dense", cmd, timeouts["dense"], lambda log, out=out: dense_figures(out / "results.json"),
                          fail_reason=missing, outputs=(out / "results.json",)))
    return parts


PREFLIGHT = """
import json, subprocess, sys, torch
info = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
if info["gpus"]:
    info["gpu_names"] = [torch.cuda.get_device_name(i) for i in range(info["gpus"])]
    info["bf16_supported"] = torch.cuda.is_bf16_supported()
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.split()[0]
    except Exception:
        pass
for name in ("torchvision", "timm", "numpy", "sklearn", "yaml", "PIL", "pytest"):
    try:
        info[name] = __import__(name).__version__
    except Exception as exc:
        info[name] = f"missing: {exc}"
print("PREFLIGHT " + json.dumps(info))
"""


def preflight(python: str, timeout_s: int, env: dict[str, str] | None = None, code: str = PREFLIGHT) -> dict[str, Any]:
    """What the machine has (torch, CUDA, GPUs, packages), asked of a child process so this one never
    initialises CUDA; exits 2 with one clear line when no CUDA device is visible."""
    try:
        proc = subprocess.run(["timeout", "-k", "5", str(timeout_s), python, "-c", code], capture_output=True,
                              text=True, cwd=ROOT, env=env, timeout=timeout_s + 15)
    except subprocess.TimeoutExpired:
        proc = subprocess.CompletedProcess([], 124, "", "")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PREFLIGHT ")]
    if proc.returncode != 0 or not lines:
        why = "timed out" if proc.returncode == 124 else (_tail(proc.stderr, 3) or f"exit status {proc.returncode}")
        print(f"gpu_check: {python} could not report its torch and CUDA ({why})", file=sys.stderr)
        sys.exit(2)
    info = json.loads(lines[-1].removeprefix("PREFLIGHT "))
    if not info["gpus"]:
        print(NO_CUDA.format(why=f" to torch {info['torch']} (CUDA build {info['torch_cuda']})"), file=sys.stderr)
        sys.exit(2)
    return info


# ---------------------------------------------------------------- report


def _mb(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}"


def part_summary(r: PartResult) -> str:
    """The table's figures cell for one part."""
    f = r.figures
    if r.status == "skipped":
        return r.reason or ""
    if r.name == "tests" and "passed" in f:
        text = f"{f['passed']} passed, {f['failed']} failed, {f['skipped']} skipped, {f['errors']} errors"
    elif r.name == "vs_lightly" and "selfsup_images_per_s" in f:
        text = f"selfsup {f['selfsup_images_per_s']:,.0f} img/s"
        if f.get("speed_ratio") is not None:
            met = "met" if f["goal_met"] else "NOT met"
            text += (f", lightly {f['lightly_images_per_s']:,.0f} img/s: {f['speed_ratio']:.2f}× "
                     f"(goal ≥ {f['goal_ratio']:g}×: {met})")
        else:
            text += f"; lightly: {f.get('partial', 'not measured')}"
    elif r.name == "dense" and "images_per_s" in f:
        text = f"densecl {f['images_per_s']:,.0f} img/s; " + ", ".join(
            f"{k} {100 * v:.1f}%" for k, v in f.items() if k.startswith(("segmentation", "detection"))
            and not k.endswith(("_labels", "_minutes")) and v is not None)
    elif r.name in ("recipe", "nccl") and "epoch_images_per_s" in f:
        per_epoch = ", ".join(f"{v:,.0f}" for v in f["epoch_images_per_s"])
        text = f"epochs {per_epoch} img/s"
        if f.get("step_window_images_per_s_median"):
            text += f" (steps median {f['step_window_images_per_s_median']:,.0f})"
        if f.get("knn") is not None:
            text += f", online kNN {100 * f['knn']:.1f}%"
    else:
        text = ""
    if r.status != "ok" and r.reason:
        text = f"{r.reason}; {text}" if text else r.reason
    return text


def format_table(results: list[PartResult]) -> str:
    rows = ["| part | status | s (timeout) | figures | peak GPU MiB |", "|---|---|---|---|---|"]
    for r in results:
        seconds = "" if r.status == "skipped" else f"{r.seconds:.0f} ({r.timeout_s})"
        peak = _mb(r.peak_memory_mb)
        if r.name == "vs_lightly" and isinstance(r.figures.get("peak_memory_mb"), dict):
            per_lib = r.figures["peak_memory_mb"]
            peak = " / ".join(f"{k} {_mb(v)}" for k, v in per_lib.items() if v) or peak
        rows.append(f"| {r.name} | {r.status} | {seconds} | {part_summary(r)} | {peak} |")
    return "\n".join(rows)


def write_report(results: list[PartResult], environment: dict[str, Any], out: Path, total_s: float,
                 budget_s: float, log_text: str = "") -> dict[str, Any]:
    """Writes the JSON (and the parts' log beside it, as OUT with .log); returns what was written."""
    report = {"written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "total_s": total_s, "budget_s": budget_s,
              "environment": environment, "ok": all(r.status in ("ok", "skipped") for r in results),
              "parts": {r.name: asdict(r) for r in results}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if log_text:
        out.with_suffix(".log").write_text(log_text)
    return report


# ---------------------------------------------------------------- prepare (run where the network is)


def prepare(python: str) -> int:
    """lightly (pip, no dependencies) and a copy of Fashion-MNIST under benchmarks/_scratch, to carry."""
    bench = runpy_namespace(ROOT / "benchmarks" / "bench_vs_lightly.py")
    if (bench["SCRATCH"] / "lightly").is_dir():
        print(f"lightly: already in {bench['SCRATCH']}")
    else:
        print(f"lightly: installing {' '.join(bench['LIGHTLY_REQUIREMENTS'])} into {bench['SCRATCH']}", flush=True)
        bench["install_lightly"]()
    if all((FMNIST_CARRIED / f).is_file() for f in FMNIST_FILES):
        print(f"Fashion-MNIST: already in {FMNIST_CARRIED}")
    elif all((FMNIST_SYSTEM / f).is_file() for f in FMNIST_FILES):
        FMNIST_CARRIED.mkdir(parents=True, exist_ok=True)
        for f in FMNIST_FILES:
            shutil.copy(FMNIST_SYSTEM / f, FMNIST_CARRIED / f)
        print(f"Fashion-MNIST: copied to {FMNIST_CARRIED}")
    else:
        print(f"Fashion-MNIST: not in {FMNIST_SYSTEM}; run `make dataset` first (the recipe part will be skipped)",
              file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in SCRATCH.rglob("*") if p.is_file()) / 2**20
    print(f"ready: carry benchmarks/_scratch ({size:.0f} MiB; the device tool carries at most 64 MiB with the tree)")
    return 0


def runpy_namespace(path: Path) -> dict[str, Any]:
    import runpy

    return runpy.run_path(str(path))


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    python = sys.executable
    if args.prepare:
        return prepare(python)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    t0 = time.perf_counter()
    environment = preflight(python, args.timeouts["preflight"], env)
    print(f"[gpu_check] {', '.join(environment.get('gpu_names', []))}; torch {environment['torch']} "
          f"(CUDA {environment['torch_cuda']}), python {environment['python']}", flush=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="selfsup-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    environment["work_dir"] = str(work)
    parts = build_parts(args.parts, python, work, args.timeouts, environment["gpus"])
    results = run_parts(parts, work, args.budget - (time.perf_counter() - t0), env)
    total = time.perf_counter() - t0
    logs = "".join(f"===== {p.name}\n{(work / f'{p.name}.log').read_text(errors='replace')}\n"
                   for p in parts if (work / f"{p.name}.log").is_file())
    out = Path(args.out)
    report = write_report(results, environment, out, total, args.budget, logs)
    print(f"\n{format_table(results)}\n\n{total:.0f} s in all; wrote {out} and {out.with_suffix('.log')}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
