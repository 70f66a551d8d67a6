"""Models: the patch-maskable ViT, the explainer (ViT backbone + explainer head), and loading of public
pretrained weights. `build_model` / `build_explainer` make them from a stage config."""

import jax
import jax.numpy as jnp

from vitshap_jax.config import num_outputs
from vitshap_jax.models.explainer_head import Explainer, ExplainerHead
from vitshap_jax.models.pretrained import PretrainedMismatchError, load_pretrained, read_architecture
from vitshap_jax.models.vit import MASKING_STRATEGIES, ViT, num_patches

__all__ = [
    "MASKING_STRATEGIES",
    "Explainer",
    "ExplainerHead",
    "PretrainedMismatchError",
    "ViT",
    "abstract_params",
    "build_explainer",
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
        remat=m.get("remat", False),
        **{k: m.get(k, default) for k, default in ARCHITECTURE_OPTIONS.items()},
    )


def build_explainer(config) -> Explainer:
    """The explainer a stage config describes: the ViT of `build_model` as backbone and an
    `ExplainerHead` (`config.explainer`) giving raw values `[B, n, C]`."""
    m, e = config.model, config.explainer
    backbone = build_model(config)
    head = ExplainerHead(
        num_classes=num_outputs(config),
        num_heads=m.num_heads,
        mlp_dim=m.mlp_dim,
        head_blocks=e.head_blocks,
        mlp_layers=e.mlp_layers,
        mlp_ratio=e.mlp_ratio,
        activation=e.activation,
        dtype=compute_dtype(m.dtype),
        num_prefix_tokens=backbone.num_prefix_tokens,
    )
    return Explainer(backbone=backbone, explainer_head=head)


def abstract_params(model, image_size: int, sharding=None):
    """Shapes and dtypes of `model`'s parameters for square `image_size` images, without computing
    them (`jax.eval_shape`): the restore target of a checkpoint, placed with `sharding` if given."""
    sample = jnp.zeros((1, image_size, image_size, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), sample)["params"])
    if sharding is None:
        return shapes
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def num_pos_prefix(config) -> int:
    """How many prefix tokens of the model `config.model` describes have a position embedding."""
    m = config.model
    prefix = int(m.get("class_token", True)) + int(m.get("distill_token", False)) + m.get("reg_tokens", 0)
    return prefix if m.get("pos_prefix", -1) < 0 else m.pos_prefix


def load_pretrained_into(config, params: dict) -> dict:
    """`load_pretrained(config.model.pretrained, params)` for the model `config` describes."""
    return load_pretrained(config.model.pretrained, params, pos_prefix=num_pos_prefix(config))
