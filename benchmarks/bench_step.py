"""How fast is one SimCLR training step, and where does its time go?

For each model (the default recipe's small CNN on 28×28 Fashion-MNIST-shaped batches, and ResNet-18
at 32×32 RGB) and each setting (fp32 contiguous as the baseline, channels-last, bf16 autocast,
torch.compile), one subprocess per setting so peak memory is its own, this prints:

- images/s of the whole step (augmentation + forward + backward + optimiser),
- the share of the step spent making the views (batched augmentation on the device),
- achieved training FLOP/s (FLOPs counted by ``torch.utils.flop_counter``) and its ratio to the
  matmul peak of the row's own dtype measured in the same process (bf16 rows: a bf16 matmul; fp32
  rows: an fp32 one),
- peak memory (CUDA: max allocated; CPU: the subprocess's max resident set),
- torch.compile's compile time where used.

    python benchmarks/bench_step.py [--device cpu|cuda] [--steps 8] [--models small,resnet18]

A setting is ``+``-joined tokens (``TOKENS``): ``channels_last``, ``bf16``, ``compile`` (the whole training
step), ``compile_backbone``, ``compile_autotune``, ``no_gemm_wgrad``, ``no_small_map``. ``--interleave ROUNDS``
runs all settings of a model in one process, one step each in turn, and prints each one's median step-time ratio
to the first setting's: the figure to trust on a loaded machine.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

MODELS = {
    "small": {"backbone": "small_resnet", "params": {"widths": [32, 64, 128, 512], "stem_stride": 2}, "chans": 1, "size": 28,
              "head": {"proj_hidden": 512, "proj_dim": 128}},
    "resnet18": {"backbone": "resnet18", "params": {}, "chans": 3, "size": 32,
                 "head": {"proj_hidden": 2048, "proj_dim": 128}},
}
SETTINGS = {
    "fp32": {"channels_last": False, "bf16": False, "compile": False},
    "channels_last": {"channels_last": True, "bf16": False, "compile": False},
    "channels_last+bf16": {"channels_last": True, "bf16": True, "compile": False},
    "channels_last+compile": {"channels_last": True, "bf16": False, "compile": True},
    "channels_last+bf16+compile": {"channels_last": True, "bf16": True, "compile": True},
}
TOKENS = {
    "fp32": {}, "channels_last": {"channels_last": True}, "bf16": {"bf16": True},
    "compile": {"compile": "step"},  # the whole training step (forward, loss, backward), as train.compile does
    "compile_backbone": {"compile": "backbone"},  # the backbone only, in place (train.compile before #20)
    "compile_autotune": {"compile": "step", "compile_mode": "max-autotune-no-cudagraphs"},
    "no_gemm_wgrad": {"gemm_wgrad": False},  # oneDNN's own bf16 weight gradient for strided convs
    "no_small_map": {"small_map": False},  # F.conv2d for the ≤ 2×2-output convs too
}


def parse_setting(setting: str) -> dict:
    """A setting is ``+``-joined tokens (``channels_last+bf16+compile``); see ``TOKENS``."""
    s = {"channels_last": False, "bf16": False, "compile": None, "compile_mode": None, "gemm_wgrad": True,
         "small_map": True}
    for token in setting.split("+"):
        if token not in TOKENS:
            raise SystemExit(f"unknown setting token {token!r}; known: {', '.join(TOKENS)}")
        s.update(TOKENS[token])
    return s


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, reps: int = 10,
                max_n: int | None = None, max_s: float = 0.2) -> tuple[float, int]:
    """(FLOP/s, n) of an n×n by n×n product in ``dtype``, the median of ``reps`` timed products.

    n doubles from 256 up to ``max_n`` (2048 on CPUs, 8192 on GPUs, where 2048 is too short to time)
    while one product takes under ``max_s`` seconds, so a dtype that the CPU only emulates (bf16 without
    AVX-512 BF16: hundreds of times slower) still measures in seconds, on a smaller n.
    """
    max_n = max_n or (8192 if device.type == "cuda" else 2048)

    def once(a: torch.Tensor, b: torch.Tensor) -> float:
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        return time.perf_counter() - t0

    n = 256
    while True:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        once(a, b)  # warm-up: kernel selection, first-touch allocation
        if n >= max_n or once(a, b) >= max_s:
            break
        n *= 2
    once(a, b)
    times = [once(a, b) for _ in range(reps)]
    return 2 * n**3 / statistics.median(times), n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Step:
    """One model + optimiser trained with one setting: ``views()`` makes a batch's views, ``train(views)`` takes
    the optimiser step (forward, loss, backward, LARS), both as the training loop does."""

    def __init__(self, model_name: str, setting: str, device: torch.device, batch: int):
        from selfsup.methods.base import Progress
        from selfsup.methods.simclr import SimCLR
        from selfsup.nn.backbones import build_backbone
        from selfsup.train.optim import LARS
        from selfsup.views import Augment, ViewRecipe, make_views, resolve_sizes

        m, s = MODELS[model_name], parse_setting(setting)
        self.model_name, self.setting, self.s, self.device, self.batch = model_name, setting, s, device, batch
        torch.manual_seed(0)
        model = SimCLR(build_backbone(m["backbone"], m["chans"], m["size"], **m["params"]), **m["head"]).to(device)
        if s["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.opt = LARS(model.parameters(), lr=0.1, weight_decay=1e-6)
        recipe = resolve_sizes(ViewRecipe(globals_=(Augment(scale=(0.2, 1.0), blur_p=0.0),) * 2), m["size"])
        self.images = torch.randint(0, 256, (batch, m["chans"], m["size"], m["size"]), dtype=torch.uint8,
                                    device=device)
        mean, std = [0.5] * m["chans"], [0.25] * m["chans"]
        self._make_views = lambda: make_views(self.images, recipe, mean, std)
        options = {"mode": s["compile_mode"]} if s["compile_mode"] else {}
        self.step_fn = model.training_step
        if s["compile"] == "backbone":
            model.backbone.compile(dynamic=False, **options)
        elif s["compile"] == "step":
            self.step_fn = torch.compile(model.training_step, dynamic=False, **options)
        self.progress = Progress(0, 100, 0, 10)
        self.compile_s = None

    def flags(self) -> None:
        from selfsup.nn import small_map_conv

        small_map_conv.GEMM_WGRAD = self.s["gemm_wgrad"]
        small_map_conv.MAX_OUTPUT_POSITIONS = 4 if self.s["small_map"] else 0

    def views(self) -> list[torch.Tensor]:
        with torch.no_grad():
            v = self._make_views()
        return [x.contiguous(memory_format=torch.channels_last) for x in v] if self.s["channels_last"] else v

    def train(self, v: list[torch.Tensor]) -> None:
        self.flags()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.s["bf16"]):
            loss, _ = self.step_fn(v, self.progress)
        self.opt.zero_grad(set_to_none=True)
        loss.float().backward()
        self.opt.step()

    def warm_up(self) -> None:
        t0 = time.perf_counter()
        self.train(self.views())  # warm-up (and compilation)
        _sync(self.device)
        if self.s["compile"]:
            self.compile_s = time.perf_counter() - t0
        self.train(self.views())

    def flops(self) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self.train(self.views())
        return counter.get_total_flops()

    def timed(self) -> tuple[float, float]:
        """(seconds making the views, seconds of the whole step)."""
        _sync(self.device)
        t0 = time.perf_counter()
        v = self.views()
        _sync(self.device)
        t1 = time.perf_counter()
        self.train(v)
        _sync(self.device)
        return t1 - t0, time.perf_counter() - t0


def run_one(model_name: str, setting: str, device: torch.device, steps: int, batch: int) -> dict:
    step = Step(model_name, setting, device, batch)
    step.warm_up()
    flops_per_step = step.flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    aug, total = zip(*(step.timed() for _ in range(steps)))
    step_s = statistics.median(total)
    bf16 = step.s["bf16"]
    peak_dtype = torch.bfloat16 if bf16 else torch.float32  # bf16 rows against bf16's own peak
    peak, peak_n = matmul_peak(device, peak_dtype)
    memory = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"model": model_name, "setting": setting, "batch": batch, "images_per_s": batch / step_s,
            "aug_share": statistics.median(aug) / step_s, "train_flops_per_s": flops_per_step / step_s,
            "matmul_peak_flops_per_s": peak, "matmul_peak_dtype": "bf16" if bf16 else "fp32",
            "matmul_peak_n": peak_n, "peak_ratio": flops_per_step / step_s / peak,
            "peak_memory_mb": memory / 2**20, "compile_s": step.compile_s, "device": str(device),
            "threads": torch.get_num_threads(), "cpu_capability": _cpu_capability()}


def run_interleaved(model_name: str, settings: list[str], device: torch.device, rounds: int, batch: int) -> list[dict]:
    """Every setting in this one process, one step of each in turn for ``rounds`` rounds (the order rotating
    each round), so machine noise hits them alike. Each row: median images/s, and the median over rounds of its
    step time against the first setting's in the same round (``ratio``: > 1 is faster than the first)."""
    steps = [Step(model_name, s, device, batch) for s in settings]
    for st in steps:
        st.warm_up()
    times: dict[str, list[float]] = {s: [] for s in settings}
    aug: dict[str, list[float]] = {s: [] for s in settings}
    for r in range(rounds):
        order = steps[r % len(steps):] + steps[:r % len(steps)]
        for st in order:
            a, t = st.timed()
            times[st.setting].append(t)
            aug[st.setting].append(a)
    base = times[settings[0]]
    rows = []
    for st in steps:
        t = times[st.setting]
        rows.append({"model": model_name, "setting": st.setting, "batch": batch,
                     "images_per_s": batch / statistics.median(t),
                     "ratio": statistics.median(b / x for b, x in zip(base, t)),
                     "aug_share": statistics.median(aug[st.setting]) / statistics.median(t),
                     "compile_s": st.compile_s, "rounds": rounds, "device": str(device),
                     "threads": torch.get_num_threads(), "cpu_capability": _cpu_capability()})
    return rows


