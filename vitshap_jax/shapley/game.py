"""Games: `value_fn(images [B, ...], masks [B, M, n]) -> values [B, M, C]`.

`surrogate_game` turns a surrogate ViT into the game of ViT-Shapley, v_x(S) = link(g(x, S)); the M
coalitions of each image are one vectorized (`vmap`) batch. Any function with the same signature (a
user's own model, a closed-form test game) works with the estimators in this package.
"""

from __future__ import annotations

import jax

from vitshap_jax import losses


def surrogate_values(model, params, images, masks, target: str):
    """v(S) of the surrogate `model` for `masks [B, M, n]` -> `[B, M, C]`."""

    def one(m):
        return losses.link(model.apply({"params": params}, images, m), target)

    return jax.vmap(one, in_axes=1, out_axes=1)(masks)


def surrogate_game(model, params, target: str):
    """The surrogate's game as a `value_fn(images, masks)`, with `params` bound."""

    def value_fn(images, masks):
        return surrogate_values(model, params, images, masks, target)

    return value_fn
