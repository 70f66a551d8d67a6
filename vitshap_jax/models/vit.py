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

Architecture options cover the ViT families people fine-tune (`pretrained.py` reads them from a
checkpoint): extra prefix tokens (a DeiT distillation token with its own head, DINOv2 register tokens),
no class token with average pooling over the visible patches, layer scale, a LayerNorm before the blocks
(CLIP), the final LayerNorm after pooling (timm's `fc_norm`), GELU variants and the LayerNorm epsilon.
Every prefix token (class, distillation, registers) is always visible: masking only ever removes patch
tokens, and with `with_complement` each half gets its own copy of every prefix token.

Parameter names follow google-research/vision_transformer (`embedding`, `cls`,
`Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1`,
...), so checkpoints in that format load by name (see `pretrained.py`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitshap_jax.config import ATTENTION_IMPLS, MASKING_STRATEGIES, POOLING

_LN_EPS = 1e-6  # the value of both google-research ViT and timm ViT checkpoints


def gelu(x):
    """Exact GELU, x * Phi(x), written as PyTorch computes it: x / 2 * (1 + erf(x / sqrt 2)). The same
    function as `nn.gelu(x, approximate=False)` (which goes through erfc) to 1e-6, and on XLA:CPU 3x
    faster forward and 1.4x faster backward (erf is a vectorized rational polynomial; erfc is not):
    docs/performance.md."""
    return x * (0.5 + 0.5 * jax.lax.erf(x * 0.7071067811865476))


@jax.custom_vjp
def softmax(logits):
    """`jax.nn.softmax` over the last axis, with its backward pass written from the output alone,
    `y * (g - sum(g * y))`: the same values and gradients, and on XLA:CPU a faster attention backward
    than differentiating through `jax.nn.softmax`'s own rule (docs/performance.md). Reverse mode only."""
    return jax.nn.softmax(logits, axis=-1)


def _softmax_forward(logits):
    y = jax.nn.softmax(logits, axis=-1)
    return y, y


def _softmax_backward(y, g):
    return (y * (g - (g * y).sum(-1, keepdims=True)),)


softmax.defvjp(_softmax_forward, _softmax_backward)


def _einsum_spec(dimension_numbers, lhs_ndim: int, rhs_ndim: int) -> str:
    """The einsum spec of a `lax.dot_general` (its output order: batch, lhs free, rhs free)."""
    (lc, rc), (lb, rb) = dimension_numbers
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    lhs = [next(letters) for _ in range(lhs_ndim)]
    rhs = [next(letters) for _ in range(rhs_ndim)]
    for i, j in zip((*lc, *lb), (*rc, *rb), strict=True):
        rhs[j] = lhs[i]
    out = [lhs[i] for i in lb]
    out += [lhs[i] for i in range(lhs_ndim) if i not in (*lc, *lb)]
    out += [rhs[j] for j in range(rhs_ndim) if j not in (*rc, *rb)]
    return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def mixed_einsum(spec: str, a, b, dot_dtype):
    """`einsum(spec, a, b)` with both operands rounded to `dot_dtype` (bfloat16) and the products
    summed in float32, the result float32: TPU's default matmul precision, which XLA:CPU does not apply
    by itself (`jax.default_matmul_precision` is ignored there). The backward pass does the same (the
    cotangent rounded to `dot_dtype`, float32 gradients), so forward and backward both run the CPU's
    bfloat16 matmul kernels (1.6-2x the float32 rate on this project's CPU: docs/performance.md).
    `spec` has two operands, and no index in one operand alone that the output lacks."""
    return jnp.einsum(spec, a.astype(dot_dtype), b.astype(dot_dtype), preferred_element_type=jnp.float32)


def _mixed_einsum_forward(spec, a, b, dot_dtype):
    a16, b16 = a.astype(dot_dtype), b.astype(dot_dtype)
    out = jnp.einsum(spec, a16, b16, preferred_element_type=jnp.float32)
    return out, (a16, b16, jnp.zeros((), a.dtype), jnp.zeros((), b.dtype))  # dtypes as residuals


def _mixed_einsum_backward(spec, dot_dtype, residuals, g):
    a16, b16, a_like, b_like = residuals
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    g16 = g.astype(dot_dtype)
    ga = jnp.einsum(f"{out},{sb}->{sa}", g16, b16, preferred_element_type=jnp.float32)
    gb = jnp.einsum(f"{sa},{out}->{sb}", a16, g16, preferred_element_type=jnp.float32)
    return ga.astype(a_like.dtype), gb.astype(b_like.dtype)


mixed_einsum.defvjp(_mixed_einsum_forward, _mixed_einsum_backward)


def dot_general_in(dot_dtype):
    """A `dot_general` for flax's Dense layers that runs in `mixed_einsum`'s precision, or None (flax's
    own) when `dot_dtype` is None."""
    if dot_dtype is None:
        return None

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        del precision, preferred_element_type
        spec = _einsum_spec(dimension_numbers, lhs.ndim, rhs.ndim)
        return mixed_einsum(spec, lhs, rhs, jnp.dtype(dot_dtype)).astype(jnp.result_type(lhs, rhs))

    return dot_general


# The MLP's activation: exact GELU (google-research, timm, HF ViT, DINOv2), its tanh approximation, and
# OpenAI CLIP's "quick GELU" x * sigmoid(1.702 x).
ACTIVATIONS = {
    "gelu": gelu,
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


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
    """Transformer MLP: Dense -> activation (`ACTIVATIONS`) -> Dense."""

    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    act: str = "gelu"
    dot_dtype: str | None = None

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        dense = functools.partial(
            nn.Dense,
            dtype=self.dtype,
            dot_general=dot_general_in(self.dot_dtype),
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
        )
        y = dense(self.mlp_dim, name="Dense_0")(x)
        y = ACTIVATIONS[self.act](y)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        y = dense(x.shape[-1], name="Dense_1")(y)
        return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


def attention_weights(q, k, mask=None):
    """Softmax attention weights `[B, heads, Tq, Tk]` (float32) of `q [B, heads, Tq, head_dim]` and
    `k [B, heads, Tk, head_dim]`; `mask` (boolean, True = may attend) broadcastable to the weights adds
    -1e30 to the held-out logits, whose weights are then exactly 0. The attention products stay in
    the inputs' dtype under `dot_dtype`: on XLA:CPU these batched [T, T] matmuls gain nothing from
    bfloat16 operands (ViT-S's forward: 1.63x with them, 1.8x without)."""
    q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    logits = (q @ k.swapaxes(-1, -2)).astype(jnp.float32)
    if mask is not None:
        logits = logits + jnp.where(mask, 0.0, -1e30).astype(jnp.float32)
    return softmax(logits)


def attention(q, k, v, mask=None):
    """The attention core of `MultiHeadDotProductAttention` (without its `inspect` hooks): `[B, heads,
    Tq, head_dim]` outputs, `v`'s dtype."""
    return attention_weights(q, k, mask).astype(v.dtype) @ v


class MultiHeadDotProductAttention(nn.Module):
    """Self-attention with an optional boolean `mask` broadcastable to `[B, heads, queries, keys]`
    (True = the query may attend to the key).

    Heads lead the batched matmuls (`[B, heads, T, head_dim]`), the query is scaled before the product,
    the mask is an additive bias (-1e30 on held-out keys, whose weight is then exactly 0) and the
    softmax runs in float32: on XLA:CPU this is 1.7x faster in the masked forward than
    `jax.nn.dot_product_attention` and 2x faster than the `[B, T, heads, head_dim]` einsums (measured:
    benchmarks/profile_ops.py, docs/performance.md). With `inspect=True` the weights `[B, heads, T, T]`
    are also stored with `sow("intermediates", "attention")` and made differentiable with
    `perturb("attention")` (the attention-based baselines read both).

    `impl` (`ATTENTION_IMPLS`) picks the attention core: "matmul" is the above; "xla" and "cudnn" are
    `jax.nn.dot_product_attention` with the boolean mask and that `implementation` (cuDNN's fused kernel
    never writes the [T, T] weights to memory; it takes bfloat16 or float16 inputs on an NVIDIA GPU
    only). jax's cuDNN front end (0.10-0.11) refuses to differentiate a sequence of odd length, masked
    or not (the 197 tokens of a ViT-B/16: measured on an H200), so "cudnn" runs cuDNN where both lengths
    are even (the packed pairs' 198 tokens, the bulk of the explainer's step) and the "matmul" core
    elsewhere. All are the same masked model: a held-out key's weight is exactly 0. With `inspect` the
    weights are needed, so the core is "matmul" whatever `impl` says.
    """

    num_heads: int
    dtype: jnp.dtype = jnp.float32
    inspect: bool = False
    dot_dtype: str | None = None
    impl: str = "matmul"

    @nn.compact
    def __call__(self, x, mask=None, queries=None):
        """`x` `[B, T, D]` -> `[B, T, D]`; with `queries` (static token indices), only those tokens'
        outputs `[B, len(queries), D]` (they still attend to every token)."""
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"hidden size {width} is not divisible by num_heads {self.num_heads}")
        proj = functools.partial(
            nn.DenseGeneral,
            features=(self.num_heads, width // self.num_heads),
            dtype=self.dtype,
            dot_general=dot_general_in(self.dot_dtype),
            kernel_init=nn.initializers.xavier_uniform(),
        )
        if self.impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl={self.impl!r}: must be one of {', '.join(ATTENTION_IMPLS)}")
        rows = x if queries is None else x[:, jnp.array(queries)]
        if mask is not None and queries is not None and mask.shape[2] > 1:
            mask = mask[:, :, jnp.array(queries)]
        q, k, v = (proj(name=name)(y) for name, y in (("query", rows), ("key", x), ("value", x)))
        impl = self.impl
        if impl == "cudnn" and (q.shape[1] % 2 or k.shape[1] % 2):
            impl = "matmul"  # cuDNN (jax 0.10-0.11) cannot differentiate odd lengths: the same model here
        if impl == "matmul" or self.inspect:
            # [B, heads, T, head_dim]: XLA:CPU runs batched matmuls with leading batch dimensions several
            # times faster than the [B, T, heads, head_dim] layout (docs/performance.md).
            q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
            weights = attention_weights(q, k, mask)
            if self.inspect:
                self.sow("intermediates", "attention", weights)
                weights = self.perturb("attention", weights)
            y = (weights.astype(v.dtype) @ v).transpose(0, 2, 1, 3)
        else:  # the library's [B, T, heads, head_dim] layout
            if impl == "cudnn" and mask is not None:  # cuDNN takes a bias of [B, N, Tq, Tk] (its
                # batching rule under vmap reshapes it to exactly that shape)
                mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
            y = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
        return nn.DenseGeneral(
            features=width,
            axis=(-2, -1),
            dtype=self.dtype,
            dot_general=dot_general_in(self.dot_dtype),
            kernel_init=nn.initializers.xavier_uniform(),
            name="out",
        )(y)


class Encoder1DBlock(nn.Module):
    """Pre-LayerNorm transformer block (names as in google-research/vision_transformer); with
    `layer_scale`, each branch is multiplied by a learned per-channel vector (`ls1`, `ls2`) before the
    residual sum (CaiT / DINOv2)."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    inspect: bool = False
    act: str = "gelu"
    ln_eps: float = _LN_EPS
    layer_scale: bool = False
    dot_dtype: str | None = None
    attention_impl: str = "matmul"

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True, queries=None):
        """`[B, T, D]` -> `[B, T, D]`, or only the tokens at `queries` (static indices: `[B, Q, D]`)."""

        def scaled(name, y):
            if not self.layer_scale:
                return y
            gamma = self.param(name, nn.initializers.constant(1e-5), (y.shape[-1],))
            return y * gamma.astype(y.dtype)

        y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="LayerNorm_0")(x)
        y = MultiHeadDotProductAttention(
            self.num_heads,
            dtype=self.dtype,
            inspect=self.inspect,
            dot_dtype=self.dot_dtype,
            impl=self.attention_impl,
            name="MultiHeadDotProductAttention_1",
        )(y, mask, queries)
        if queries is not None:
            x = x[:, jnp.array(queries)]
        x = x + nn.Dropout(self.dropout_rate)(scaled("ls1", y), deterministic=deterministic)
        y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="LayerNorm_2")(x)
        y = MlpBlock(
            self.mlp_dim,
            self.dropout_rate,
            dtype=self.dtype,
            act=self.act,
            dot_dtype=self.dot_dtype,
            name="MlpBlock_3",
        )(y, deterministic=deterministic)
        return x + scaled("ls2", y)


class AddPositionEmbs(nn.Module):
    """Learned position embeddings `[1, num_pos_prefix + n_patches, D]`: one for each of the first
    `num_pos_prefix` prefix tokens, then one per patch (row-major). Prefix tokens beyond them (timm's
    `no_embed_class`, Hugging Face DINOv2's registers) get none."""

    num_pos_prefix: int = 1

    @nn.compact
    def __call__(self, prefix, patches):
        k = self.num_pos_prefix
        shape = (1, k + patches.shape[1], patches.shape[2])
        pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), shape)
        if pos.shape != shape:
            raise ValueError(
                f"input has {patches.shape[1]} patches of width {patches.shape[2]} but the position "
                f"embedding is {pos.shape[1:]}: the image size differs from the parameters' image size"
            )
        pos = pos.astype(patches.dtype)
        prefix = jnp.concatenate([prefix[:, :k] + pos[:, :k], prefix[:, k:]], axis=1)
        return prefix, patches + pos[:, k:]


class Encoder(nn.Module):
    """Position embeddings, token assembly, the blocks, and the final LayerNorm.

    Tokens are `[prefix (P); patches]`. `mask` is the attention mask (see MultiHeadDotProductAttention);
    `patch_indices` keeps only those patch tokens; `with_complement` puts a second copy of the prefix
    tokens (with their position embeddings) right after the first: `[prefix; prefix; patches]`.
    `outputs` (static token indices) returns only those tokens: the last block then computes its
    attention queries, MLP and the final LayerNorm for them alone (the same values, without the work
    on tokens nobody reads).
    """

    depth: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    inspect: bool = False
    act: str = "gelu"
    ln_eps: float = _LN_EPS
    layer_scale: bool = False
    pre_norm: bool = False
    final_norm: bool = True
    num_pos_prefix: int = 1
    remat: bool = False
    dot_dtype: str | None = None
    attention_impl: str = "matmul"

    @nn.compact
    def __call__(
        self,
        prefix,
        patches,
        mask=None,
        patch_indices=None,
        *,
        deterministic: bool,
        with_complement=False,
        outputs=None,
    ):
        prefix, patches = AddPositionEmbs(self.num_pos_prefix, name="posembed_input")(prefix, patches)
        if patch_indices is not None:  # the chosen patch tokens, with their own position embeddings
            patches = jnp.take_along_axis(patches, patch_indices[..., None], axis=1)
        x = jnp.concatenate([prefix, prefix, patches] if with_complement else [prefix, patches], axis=1)
        if self.pre_norm:
            x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm_pre")(x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        # Rematerialization: a block's activations are recomputed in the backward pass instead of kept.
        block = (
            nn.remat(Encoder1DBlock, static_argnums=(3, 4))
            if self.remat and not self.inspect
            else Encoder1DBlock
        )
        for i in range(self.depth):
            if self.inspect and i == self.depth - 1:  # tokens entering the last block, for GradCAM
                self.sow("intermediates", "last_block_input", x)
                x = self.perturb("last_block_input", x)
            x = block(
                self.num_heads,
                self.mlp_dim,
                self.dropout_rate,
                dtype=self.dtype,
                inspect=self.inspect,
                act=self.act,
                ln_eps=self.ln_eps,
                layer_scale=self.layer_scale,
                dot_dtype=self.dot_dtype,
                attention_impl=self.attention_impl,
                name=f"encoderblock_{i}",
            )(x, mask, deterministic, outputs if i == self.depth - 1 else None)
        if outputs is not None and self.depth == 0:
            x = x[:, jnp.array(outputs)]
        if not self.final_norm:
            return x
        return nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="encoder_norm")(x)


class ViT(nn.Module):
    """ViT classifier, evaluated on a coalition of visible patches.

    Attributes:
      num_classes: outputs of the head (1 for a binary target with a sigmoid link).
      patch_size: side of a square patch in pixels.
      hidden_size, depth, num_heads, mlp_dim: the transformer's shape (see configs/common.py).
      dropout_rate: dropout after attention/MLP, active only with `train=True`.
      masking: how `patch_mask` removes patches: "attention" or "zero" (module docstring).
      dtype: compute dtype; parameters are always float32.
      inspect: expose attention weights and the tokens entering the last block (collections
        "intermediates" and "perturbations") for `evaluation.baselines`; same parameters and outputs.
      class_token: a learned class token (`cls`) leads the sequence.
      distill_token: a DeiT distillation token (`dist`) follows it; with `distill_head`, the logits are
        the mean of `head` on the class token and `head_dist` on the distillation token (DeiT's inference).
      reg_tokens: learned register tokens (`reg`, DINOv2 "registers") after them.
      pos_prefix: how many of the leading prefix tokens have a position embedding (-1: all of them).
      pool: "token" (the class token) or "avg" (the mean of the visible patch tokens; an empty
        coalition pools to the zero vector).
      fc_norm: the final LayerNorm is applied after pooling (`norm_pooled`, timm's `fc_norm`)
        instead of to every token (`Transformer/encoder_norm`).
      pre_norm: a LayerNorm (`Transformer/norm_pre`) after the embeddings, before the blocks (CLIP).
      layer_scale: per-channel scales on both residual branches of every block (DINOv2).
      act: the MLP activation, a key of `ACTIVATIONS`.
      ln_eps: epsilon of every LayerNorm (1e-6 google/timm, 1e-12 Hugging Face ViT, 1e-5 CLIP).
      remat: recompute each block's activations in the backward pass instead of keeping them
        (`nn.remat`): the same values and gradients with less memory and more compute. Not an
        architecture option: the parameters are the same.
      dot_dtype: None, or "bfloat16": the transformer's dense layers (the q/k/v and output projections,
        the MLP) take operands rounded to bfloat16 and sum in float32 (`mixed_einsum`); the attention
        products and the rest run in `dtype`. Not an architecture option either.
      attention_impl: the attention core, one of `ATTENTION_IMPLS` (`MultiHeadDotProductAttention`):
        the same model and parameters whichever. Not an architecture option.
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
    class_token: bool = True
    distill_token: bool = False
    distill_head: bool = False
    reg_tokens: int = 0
    pos_prefix: int = -1
    pool: str = "token"
    fc_norm: bool = False
    pre_norm: bool = False
    layer_scale: bool = False
    act: str = "gelu"
    ln_eps: float = _LN_EPS
    remat: bool = False
    dot_dtype: str | None = None
    attention_impl: str = "matmul"

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: class, distillation and register tokens, in that order."""
        return int(self.class_token) + int(self.distill_token) + self.reg_tokens

    def setup(self):
        if self.masking not in MASKING_STRATEGIES:
            raise ValueError(f"masking={self.masking!r}: must be one of {', '.join(MASKING_STRATEGIES)}")
        if self.pool not in POOLING:
            raise ValueError(f"pool={self.pool!r}: must be one of {', '.join(POOLING)}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act={self.act!r}: must be one of {', '.join(ACTIVATIONS)}")
        if self.pool == "token" and not self.class_token:
            raise ValueError("pool='token' needs a class token; use pool='avg' for a ViT without one")
        if self.distill_head and not self.distill_token:
            raise ValueError("distill_head needs distill_token")
        if self.distill_token and not self.class_token:
            raise ValueError("distill_token needs class_token (DeiT: class token, then distillation token)")
        pos_prefix = self.num_prefix_tokens if self.pos_prefix < 0 else self.pos_prefix
        if pos_prefix > self.num_prefix_tokens:
            raise ValueError(
                f"pos_prefix={self.pos_prefix} exceeds the {self.num_prefix_tokens} prefix tokens"
            )
        self.embedding = nn.Conv(
            self.hidden_size,
            (self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            dtype=self.dtype,
        )
        width = self.hidden_size
        if self.class_token:
            self.cls = self.param("cls", nn.initializers.zeros, (1, 1, width))
        if self.distill_token:
            self.dist = self.param("dist", nn.initializers.normal(stddev=0.02), (1, 1, width))
        if self.reg_tokens:
            self.reg = self.param("reg", nn.initializers.normal(stddev=0.02), (1, self.reg_tokens, width))
        self.Transformer = Encoder(
            self.depth,
            self.num_heads,
            self.mlp_dim,
            self.dropout_rate,
            dtype=self.dtype,
            inspect=self.inspect,
            act=self.act,
            ln_eps=self.ln_eps,
            layer_scale=self.layer_scale,
            pre_norm=self.pre_norm,
            final_norm=not self.fc_norm,
            num_pos_prefix=pos_prefix,
            remat=self.remat,
            dot_dtype=self.dot_dtype,
            attention_impl=self.attention_impl,
        )
        if self.fc_norm:
            self.norm_pooled = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype)
        self.head = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype)
        if self.distill_head:
            self.head_dist = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype)

    def _prefix(self, b: int, dtype) -> jax.Array:
        """The prefix tokens `[B, P, D]`: class, distillation, registers."""
        parts = [self.cls] if self.class_token else []
        parts += [self.dist] if self.distill_token else []
        parts += [self.reg] if self.reg_tokens else []
        shape = (b, self.num_prefix_tokens, self.hidden_size)
        if not parts:
            return jnp.zeros(shape, dtype)
        return jnp.broadcast_to(jnp.concatenate(parts, axis=1).astype(dtype), shape)

    def encode(
        self,
        images,
        patch_mask=None,
        *,
        train: bool = False,
        patch_indices=None,
        with_complement: bool = False,
        outputs=None,
    ):
        """Token features after the final LayerNorm (before it, with `fc_norm`).

        Args:
          images: `[B, H, W, C]` float, normalized; H and W multiples of `patch_size`.
          patch_mask: `[B, n_patches]` bool or {0, 1} (1 = visible), patches in row-major order;
            None means every patch is visible.
          train: enables dropout (needs a "dropout" rng).
          patch_indices: `[B, k]` int; run only these patch tokens (plus the prefix tokens). Exactly
            equivalent to an attention mask that keeps these k patches; not combinable with `patch_mask`.
          with_complement: evaluate the coalition `patch_mask` and its complement in one sequence of
            n + 2P tokens (attention masking only): the P prefix tokens twice, every patch token once, and
            a block-diagonal attention mask (the first prefix copy and the coalition's patches form one
            block, the second copy and the other patches the other). Under attention masking a held-out
            token is never attended to, so each block computes exactly what the masked model computes
            for its coalition, at about half the cost of two masked passes.
          outputs: static token indices; return only these tokens (see `Encoder`).

        Returns:
          `[B, P + n_patches, D]`, `[B, P + k, D]` with `patch_indices`, or `[B, 2P + n_patches, D]` with
          `with_complement`; P = `num_prefix_tokens`, the class token (if any) first.
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
            mask = self._attention_mask(visible, with_complement)
            if self.masking == "zero":
                images = images * patch_mask_to_pixels(visible, grid, p).astype(images.dtype)
        x = self.embedding(images.astype(self.dtype)).reshape(b, n, self.hidden_size)
        return self.Transformer(
            self._prefix(b, x.dtype),
            x,
            mask,
            patch_indices,
            deterministic=not train,
            with_complement=with_complement,
            outputs=outputs,
        )

    def _attention_mask(self, visible, with_complement: bool):
        """The boolean attention mask of a coalition (None under zero masking). Prefix tokens are
        always visible; without any, every token also attends to itself, so that a held-out token's
        row is never empty (its output is never used)."""
        if self.masking == "zero":
            return None
        b, n = visible.shape
        k = self.num_prefix_tokens
        if with_complement:
            group = jnp.concatenate([jnp.zeros((b, k), bool), jnp.ones((b, k), bool), ~visible], axis=1)
            return group[:, None, :, None] == group[:, None, None, :]  # [B, 1, n + 2k, n + 2k]
        keys = jnp.concatenate([jnp.ones((b, k), bool), visible], axis=1)[:, None, None, :]
        if k == 0:
            keys = keys | jnp.eye(n, dtype=bool)[None, None]
        return keys

    def pooled(self, tokens, patch_mask=None, *, with_complement: bool = False):
        """The pooled feature(s) the head reads: `[B, D]`, or `[B, 2, D]` with `with_complement`.

        For `pool="avg"`, `patch_mask` (the coalition, as given to `encode`) selects the patch tokens
        averaged; without one, or under zero masking, every patch token in `tokens` is averaged.
        """
        k = self.num_prefix_tokens
        if self.pool == "token":
            feats = tokens[:, jnp.array([0, k])] if with_complement else tokens[:, 0]
        elif with_complement:  # a patch_mask under attention masking (checked in `encode`)
            visible = (patch_mask if patch_mask.dtype == jnp.bool_ else patch_mask > 0.5).astype(tokens.dtype)
            weights = jnp.stack([visible, 1 - visible], axis=1)  # [B, 2, n]
            total = jnp.einsum("bgt,btd->bgd", weights, tokens[:, 2 * k :])
            feats = total / jnp.maximum(weights.sum(-1), 1)[..., None]
        elif patch_mask is None or self.masking == "zero":  # no patch token left: the zero vector
            feats = tokens[:, k:].sum(axis=1) / max(tokens.shape[1] - k, 1)
        else:
            visible = (patch_mask if patch_mask.dtype == jnp.bool_ else patch_mask > 0.5).astype(tokens.dtype)
            total = jnp.einsum("bt,btd->bd", visible, tokens[:, k:])
            feats = total / jnp.maximum(visible.sum(-1), 1)[:, None]
        return self.norm_pooled(feats) if self.fc_norm else feats

    def __call__(
        self,
        images,
        patch_mask=None,
        *,
        train: bool = False,
        patch_indices=None,
        with_complement: bool = False,
    ):
        """Logits `[B, num_classes]` (float32) from the pooled feature; arguments as in `encode`. With
        `with_complement`: `[B, 2, num_classes]`, the coalition's logits and its complement's.

        With `pool="token"` (and not `inspect`), only the class (and distillation) tokens' outputs are
        computed in the last block (`Encoder`'s `outputs`): the same logits for less work."""
        kwargs = dict(train=train, patch_indices=patch_indices, with_complement=with_complement)
        if self.pool != "token" or self.inspect:
            tokens = self.encode(images, patch_mask, **kwargs)
            feats = self.pooled(tokens, patch_mask, with_complement=with_complement)
            dist = None
            if self.distill_head:
                k = self.num_prefix_tokens
                dist = tokens[:, jnp.array([1, k + 1])] if with_complement else tokens[:, 1]
        else:
            k = self.num_prefix_tokens
            groups = (0, k) if with_complement else (0,)
            heads = (groups, tuple(g + 1 for g in groups)) if self.distill_head else (groups,)
            tokens = self.encode(images, patch_mask, outputs=sum(heads, ()), **kwargs)
            g = len(groups)
            feats = tokens[:, :g] if with_complement else tokens[:, 0]
            dist = (tokens[:, g:] if with_complement else tokens[:, 1]) if self.distill_head else None
            if self.fc_norm:
                feats = self.norm_pooled(feats)
        logits = self.head(feats)
        if dist is not None:
            if self.fc_norm:
                dist = self.norm_pooled(dist)
            logits = (logits + self.head_dist(dist)) / 2
        return logits.astype(jnp.float32)