def _cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--models", default="small,resnet18")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--batch", type=int, default=None, help="default: 256 (small), 128 on CPU / 512 on GPU (resnet18)")
    parser.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                        help="all settings of a model in one process, one step each in turn for ROUNDS rounds; "
                             "prints each setting's step-time ratio to the first setting's (no peak/memory figures)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.interleave:
        rows = []
        for model_name in args.models.split(","):
            batch = args.batch or (256 if model_name == "small" else (512 if device.type == "cuda" else 128))
            rows += run_interleaved(model_name, args.settings.split(","), device, args.interleave, batch)
            for r in rows:
                if r["model"] == model_name:
                    print(f"{model_name:9s} {r['setting']:36s} {r['images_per_s']:7.0f} img/s  ×{r['ratio']:.3f} "
                          f"aug {100 * r['aug_share']:4.1f}%" + (f"  compile {r['compile_s']:.1f}s" if r["compile_s"] else ""),
                          flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=2)
        return
    if args.one:
        model_name, setting = args.one.split(":")
        batch = args.batch or (256 if model_name == "small" else (512 if device.type == "cuda" else 128))
        print(json.dumps(run_one(model_name, setting, device, args.steps, batch)))
        return
    rows = []
    for model_name in args.models.split(","):
        for setting in args.settings.split(","):
            cmd = [sys.executable, __file__, "--one", f"{model_name}:{setting}", "--device", args.device,
                   "--steps", str(args.steps)] + (["--batch", str(args.batch)] if args.batch else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{model_name} {setting}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{model_name:9s} {setting:22s} {r['images_per_s']:8.0f} img/s  aug {100 * r['aug_share']:4.1f}%  "
                  f"{r['train_flops_per_s'] / 1e9:7.1f} GFLOP/s = {100 * r['peak_ratio']:5.1f}% of {r['matmul_peak_dtype']} matmul peak "
                  f"({r['matmul_peak_flops_per_s'] / 1e9:.0f})  peak mem {r['peak_memory_mb']:.0f} MB"
                  + (f"  compile {r['compile_s']:.1f}s" if r["compile_s"] else ""), flush=True)
    print("\n| model | setting | batch | images/s | aug share | GFLOP/s | % of matmul peak (same dtype) | peak MB | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        compile_s = "" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        print(f"| {r['model']} | {r['setting']} | {r['batch']} | {r['images_per_s']:.0f} | {100 * r['aug_share']:.1f}% "
              f"| {r['train_flops_per_s'] / 1e9:.1f} | {100 * r['peak_ratio']:.1f}% | {r['peak_memory_mb']:.0f} "
              f"| {compile_s} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
