"""Games: `value_fn(images [B, ...], masks [B, M, n]) -> values [B, M, C]`.

`surrogate_game` turns a surrogate ViT into the game of ViT-Shapley, v_x(S) = link(g(x, S)); the M
coalitions of each image are one vectorized (`vmap`) batch. Any function with the same signature (a
user's own model, a closed-form test game) works with the estimators in this package.

A game is passed to jitted code as a `jax.tree_util.Partial` (`as_game`): the surrogate's parameters are
its leaves, so they are arguments of the compiled code rather than constants baked into it, and the
estimators compile once per model and shapes.

The estimators mostly need a coalition together with its complement (paired sampling, the exact sum,
insertion with deletion): `value_pairs(game, images, masks)` returns both. For a surrogate with
attention masking it runs each pair as one sequence of n + 2 tokens (`ViT(..., with_complement=True)`),
about half the work of two masked passes; for any other game it evaluates both coalitions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vitshap_jax import losses


def surrogate_values(model, params, images, masks, target: str):
    """v(S) of the surrogate `model` for `masks [B, M, n]` -> `[B, M, C]`."""

    def one(m):
        return losses.link(model.apply({"params": params}, images, m), target)

    return jax.vmap(one, in_axes=1, out_axes=1)(masks)


def surrogate_value_pairs(model, params, images, masks, target: str, *, packed: bool = True):
    """(v(S), v(complement of S)) of the surrogate for `masks [B, P, n]`: `[B, P, C]` each.

    `packed` (attention masking only) runs each pair as one sequence of n + 2 tokens; otherwise the 2P
    coalitions are evaluated as in `surrogate_values`."""
    if not (packed and model.masking == "attention"):
        return _pairs_one_by_one(lambda x, m: surrogate_values(model, params, x, m, target), images, masks)

    def one(m):
        logits = model.apply({"params": params}, images, m, with_complement=True)  # [B, 2, C]
        return losses.link(logits[:, 0], target), losses.link(logits[:, 1], target)

    return jax.vmap(one, in_axes=1, out_axes=1)(masks)


@dataclasses.dataclass(frozen=True)
class _SurrogateGame:
    model: Any  # a flax module: hashable, compared by its fields
    target: str
    packed: bool = True

    def __call__(self, params, images, masks):
        return surrogate_values(self.model, params, images, masks, self.target)

    def pairs(self, params, images, masks):
        return surrogate_value_pairs(self.model, params, images, masks, self.target, packed=self.packed)


def surrogate_game(model, params, target: str, *, packed: bool = True) -> jax.tree_util.Partial:
    """The surrogate's game as a `value_fn(images, masks)`, with `params` bound (as pytree leaves).
    `packed=False` turns off the n + 2 token evaluation of pairs (for comparisons)."""
    return jax.tree_util.Partial(_SurrogateGame(model, target, packed), params)


def grand_and_null(surrogate, surrogate_params, images, target: str, *, packed: bool = True):
    """v(all), v(empty) of the surrogate: `[B, C]` each (one n + 2 token pass when `packed`)."""
    b, n = images.shape[0], (images.shape[1] // surrogate.patch_size) ** 2
    full = jnp.ones((b, 1, n), bool)
    grand, null = surrogate_value_pairs(surrogate, surrogate_params, images, full, target, packed=packed)
    return grand[:, 0], null[:, 0]


def coalition_values(surrogate, surrogate_params, images, masks, target: str, *, paired: bool, packed: bool):
    """v(S) of the surrogate for `masks [B, M, n]`; with `paired` (coalition M/2 + j the complement of
    j) each pair is evaluated together (`packed`: one n + 2 token sequence)."""
    if not paired:
        return surrogate_values(surrogate, surrogate_params, images, masks, target)
    half = masks.shape[1] // 2
    pairs = surrogate_value_pairs(surrogate, surrogate_params, images, masks[:, :half], target, packed=packed)
    return jnp.concatenate(pairs, axis=1)


def select_class(values, classes):
    """The explained class of each image: `values [B, ..., C]`, `classes [B]` -> `[B, ...]` (numpy in,
    numpy out; otherwise jax)."""
    xp = np if isinstance(values, np.ndarray) and isinstance(classes, np.ndarray) else jnp
    index = xp.asarray(classes).reshape(-1, *(1,) * (values.ndim - 1))
    return xp.take_along_axis(values, index, axis=-1)[..., 0]


def value_pairs(value_fn, images, masks):
    """(v(S), v(complement of S)) for `masks [B, P, n]`: `[B, P, C]` each, for any game."""
    if isinstance(value_fn, jax.tree_util.Partial) and isinstance(value_fn.func, _SurrogateGame):
        return value_fn.func.pairs(*value_fn.args, images, masks)
    return _pairs_one_by_one(value_fn, images, masks)


def _pairs_one_by_one(value_fn, images, masks):
    """(v(S), v(complement)) by evaluating the 2P coalitions of `masks [B, P, n]` and their complements."""
    values = value_fn(images, jnp.concatenate([masks, ~masks], axis=1))
    return values[:, : masks.shape[1]], values[:, masks.shape[1] :]


def _table_values(table, images, masks):
    codes = (masks.astype(jnp.int32) << jnp.arange(masks.shape[-1])).sum(-1)  # [B, M]
    return jnp.take_along_axis(table, codes[..., None], axis=1)


def table_game(table) -> jax.tree_util.Partial:
    """A game given by the value of every coalition: `table [B, 2^n, C]`, row = the coalition's binary
    code (player i is bit i). For tests and benchmarks against exact values and other libraries; the
    images passed to it are ignored (only their batch size must match)."""
    table = jnp.asarray(table)
    if table.ndim != 3 or table.shape[1] & (table.shape[1] - 1):
        raise ValueError(f"a game table is [batch, 2^n, classes], got shape {table.shape}")
    return jax.tree_util.Partial(_table_values, table)


def as_game(value_fn) -> jax.tree_util.Partial:
    """`value_fn` as a pytree that jitted functions take as an argument (a plain function is compiled
    into the code and compared by identity, so pass the same object to reuse the compilation)."""
    return value_fn if isinstance(value_fn, jax.tree_util.Partial) else jax.tree_util.Partial(value_fn)
