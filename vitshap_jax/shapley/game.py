"""Games: `value_fn(images [B, ...], masks [B, M, n]) -> values [B, M, C]`.

`surrogate_game` turns a surrogate ViT into the game of ViT-Shapley, v_x(S) = link(g(x, S)); the M
coalitions of each image are one vectorized (`vmap`) batch. Any function with the same signature (a
user's own model, a closed-form test game) works with the estimators in this package.

A game is passed to jitted code as a `jax.tree_util.Partial` (`as_game`): the surrogate's parameters are
its leaves, so they are arguments of the compiled code rather than constants baked into it, and the
estimators compile once per model and shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from vitshap_jax import losses


def surrogate_values(model, params, images, masks, target: str):
    """v(S) of the surrogate `model` for `masks [B, M, n]` -> `[B, M, C]`."""

    def one(m):
        return losses.link(model.apply({"params": params}, images, m), target)

    return jax.vmap(one, in_axes=1, out_axes=1)(masks)


@dataclasses.dataclass(frozen=True)
class _SurrogateGame:
    model: Any  # a flax module: hashable, compared by its fields
    target: str

    def __call__(self, params, images, masks):
        return surrogate_values(self.model, params, images, masks, self.target)


def surrogate_game(model, params, target: str) -> jax.tree_util.Partial:
    """The surrogate's game as a `value_fn(images, masks)`, with `params` bound (as pytree leaves)."""
    return jax.tree_util.Partial(_SurrogateGame(model, target), params)


def as_game(value_fn) -> jax.tree_util.Partial:
    """`value_fn` as a pytree that jitted functions take as an argument (a plain function is compiled
    into the code and compared by identity, so pass the same object to reuse the compilation)."""
    return value_fn if isinstance(value_fn, jax.tree_util.Partial) else jax.tree_util.Partial(value_fn)
