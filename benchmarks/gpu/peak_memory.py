"""Run a Python module or script in this process, then write its peak CUDA memory to a JSON file.

    python benchmarks/gpu/peak_memory.py --json OUT.json -m pytest -q tests/test_cuda.py
    python benchmarks/gpu/peak_memory.py --json OUT.json benchmarks/bench_vs_lightly.py --device cuda
    torchrun --nproc_per_node 2 benchmarks/gpu/peak_memory.py --json OUT.rank{rank}.json -m selfsup pretrain ...

What is written, also when the program exits with an error (not when it is killed):
``{"peak_allocated_mb": ..., "peak_reserved_mb": ..., "devices": [...]}`` from
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` of every device, or nulls when the
program never touched CUDA. ``{rank}`` in the path becomes the process's ``RANK`` (torchrun).
"""
from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any

USAGE = "usage: peak_memory.py --json PATH (-m MODULE | SCRIPT) [ARGS...]"


def peak_memory() -> dict[str, Any]:
    """Peak CUDA memory of this process so far; nulls when torch or CUDA was never initialised."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return {"peak_allocated_mb": None, "peak_reserved_mb": None, "devices": []}
    devices = []
    for i in range(torch.cuda.device_count()):
        devices.append({"index": i, "name": torch.cuda.get_device_name(i),
                        "peak_allocated_mb": torch.cuda.max_memory_allocated(i) / 2**20,
                        "peak_reserved_mb": torch.cuda.max_memory_reserved(i) / 2**20})
    return {"peak_allocated_mb": max(d["peak_allocated_mb"] for d in devices),
            "peak_reserved_mb": max(d["peak_reserved_mb"] for d in devices), "devices": devices}


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] != "--json" or (argv[2] == "-m" and len(argv) < 4):
        sys.exit(USAGE)
    out = Path(argv[1].replace("{rank}", os.environ.get("RANK", "0")))
    target = argv[2:]
    try:
        if target[0] == "-m":
            sys.argv = [target[1], *target[2:]]
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(target)
            runpy.run_path(target[0], run_name="__main__")
    finally:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(peak_memory(), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
