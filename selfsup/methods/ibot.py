"""iBOT: DINO's [CLS] self-distillation across views plus masked patch self-distillation (an online tokenizer).

Zhou, Wei, Wang, Shen, Xie, Yuille, Kong. iBOT: Image BERT Pre-Training with Online Tokenizer. ICLR 2022,
arXiv:2111.07832.

The student sees its two global crops with blockwise masks (a random ratio per image; hidden patches replaced by
a learnt mask token, SimMIM-style) and the local crops whole; the EMA teacher sees the two global crops whole.
Two losses, summed with weights λ1 = λ2 = 1 (the reference ``--lambda1``/``--lambda2``):

- [CLS]: DINO's cross-entropy of every student view against the centred, sharpened teacher [CLS] output of the
  *other* global views (:func:`~selfsup.losses.distillation.dino_loss`, the mean over those pairs), with the
  [CLS] centre and teacher temperature;
- patches (MIM): at each masked token of global view v, the student's patch output against the teacher's
  output for the same patch of the same view, unmasked (:func:`~selfsup.losses.ibot.ibot_patch_loss`), the
  patch targets centred with their own centre and sharpened with their own temperature. Local crops take part
  in the [CLS] loss only.

Paper defaults (ViT-S/16 recipe in the reference README): one head shared by the [CLS] and the patch tokens
(``--shared_head true``; the argparse default is false, the published runs set it), 3-layer GELU MLP (2048,
bottleneck 256) and a weight-normalised last layer to K = 8192 outputs with a learnt magnitude
(``--norm_last_layer false``), student temperature 0.1, teacher temperatures 0.04 → 0.07 over 30 epochs for
[CLS] and patches, centre momentum 0.9 for both, teacher momentum 0.996 → 1 (cosine), masks with probability
0.5 and ratio U(0.1, 0.5) (``--pred_ratio 0 0.3 --pred_ratio_var 0 0.2``), blocks of aspect 0.3–1/0.3, global
crops 0.25–1, 10 local crops 0.05–0.25, last layer frozen for the first epoch; AdamW, lr 5e-4·B/256, weight
decay 0.04 → 0.4 (``optim.weight_decay_end``), gradient clipping 3, drop path 0.1 in the student (the
teacher has none). ``shared_head=False`` gives the patch tokens a head of their own (DINOv2's untied heads;
iBOT's code would share the MLP and untie only the last layer).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.losses.distillation import centered_softmax, dino_loss, update_center
from selfsup.losses.ibot import ibot_patch_loss_masked
from selfsup.methods.base import MethodSpec, Progress
from selfsup.methods.dino import DINOHead
from selfsup.methods.masked_distillation import (check_heads, check_masking, check_temperatures, student_outputs,
                                                  teacher_tokens)
from selfsup.methods.registry import register
from selfsup.nn.ema import check_momentum, frozen_copy
from selfsup.nn.masking import blockwise_masks
from selfsup.nn.vit import require_vit, without_drop_path
from selfsup.schedules import Schedule
from selfsup.views import dino_multicrop


@register("ibot", "self-distillation", "Zhou et al. 2022, iBOT: Image BERT Pre-Training with Online Tokenizer, "
          "arXiv:2111.07832")
class IBOT(nn.Module):
    spec = MethodSpec(
        views=dino_multicrop(split=0.25, local_crops=10, saturation=0.2),
        default_backbone="vit_tiny",
        stochastic_step=True,  # draws its masks inside training_step
        test_params={"out_dim": 64, "hidden": 32, "bottleneck": 16, "freeze_last_layer_epochs": 0},
    )

    def __init__(self, backbone: nn.Module, *, out_dim: int = 8192, hidden: int = 2048, bottleneck: int = 256,
                 shared_head: bool = True, patch_out_dim: int = 8192, norm_last_layer: bool = False,
                 student_temp: float = 0.1, teacher_temp: float = 0.07, warmup_teacher_temp: float = 0.04,
                 teacher_patch_temp: float = 0.07, warmup_teacher_patch_temp: float = 0.04,
                 warmup_teacher_temp_epochs: float = 30, cls_loss_weight: float = 1.0, patch_loss_weight: float = 1.0,
                 mask_ratio: tuple[float, float] = (0.1, 0.5), mask_probability: float = 0.5,
                 center_momentum: float = 0.9, momentum_start: float = 0.996, momentum_end: float = 1.0,
                 freeze_last_layer_epochs: float = 1, gather: bool = False):
        super().__init__()
        vit = require_vit(backbone, "ibot")
        check_masking("ibot", mask_ratio, mask_probability)
        check_heads("ibot", out_dim=out_dim, hidden=hidden, bottleneck=bottleneck, patch_out_dim=patch_out_dim)
        check_temperatures("ibot", student_temp, {"teacher": (warmup_teacher_temp, teacher_temp),
                                                  "teacher patch": (warmup_teacher_patch_temp, teacher_patch_temp)})
        check_momentum("ibot", momentum_start, momentum_end)
        if not 0.0 <= center_momentum <= 1.0 or warmup_teacher_temp_epochs < 0 or freeze_last_layer_epochs < 0:
            raise ValueError(f"ibot: need center_momentum in [0, 1], warmup_teacher_temp_epochs ≥ 0 and "
                             f"freeze_last_layer_epochs ≥ 0, got {center_momentum}, {warmup_teacher_temp_epochs}, "
                             f"{freeze_last_layer_epochs}")
        if min(cls_loss_weight, patch_loss_weight) < 0:
            raise ValueError(f"ibot: loss weights must be ≥ 0, got {cls_loss_weight} and {patch_loss_weight}")
        self.backbone = vit
        self.mask_token = nn.Parameter(torch.zeros(vit.num_features))  # zeros, as iBOT's ``masked_embed``
        self.head = DINOHead(vit.num_features, out_dim, hidden, bottleneck, norm_last_layer)
        patch_dim = out_dim if shared_head else patch_out_dim
        self.patch_head = None if shared_head else DINOHead(vit.num_features, patch_dim, hidden, bottleneck,
                                                            norm_last_layer)
        self.teacher_backbone = without_drop_path(frozen_copy(vit))
        self.teacher_head = frozen_copy(self.head)
        self.teacher_patch_head = None if shared_head else frozen_copy(self.patch_head)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("patch_center", torch.zeros(1, 1, patch_dim))
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.cls_loss_weight, self.patch_loss_weight = cls_loss_weight, patch_loss_weight
        self.mask_ratio, self.mask_probability = tuple(mask_ratio), mask_probability
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self.gather = gather
        self.teacher_temp = Schedule(warmup_teacher_temp, teacher_temp, "warmup", warmup_teacher_temp_epochs)
        self.teacher_patch_temp = Schedule(warmup_teacher_patch_temp, teacher_patch_temp, "warmup",
                                           warmup_teacher_temp_epochs)
        self.teacher_momentum = Schedule(momentum_start, momentum_end)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def draw_masks(self, batch: int, grid: tuple[int, int], device: torch.device) -> Tensor:
        """(batch, h·w) bool blockwise masks, True = mask token (iBOT's ``ImageFolderMask``)."""
        return blockwise_masks(batch, grid, self.mask_ratio, self.mask_probability, device=device)

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        b = views[0].shape[0]
        masks = self.draw_masks(2 * b, self.backbone.patch_grid(views[0]), views[0].device)  # view 0, then view 1
        patch_head = self.patch_head or self.head
        s = student_outputs(self.backbone, self.mask_token, self.head, patch_head, views, masks,
                            self.last_layer_frozen(progress))
        with torch.no_grad():
            t = teacher_tokens(self.teacher_backbone, views)
            t_cls = self.teacher_head(self.teacher_backbone.cls_output(t))  # (2B, K)
            t_patch = (self.teacher_patch_head or self.teacher_head)(self.teacher_backbone.patch_outputs(t))  # (2B, L, K')
            patch_temp = progress.value("teacher_patch_temp")
            patch_targets = centered_softmax(t_patch[masks], self.patch_center.reshape(1, -1), patch_temp)  # (M, K')
        temp = progress.value("teacher_temp")
        cls_loss = dino_loss(s.cls_logits, t_cls.chunk(2), self.center, self.student_temp, temp)
        patch_loss = ibot_patch_loss_masked(s.patch_logits, patch_targets, masks, self.student_temp)
        loss = self.cls_loss_weight * cls_loss + self.patch_loss_weight * patch_loss
        with torch.no_grad():  # a uniform teacher (entropy log K) is one of the two collapses centring balances
            entropy = torch.special.entr(F.softmax((t_cls.float() - self.center) / temp, dim=-1)).sum(-1).mean()
        return loss, {"cls_loss": cls_loss.detach(), "patch_loss": patch_loss.detach(),
                      "masked_share": masks.float().mean(), "teacher_temp": torch.tensor(temp),
                      "teacher_entropy": entropy, "teacher_cls": t_cls, "teacher_patch": t_patch,
                      "z": s.cls_embed[:b].detach(), "z_pair": s.cls_embed[b:].detach()}

    def last_layer_frozen(self, progress: Progress) -> bool:
        """Whether this step cuts the heads' last-layer gradients: during the first ``freeze_last_layer_epochs``
        (fractional: counted in steps)."""
        return progress.step < self.freeze_last_layer_epochs * progress.steps_per_epoch

    def schedules(self) -> dict[str, Schedule]:
        return {"teacher_momentum": self.teacher_momentum, "teacher_temp": self.teacher_temp,
                "teacher_patch_temp": self.teacher_patch_temp}

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = [(self.teacher_backbone, self.backbone), (self.teacher_head, self.head)]
        return pairs + ([(self.teacher_patch_head, self.patch_head)] if self.patch_head is not None else [])

    @torch.no_grad()
    def after_step(self, progress: Progress, logs: dict[str, Tensor]) -> None:
        """Both centres move towards this step's teacher outputs (iBOT's ``update_center``): the [CLS] centre to
        the mean over the 2B global views, the patch centre to the mean over every patch token of them; over
        every process with ``gather``."""
        self.center.copy_(update_center(self.center, logs["teacher_cls"], self.center_momentum, gather=self.gather))
        self.patch_center.copy_(update_center(self.patch_center, logs["teacher_patch"], self.center_momentum,
                                              gather=self.gather))
