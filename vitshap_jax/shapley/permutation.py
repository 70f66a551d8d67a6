"""Permutation sampling of Shapley values, antithetic: each permutation with its reverse.

phi_i is the average over uniformly random orders of the players of i's marginal contribution
`v(players before i, plus i) - v(players before i)`. One order costs the n - 1 coalitions between the
empty and the full one (its prefixes). The reversed order's prefixes are the complements of the forward
prefixes, so the antithetic pair is n - 1 coalition pairs (`game.value_pairs`: one sequence of n + 2
tokens each for an attention-masked surrogate), 2 (n - 1) evaluations in all. Antithetic pairs cancel the
first-order noise (the estimate of a game of order <= 2 is exact from one pair), the estimate is unbiased
and efficient for every permutation, and its standard error is the spread of the per-pair estimates
(exact, as they are independent).

Sampling stops when every image's largest standard error is at most `threshold` times the range of its
estimates, or at `max_evals` evaluations per image (whole antithetic pairs, at least one).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vitshap_jax.shapley.game import as_game, value_pairs
from vitshap_jax.shapley.kernelshap import null_and_total, stop_rule


def evals_per_pair(n: int) -> int:
    """Evaluations one antithetic pair of permutations costs (v(empty), v(all) shared by all)."""
    return 2 * (n - 1)


def antithetic_estimates(key, images, null, full, value_fn, *, perms: int, n: int):
    """Each of `perms` antithetic pairs' estimate of phi, `[B, P, n, C]` (unbiased and efficient each),
    from `null`, `full` = v(empty), v(all) `[B, C]`; 2 (n - 1) evaluations of `value_fn` per pair."""
    b = images.shape[0]
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(key, (b, perms, n)), axis=-1), axis=-1)  # position
    prefixes = ranks[:, :, None, :] < jnp.arange(1, n)[:, None]  # prefixes of size 1..n-1: [B, P, n-1, n]
    forward, complement = value_pairs(value_fn, images, prefixes.reshape(b, perms * (n - 1), n))
    forward, complement = (v.reshape(b, perms, n - 1, -1) for v in (forward, complement))
    ends = (jnp.broadcast_to(x[:, None, None], (b, perms, 1, x.shape[-1])) for x in (null, full, full, null))
    lo, hi, lo_c, hi_c = ends
    chain = jnp.concatenate([lo, forward, hi], axis=2)  # v(prefix of size k), k = 0..n: [B, P, n+1, C]
    chain_c = jnp.concatenate([lo_c, complement, hi_c], axis=2)  # v(complement of the prefix of size k)
    at = ranks[..., None]  # player i is at position ranks[i] forward, n - 1 - ranks[i] in reverse
    forward_gain = jnp.take_along_axis(chain[:, :, 1:] - chain[:, :, :-1], at, axis=2)
    # In reverse, the players before i are those after it forward: the complement of prefix ranks[i] + 1.
    reverse_gain = jnp.take_along_axis(chain_c[:, :, :-1] - chain_c[:, :, 1:], at, axis=2)
    return 0.5 * (forward_gain + reverse_gain)


@functools.partial(jax.jit, static_argnames=("perms", "n"))
def _step(key, images, null, full, value_fn, *, perms: int, n: int):
    """Sums over `perms` antithetic pairs of each pair's estimate, and of its square: `[B, n, C]` each."""
    estimate = antithetic_estimates(key, images, null, full, value_fn, perms=perms, n=n)
    return estimate.sum(1), (estimate**2).sum(1)


def permutation_shapley(
    value_fn,
    images,
    n: int,
    *,
    key,
    threshold: float | None = 0.01,
    perms_per_step: int = 8,
    max_evals: int = 1_000_000,
):
    """Estimates Shapley values `[B, n, C]` of `value_fn` by antithetic permutation sampling.

    Args:
      value_fn: `(images [B, ...], masks [B, M, n]) -> [B, M, C]`.
      key: a jax PRNG key.
      threshold: stop when every image's largest standard error is at most this fraction of the range of
        its estimates; None runs until `max_evals`.
      perms_per_step: antithetic pairs of permutations per jitted step (2 (n - 1) evaluations each).
      max_evals: evaluations per image (counting v(empty) and v(all)); at least one antithetic pair runs.

    Returns:
      (phi `[B, n, C]`, info) with info = {"evals": evaluations per image, "std_error": `[B, n, C]`,
      "converged": bool `[B]`, "permutations": permutations per image (both directions counted)}.
    """
    if n < 2:
        raise ValueError(f"permutation sampling needs at least 2 players, got {n}")
    value_fn = as_game(value_fn)
    null, total = null_and_total(images, value_fn, n=n)
    full = null + total
    pairs_left = max(1, (max_evals - 2) // evals_per_pair(n))
    count, s1, s2 = 0, 0.0, 0.0
    while pairs_left > 0:
        perms = min(perms_per_step, pairs_left)
        key, sub = jax.random.split(key)
        a, a2 = _step(sub, images, null, full, value_fn, perms=perms, n=n)
        s1, s2, count, pairs_left = s1 + a, s2 + a2, count + perms, pairs_left - perms
        phi = s1 / count
        std = jnp.sqrt(jnp.maximum(s2 / count - phi**2, 0.0) / max(count - 1, 1))
        converged = stop_rule(phi, std, threshold) & (count >= 2)
        if threshold is not None and bool(converged.all()):
            break
    if count < 2:
        std = jnp.full(phi.shape, jnp.nan, phi.dtype)
    info = {"evals": 2 + evals_per_pair(n) * count, "std_error": std, "converged": converged}
    return phi, {**info, "permutations": 2 * count}
