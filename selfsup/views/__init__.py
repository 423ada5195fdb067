"""Batched, per-sample-random augmentation on the training device, and view recipes."""
from selfsup.views.recipe import (Augment, ViewRecipe, apply_overrides, augment, byol_pair, center_view, dino_multicrop,
                                  group_by_size, make_views, normalize, resolve_sizes, to_float)

__all__ = ["Augment", "ViewRecipe", "apply_overrides", "augment", "byol_pair", "center_view", "dino_multicrop",
           "group_by_size", "make_views", "normalize", "resolve_sizes", "to_float"]
