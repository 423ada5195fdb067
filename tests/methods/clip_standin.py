"""A tiny stand-in video backbone and helpers for the clip-level method tests (test_cvrl, test_rho_byol,
test_rho_moco): the video contract (forward (B, C, T, H, W) → (B, num_features), ``input_kind = "clips"``) at a
cost of milliseconds, independent of selfsup.nn.video."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from selfsup.methods import METHODS
from selfsup.methods.base import finish_step, make_progress

SIZE, FRAMES, BATCH = 16, 4, 8


class TinyClipNet(nn.Module):
    """Conv3d + BN + ReLU + global average pooling: clips (B, C, T, H, W) → (B, num_features)."""

    input_kind = "clips"

    def __init__(self, in_chans: int = 1, num_features: int = 8):
        super().__init__()
        self.num_features = num_features
        self.net = nn.Sequential(nn.Conv3d(in_chans, num_features, 3, stride=(1, 2, 2), padding=1, bias=False),
                                 nn.BatchNorm3d(num_features), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten())

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5:
            raise ValueError(f"TinyClipNet takes clips (B, C, T, H, W), got shape {tuple(x.shape)}")
        return self.net(x)


def tiny(name: str, **params) -> nn.Module:
    return METHODS[name].cls(TinyClipNet(), **{**METHODS[name].spec.test_params, **params})


def clips(n: int = 2, batch: int = BATCH) -> list[Tensor]:
    """``n`` clips (B, 1, T, H, W) of each of ``batch`` videos: a video is a still pattern with its own contrast and
    brightness (so that pooled features tell videos apart), each clip of it that plus its own noise."""
    video = torch.randn(batch, 1, 1, SIZE, SIZE) * torch.rand(batch, 1, 1, 1, 1).add(0.5) + torch.randn(batch, 1, 1, 1, 1)
    return [video + 0.3 * torch.randn(batch, 1, FRAMES, SIZE, SIZE) for _ in range(n)]


def step(method: nn.Module, views: list[Tensor], i: int = 0, total: int = 100) -> tuple[Tensor, dict]:
    progress = make_progress(method, i, total, 0, 10)
    loss, logs = method.training_step(views, progress)
    loss.backward()
    finish_step(method, progress, logs)
    return loss, logs


def losses_on(method: nn.Module, views: list[Tensor], steps: int = 12, lr: float = 0.05) -> list[float]:
    """The losses of ``steps`` SGD steps on a fixed batch (EMA and queue updates included)."""
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    losses = []
    for i in range(steps):
        opt.zero_grad()
        progress = make_progress(method, i, steps, 0, steps)
        loss, logs = method.training_step(views, progress)
        loss.backward()
        opt.step()
        finish_step(method, progress, logs)
        losses.append(float(loss.detach()))
    return losses


def loss_falls(method: nn.Module, views: list[Tensor], steps: int = 12, lr: float = 0.05) -> tuple[float, float]:
    """The loss on a fixed batch before ``steps`` SGD steps and the lowest of the last three."""
    losses = losses_on(method, views, steps, lr)
    return losses[0], min(losses[-3:])


def student_and_teacher(method: nn.Module, teacher_prefixes: tuple[str, ...]) -> tuple[list, list]:
    student, teacher = [], []
    for name, p in method.named_parameters():
        (teacher if name.startswith(teacher_prefixes) else student).append((name, p))
    return student, teacher
