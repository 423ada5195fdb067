"""Where and how a run computes: the device, the autocast dtype, global batch norm, and the RNG state that
makes a resumed run replay its augmentation draws."""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from selfsup import distributed as dist
from selfsup.config import ConfigError

log = logging.getLogger("selfsup")


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present. Under torchrun each process takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.is_distributed():
        name = f"cuda:{dist.local_rank()}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError([f"train.device is {name!r} but no CUDA GPU is available; use --device cpu"])
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), read from /proc/cpuinfo (Linux).

    Elsewhere (other systems, CPUs that would emulate bf16) the answer is False, and fp32 is kept."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast dtype or None. ``auto`` uses bf16 where it is native: GPUs that support it, and
    CPUs with AVX-512 BF16/AMX (the small CNN's step is 1.6× faster there, benchmarks/bench_step.py);
    on other CPUs bf16 is emulated and slower than fp32, so ``auto`` keeps fp32."""
    if name == "bf16":
        return torch.bfloat16
    if name != "auto":
        return None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def choose_attention(model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None) -> int:
    """Training on a CPU under bf16 autocast: the ViT blocks' attention as plain matmul + softmax instead of
    ``F.scaled_dot_product_attention``, whose CPU kernel's bf16 backward is 2–12× slower for the sequence
    lengths used here (10–197 tokens: benchmarks/step/README.md, "Attention"). timm's attention
    modules have both paths (``fused_attn``); elsewhere (fp32, CUDA) the fused kernel is kept. Returns the
    number of attention modules switched."""
    if device.type != "cpu" or amp_dtype != torch.bfloat16:
        return 0
    switched = 0
    for module in model.modules():
        if getattr(module, "fused_attn", False):
            module.fused_attn = False
            switched += 1
    return switched


def sync_batchnorm(model: nn.Module, device: torch.device, main: bool) -> nn.Module:
    """Batch statistics over the global batch (SimCLR §B.9 "global BN"): SyncBatchNorm on GPUs. torch has
    no SyncBatchNorm for CPU tensors, so CPU processes keep per-process statistics, with a warning."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if main:
        log.warning("SyncBatchNorm needs GPUs: on CPU each process normalises with its own batch statistics "
                    "(the method's loss still uses the global batch)")
    return model


def rng_state(device: torch.device) -> list[dict[str, Tensor]]:
    """Every rank's RNG state (augmentations draw from it), so each rank resumes its own stream. A collective:
    every rank must call it."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).cpu()
    if dist.world_size() == 1:
        return [state]
    states: list = [None] * dist.world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def set_rng_state(states: list[dict[str, Tensor]], device: torch.device) -> None:
    if len(states) != dist.world_size():
        log.warning("checkpoint holds RNG states of %d process(es), this run has %d: augmentation draws differ "
                    "from the uninterrupted run", len(states), dist.world_size())
    state = states[dist.rank() % len(states)]
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
