"""Removing patches from images: what ROAR retrains on (`commands/roar.py`)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from vitshap_jax.evaluation.metrics import importance_order
from vitshap_jax.models.vit import patch_mask_to_pixels


def remove_top(images, scores, fraction: float, patch_size: int, key) -> np.ndarray:
    """`images` with the round(fraction * n) highest-scoring patches of each set to zero (the dataset
    mean after normalization; ties broken at random with `key`)."""
    n = scores.shape[1]
    k = round(fraction * n)
    rank = jnp.argsort(importance_order(jnp.asarray(scores), key), axis=-1)  # rank of each patch
    keep = rank >= k
    side = images.shape[1] // patch_size
    return np.asarray(images * patch_mask_to_pixels(keep, (side, side), patch_size))
