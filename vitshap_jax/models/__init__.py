"""Models: the patch-maskable ViT and loading of public pretrained weights."""

import jax.numpy as jnp

from vitshap_jax.config import num_outputs
from vitshap_jax.models.pretrained import PretrainedMismatchError, load_pretrained
from vitshap_jax.models.vit import MASKING_STRATEGIES, ViT, num_patches

__all__ = [
    "MASKING_STRATEGIES",
    "PretrainedMismatchError",
    "ViT",
    "build_model",
    "load_pretrained",
    "num_patches",
]


def build_model(config, *, masking: str | None = None) -> ViT:
    """The ViT a stage config describes (`config.model`, `config.dataset`); `masking` overrides it."""
    m = config.model
    return ViT(
        num_classes=num_outputs(config),
        patch_size=m.patch_size,
        hidden_size=m.hidden_size,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_dim=m.mlp_dim,
        dropout_rate=m.dropout_rate,
        masking=masking or m.masking,
        dtype=jnp.dtype(m.dtype),
    )
