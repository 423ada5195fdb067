"""Optimisers with parameter groups: no weight decay (and no LARS adaptation) on biases and norms."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from selfsup.config import OptimConfig
from selfsup.methods.base import custom_param_groups


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017, arXiv:1708.03888), SGD with momentum.

    For each parameter with ``lars=True``: the update is ``lr · η·‖w‖/‖g + λw‖ · (g + λw)``
    (trust ratio 1 when either norm is 0); groups with ``lars=False`` (biases, norms) get plain SGD.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["weight_decay"]:
                    d = d.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm,
                                        torch.ones_like(w_norm))
                    d = d.mul(trust)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss


def _is_exempt(name: str, p: nn.Parameter) -> bool:
    """Biases and normalisation weights (1-D) are not decayed (Goyal et al. 2017; SimCLR; BYOL)."""
    return p.ndim <= 1 or name.endswith(".bias")


def param_groups(model: nn.Module) -> list[dict]:
    """Groups carry ``lr_scale`` (multiplies the scheduled lr) and ``exempt`` (no decay / no LARS).

    A method may define ``param_groups()`` returning ``[{"params": [...], "lr_scale": s, "fixed_lr": bool}, …]``
    for parts that need their own rate (a predictor, say); the remaining parameters form the default group.
    Each group is split into decayed weights and exempt biases/norms.
    """
    custom = custom_param_groups(model)
    claimed = {id(p) for g in custom for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    default = [p for p in model.parameters() if p.requires_grad and id(p) not in claimed]
    sources = [({"lr_scale": 1.0}, default)]
    sources += [({k: v for k, v in g.items() if k != "params"}, [p for p in g["params"] if p.requires_grad])
                for g in custom]
    groups = []
    for extra, params in sources:
        for exempt in (False, True):
            members = [p for p in params if _is_exempt(names.get(id(p), ""), p) == exempt]
            if members:
                groups.append({"lr_scale": 1.0, **extra, "params": members, "exempt": exempt})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model)
    for g in groups:
        g["weight_decay"] = 0.0 if g["exempt"] else cfg.weight_decay
        g["lr"] = lr * g["lr_scale"]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    if cfg.name == "lars":
        for g in groups:
            g["lars"] = not g["exempt"]
        return LARS(groups, lr=lr, momentum=cfg.momentum)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas))
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def set_optim_values(optimizer: torch.optim.Optimizer, lr: float, base_lr: float, weight_decay: float | None = None) -> None:
    """This step's values: the scheduled ``lr`` times each group's ``lr_scale`` (groups with ``fixed_lr`` keep
    ``base_lr``: SimSiam's predictor, arXiv:2011.10566 §4.2, table 1c), and when given the scheduled weight
    decay on every decayed group (biases and norms stay at 0)."""
    for g in optimizer.param_groups:
        g["lr"] = (base_lr if g.get("fixed_lr") else lr) * g.get("lr_scale", 1.0)
        if weight_decay is not None and not g.get("exempt", False):
            g["weight_decay"] = weight_decay
