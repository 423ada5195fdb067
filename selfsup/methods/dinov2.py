"""DINOv2: DINO's [CLS] and iBOT's masked-patch self-distillation with untied heads, Sinkhorn-Knopp teacher
targets and a KoLeo regulariser.

Oquab et al. DINOv2: Learning Robust Visual Features without Supervision. TMLR 2024, arXiv:2304.07193 (§4,
"Discriminative self-supervised pre-training"; the reference ``dinov2/train/ssl_meta_arch.py`` and
``configs/ssl_default_config.yaml`` + ``configs/train/vitl14.yaml``, the paper's recipe).

The student sees two global crops with blockwise masks (DINOv2's collator: exactly half the images masked, their
ratios spread over (0.1, 0.5)) and the local crops whole; the EMA teacher sees the two global crops whole.
The loss, summed with the reference's weights:

- 1 × [CLS]: every student view's [CLS] head output against the teacher targets of the *other* global views, the
  mean over those pairs (:func:`~selfsup.losses.distillation.multicrop_cross_entropy`), from the DINO head;
- 1 × patches: at each masked token of a global view, the student's iBOT-head output against the teacher's for
  the same patch of the unmasked view (:func:`~selfsup.losses.ibot.ibot_patch_loss_masked`), from a *separate*
  iBOT head (untied, ``ibot.separate_head: true`` in the paper's configs: §4 "untying head weights");
- 0.1 × KoLeo on the student backbone's [CLS] outputs of each global view, per process and never between the
  two crops of one image (:func:`~selfsup.losses.distillation.koleo_loss`, summed over the two views).

Teacher targets are Sinkhorn-Knopp normalisations of the teacher logits at the teacher temperature, 3
iterations (``centering: sinkhorn_knopp``; SwAV's equipartition instead of DINO's running centre): over the 2B
[CLS] outputs of both global views together, and over the masked patch tokens (all processes' with ``gather``).

Paper defaults: heads of 3 GELU layers (2048, bottleneck 256) to K = 65536 (131072 for ViT-L/g) with a learnt
last-layer magnitude, student temperature 0.1, teacher temperature 0.04 → 0.07 over 30 epochs, teacher
momentum 0.992 → 1 (cosine; 0.994 for ViT-L), last layers frozen for the first epoch; the recipe's parts:
AdamW, lr 0.004·√(B/1024), weight decay 0.04 → 0.2 (cosine, ``optim.weight_decay_end``), gradient clipping 3,
global crops 0.32–1, 8 local crops 0.05–0.32, and in the ViT LayerScale 1e-5 and stochastic depth 0.3–0.4
(backbone settings ``layer_scale``, ``drop_path``: the teacher runs without drop path). Not here: layer-wise
lr decay 0.9 and the patch-embedding lr × 0.2 (optimiser settings this library does not have), the
high-resolution phase at the end. Registers (Darcet et al. 2024, arXiv:2309.16588) are a backbone setting;
``registers=N`` makes the method refuse a backbone without exactly N.

A ViT without LayerScale is accepted with a warning: the objective does not need it, the paper's ViTs have it
(it stabilises deep ViTs; a 6-block ViT-Tiny trains without it), so it belongs in the recipe.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from selfsup.losses.clustering import sinkhorn_knopp
from selfsup.losses.distillation import koleo_loss, multicrop_cross_entropy
from selfsup.losses.ibot import ibot_patch_loss_masked
from selfsup.methods.base import MethodSpec, Progress
from selfsup.methods.dino import DINOHead
from selfsup.methods.masked_distillation import (check_heads, check_masking, check_temperatures, student_outputs,
                                                  teacher_tokens)
from selfsup.methods.registry import register
from selfsup.nn.ema import check_momentum, frozen_copy
from selfsup.nn.masking import blockwise_masks
from selfsup.nn.vit import require_registers, require_vit, without_drop_path
from selfsup.schedules import Schedule
from selfsup.views import dino_multicrop

log = logging.getLogger("selfsup")


@register("dinov2", "self-distillation", "Oquab et al. 2024, DINOv2: Learning Robust Visual Features without "
          "Supervision, arXiv:2304.07193")
class DINOv2(nn.Module):
    spec = MethodSpec(
        views=dino_multicrop(split=0.32, local_crops=8, saturation=0.2),
        default_backbone="vit_tiny",
        stochastic_step=True,  # draws its masks inside training_step
        test_params={"out_dim": 64, "patch_out_dim": 48, "hidden": 32, "bottleneck": 16, "freeze_last_layer_epochs": 0},
    )

    def __init__(self, backbone: nn.Module, *, out_dim: int = 65536, patch_out_dim: int = 65536, hidden: int = 2048,
                 bottleneck: int = 256, shared_head: bool = False, student_temp: float = 0.1,
                 teacher_temp: float = 0.07, warmup_teacher_temp: float = 0.04, warmup_teacher_temp_epochs: float = 30,
                 dino_loss_weight: float = 1.0, ibot_loss_weight: float = 1.0, koleo_loss_weight: float = 0.1,
                 sinkhorn_iterations: int = 3, mask_ratio: tuple[float, float] = (0.1, 0.5),
                 mask_probability: float = 0.5, momentum_start: float = 0.992, momentum_end: float = 1.0,
                 freeze_last_layer_epochs: float = 1, registers: int = 0, gather: bool = False):
        super().__init__()
        vit = require_registers(backbone, "dinov2", registers) if registers else require_vit(backbone, "dinov2")
        check_masking("dinov2", mask_ratio, mask_probability)
        check_heads("dinov2", out_dim=out_dim, hidden=hidden, bottleneck=bottleneck, patch_out_dim=patch_out_dim)
        check_temperatures("dinov2", student_temp, {"teacher": (warmup_teacher_temp, teacher_temp)})
        check_momentum("dinov2", momentum_start, momentum_end)
        if min(dino_loss_weight, ibot_loss_weight, koleo_loss_weight) < 0 or sinkhorn_iterations < 1:
            raise ValueError(f"dinov2: loss weights must be ≥ 0 and sinkhorn_iterations ≥ 1, got dino "
                             f"{dino_loss_weight}, ibot {ibot_loss_weight}, koleo {koleo_loss_weight}, "
                             f"{sinkhorn_iterations} iterations")
        if warmup_teacher_temp_epochs < 0 or freeze_last_layer_epochs < 0:
            raise ValueError(f"dinov2: warmup_teacher_temp_epochs and freeze_last_layer_epochs must be ≥ 0, got "
                             f"{warmup_teacher_temp_epochs} and {freeze_last_layer_epochs}")
        if isinstance(vit.blocks[0].ls1, nn.Identity):
            log.warning("dinov2: the ViT has no LayerScale; the paper's ViTs use it (backbone.params.layer_scale=1e-5, "
                        "with stochastic depth backbone.params.drop_path, as configs/dinov2_fashion_mnist.yaml)")
        self.backbone = vit
        self.mask_token = nn.Parameter(torch.zeros(vit.num_features))  # zeros, as DINOv2's ``mask_token``
        # DINOv2's heads: a learnt last-layer magnitude (weight_g trainable), no BN.
        self.dino_head = DINOHead(vit.num_features, out_dim, hidden, bottleneck, norm_last_layer=False)
        self.ibot_head = None if shared_head else DINOHead(vit.num_features, patch_out_dim, hidden, bottleneck,
                                                           norm_last_layer=False)
        self.teacher_backbone = without_drop_path(frozen_copy(vit))
        self.teacher_dino_head = frozen_copy(self.dino_head)
        self.teacher_ibot_head = None if shared_head else frozen_copy(self.ibot_head)
        self.student_temp, self.sinkhorn_iterations = student_temp, sinkhorn_iterations
        self.weights = {"dino": dino_loss_weight, "ibot": ibot_loss_weight, "koleo": koleo_loss_weight}
        self.mask_ratio, self.mask_probability = tuple(mask_ratio), mask_probability
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self.gather = gather
        self.teacher_temp = Schedule(warmup_teacher_temp, teacher_temp, "warmup", warmup_teacher_temp_epochs)
        self.teacher_momentum = Schedule(momentum_start, momentum_end)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def draw_masks(self, batch: int, grid: tuple[int, int], device: torch.device) -> Tensor:
        """(batch, h·w) bool blockwise masks as DINOv2's collator draws them (``stratified``), True = mask token."""
        return blockwise_masks(batch, grid, self.mask_ratio, self.mask_probability, stratified=True, device=device)

    @torch.no_grad()
    def teacher_targets(self, views: list[Tensor], masks: Tensor, temp: float) -> tuple[Tensor, Tensor]:
        """Sinkhorn-Knopp targets of the teacher: (2B, K) for the [CLS] of both global views (view 0, then
        view 1) and (M, K') for their M masked patch tokens in ``x[masks]`` order; with ``gather`` each over the
        rows of every process."""
        t = teacher_tokens(self.teacher_backbone, views)
        cls_logits = self.teacher_dino_head(self.teacher_backbone.cls_output(t))
        patch_logits = (self.teacher_ibot_head or self.teacher_dino_head)(self.teacher_backbone.patch_outputs(t)[masks])
        return (sinkhorn_knopp(cls_logits, temp, self.sinkhorn_iterations, gather=self.gather),
                sinkhorn_knopp(patch_logits, temp, self.sinkhorn_iterations, gather=self.gather))

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        b = views[0].shape[0]
        masks = self.draw_masks(2 * b, self.backbone.patch_grid(views[0]), views[0].device)  # view 0, then view 1
        s = student_outputs(self.backbone, self.mask_token, self.dino_head, self.ibot_head or self.dino_head, views,
                            masks, self.last_layer_frozen(progress))
        temp = progress.value("teacher_temp")
        cls_targets, patch_targets = self.teacher_targets(views, masks, temp)
        dino = multicrop_cross_entropy(s.cls_logits, cls_targets.chunk(2), self.student_temp)
        ibot = ibot_patch_loss_masked(s.patch_logits, patch_targets, masks, self.student_temp)
        koleo = sum(koleo_loss(f) for f in s.cls_features.chunk(2))  # per process, within each view
        w = self.weights
        loss = w["dino"] * dino + w["ibot"] * ibot + w["koleo"] * koleo
        with torch.no_grad():
            entropy = torch.special.entr(cls_targets).sum(dim=-1).mean()
        return loss, {"dino_loss": dino.detach(), "ibot_loss": ibot.detach(), "koleo_loss": koleo.detach(),
                      "masked_share": masks.float().mean(), "teacher_temp": torch.tensor(temp),
                      "teacher_entropy": entropy, "z": s.cls_embed[:b].detach(), "z_pair": s.cls_embed[b:].detach()}

    def last_layer_frozen(self, progress: Progress) -> bool:
        """Whether this step cuts the heads' last-layer gradients: during the first ``freeze_last_layer_epochs``
        (fractional: counted in steps)."""
        return progress.step < self.freeze_last_layer_epochs * progress.steps_per_epoch

    def schedules(self) -> dict[str, Schedule]:
        return {"teacher_momentum": self.teacher_momentum, "teacher_temp": self.teacher_temp}

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = [(self.teacher_backbone, self.backbone), (self.teacher_dino_head, self.dino_head)]
        return pairs + ([(self.teacher_ibot_head, self.ibot_head)] if self.ibot_head is not None else [])
