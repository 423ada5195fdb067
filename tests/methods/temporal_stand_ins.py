"""Tiny stand-in video backbones and shared checks for the temporal pretext tests (not a test module itself).

The stand-ins hold no batch norm, so a sample run alone gives what it gives in a batch: the tests' naive
per-sample reference losses can then be compared with the batched methods exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from selfsup.methods.base import Progress

PROGRESS = Progress(0, 10, 0, 10)


class TinyClipNet(nn.Module):
    """Conv3d + ReLU + global average pooling: (B, C, T, H, W) → (B, width); any T ≥ 1."""

    input_kind = "clips"
    min_frames = 1

    def __init__(self, in_chans: int = 1, width: int = 8):
        super().__init__()
        self.conv = nn.Conv3d(in_chans, width, 3, padding=1)
        self.num_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3, 4))


class TinyFrameNet(nn.Module):
    """A per-frame encoder: ``frame_features`` (B, C, T, H, W) → (B, T, width) through a Conv2d, forward the mean."""

    input_kind = "clips"
    min_frames = 1

    def __init__(self, in_chans: int = 1, width: int = 8):
        super().__init__()
        self.frame = nn.Conv2d(in_chans, width, 3, padding=1)
        self.num_features = width
        self.calls = 0

    def frame_features(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        b, c, t, h, w = x.shape
        f = torch.relu(self.frame(x.transpose(1, 2).reshape(b * t, c, h, w))).mean(dim=(2, 3))
        return f.view(b, t, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frame_features(x).mean(dim=1)


def time_coded(b: int = 4, t: int = 8, s: int = 8, c: int = 1) -> torch.Tensor:
    """Clips (B, C, T, H, W) whose every pixel of frame t of clip i holds 100·i + t plus a pixel pattern below 0.5,
    so ``frame_time`` reads back which frame of which clip a frame is."""
    pattern = torch.rand(1, c, 1, s, s) * 0.4
    clip = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1, 1) * 100
    time = torch.arange(t, dtype=torch.float32).view(1, 1, t, 1, 1)
    return (clip + time + pattern).expand(b, c, t, s, s).contiguous()


def frame_time(frame: torch.Tensor) -> int:
    """The frame index a frame of :func:`time_coded` clips came from (any shape with the coded value first)."""
    return int(frame.flatten()[0].floor()) % 100


def gradients_reach_every_parameter(method, views) -> None:
    loss, logs = method.training_step(views, PROGRESS)
    assert loss.ndim == 0 and torch.isfinite(loss), loss
    loss.backward()
    missing = [n for n, p in method.named_parameters() if p.requires_grad and
               (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
    assert not missing, f"no gradient reached {missing}"
    assert logs["z"].ndim == 2 and not logs["z"].requires_grad
    assert 0 <= float(logs["pretext_acc"]) <= 1


def steps_lower_the_loss(method, views, steps: int = 8, lr: float = 1e-2) -> tuple[float, float]:
    """Adam on one fixed batch with the same random task each step (reseeded): the first and last loss."""
    opt = torch.optim.Adam(method.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        torch.manual_seed(123)
        loss, _ = method.training_step(views, PROGRESS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    return losses[0], losses[-1]
