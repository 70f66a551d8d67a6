"""Baseline explanations on the patch grid, all in JAX.

Every method explains one class per image and returns patch scores `[B, n_patches]` (patches in
row-major order, the players of ViT-Shapley). Three families:

* gradients of a differentiable `logit_fn(images [B, H, W, C]) -> [B, classes]` (the classifier),
  summed over each patch's pixels and channels: `vanilla_gradient` (|d logit / d x|, Simonyan et al.
  2014), `integrated_gradients` (Sundararajan et al. 2017, signed, from an all-zero image: the dataset
  mean after normalization), `smoothgrad` (|mean gradient| under Gaussian input noise, Smilkov et al.
  2017), `vargrad` (variance of the gradient under the same noise, Adebayo et al. 2018);
* internals of a ViT built with `inspect=True` (`models/vit.py` exposes its attention weights and last
  block's tokens): `attention_last` (class token's attention in the last layer, mean over heads),
  `attention_rollout` (Abnar & Zuidema 2020: product over layers of 0.5 A + 0.5 I), `gradcam`
  (Selvaraju et al. 2017 on the patch tokens entering the last block: the last block's outputs of
  patch tokens never reach the class token), `transformer_attribution` (Chefer et al., CVPR 2021:
  LRP relevance of each attention map, `evaluation.lrp`, weighted by its gradient and rolled out
  over the layers) and `generic_attention` (Chefer et al., ICCV 2021: the same with the attention maps
  in place of their relevance);
* queries of a game `value_fn(images, masks [B, M, n]) -> [B, M, C]` (the surrogate):
  `leave_one_out`, `rise` (Petsiuk et al. 2018, Bernoulli masks drawn on the patch grid itself),
  `kernelshap_budget` (the standard paired KernelSHAP stopped at a fixed number of evaluations),
  `permutation_budget` (antithetic permutation sampling at a fixed budget), and `random_scores`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vitshap_jax.evaluation import lrp
from vitshap_jax.shapley.game import select_class
from vitshap_jax.shapley.kernelshap import kernelshap
from vitshap_jax.shapley.permutation import permutation_shapley


def patch_sum(pixels, patch_size: int):
    """`[B, H, W, C]` -> `[B, n_patches]`: sum over each patch's pixels and channels (row-major)."""
    b, h, w, c = pixels.shape
    p = patch_size
    x = pixels.reshape(b, h // p, p, w // p, p, c)
    return x.sum(axis=(2, 4, 5)).reshape(b, -1)


def _class_logit_grad(logit_fn, images, classes):
    """d logit[class] / d image, per image: `[B, H, W, C]` (images are independent in the batch)."""

    def total(x):
        return select_class(logit_fn(x), classes).sum()

    return jax.grad(total)(images)


def _repeat(x, k):
    return jnp.repeat(x, k, axis=0)  # [B, ...] -> [B * k, ...], each image's copies adjacent


def vanilla_gradient(logit_fn, images, classes, *, patch_size: int):
    return patch_sum(jnp.abs(_class_logit_grad(logit_fn, images, classes)), patch_size)


def integrated_gradients(logit_fn, images, classes, *, patch_size: int, steps: int = 32):
    """Signed; the patch scores sum to logit(x) - logit(0) up to the `steps`-point midpoint rule."""
    b = images.shape[0]
    alphas = (jnp.arange(steps, dtype=images.dtype) + 0.5) / steps
    path = alphas[None, :, None, None, None] * images[:, None]  # [B, steps, H, W, C]
    grads = _class_logit_grad(logit_fn, path.reshape(b * steps, *images.shape[1:]), _repeat(classes, steps))
    avg = grads.reshape(b, steps, *images.shape[1:]).mean(1)
    return patch_sum(images * avg, patch_size)


def _noisy_grads(logit_fn, images, classes, key, samples: int, noise: float):
    b = images.shape[0]
    scale = noise * (images.max(axis=(1, 2, 3)) - images.min(axis=(1, 2, 3)))  # per image
    eps = jax.random.normal(key, (b, samples, *images.shape[1:]), images.dtype)
    noisy = images[:, None] + scale[:, None, None, None, None] * eps
    grads = _class_logit_grad(
        logit_fn, noisy.reshape(b * samples, *images.shape[1:]), _repeat(classes, samples)
    )
    return grads.reshape(b, samples, *images.shape[1:])


def smoothgrad(logit_fn, images, classes, key, *, patch_size: int, samples: int = 32, noise: float = 0.15):
    """|mean gradient| over `samples` inputs with noise of std `noise` x (max - min) of the image."""
    grads = _noisy_grads(logit_fn, images, classes, key, samples, noise)
    return patch_sum(jnp.abs(grads.mean(1)), patch_size)


def vargrad(logit_fn, images, classes, key, *, patch_size: int, samples: int = 32, noise: float = 0.15):
    """Variance of the gradient over the same noisy inputs as `smoothgrad`."""
    grads = _noisy_grads(logit_fn, images, classes, key, samples, noise)
    return patch_sum(grads.var(1), patch_size)


def _class_token_model(model, method: str) -> int:
    """The first patch token's index of a ViT whose prediction reads the class token (token 0), which
    the attention-based methods follow back; a clear error for any other ViT."""
    if not model.class_token or model.pool != "token" or model.distill_head:
        raise ValueError(
            f"{method} follows the class token's attention, but this ViT predicts from "
            f"{'the mean patch token' if model.pool == 'avg' else 'two heads'}: use a gradient or game method"
        )
    return model.num_prefix_tokens


def _inspect(model, params, images):
    """Logits and intermediates of a ViT run with `inspect=True`."""
    logits, state = model.clone(inspect=True).apply({"params": params}, images, mutable=["intermediates"])
    return logits, state["intermediates"]["Transformer"]


def _per_layer(tree, depth: int) -> list:
    """The "attention" entry of every layer's attention module in an intermediates/gradient tree."""
    return [tree[f"encoderblock_{i}"]["MultiHeadDotProductAttention_1"]["attention"] for i in range(depth)]


def attention_maps(model, params, images) -> list:
    """Attention weights of every layer, `[B, heads, 1 + n, 1 + n]` each (index 0 = class token)."""
    _, inter = _inspect(model, params, images)
    return [a[0] for a in _per_layer(inter, model.depth)]


def attention_last(model, params, images, classes=None):
    """The class token's attention to each patch in the last layer, mean over heads (class-agnostic)."""
    first = _class_token_model(model, "attention_last")
    return attention_maps(model, params, images)[-1].mean(1)[:, 0, first:]


def attention_rollout(model, params, images, classes=None):
    """Row 0 of prod_l (0.5 A_l + 0.5 I), A_l the head-averaged attention of layer l (class-agnostic)."""
    first = _class_token_model(model, "attention_rollout")
    maps = attention_maps(model, params, images)
    t = maps[0].shape[-1]
    rollout = jnp.eye(t)
    for a in maps:
        rollout = (0.5 * a.mean(1) + 0.5 * jnp.eye(t)) @ rollout
    return rollout[:, 0, first:]


def _intermediate_grads(model, params, images, classes):
    """(intermediates, d logit[class] / d intermediates) of an `inspect=True` run."""
    net = model.clone(inspect=True)
    _, state = net.apply({"params": params}, images, mutable=["intermediates", "perturbations"])

    def total(perturbations):
        logits = net.apply({"params": params, "perturbations": perturbations}, images)
        return select_class(logits, classes).sum()

    grads = jax.grad(total)(state["perturbations"])
    return state["intermediates"]["Transformer"], grads["Transformer"]


def gradcam(model, params, images, classes):
    """ReLU(sum_d alpha_d T_id), T the patch tokens entering the last block, alpha = mean_i dlogit/dT_id."""
    inter, grads = _intermediate_grads(model, params, images, classes)
    first = model.num_prefix_tokens
    tokens, g = inter["last_block_input"][0][:, first:], grads["last_block_input"][:, first:]
    alpha = g.mean(1, keepdims=True)  # [B, 1, D]
    return jax.nn.relu((alpha * tokens).sum(-1))


def _gradient_weighted_rollout(attention_grads, weights, first: int):
    """Row 0 (class token) of prod_l (I + mean_heads((dlogit/dA_l * weights_l)^+)), patches only
    (columns from `first` on)."""
    r = None
    for ga, w in zip(attention_grads, weights, strict=True):
        cam = jax.nn.relu(ga * w).mean(1)  # [B, T, T]
        r = jnp.broadcast_to(jnp.eye(cam.shape[-1]), cam.shape) if r is None else r
        r = r + cam @ r
    return r[:, 0, first:]


def transformer_attribution(model, params, images, classes):
    """Chefer, Gur & Wolf (CVPR 2021), the paper's "LRP": attention relevance propagated through layers.

    R^A_l, the LRP relevance of layer l's attention map for the class (`evaluation.lrp`: LRP rules through
    every layer from the class logit down), is weighted by the attention gradient; with
    Abar_l = I + mean_heads((dlogit/dA_l * R^A_l)^+) the scores are the class token's row of
    Abar_L ... Abar_1 over the patches."""
    lrp.check_supported(model)
    _, grads = _intermediate_grads(model, params, images, classes)
    attention_relevance, _ = lrp.relevance(model, params, images, classes)
    return _gradient_weighted_rollout(_per_layer(grads, model.depth), attention_relevance, 1)


def generic_attention(model, params, images, classes):
    """Chefer, Gur & Wolf (ICCV 2021): as `transformer_attribution` with each attention map in place of
    its LRP relevance, R <- R + mean_heads((dlogit/dA * A)^+) R (no LRP pass; any attention model)."""
    first = _class_token_model(model, "generic_attention")
    inter, grads = _intermediate_grads(model, params, images, classes)
    maps = [a[0] for a in _per_layer(inter, model.depth)]
    return _gradient_weighted_rollout(_per_layer(grads, model.depth), maps, first)


def leave_one_out(value_fn, images, classes, *, n: int):
    """v(all)[class] - v(all but i)[class] for every patch i (n + 1 evaluations)."""
    b = images.shape[0]
    masks = jnp.concatenate([jnp.ones((1, n), bool), ~jnp.eye(n, dtype=bool)])  # [n + 1, n]
    values = value_fn(images, jnp.broadcast_to(masks, (b, n + 1, n)))
    v = select_class(values, classes)  # [B, n + 1]
    return v[:, :1] - v[:, 1:]


def rise(value_fn, images, classes, key, *, n: int, num_masks: int = 2000, p: float = 0.5, chunk: int = 500):
    """E[v(S)[class] | i in S] - E[v(S)[class]] with S ~ Bernoulli(p) per patch (RISE's saliency,
    centered so that a patch that does not matter scores 0)."""
    b = images.shape[0]
    total_mv, total_v, total_m = 0.0, 0.0, 0.0
    for start in range(0, num_masks, chunk):
        key, sub = jax.random.split(key)
        m = min(chunk, num_masks - start)
        masks = jax.random.bernoulli(sub, p, (b, m, n))
        v = select_class(value_fn(images, masks), classes)[..., None]  # [B, m, 1]
        total_mv = total_mv + (masks * v).sum(1)
        total_v, total_m = total_v + v.sum(1), total_m + masks.sum(1)
    return total_mv / jnp.maximum(total_m, 1) - total_v / num_masks


def kernelshap_budget(
    value_fn,
    images,
    classes,
    key,
    *,
    n: int,
    evals: int,
    pairs_per_step: int = 64,
    estimator: str = "standard",
):
    """KernelSHAP (paired, efficient; `estimator` "standard" or "unbiased") stopped after exactly `evals`
    evaluations per image."""
    phi, _ = kernelshap(
        value_fn,
        images,
        n,
        key=key,
        threshold=None,
        pairs_per_step=pairs_per_step,
        max_evals=evals,
        estimator=estimator,
    )
    return select_class(phi, classes)


def permutation_budget(value_fn, images, classes, key, *, n: int, evals: int, perms_per_step: int = 8):
    """Antithetic permutation sampling with as many pairs of permutations as `evals` evaluations per
    image pay for (2 (n - 1) each; the caller checks that one fits)."""
    phi, _ = permutation_shapley(
        value_fn, images, n, key=key, threshold=None, perms_per_step=perms_per_step, max_evals=evals
    )
    return select_class(phi, classes)


def random_scores(images, classes, key, *, n: int):
    return jax.random.normal(key, (images.shape[0], n))
