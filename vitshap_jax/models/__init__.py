"""Models: the patch-maskable ViT and loading of public pretrained weights."""

import jax
import jax.numpy as jnp

from vitshap_jax.config import num_outputs
from vitshap_jax.models.pretrained import PretrainedMismatchError, load_pretrained, read_architecture
from vitshap_jax.models.vit import MASKING_STRATEGIES, ViT, num_patches

__all__ = [
    "MASKING_STRATEGIES",
    "PretrainedMismatchError",
    "ViT",
    "build_model",
    "compute_dtype",
    "load_pretrained",
    "load_pretrained_into",
    "num_patches",
    "read_architecture",
]

# `config.model` fields that are `ViT` options, with the value of configs written before they existed.
ARCHITECTURE_OPTIONS = {
    "class_token": True,
    "distill_token": False,
    "distill_head": False,
    "reg_tokens": 0,
    "pos_prefix": -1,
    "pool": "token",
    "fc_norm": False,
    "pre_norm": False,
    "layer_scale": False,
    "act": "gelu",
    "ln_eps": 1e-6,
}


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
        **{k: m.get(k, default) for k, default in ARCHITECTURE_OPTIONS.items()},
    )


def num_pos_prefix(config) -> int:
    """How many prefix tokens of the model `config.model` describes have a position embedding."""
    m = config.model
    prefix = int(m.get("class_token", True)) + int(m.get("distill_token", False)) + m.get("reg_tokens", 0)
    return prefix if m.get("pos_prefix", -1) < 0 else m.pos_prefix


def load_pretrained_into(config, params: dict) -> dict:
    """`load_pretrained(config.model.pretrained, params)` for the model `config` describes."""
    return load_pretrained(config.model.pretrained, params, pos_prefix=num_pos_prefix(config))
