"""Losses of the pretext family that are more than a cross-entropy: PIRL's two-term memory-bank loss.

PIRL (Misra & van der Maaten 2019, arXiv:1912.01991, eq. 5):
``L = λ·L_NCE(m_I, g(v_{I^t})) + (1 − λ)·L_NCE(m_I, f(v_I))``, where m_I is the memory-bank
representation of image I, f(v_I) the image branch, g(v_{I^t}) the jigsaw branch, and the noise
samples are other images' memory rows. The contrast is InfoNCE (softmax over the positive and the
negatives, the one :func:`~selfsup.losses.contrastive.info_nce`), i.e. VISSL's
``nce_loss_with_memory`` with ``loss_type: cross_entropy``; the paper's eq. 3–4 use binary NCE with
an estimated partition function instead.
"""
from __future__ import annotations

from torch import Tensor

from selfsup.losses.contrastive import info_nce


def pirl_loss(image: Tensor, transformed: Tensor, memory: Tensor, negatives: Tensor, temperature: float = 0.07,
              lam: float = 0.5) -> Tensor:
    """PIRL's convex combination of two InfoNCE terms against one memory bank.

    image: (B, D) f(v_I); transformed: (B, D) g(v_{I^t}); memory: (B, D) m_I, the positives (no gradient);
    negatives: (K, D) memory rows of other images (no gradient). All are l2-normalised inside.
    lam: weight λ of the transformed-image term (paper: 0.5). Computed in fp32 under autocast, as
    ``info_nce`` is.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"PIRL's λ must be in [0, 1], got {lam}")
    memory, negatives = memory.detach(), negatives.detach()
    to_transformed = info_nce(transformed, memory, temperature, negatives=negatives, in_batch=False)
    to_image = info_nce(image, memory, temperature, negatives=negatives, in_batch=False)
    return lam * to_transformed + (1 - lam) * to_image
