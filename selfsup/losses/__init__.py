"""Losses: pure functions on tensors, one module per family."""
from selfsup.losses.contrastive import info_nce, nt_xent

__all__ = ["info_nce", "nt_xent"]
