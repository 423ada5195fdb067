"""DINO: a student matches the centred, sharpened output distribution of an EMA teacher across crops.

Caron et al. Emerging Properties in Self-Supervised Vision Transformers. ICCV 2021, arXiv:2104.14294.

Defaults follow the paper (§3.1, appendix): a 3-layer GELU MLP head (hidden 2048, bottleneck 256),
l2-normalisation, then a weight-normalised linear layer without bias to K = 65536 outputs whose
magnitude is fixed to 1 (``norm_last_layer``); teacher momentum 0.996 → 1 on a cosine; centre momentum
0.9; student temperature 0.1; teacher temperature warmed up linearly 0.04 → 0.07 over 30 epochs
(per iteration here, not per epoch), then constant; 2 global crops (scale 0.4–1, view 1 always
blurred, view 2 blurred with p = 0.1 and solarised with p = 0.2) and 8 local crops (scale 0.05–0.4,
96/224 of the global side); the last layer is frozen during the first epoch; gradient clipping at
3.0 lives in the recipe's ``optim.clip_grad``. ``use_bn_in_head`` (the reference code's option, off
for ViTs) adds BatchNorm to the head's hidden layers: CNN features, pooled after a ReLU, all share one
positive direction, and without it the centred teacher turns uniform on short runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from selfsup.losses.distillation import dino_loss
from selfsup.methods.base import MethodSpec, Progress, by_sample, by_view, step_from_embeddings
from selfsup.methods.registry import register
from selfsup.nn.ema import frozen_copy
from selfsup.nn.heads import mlp
from selfsup.nn.vit import without_drop_path
from selfsup.distributed import all_reduce_mean
from selfsup.schedules import Schedule
from selfsup.views import dino_multicrop, group_by_size


class DINOHead(nn.Module):
    """MLP (GELU, BN optional) → l2-normalised bottleneck (B, bottleneck) → weight-normed linear → (B, K) logits."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, bottleneck: int, norm_last_layer: bool = True,
                 use_bn: bool = False):
        super().__init__()
        self.mlp = mlp([in_dim, hidden, hidden, bottleneck], norm="bn" if use_bn else None, activation=nn.GELU)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):  # the reference head's init: small weights, zero bias
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        # A fixed unit magnitude makes the last layer a cosine classifier, which stabilises training.
        magnitude.requires_grad_(not norm_last_layer)

    def embed(self, x: Tensor) -> Tensor:
        return F.normalize(self.mlp(x), dim=-1)

    def logits(self, e: Tensor, freeze_last_layer: bool = False) -> Tensor:
        w = self.last_layer.weight
        if freeze_last_layer:
            # Same value, zero gradient: the last layer stays put, and every parameter still takes part in the
            # backward (DDP needs that); weight decay only rescales the direction part, which the norm cancels.
            w = w.detach() + 0 * w
        return F.linear(e, w)

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(self.embed(x))


@register("dino", "self-distillation", "Caron et al. 2021, Emerging Properties in Self-Supervised Vision "
          "Transformers, arXiv:2104.14294")
