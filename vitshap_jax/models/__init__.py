"""Models: the patch-maskable ViT and loading of public pretrained weights."""

import jax
import jax.numpy as jnp

from vitshap_jax.config import num_outputs
from vitshap_jax.models.pretrained import PretrainedMismatchError, load_pretrained
from vitshap_jax.models.vit import MASKING_STRATEGIES, ViT, num_patches

__all__ = [
    "MASKING_STRATEGIES",
    "PretrainedMismatchError",
    "ViT",
    "build_model",
    "compute_dtype",
    "load_pretrained",
    "num_patches",
]


def compute_dtype(name: str):
    """The compute dtype of `config.model.dtype`: "auto" is bfloat16 on GPU and TPU, float32 on CPU."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else jnp.float32
    return jnp.dtype(name)


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
        dtype=compute_dtype(m.dtype),
    )
