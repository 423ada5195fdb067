"""Networks: backbones, the MLP head builder, EMA teachers, memory queues and per-sample memories."""
from selfsup.nn.backbones import BACKBONES, BackboneError, build_backbone, check_backbone_name, register_backbone
from selfsup.nn.ema import ema_update_, frozen_copy, update_teachers
from selfsup.nn.heads import mlp
from selfsup.nn.memory import IndexedMemory
from selfsup.nn.queue import MemoryQueue
from selfsup.nn import vit  # noqa: F401  (registers the vit_tiny / vit_small backbones)
from selfsup.nn import video_vit  # noqa: F401  (registers the video_vit backbone; timm loads when one is built)

__all__ = ["BACKBONES", "BackboneError", "build_backbone", "check_backbone_name", "register_backbone", "ema_update_",
           "update_teachers", "frozen_copy", "mlp", "MemoryQueue", "IndexedMemory"]
