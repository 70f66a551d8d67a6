"""Losses, the link function and predictions, per example, for multi-class (softmax) and binary
(sigmoid) targets.

Binary targets have one logit; the explained "class" is the positive one (C = 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def link(logits, target: str):
    """Model output -> probabilities: softmax over classes, or sigmoid of the single logit."""
    return jax.nn.sigmoid(logits) if target == "binary" else jax.nn.softmax(logits, axis=-1)


def predictions(logits, target: str):
    """The predicted class `[B]`: logit > 0 for a binary target, else the arg max."""
    return (logits[:, 0] > 0).astype(jnp.int32) if target == "binary" else jnp.argmax(logits, -1)


def scores(logits, target: str):
    """Probability of the positive class (binary) or of the predicted class `[B]`."""
    return jax.nn.sigmoid(logits[:, 0]) if target == "binary" else jnp.max(jax.nn.softmax(logits, -1), -1)


def classification_loss(logits, labels, target: str):
    """`logits [B, C]`, integer `labels [B]` -> `[B]`: cross-entropy, or BCE with one logit."""
    if target == "binary":
        return optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(logits.dtype))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def kl_from_logits(teacher_logits, student_logits, target: str):
    """KL(teacher || student) per example `[B]` (Bernoulli KL of the sigmoids for binary targets)."""
    if target == "binary":
        t, s = teacher_logits[:, 0], student_logits[:, 0]
        p = jax.nn.sigmoid(t)
        return p * (jax.nn.log_sigmoid(t) - jax.nn.log_sigmoid(s)) + (1 - p) * (
            jax.nn.log_sigmoid(-t) - jax.nn.log_sigmoid(-s)
        )
    log_p = jax.nn.log_softmax(teacher_logits, axis=-1)
    log_q = jax.nn.log_softmax(student_logits, axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def shapley_loss(null, phi, masks, values):
    """The amortized Shapley weighted-least-squares loss per example `[B]`.

    `null [B, C]` = v(empty), `phi [B, n, C]`, `masks [B, M, n]` drawn from the Shapley kernel,
    `values [B, M, C]` = v(S). Returns `n * mean over M and C of (v(empty) + 1_S . phi - v(S))^2`.
    """
    n = phi.shape[1]
    approx = null[:, None, :] + jnp.einsum("bmn,bnc->bmc", masks.astype(phi.dtype), phi)
    return n * jnp.mean((approx - values) ** 2, axis=(1, 2))


def regression_loss(phi, target):
    """Stochastic amortization's loss per example `[B]`: `mean over n and C of (phi - target)^2`, with
    `phi [B, n, C]` the explainer's values and `target [B, n, C]` an unbiased estimate of the Shapley
    values (`shapley.amortized`); no gradient flows into the target."""
    return jnp.mean((phi - jax.lax.stop_gradient(target)) ** 2, axis=(1, 2))
