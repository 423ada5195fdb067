"""Losses: pure functions on tensors, one module per family."""
from selfsup.losses.contrastive import info_nce, nt_xent

__all__ = ["info_nce", "nt_xent"]
from selfsup.losses.contrastive import dcl_loss, vmf_weights
__all__ += ["dcl_loss", "vmf_weights"]
from selfsup.losses.redundancy import barlow_twins_loss, vicreg_loss, wmse_loss
__all__ += ["barlow_twins_loss", "vicreg_loss", "wmse_loss"]
from selfsup.losses.clustering import deepcluster_loss, sinkhorn_knopp, spherical_kmeans, swav_loss
__all__ += ["deepcluster_loss", "sinkhorn_knopp", "spherical_kmeans", "swav_loss"]
from selfsup.losses.distillation import byol_loss, dino_loss, negative_cosine
__all__ += ["byol_loss", "dino_loss", "negative_cosine"]
from selfsup.losses.masked import latent_prediction_loss, masked_l1, masked_mse, normalize_patches
__all__ += ["latent_prediction_loss", "masked_l1", "masked_mse", "normalize_patches"]
from selfsup.losses.msn import msn_loss
__all__ += ["msn_loss"]
from selfsup.losses.pretext import pirl_loss
__all__ += ["pirl_loss"]
from selfsup.losses.distillation import centered_softmax, koleo_loss, update_center
__all__ += ["centered_softmax", "koleo_loss", "update_center"]
from selfsup.losses.ibot import ibot_patch_loss, patch_sinkhorn_targets
__all__ += ["ibot_patch_loss", "patch_sinkhorn_targets"]
from selfsup.losses.cca import cca_correlation, dccae_loss, reconstruction_error
__all__ += ["cca_correlation", "dccae_loss", "reconstruction_error"]
