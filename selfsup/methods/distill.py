"""Distil a big pretrained encoder (the teacher, frozen) into the run's backbone (the student).

Fang et al. SEED: Self-supervised Distillation For Visual Representation. ICLR 2021, arXiv:2101.04731;
Beyer et al. Knowledge distillation: A good teacher is patient and consistent. CVPR 2022, arXiv:2106.05237.

The student gets a projector to the teacher's width (the one :func:`~selfsup.nn.heads.mlp`: 2 layers with BN) and
learns the teacher's embeddings of the *same* augmented views — function matching, Beyer et al.'s "consistent"
teaching: both networks see exactly the crops the recipe draws (SimCLR's two views here, so a SimCLR student of
the same budget is the like-for-like baseline), the teacher at its own input size and normalisation (below).
Losses (:mod:`selfsup.losses.teacher`):

- ``loss: queue`` (default): SEED — cross-entropy between the teacher's and the student's softmax similarities to
  ``[own teacher embedding; a queue of past teacher embeddings]`` (LightlyTrain's distillation v1 is the same
  construction). Defaults are the SEED code's (jacobswan1/SEED ``tools/opts.py`` and README): τ_student 0.2,
  τ_teacher 1e-4, a queue of 65,536. SEED queues the teacher's 128-d head outputs; here the teacher is an encoder
  without its head, so the queue holds its ``num_features``-d embeddings (a recipe with a 2,048-d teacher wants a
  smaller queue: 65,536 × 2,048 floats are 512 MB). The queue starts empty, as MoCo's here
  (:mod:`selfsup.methods.mocov2`): the very first step uses the batch's own teacher embeddings instead. Each step's
  teacher embeddings (both views) join the queue in ``after_step``.
- ``center_teacher`` (default on; a departure from SEED): the teacher's embeddings are centred by a running mean
  (DINO's centre EMA, :func:`~selfsup.losses.distillation.update_center`, momentum ``center_momentum``; the first step
  by its own batch mean) before they are l2-normalised, the queue's as well (it holds them uncentred, so every step
  centres all of them by the same, latest mean). SEED's teacher embeddings are a contrastive head's outputs, spread
  over the sphere by their training; an encoder's pooled ReLU features are not: a 1-epoch E-SSL teacher's digits
  embeddings have a mean pairwise cosine of 0.97, so every queue entry looks like the teacher's own embedding and a
  student that matches the teacher exactly still pays log(1 + K·e^(−0.15/τ_S)) ≈ 8.2 of the uniform 8.3 (K = 4,096).
  Centred, the same pairs have a mean cosine of 0.02.
- ``loss: mse``: LightlyTrain's distillation v2 — the squared distance between the l2-normalised student projection
  and teacher embedding of each view.
- ``ssl_weight`` > 0 adds SimCLR's NT-Xent (arXiv:2002.05709) between the two views' projections through a second,
  SimCLR-shaped projector, weighted by ``ssl_weight``.

The teacher (``teacher``): a selfsup run directory, its ``encoder.pt``, or a file written by ``selfsup export`` with
its ``.json`` sidecar (any backbone selfsup builds; :mod:`selfsup.nn.encoder_file`), or, from Python, an
``nn.Module`` reporting ``num_features`` (or a zero-argument function returning one). Its parameters are frozen and
never in the optimiser or an EMA; it stays in eval mode whatever ``train()`` is called with (its BatchNorm statistics
are the ones it was trained with); its features are computed once per step, under ``torch.no_grad()`` and under the
loop's autocast (bf16 where the run's precision is). The run records the teacher's absolute path and the SHA-256 of
its weights file in ``config.yaml`` (``method.params.teacher`` / ``teacher_sha256``, by :meth:`Distill.resolve_params`)
and says both in a log line; a resumed run whose teacher file changed is refused, naming ``teacher_sha256``.

Its weights are part of the method's state (the checkpoint's ``model``), not of the student's ``encoder.pt``; the
teacher file is still needed to rebuild the method (its architecture comes from it) when resuming.

Inputs the teacher was not trained on are adapted, never refused where a meaning exists:

- the views (normalised with the run's data statistics, ``input_mean``/``input_std``, which the builder passes) are
  un-normalised and normalised again with the teacher's own mean/std;
- grey data for an RGB teacher: the grey channel repeated three times; RGB data for a grey teacher: luminance
  (ITU-R BT.601 weights, PIL's ``L``); other channel mismatches are a ``ValueError`` naming both;
- views of another size than the teacher's ``image_size`` are resized to it (bilinear, antialiased when shrinking):
  a 64-px teacher distilled at 28 px sees 64-px views of the same crops.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup import distributed as dist
from selfsup.distributed import gather_no_grad
from selfsup.losses.contrastive import nt_xent
from selfsup.losses.distillation import update_center
from selfsup.losses.teacher import normalized_mse, queue_distillation_loss
from selfsup.methods.base import MethodSpec, Progress
from selfsup.methods.registry import register
from selfsup.nn.backbones import build_backbone
from selfsup.nn.encoder_file import find_encoder, load_frozen_encoder
from selfsup.nn.heads import mlp
from selfsup.nn.queue import MemoryQueue
from selfsup.views import Augment, ViewRecipe

log = logging.getLogger("selfsup")

LOSSES = ("queue", "mse")
LUMINANCE = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights: what PIL's ``convert("L")`` computes."""
NO_TEACHER = ("distill needs a teacher: --teacher RUN_DIR (a selfsup run) or --teacher ENC.pt (a `selfsup export` file "
              "with its .json beside it), i.e. method.params.teacher")


