"""benchmarks/gpu_check.sh on a machine without CUDA, and the parts of its runner that need no GPU:
argument parsing, per-part timeouts and failures, reading figures, the JSON and the table."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
spec.loader.exec_module(gpu_check)


def _script(env_changes: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, **env_changes}
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)
    return proc, time.perf_counter() - t0


def test_without_cuda_it_fails_at_once_with_one_clear_line():
    proc, seconds = _script({"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and seconds < 10
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device is visible" in lines[0] and "benchmarks/gpu/README.md" in lines[0]
    assert not (ROOT / "benchmarks" / "gpu" / "gpu_check.json").exists() or proc.stdout == ""


@pytest.mark.skipif(os.path.exists("/dev/nvidia0") or bool(subprocess.run(["which", "nvidia-smi"],
                    capture_output=True).stdout), reason="this machine has an NVIDIA driver")
def test_on_a_machine_without_a_driver_it_fails_at_once():
    proc, seconds = _script({})
    assert proc.returncode == 2 and seconds < 10
    assert "no CUDA device is visible" in proc.stderr and "nvidia-smi" in proc.stderr


def test_preflight_that_sees_no_gpu_exits_with_the_message(capsys):
    fake = 'print("PREFLIGHT " + __import__("json").dumps({"gpus": 0, "torch": "9.9", "torch_cuda": "13.0"}))'
    with pytest.raises(SystemExit) as exit_:
        gpu_check.preflight(sys.executable, 30, code=fake)
    assert exit_.value.code == 2
    assert "no CUDA device is visible to torch 9.9" in capsys.readouterr().err


def test_preflight_that_hangs_is_cut_off(capsys):
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        gpu_check.preflight(sys.executable, 1, code="import time; time.sleep(60)")
    assert exit_.value.code == 2 and time.perf_counter() - t0 < 20
    assert "timed out" in capsys.readouterr().err


def test_arguments():
    args = gpu_check.parse_args([])
    assert args.parts == list(gpu_check.PARTS) and args.out.endswith("benchmarks/gpu/gpu_check.json")
    assert args.budget == gpu_check.BUDGET_S and args.timeouts == gpu_check.TIMEOUTS
    # the defaults keep the promise: the budget holds the preflight and every part; a part overruns its
    # share by at most timeout's 10 s grace before the kill
    assert args.budget + 10 <= 8 * 60 - 15
    args = gpu_check.parse_args(["--out", "/tmp/x.json", "--parts", "recipe,tests", "--timeout", "tests=30"])
    assert args.out == "/tmp/x.json" and args.parts == ["recipe", "tests"] and args.timeouts["tests"] == 30
    for bad in (["--parts", "tests,warp"], ["--timeout", "tests=soon"], ["--timeout", "nope=3"], ["--budget", "1"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


def _part(name: str, code: str, timeout_s: int = 30, **kw) -> "gpu_check.Part":
    return gpu_check.Part(name, [sys.executable, "-c", code], timeout_s, **kw)


def test_a_part_past_its_timeout_is_recorded_and_the_rest_still_run(tmp_path):
    parts = [_part("tests", "import time; print('working', flush=True); time.sleep(60)", timeout_s=21),
             _part("vs_lightly", "import sys; print('boom'); sys.exit(4)"),
             _part("recipe", "print('fine')", figures=lambda log: {"said": log.strip().splitlines()[-1]}),
             gpu_check.Part("nccl", ["true"], 30, skip_reason="1 CUDA device(s) visible; the 2-process NCCL run needs 2")]
    t0 = time.perf_counter()
    results = gpu_check.run_parts(parts, tmp_path, budget_s=300)
    assert time.perf_counter() - t0 < 60
    hung, failed, ok, skipped = results
    assert hung.status == "timed out" and hung.returncode == 124 and 20 < hung.seconds < 40
    assert "still running after 21 s" in hung.reason and "working" in hung.log_tail
    assert failed.status == "failed" and failed.reason == "exit status 4: boom" and "boom" in failed.log_tail
    assert ok.status == "ok" and ok.figures == {"said": "fine"} and ok.log_tail == ""
    assert skipped.status == "skipped" and "needs 2" in skipped.reason


def test_a_part_is_skipped_when_the_budget_is_spent(tmp_path):
    result = gpu_check.run_part(_part("tests", "print(1)"), tmp_path / "t.log", seconds_left=10)
    assert result.status == "skipped" and "budget spent" in result.reason


def test_figures_can_fail_a_part_or_mark_it_partial(tmp_path):
    none_passed = _part("tests", "print('5 skipped in 0.1s')", figures=gpu_check.pytest_counts)
    result = gpu_check.run_part(none_passed, tmp_path / "t.log", seconds_left=100)
    assert result.status == "failed" and "no CUDA test passed" in result.reason
    counts = gpu_check.pytest_counts("....\n8 passed, 1 failed, 2 errors in 3.2s\n")
    assert counts["passed"] == 8 and counts["failed"] == 1 and counts["errors"] == 2 and "problem" not in counts


def test_peak_memory_wrapper_runs_a_module_and_writes_nulls_without_cuda(tmp_path):
    out = tmp_path / "mem.rank{rank}.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "peak_memory.py"), "--json", str(out),
                           "-m", "json.tool", "--help"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "RANK": "1"})
    assert proc.returncode == 0 and "json.tool" in proc.stdout
    written = json.loads((tmp_path / "mem.rank1.json").read_text())
    assert written == {"peak_allocated_mb": None, "peak_reserved_mb": None, "devices": []}
    (tmp_path / "mem.rank0.json").write_text(json.dumps({"peak_allocated_mb": 812.5}))
    (tmp_path / "mem.rank1.json").write_text(json.dumps({"peak_allocated_mb": 900.0}))
    assert gpu_check._read_peak(out) == 900.0


def _metrics(run: Path, records: list[dict], env: dict) -> None:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "env.json").write_text(json.dumps(env))


def test_recipe_images_per_s_from_metrics(tmp_path):
    steps = [{"step": 20 * i, "epoch": 1, "loss": 5.0, "lr": 0.1, "images_per_s": ips}
             for i, ips in enumerate([900.0, 30000.0, 32000.0, 31000.0], 1)]
    epochs = [{"step": 80, "epoch": 1, "loss": 5.1, "images_per_s": 25000.0, "knn": 0.7, "epoch_time_s": 2.0},
              {"step": 160, "epoch": 2, "loss": 4.9, "images_per_s": 31500.0, "knn": 0.75, "epoch_time_s": 1.6,
               "skipped_steps": 0}]
    _metrics(tmp_path / "run", steps + epochs, {"device": "cuda:0", "gpu": "NVIDIA H200", "precision": "torch.bfloat16",
                                                "channels_last": True, "world_size": 1})
    f = gpu_check.recipe_figures(tmp_path / "run")
    assert f["epoch_images_per_s"] == [25000.0, 31500.0] and f["step_window_images_per_s_median"] == 31000.0
    assert f["knn"] == 0.75 and f["gpu"] == "NVIDIA H200" and "problem" not in f
    assert gpu_check.recipe_figures(tmp_path / "missing") == {"problem": "metrics.jsonl was not written"}


def _lightly_json(path: Path, **extra) -> Path:
    path.write_text(json.dumps({"images_per_s": {"selfsup": 30000.0, "lightly": extra.pop("lightly", 12000.0)},
                                "speed_ratio": extra.pop("ratio", 2.5), "peak_memory_mb": {"selfsup": 3000.0,
                                                                                           "lightly": 2500.0},
                                "backbone": "resnet18", "batch_size": 512, **extra}))
    return path


def test_report_json_and_table_from_fake_results(tmp_path):
    lightly = gpu_check.lightly_figures(_lightly_json(tmp_path / "vs.json"))
    assert lightly["goal_met"] is True and lightly["settings"]["backbone"] == "resnet18"
    missing = gpu_check.lightly_figures(_lightly_json(tmp_path / "vs2.json", lightly=None, ratio=None,
                                                      lightly_error="lightly unavailable: no module"))
    assert missing["partial"] == "lightly unavailable: no module" and missing["goal_met"] is None
    R = gpu_check.PartResult
    results = [R("tests", "ok", 41.2, 150, 0, figures={"passed": 14, "failed": 0, "skipped": 0, "errors": 0},
                 peak_memory_mb=812.0),
               R("vs_lightly", "ok", 70.0, 150, 0, figures=lightly),
               R("recipe", "timed out", 120.0, 120, 124, reason="still running after 120 s", log_tail="..."),
               R("nccl", "skipped", reason="1 CUDA device(s) visible; the 2-process NCCL run needs 2")]
    out = tmp_path / "gpu" / "check.json"
    report = gpu_check.write_report(results, {"gpus": 1, "gpu_names": ["NVIDIA H200"]}, out, 240.0, 450, "logs\n")
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(report)) and written["ok"] is False
    assert written["parts"]["recipe"]["status"] == "timed out" and written["parts"]["tests"]["peak_memory_mb"] == 812.0
    assert out.with_suffix(".log").read_text() == "logs\n"
    table = gpu_check.format_table(results).splitlines()
    assert table[0].startswith("| part | status |") and len(table) == 6
    assert "14 passed, 0 failed" in table[2] and "| 812 |" in table[2]
    assert "2.50×" in table[3] and "goal ≥ 2×: met" in table[3] and "selfsup 3,000 / lightly 2,500" in table[3]
    assert "timed out" in table[4] and "still running after 120 s" in table[4]
    assert "| nccl | skipped |" in table[5] and "needs 2" in table[5]
    partial = R("vs_lightly", "partial", 50.0, 150, 3, reason=missing["partial"], figures=missing)
    assert "lightly unavailable: no module" in gpu_check.format_table([partial])


def test_recipe_part_fails_with_the_way_out_when_fashion_mnist_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "FMNIST_SYSTEM", tmp_path / "none")
    monkeypatch.setattr(gpu_check, "FMNIST_CARRIED", tmp_path / "none2")
    parts = {p.name: p for p in gpu_check.build_parts(list(gpu_check.PARTS), "python3", tmp_path, gpu_check.TIMEOUTS, 1)}
    assert "--prepare" in parts["recipe"].fail_reason and "needs 2" in parts["nccl"].skip_reason
    result = gpu_check.run_part(parts["recipe"], tmp_path / "recipe.log", seconds_left=100)
    assert result.status == "failed" and "carry benchmarks/_scratch" in result.reason
    assert parts["tests"].skip_reason is None and "--no-install" in parts["vs_lightly"].cmd
    two = {p.name: p for p in gpu_check.build_parts(["nccl"], "python3", tmp_path, gpu_check.TIMEOUTS, 2)}
    assert two["nccl"].skip_reason is None and "torch.distributed.run" in two["nccl"].cmd


def test_dense_figures_from_the_bench_results(tmp_path):
    row = {"method": "densecl", "family": "contrastive", "images_per_s": 900.0, "segmentation_1%": 0.12,
           "segmentation_1%_minutes": 0.5, "detection_finetune_1%": 0.08, "knn": 0.2}
    ref = {"method": "random init", "family": "reference", "segmentation_1%": 0.05}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"rows": [row, ref]}))
    f = gpu_check.dense_figures(path)
    assert f == {"images_per_s": 900.0, "segmentation_1%": 0.12, "segmentation_1%_minutes": 0.5,
                 "detection_finetune_1%": 0.08}
    assert gpu_check.dense_figures(tmp_path / "none.json") == {"problem": "none.json was not written"}
    path.write_text(json.dumps({"rows": [{"method": "densecl", "error": "boom"}]}))
    assert gpu_check.dense_figures(path) == {"problem": "boom"}
