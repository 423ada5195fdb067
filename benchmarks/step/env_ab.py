"""Environment settings (read at process start: thread counts, OpenMP policy, THP allocation, ISA caps) side by side.

Each round starts one subprocess per setting (the order rotating), which trains ``--steps`` timed steps of
``bench_step.Step`` after warm-up and reports its median step time; the printed ratio of a setting is the median
over rounds of the first setting's time over its own (> 1: faster than the first), so machine noise hits all alike.

    python benchmarks/step/env_ab.py --model small --setting channels_last+bf16 --rounds 4 \\
        --env "" --env THP_MEM_ALLOC_ENABLE=1 --env OMP_WAIT_POLICY=PASSIVE
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(model: str, setting: str, steps: int, batch: int | None) -> None:
    sys.path.insert(0, str(HERE.parent))
    import torch
    from bench_step import Step

    batch = batch or (256 if model == "small" else 128)
    st = Step(model, setting, torch.device("cpu"), batch)
    st.warm_up()
    times = [st.timed()[1] for _ in range(steps)]
    print(json.dumps({"step_s": statistics.median(times), "threads": torch.get_num_threads(),
                      "capability": torch.backends.cpu.get_cpu_capability(), "compile_s": st.compile_s}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--setting", default="channels_last+bf16", help="a bench_step.py setting for every row")
    parser.add_argument("--env", action="append", default=[],
                        help="space-separated KEY=VALUE pairs for one row ('' = the environment as it is)")
    parser.add_argument("--settings", default=None, help="comma-separated bench_step settings, one row each "
                        "(instead of --env rows; all in the same environment)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.setting, args.steps, args.batch)
        return
    rows = ([(e, args.setting) for e in args.env] if args.env else
            [("", s) for s in (args.settings or args.setting).split(",")])
    times: list[list[float]] = [[] for _ in rows]
    info: list[dict] = [{} for _ in rows]
    for r in range(args.rounds):
        for i in [(r + j) % len(rows) for j in range(len(rows))]:
            env_s, setting = rows[i]
            env = {**os.environ, **dict(kv.split("=", 1) for kv in env_s.split())}
            cmd = [sys.executable, __file__, "--child", "--model", args.model, "--setting", setting,
                   "--steps", str(args.steps)] + (["--batch", str(args.batch)] if args.batch else [])
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{env_s} {setting}: failed\n{proc.stderr[-3000:]}")
            info[i] = json.loads(proc.stdout.strip().splitlines()[-1])
            times[i].append(info[i]["step_s"])
    base = times[0]
    out = []
    for (env_s, setting), t, inf in zip(rows, times, info):
        ratio = statistics.median(b / x for b, x in zip(base, t))
        out.append({"env": env_s, "setting": setting, "step_s": statistics.median(t), "ratio": ratio, **inf})
        print(f"{args.model} {setting:28s} {env_s or '(as is)':50s} {statistics.median(t):6.2f} s/step  ×{ratio:.3f}  "
              f"threads {inf['threads']} {inf['capability']}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
