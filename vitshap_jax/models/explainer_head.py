"""The explainer: a ViT backbone and an explainer head giving raw per-patch, per-class values.

Head (the reference's design, configurable): `head_blocks` extra transformer blocks over all tokens
[prefix tokens; patches], the prefix tokens (class, distillation, registers) then dropped, LayerNorm,
an MLP of `mlp_layers` Dense layers (D -> ratio*D -> ... -> C) with `activation` between them, and
`tanh`. The output `phi_raw [B, n, C]` is
made efficient afterwards with `shapley.additive_efficient_normalization` using the surrogate's
v(all) and v(empty) (the explainer stage does it, since it needs the surrogate).

Parameters: `backbone` has exactly the ViT's names (minus its classification heads), so it is
initialized from the surrogate's parameters by copying; the head lives under `explainer_head`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from vitshap_jax.models.vit import _LN_EPS, Encoder1DBlock, ViT, dot_general_in

ACTIVATIONS = {"gelu": lambda x: nn.gelu(x, approximate=False), "relu": nn.relu}


class ExplainerHead(nn.Module):
    num_classes: int
    num_heads: int
    mlp_dim: int
    head_blocks: int = 1
    mlp_layers: int = 3
    mlp_ratio: int = 4
    activation: str = "gelu"
    dtype: jnp.dtype = jnp.float32
    dot_dtype: str | None = None  # the ViT's (models/vit.py)
    attention_impl: str = "matmul"  # the ViT's
    num_prefix_tokens: int = 1  # class, distillation and register tokens before the patches

    @nn.compact
    def __call__(self, tokens, *, train: bool = False):
        """`tokens [B, P + n, D]` -> `phi_raw [B, n, C]` in (-1, 1), float32."""
        x = tokens
        for i in range(self.head_blocks):
            x = Encoder1DBlock(
                self.num_heads,
                self.mlp_dim,
                dtype=self.dtype,
                dot_dtype=self.dot_dtype,
                attention_impl=self.attention_impl,
                name=f"block_{i}",
            )(x, None, deterministic=not train)
        x = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="norm")(x[:, self.num_prefix_tokens :])
        width = self.mlp_ratio * tokens.shape[-1]
        act = ACTIVATIONS[self.activation]
        dense = functools.partial(nn.Dense, dtype=self.dtype, dot_general=dot_general_in(self.dot_dtype))
        for i in range(self.mlp_layers - 1):
            x = act(dense(width, name=f"mlp_{i}")(x))
        x = dense(self.num_classes, name=f"mlp_{self.mlp_layers - 1}")(x)
        return jnp.tanh(x).astype(jnp.float32)


class Explainer(nn.Module):
    """`Explainer(backbone=ViT(...), explainer_head=ExplainerHead(...)).apply(variables, images)`
    -> `phi_raw [B, n_patches, C]`. Modules given as fields are named after them."""

    backbone: ViT
    explainer_head: ExplainerHead

    def __call__(self, images, *, train: bool = False):
        tokens = self.backbone.encode(images, train=train)
        return self.explainer_head(tokens, train=train)
