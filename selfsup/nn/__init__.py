"""Networks: backbones, the MLP head builder, EMA teachers, memory queues and per-sample memories."""
from selfsup.nn.backbones import BACKBONES, BackboneError, build_backbone, register_backbone
from selfsup.nn.ema import ema_update_, frozen_copy, update_teachers
from selfsup.nn.heads import mlp
from selfsup.nn.memory import IndexedMemory
from selfsup.nn.queue import MemoryQueue
from selfsup.nn import vit  # registers the vit_tiny / vit_small backbones

__all__ = ["BACKBONES", "BackboneError", "build_backbone", "register_backbone", "ema_update_", "update_teachers",
           "frozen_copy", "mlp", "MemoryQueue", "IndexedMemory"]