def tiny_random_teacher() -> nn.Module:
    """A fresh random 16-px grey ``small_resnet`` (8-16-32 wide): the teacher the registry-wide tests give
    (``spec.test_params``), so every test builds its own and no test needs a trained run."""
    return build_backbone("small_resnet", 1, 16, widths=[8, 16, 32])


@register("distill", "distillation", "Fang et al. 2021, SEED: Self-supervised Distillation, arXiv:2101.04731; "
          "Beyer et al. 2022, function matching, arXiv:2106.05237")
class Distill(nn.Module):
    spec = MethodSpec(
        views=ViewRecipe(globals_=(Augment(), Augment())),  # SimCLR's crops, the same for teacher and student
        test_params={"teacher": tiny_random_teacher, "queue_size": 32, "proj_hidden": 32, "ssl_weight": 0.5,
                     "ssl_proj_dim": 16},
    )

    def __init__(self, backbone: nn.Module, *, teacher: str | nn.Module | Callable[[], nn.Module] | None = None,
                 loss: str = "queue", queue_size: int = 65536, student_temp: float = 0.2, teacher_temp: float = 1e-4,
                 proj_hidden: int = 2048, ssl_weight: float = 0.0, ssl_temperature: float = 0.5,
                 ssl_proj_dim: int = 128, center_teacher: bool = True, center_momentum: float = 0.9,
                 teacher_sha256: str | None = None, input_mean: list[float] | None = None,
                 input_std: list[float] | None = None, gather: bool = False):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"distill: loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if student_temp <= 0 or teacher_temp <= 0 or ssl_temperature <= 0:
            raise ValueError(f"distill: temperatures must be > 0, got student_temp {student_temp}, teacher_temp "
                             f"{teacher_temp}, ssl_temperature {ssl_temperature}")
        if queue_size < 1 or proj_hidden < 1 or ssl_proj_dim < 1:
            raise ValueError(f"distill: queue_size, proj_hidden and ssl_proj_dim must be ≥ 1, got {queue_size}, "
                             f"{proj_hidden}, {ssl_proj_dim}")
        if ssl_weight < 0:
            raise ValueError(f"distill: ssl_weight must be ≥ 0, got {ssl_weight}")
        if not 0.0 <= center_momentum < 1.0:
            raise ValueError(f"distill: center_momentum must be in [0, 1), got {center_momentum}")
        self.backbone = backbone
        self.teacher, stats, sizes = _teacher(teacher, teacher_sha256)
        dim = self.teacher.num_features
        self.projector = mlp([backbone.num_features, proj_hidden, dim], norm="bn")
        self.ssl_projector = mlp([backbone.num_features, proj_hidden, ssl_proj_dim], norm="bn") if ssl_weight else None
        self.queue = MemoryQueue(queue_size, dim) if loss == "queue" else None  # uncentred teacher embeddings
        self.center_teacher, self.center_momentum = center_teacher, center_momentum
        self.register_buffer("teacher_center", torch.zeros(dim))
        self.loss_kind, self.ssl_weight, self.gather = loss, ssl_weight, gather
        self.student_temp, self.teacher_temp, self.ssl_temperature = student_temp, teacher_temp, ssl_temperature
        student_chans = getattr(backbone, "in_chans", None)
        self.teacher_size: int | None = sizes[1]
        self.channel_map = _channel_map(student_chans, sizes[0])
        # the views' normalisation undone and the teacher's applied; identity when either is unknown
        self.renormalise = stats is not None and input_mean is not None and input_std is not None
        c_in = student_chans or len(input_mean or ()) or 1
        self.register_buffer("input_mean", _per_channel(input_mean if self.renormalise else None, c_in, 0.0), False)
        self.register_buffer("input_std", _per_channel(input_std if self.renormalise else None, c_in, 1.0), False)
        c_t = sizes[0] or c_in
        self.register_buffer("teacher_mean", _per_channel(stats[0] if self.renormalise else None, c_t, 0.0), False)
        self.register_buffer("teacher_std", _per_channel(stats[1] if self.renormalise else None, c_t, 1.0), False)

    @classmethod
    def resolve_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """The teacher as the run records it: its absolute path and the SHA-256 of its weights file (checked against
        a ``teacher_sha256`` the config already holds, as ``backbone.weights_sha256`` is)."""
        teacher = params.get("teacher")
        if teacher is None:
            raise ValueError(NO_TEACHER)
        if not isinstance(teacher, (str, os.PathLike)):
            raise ValueError("a run's config names its teacher by path (a run directory or a `selfsup export` file); "
                             "an nn.Module teacher is for the Python API: Distill(backbone, teacher=module)")
        source = find_encoder(teacher)
        sha = source.sha256()
        recorded = params.get("teacher_sha256")
        if recorded and str(recorded).lower() != sha:
            raise ValueError(f"the teacher {source.weights} has SHA-256 {sha}, not the {recorded} this config records: "
                             "it changed since; remove method.params.teacher_sha256 to use it as it is now")
        return {**params, "teacher": str(source.path), "teacher_sha256": sha}

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def train(self, mode: bool = True) -> Distill:
        super().train(mode)
        self.teacher.eval()  # frozen: its BatchNorm statistics stay those it was trained with
        return self

    def teacher_input(self, x: Tensor) -> Tensor:
        """Views (N, C, H, W) as the run normalised them → the teacher's input: its normalisation, channels, size."""
        if self.renormalise:
            x = x * self.input_std + self.input_mean
        if self.channel_map == "repeat":
            x = x.expand(-1, 3, -1, -1)
        elif self.channel_map == "luminance":
            x = (x * x.new_tensor(LUMINANCE).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        if self.renormalise:
            x = (x - self.teacher_mean) / self.teacher_std
        size = self.teacher_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=size < max(x.shape[-2:]))
        return x

    @torch.no_grad()
    def teacher_embeddings(self, x: Tensor) -> Tensor:
        """(N, C, H, W) views → (N, D_t) teacher features in fp32, one pass, no gradient."""
        return self.teacher(self.teacher_input(x)).float()

    def center(self, progress: Progress, t: Tensor) -> Tensor:
        """(D_t,) what the teacher's embeddings t (N, D_t) are centred by: the running mean, at the first step the
        batch's own mean (every process's, with ``gather``; zeros without ``center_teacher``)."""
        if not self.center_teacher:
            return torch.zeros_like(self.teacher_center)
        return (gather_no_grad(t) if self.gather else t).mean(dim=0) if progress.step == 0 else self.teacher_center

    def training_step(self, views: list[Tensor], progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        x = torch.cat(views)  # both views through each network together
        raw = self.teacher_embeddings(x)  # (2B, D_t)
        c = self.center(progress, raw)
        t = raw - c
        h = self.backbone(x)
        p = self.projector(h)  # (2B, D_t)
        logs: dict[str, Tensor] = {"teacher_raw": raw}
        if self.queue is not None:
            queued = self.queue.contents()
            if not queued.shape[0]:  # first step, nothing queued yet: the (global) batch's teacher embeddings
                queued = gather_no_grad(raw) if self.gather else raw
            keys = F.normalize(queued - c, dim=1)
            distill = queue_distillation_loss(p, t, keys, self.student_temp, self.teacher_temp)
        else:
            distill = normalized_mse(p, t)
        loss = distill
        logs["distill_loss"] = distill.detach()
        if self.ssl_projector is not None:
            z1, z2 = self.ssl_projector(h).chunk(2)
            ssl = nt_xent(z1, z2, self.ssl_temperature, gather=self.gather)
            loss = loss + self.ssl_weight * ssl
            logs["ssl_loss"] = ssl.detach()
        with torch.no_grad():
            logs["teacher_cos"] = F.cosine_similarity(p.detach().float(), t, dim=1).mean()
        p1, p2 = p.detach().chunk(2)
        return loss, {**logs, "z": p1, "z_pair": p2}

    def after_step(self, progress: Progress, logs: dict[str, Tensor]) -> None:
        raw = logs["teacher_raw"]
        if self.queue is not None:
            self.queue.push(gather_no_grad(raw) if self.gather else raw)
        if self.center_teacher:  # the first step's centre is its batch mean: no zeros to forget
            momentum = 0.0 if progress.step == 0 else self.center_momentum
            self.teacher_center.copy_(update_center(self.teacher_center, raw, momentum, gather=self.gather))


def _teacher(teacher: Any, sha256: str | None) -> tuple[nn.Module, tuple | None, tuple[int | None, int | None]]:
    """(the frozen teacher, its (mean, std) or None when unknown, its (in_chans, image_size), None where unknown)."""
    if teacher is None:
        raise ValueError(NO_TEACHER)
    if isinstance(teacher, (str, os.PathLike)):
        source = find_encoder(teacher)
        module, loaded = load_frozen_encoder(source)
        if dist.rank() == 0:
            sha = sha256 or source.sha256()
            log.info("distill: teacher %s (%s; weights %s, sha256 %s)", source.path, source.summary(), source.weights,
                     sha)
            for note in loaded.notes:
                log.info("distill: teacher weights: %s", note)
        return module, (source.mean, source.std), (source.in_chans, source.image_size)
    if not isinstance(teacher, nn.Module) and callable(teacher):
        teacher = teacher()
    if not isinstance(teacher, nn.Module):
        raise ValueError(f"distill: teacher must be a path, an nn.Module or a function returning one, got "
                         f"{type(teacher).__name__}")
    if not isinstance(getattr(teacher, "num_features", None), int):
        raise ValueError(f"distill: the teacher module ({type(teacher).__name__}) must report num_features, its "
                         "embedding width, as selfsup's backbones do")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval(), None, (getattr(teacher, "in_chans", None), getattr(teacher, "image_size", None))


def _channel_map(student: int | None, teacher: int | None) -> str:
    """How the run's channels become the teacher's: ``same``, ``repeat`` (1 → 3) or ``luminance`` (3 → 1)."""
    if student is None or teacher is None or student == teacher:
        return "same"
    if (student, teacher) == (1, 3):
        return "repeat"
    if (student, teacher) == (3, 1):
        return "luminance"
    raise ValueError(f"distill: the data has {student} channel(s) and the teacher takes {teacher}; only grey → RGB "
                     "(repeated) and RGB → grey (luminance) are adapted: give a teacher trained on "
                     f"{student}-channel images")


def _per_channel(values: Any, channels: int, default: float) -> Tensor:
    """(1, C, 1, 1) statistics; one value given for several channels is repeated."""
    v = torch.full((channels,), default) if values is None else torch.tensor([float(x) for x in values])
    if v.numel() == 1 and channels > 1:
        v = v.expand(channels).clone()
    if v.numel() != channels:
        raise ValueError(f"distill: {v.numel()} normalisation value(s) for {channels} channel(s)")
    return v.view(1, channels, 1, 1)
