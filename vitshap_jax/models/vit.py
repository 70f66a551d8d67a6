"""Vision Transformer that takes an explicit patch mask (which patches are "players" present).

The game of ViT-Shapley is `v_x(S) = link(g(x, S))`: the model evaluated with only the patches in the
coalition S visible. `ViT.apply(variables, images, patch_mask)` evaluates it for a batch of images and
coalitions at once. Two ways to hold a patch out:

* ``attention`` (the paper's choice): a held-out patch token is never used as a key in any
  self-attention layer (boolean mask on the attention logits, before the softmax). The class token is
  always visible. No visible token depends on a held-out one, so the output equals running the model
  on the visible tokens alone; `patch_indices` runs exactly that (gathered tokens, same position
  embeddings), which is both the test oracle and a faster path when few patches are visible.
  `with_complement=True` evaluates a coalition and its complement together in n + 2 tokens (paired
  sampling gives both), the visible-token path that the estimators and the explainer's training use.
* ``zero``: the held-out patches' pixels are set to zero (after normalization) before the patch
  embedding. The comparison strategy of the paper.

Parameter names follow google-research/vision_transformer (`embedding`, `cls`,
`Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1`,
...), so checkpoints in that format load by name (see `pretrained.py`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitshap_jax.config import MASKING_STRATEGIES

_LN_EPS = 1e-6  # the value of both google-research ViT and timm ViT checkpoints


def num_patches(image_size: int, patch_size: int) -> int:
    """Players of the game: patches of a square `image_size` image."""
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    return (image_size // patch_size) ** 2


def patch_mask_to_pixels(patch_mask: jax.Array, grid: tuple[int, int], patch_size: int) -> jax.Array:
    """Upsamples a patch mask `[B, gh*gw]` to a pixel mask `[B, gh*p, gw*p, 1]` (row-major patches)."""
    b = patch_mask.shape[0]
    m = patch_mask.reshape(b, grid[0], 1, grid[1], 1)
    m = jnp.broadcast_to(m, (b, grid[0], patch_size, grid[1], patch_size))
    return m.reshape(b, grid[0] * patch_size, grid[1] * patch_size, 1)


class MlpBlock(nn.Module):
    """Transformer MLP: Dense -> GELU -> Dense."""

    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        dense = functools.partial(
            nn.Dense,
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
        )
        y = dense(self.mlp_dim, name="Dense_0")(x)
        y = nn.gelu(y, approximate=False)  # exact GELU, as in timm / PyTorch checkpoints
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        y = dense(x.shape[-1], name="Dense_1")(y)
        return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class MultiHeadDotProductAttention(nn.Module):
    """Self-attention with an optional boolean `mask` broadcastable to `[B, heads, queries, keys]`
    (True = the query may attend to the key).

    With `inspect=True` the attention weights `[B, heads, T, T]` are computed explicitly, stored with
    `sow("intermediates", "attention")` and made differentiable with `perturb("attention")` (the
    attention-based baselines read both); otherwise the fused `jax.nn.dot_product_attention` runs.
    """

    num_heads: int
    dtype: jnp.dtype = jnp.float32
    inspect: bool = False

    @nn.compact
    def __call__(self, x, mask=None):
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"hidden size {width} is not divisible by num_heads {self.num_heads}")
        proj = functools.partial(
            nn.DenseGeneral,
            features=(self.num_heads, width // self.num_heads),
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
        )
        q, k, v = (proj(name=name)(x) for name in ("query", "key", "value"))
        if self.inspect:
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
            if mask is not None:
                logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
            weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
            self.sow("intermediates", "attention", weights)
            weights = self.perturb("attention", weights)
            y = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
        else:
            y = jax.nn.dot_product_attention(q, k, v, mask=mask)
        return nn.DenseGeneral(
            features=width,
            axis=(-2, -1),
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            name="out",
        )(y)


class Encoder1DBlock(nn.Module):
    """Pre-LayerNorm transformer block (names as in google-research/vision_transformer)."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    inspect: bool = False

    @nn.compact
    def __call__(self, x, mask, *, deterministic: bool):
        y = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="LayerNorm_0")(x)
        y = MultiHeadDotProductAttention(
            self.num_heads, dtype=self.dtype, inspect=self.inspect, name="MultiHeadDotProductAttention_1"
        )(y, mask)
        x = x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        y = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="LayerNorm_2")(x)
        y = MlpBlock(self.mlp_dim, self.dropout_rate, dtype=self.dtype, name="MlpBlock_3")(
            y, deterministic=deterministic
        )
        return x + y


class AddPositionEmbs(nn.Module):
    """Learned position embeddings `[1, 1 + n_patches, D]` (class token first)."""

    @nn.compact
    def __call__(self, x):
        pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1, *x.shape[1:]))
        if pos.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"input has {x.shape[1]} tokens of width {x.shape[2]} but the position embedding is "
                f"{pos.shape[1:]}: the image size differs from the one the parameters were made for"
            )
        return x + pos.astype(x.dtype)


