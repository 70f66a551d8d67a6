"""Layer-wise relevance propagation (LRP) through the ViT, as in Chefer, Gur & Wolf (CVPR 2021).

"Transformer Interpretability Beyond Attention Visualization" explains a class by propagating LRP
relevance from the class's output down through every layer and reading off the relevance `R^A` of each
block's attention map; `baselines.transformer_attribution` combines it with the attention gradients.
The rules, per layer (relevance flows from a layer's output R to its inputs):

* Dense layers (head, query/key/value, attention output, MLP): LRP-alpha1-beta0, the paper's Eq. 2,
  `R_j = sum_i (x_j w_ji)^+ / sum_j' (x_j' w_j'i)^+ R_i` (only positive contributions; the bias gets no
  relevance).
* Layers with two tensor inputs u, v (the residual additions, Q K^T and A V): the gradient rule
  `R^u = u * d<f(u, v), R / f(u, v)>/du` (Eqs. 3-4), then rescaled so that u and v split the incoming
  total in proportion to |sum R^u| and |sum R^v| (Eqs. 5-6): relevance is conserved and bounded.
* LayerNorm, GELU and the softmax pass relevance through unchanged, position by position; a tensor used
  twice (a block's input feeds the residual and the LayerNorm branch; query, key and value share theirs)
  receives the sum of its uses' relevances.

Relevance starts as one-hot on the explained class's logit. With these rules it is conserved: the
relevance entering every block sums to 1 per image (tested). The propagation runs on a float32 replica
of `models.ViT` built from its parameters (full images, no patch mask), tested equal to the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vitshap_jax.models.vit import _LN_EPS

_TINY = 1e-9


def _safe_div(a, b):
    """a / b, and 0 where |b| <= 1e-9 (a layer output that carries no relevance)."""
    ok = jnp.abs(b) > _TINY
    return jnp.where(ok, a / jnp.where(ok, b, 1.0), 0.0)


def _per_image_sum(x):
    return x.reshape(x.shape[0], -1).sum(1)


def _per_image_scale(x, s):
    return x * s.reshape(-1, *([1] * (x.ndim - 1)))


def dense_relevance(x, kernel, r):
    """LRP-alpha1-beta0 for `y = x @ kernel (+ bias)`: x `[..., in]`, kernel `[in, out]`, r `[..., out]`.

    `(x_j w_ji)^+` is `x_j^+ w_ji^+ + x_j^- w_ji^-`, so the positive contributions are two matmuls."""
    xp, xn = jnp.maximum(x, 0), jnp.minimum(x, 0)
    wp, wn = jnp.maximum(kernel, 0), jnp.minimum(kernel, 0)
    s = _safe_div(r, xp @ wp + xn @ wn)
    return xp * (s @ wp.T) + xn * (s @ wn.T)


def two_input_relevance(f, u, v, r):
    """Relevance of both inputs of `z = f(u, v)` (Eqs. 3-6 of the paper), u, v, r batched on axis 0."""
    z, vjp = jax.vjp(f, u, v)
    gu, gv = vjp(_safe_div(r, z))
    ru, rv = u * gu, v * gv
    su, sv, total = _per_image_sum(ru), _per_image_sum(rv), _per_image_sum(r)
    both = jnp.abs(su) + jnp.abs(sv)
    ru = _per_image_scale(ru, _safe_div(_safe_div(jnp.abs(su), both) * total, su))
    rv = _per_image_scale(rv, _safe_div(_safe_div(jnp.abs(sv), both) * total, sv))
    return ru, rv


def _add(u, v):
    return u + v


def _layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + _LN_EPS) * p["scale"] + p["bias"]


def _attend(a, v):
    return jnp.einsum("bhqk,bkhd->bqhd", a, v)


def _scores(q, k):
    return jnp.einsum("bqhd,bkhd->bhqk", q, k)


def forward(params, images, *, patch_size: int, depth: int):
    """`models.ViT` on full images, in float32, keeping what the relevance rules need.

    Returns `(logits [B, C], blocks, cls_features [B, D])`, `blocks` a list of per-block dicts of layer
    inputs and outputs (`a` is the attention `[B, heads, T, T]`)."""
    params = jax.tree.map(lambda t: jnp.asarray(t, jnp.float32), params)
    images = jnp.asarray(images, jnp.float32)
    b, h, w, c = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch_size {p}")
    emb = params["embedding"]
    width = emb["kernel"].shape[-1]
    patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
    x = patches @ emb["kernel"].reshape(-1, width) + emb["bias"]
    x = jnp.concatenate([jnp.broadcast_to(params["cls"], (b, 1, width)), x], axis=1)
    x = x + params["Transformer"]["posembed_input"]["pos_embedding"]
    blocks = []
    for i in range(depth):
        bp = params["Transformer"][f"encoderblock_{i}"]
        att = bp["MultiHeadDotProductAttention_1"]
        y = _layer_norm(x, bp["LayerNorm_0"])
        q, k, v = (
            jnp.einsum("btd,dhe->bthe", y, att[n]["kernel"]) + att[n]["bias"]
            for n in ("query", "key", "value")
        )
        a = jax.nn.softmax(_scores(q, k) / jnp.sqrt(q.shape[-1]), axis=-1)
        o = _attend(a, v)
        attn = jnp.einsum("bqhd,hde->bqe", o, att["out"]["kernel"]) + att["out"]["bias"]
        x_mid = x + attn
        y2 = _layer_norm(x_mid, bp["LayerNorm_2"])
        mlp = bp["MlpBlock_3"]
        g = jax.nn.gelu(y2 @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"], approximate=False)
        m = g @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]
        blocks.append(dict(x=x, y=y, q=q, k=k, v=v, a=a, o=o, attn=attn, x_mid=x_mid, y2=y2, g=g, m=m))
        x = x_mid + m
    cls = _layer_norm(x, params["Transformer"]["encoder_norm"])[:, 0]
    return cls @ params["head"]["kernel"] + params["head"]["bias"], blocks, cls


def check_supported(model) -> None:
    """The LRP pass is written for the google-research ViT (one class token, token pooling, exact GELU,
    epsilon 1e-6, no layer scale or extra norms); anything else is a clear error, not a wrong map."""
    from vitshap_jax.models import ARCHITECTURE_OPTIONS

    different = [k for k, v in ARCHITECTURE_OPTIONS.items() if getattr(model, k) != v]
    if different:
        options = ", ".join(f"{k}={getattr(model, k)!r}" for k in different)
        raise ValueError(f"transformer_attribution (LRP) supports the plain ViT only; this one has {options}")


def relevance(model, params, images, classes):
    """LRP relevance of each block's attention map for the class `classes[b]` of each image.

    Returns `(attention_relevance, input_relevance)`: a list with `[B, heads, T, T]` per block (T = 1 +
    n_patches) and the relevance `[B, T, D]` of the tokens entering the first block."""
    params = jax.tree.map(lambda t: jnp.asarray(t, jnp.float32), params)  # forward's cast is then a no-op
    _, blocks, cls = forward(params, images, patch_size=model.patch_size, depth=model.depth)
    r = jax.nn.one_hot(classes, params["head"]["kernel"].shape[-1], dtype=jnp.float32)
    r_cls = dense_relevance(cls, params["head"]["kernel"], r)  # through the final LayerNorm unchanged
    r_x = jnp.zeros_like(blocks[-1]["x"]).at[:, 0].set(r_cls)
    attention = [None] * len(blocks)
    for i in reversed(range(len(blocks))):
        blk = blocks[i]
        bp = params["Transformer"][f"encoderblock_{i}"]
        att, mlp = bp["MultiHeadDotProductAttention_1"], bp["MlpBlock_3"]
        r_mid, r_m = two_input_relevance(_add, blk["x_mid"], blk["m"], r_x)
        r_g = dense_relevance(blk["g"], mlp["Dense_1"]["kernel"], r_m)  # GELU: unchanged
        r_mid = r_mid + dense_relevance(blk["y2"], mlp["Dense_0"]["kernel"], r_g)  # LayerNorm: unchanged
        r_x, r_attn = two_input_relevance(_add, blk["x"], blk["attn"], r_mid)
        o = blk["o"]
        out_kernel = att["out"]["kernel"]  # [heads, head_dim, D]
        r_o = dense_relevance(
            o.reshape(*o.shape[:2], -1), out_kernel.reshape(-1, out_kernel.shape[-1]), r_attn
        ).reshape(o.shape)
        r_a, r_v = two_input_relevance(_attend, blk["a"], blk["v"], r_o)
        attention[i] = r_a
        # The softmax passes relevance unchanged; the 1/sqrt(d) scale cancels in the gradient rule.
        r_q, r_k = two_input_relevance(_scores, blk["q"], blk["k"], r_a)
        for name, r_n in (("query", r_q), ("key", r_k), ("value", r_v)):
            kernel = att[name]["kernel"]
            r_x = r_x + dense_relevance(
                blk["y"], kernel.reshape(kernel.shape[0], -1), r_n.reshape(*r_n.shape[:2], -1)
            )
    return attention, r_x