class DINO(nn.Module):
    spec = MethodSpec(
        views=dino_multicrop(split=0.4, local_crops=8),
        test_params={"out_dim": 64, "hidden": 32, "bottleneck": 16, "freeze_last_layer_epochs": 0},
        # per-sample cross-entropies against a centre fixed during the step: chunks accumulate without caching
        # the (B, V, K) logits (embed/loss_from serve GradCache too)
        micro_batches="per_sample",
    )

    def __init__(self, backbone: nn.Module, *, out_dim: int = 65536, hidden: int = 2048, bottleneck: int = 256,
                 norm_last_layer: bool = True, student_temp: float = 0.1, teacher_temp: float = 0.07,
                 warmup_teacher_temp: float = 0.04, warmup_teacher_temp_epochs: float = 30,
                 center_momentum: float = 0.9, momentum_start: float = 0.996, momentum_end: float = 1.0,
                 freeze_last_layer_epochs: int = 1, use_bn_in_head: bool = False):
        super().__init__()
        problems = [f"{n} must be > 0, got {v}" for n, v in (("student_temp", student_temp),
                    ("teacher_temp", teacher_temp), ("warmup_teacher_temp", warmup_teacher_temp)) if v <= 0]
        problems += [f"{n} must be in [0, 1], got {v}" for n, v in (("center_momentum", center_momentum),
                     ("momentum_start", momentum_start), ("momentum_end", momentum_end)) if not 0 <= v <= 1]
        if warmup_teacher_temp_epochs < 0:
            problems.append(f"warmup_teacher_temp_epochs must be ≥ 0, got {warmup_teacher_temp_epochs}")
        if teacher_temp < warmup_teacher_temp:
            problems.append(f"the warm-up raises the teacher temperature from warmup_teacher_temp to teacher_temp, "
                            f"so teacher_temp ({teacher_temp}) must be ≥ warmup_teacher_temp ({warmup_teacher_temp})")
        if freeze_last_layer_epochs < 0:
            problems.append(f"freeze_last_layer_epochs must be ≥ 0, got {freeze_last_layer_epochs}")
        if min(out_dim, hidden, bottleneck) < 1:
            problems.append(f"head widths must be ≥ 1, got out_dim {out_dim}, hidden {hidden}, bottleneck {bottleneck}")
        if problems:
            raise ValueError("dino: " + "; ".join(problems))
        self.backbone = backbone
        self.head = DINOHead(backbone.num_features, out_dim, hidden, bottleneck, norm_last_layer, use_bn_in_head)
        # the reference builds its teacher without stochastic depth (a ViT student may have it)
        self.teacher_backbone = without_drop_path(frozen_copy(self.backbone))
        self.teacher_head = frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        # Linear warm-up over ``warmup_teacher_temp_epochs`` (fractional epochs, per iteration), then constant.
        self.teacher_temp = Schedule(warmup_teacher_temp, teacher_temp, "warmup", warmup_teacher_temp_epochs)
        self.teacher_momentum = Schedule(momentum_start, momentum_end)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        return step_from_embeddings(self, views, progress)

    def embed(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """The student's logits of every crop, ``student_i`` (B, K) for view i, and the two global crops'
        bottleneck embeddings ``z``, ``z_pair`` (B, bottleneck, detached: the collapse monitor's)."""
        b = views[0].shape[0]
        frozen = progress.epoch < self.freeze_last_layer_epochs
        out: dict[str, Tensor] = {}
        first: Tensor | None = None
        for idx, x in group_by_size(views):  # crops of one size through the backbone together
            e = self.head.embed(self.backbone(x))
            first = e if first is None else first
            for i, logits in zip(idx, self.head.logits(e, frozen).chunk(len(idx))):
                out[f"student_{i}"] = logits
        return {**out, "z": first[:b].detach(), "z_pair": first[b:2 * b].detach()}

    def targets(self, views: list[Tensor], progress: Progress) -> dict[str, Tensor]:
        """The teacher's logits of the global crops, ``teacher`` (B, n_global, K)."""
        n_global = len(self.spec.views.globals_)
        return {"teacher": by_sample(self.teacher_head(self.teacher_backbone(torch.cat(views[:n_global]))),
                                     views[0].shape[0])}

    def loss_from(self, emb: dict[str, Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        n_global = emb["teacher"].shape[1]
        student = [emb[f"student_{i}"] for i in range(sum(k.startswith("student_") for k in emb))]
        teacher = by_view(emb["teacher"])  # (n_global·B, K), view-major
        temp = progress.value("teacher_temp")
        loss = dino_loss(student, teacher.chunk(n_global), self.center, self.student_temp, temp)
        with torch.no_grad():  # log K when the teacher has turned uniform (one of DINO's two collapses)
            entropy = torch.special.entr(F.softmax((teacher - self.center) / temp, dim=-1)).sum(dim=-1).mean()
        return loss, {"teacher_temp": torch.tensor(temp), "teacher_entropy": entropy,
                      "teacher_mean": teacher.mean(dim=0, keepdim=True), "z": emb["z"].detach(),
                      "z_pair": emb["z_pair"].detach()}

    def schedules(self) -> dict[str, Schedule]:
        return {"teacher_momentum": self.teacher_momentum, "teacher_temp": self.teacher_temp}

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.teacher_backbone, self.backbone), (self.teacher_head, self.head)]

    @torch.no_grad()
    def after_step(self, progress: Progress, logs: dict[str, Tensor]) -> None:
        """c ← m·c + (1 − m)·mean of this step's teacher outputs over every rank (arXiv:2104.14294, eq. 4)."""
        batch_mean = all_reduce_mean(logs["teacher_mean"])
        self.center.mul_(self.center_momentum).add_(batch_mean, alpha=1 - self.center_momentum)
