"""Networks: backbones, the MLP head builder, EMA teachers and memory queues."""
from selfsup.nn.backbones import BACKBONES, BackboneError, build_backbone, check_backbone_name, register_backbone
from selfsup.nn.ema import cosine_schedule, ema_update_, frozen_copy
from selfsup.nn.heads import mlp
from selfsup.nn.queue import MemoryQueue
from selfsup.nn import vit  # registers the vit_tiny / vit_small backbones

__all__ = ["BACKBONES", "BackboneError", "build_backbone", "check_backbone_name", "register_backbone",
           "cosine_schedule", "ema_update_", "frozen_copy", "mlp", "MemoryQueue"]