class Encoder(nn.Module):
    """Position embeddings, optional token selection, the blocks, and the final LayerNorm.

    `mask` is the attention mask (see MultiHeadDotProductAttention); `patch_indices` keeps only those
    patch tokens; `second_cls` inserts a copy of the class token (with its position embedding) as token 1.
    """

    depth: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    inspect: bool = False

    @nn.compact
    def __call__(self, x, mask=None, patch_indices=None, *, deterministic: bool, second_cls: bool = False):
        x = AddPositionEmbs(name="posembed_input")(x)
        if second_cls:
            x = jnp.concatenate([x[:, :1], x], axis=1)
        if patch_indices is not None:
            # Keep the class token and the chosen patch tokens, with their own position embeddings.
            patches = jnp.take_along_axis(x[:, 1:], patch_indices[..., None], axis=1)
            x = jnp.concatenate([x[:, :1], patches], axis=1)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        for i in range(self.depth):
            if self.inspect and i == self.depth - 1:  # tokens entering the last block, for GradCAM
                self.sow("intermediates", "last_block_input", x)
                x = self.perturb("last_block_input", x)
            x = Encoder1DBlock(
                self.num_heads,
                self.mlp_dim,
                self.dropout_rate,
                dtype=self.dtype,
                inspect=self.inspect,
                name=f"encoderblock_{i}",
            )(x, mask, deterministic=deterministic)
        return nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="encoder_norm")(x)


class ViT(nn.Module):
    """ViT classifier over the class token, evaluated on a coalition of visible patches.

    Attributes:
      num_classes: outputs of the head (1 for a binary target with a sigmoid link).
      patch_size: side of a square patch in pixels.
      hidden_size, depth, num_heads, mlp_dim: the transformer's shape (see configs/common.py).
      dropout_rate: dropout after attention/MLP, active only with `train=True`.
      masking: how `patch_mask` removes patches: "attention" or "zero" (module docstring).
      dtype: compute dtype; parameters are always float32.
      inspect: expose attention weights and the tokens entering the last block (collections
        "intermediates" and "perturbations") for `vitshap_jax.baselines`; same parameters and outputs.
    """

    num_classes: int
    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    masking: str = "attention"
    dtype: jnp.dtype = jnp.float32
    inspect: bool = False

    def setup(self):
        if self.masking not in MASKING_STRATEGIES:
            raise ValueError(f"masking={self.masking!r}: must be one of {', '.join(MASKING_STRATEGIES)}")
        self.embedding = nn.Conv(
            self.hidden_size,
            (self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            dtype=self.dtype,
        )
        self.cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden_size))
        self.Transformer = Encoder(
            self.depth,
            self.num_heads,
            self.mlp_dim,
            self.dropout_rate,
            dtype=self.dtype,
            inspect=self.inspect,
        )
        self.head = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype)

    def encode(
        self,
        images,
        patch_mask=None,
        *,
        train: bool = False,
        patch_indices=None,
        with_complement: bool = False,
    ):
        """Token features after the final LayerNorm.

        Args:
          images: `[B, H, W, C]` float, normalized; H and W multiples of `patch_size`.
          patch_mask: `[B, n_patches]` bool or {0, 1} (1 = visible), patches in row-major order;
            None means every patch is visible.
          train: enables dropout (needs a "dropout" rng).
          patch_indices: `[B, k]` int; run only these patch tokens (plus the class token). Exactly
            equivalent to an attention mask that keeps these k patches; not combinable with `patch_mask`.
          with_complement: evaluate the coalition `patch_mask` and its complement in one sequence of
            n + 2 tokens (attention masking only): two class tokens, every patch token once, and a
            block-diagonal attention mask (class token 0 and the coalition's patches form one block,
            class token 1 and the other patches the other). Under attention masking a held-out token is
            never attended to, so each block computes exactly what the masked model computes for its
            coalition, at about half the cost of two masked passes.

        Returns:
          `[B, 1 + n_patches, D]`, `[B, 1 + k, D]` with `patch_indices`, or `[B, 2 + n_patches, D]` with
          `with_complement`; index 0 is the class token (and 1 the complement's).
        """
        b, h, w, _ = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of patch_size {p}")
        grid = (h // p, w // p)
        n = grid[0] * grid[1]
        mask = None
        if with_complement and (patch_mask is None or self.masking != "attention"):
            raise ValueError("with_complement needs a patch_mask and attention masking")
        if patch_mask is not None:
            if patch_indices is not None:
                raise ValueError("pass either patch_mask or patch_indices, not both")
            if patch_mask.shape != (b, n):
                raise ValueError(
                    f"patch_mask has shape {patch_mask.shape}; expected (batch, n_patches) = {(b, n)} "
                    f"for {h}x{w} images with {p}x{p} patches"
                )
            visible = patch_mask if patch_mask.dtype == jnp.bool_ else patch_mask > 0.5
            if self.masking == "zero":
                images = images * patch_mask_to_pixels(visible, grid, p).astype(images.dtype)
            elif with_complement:
                group = jnp.concatenate([jnp.zeros((b, 1), bool), jnp.ones((b, 1), bool), ~visible], axis=1)
                mask = group[:, None, :, None] == group[:, None, None, :]  # [B, 1, n + 2, n + 2]
            else:
                mask = jnp.concatenate([jnp.ones((b, 1), bool), visible], axis=1)[:, None, None, :]
        x = self.embedding(images.astype(self.dtype)).reshape(b, n, self.hidden_size)
        cls = jnp.broadcast_to(self.cls.astype(x.dtype), (b, 1, self.hidden_size))
        x = jnp.concatenate([cls, x], axis=1)
        return self.Transformer(x, mask, patch_indices, deterministic=not train, second_cls=with_complement)

    def __call__(
        self,
        images,
        patch_mask=None,
        *,
        train: bool = False,
        patch_indices=None,
        with_complement: bool = False,
    ):
        """Logits `[B, num_classes]` (float32) from the class token; arguments as in `encode`. With
        `with_complement`: `[B, 2, num_classes]`, the coalition's logits and its complement's."""
        tokens = self.encode(
            images, patch_mask, train=train, patch_indices=patch_indices, with_complement=with_complement
        )
        cls_tokens = tokens[:, :2] if with_complement else tokens[:, 0]
        return self.head(cls_tokens).astype(jnp.float32)
