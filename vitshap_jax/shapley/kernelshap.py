"""KernelSHAP with paired sampling, run until its standard error is small (Covert & Lee, 2021).

Shapley values solve `min_phi E_z (v(z) - v(0) - z . phi)^2` subject to `1 . phi = v(1) - v(0)`, with
z drawn from the Shapley kernel. The solution is `phi = A^-1 (b - 1 (1^T A^-1 b - D) / (1^T A^-1 1))`
with `A = E[z z^T]`, `b = E[z (v(z) - v(0))]` and `D = v(1) - v(0)`. A is known in closed form for the
Shapley kernel, so only b is estimated, from pairs (z, 1 - z). phi is linear in the estimate of b, so
its standard error follows from the per-pair contributions; sampling stops when
`max std error <= threshold * (max phi - min phi)` for every image (or at `max_evals`). Efficiency
holds exactly at every step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vitshap_jax.shapley.game import as_game, value_pairs
from vitshap_jax.shapley.sampling import shapley_kernel_coalitions, shapley_kernel_size_probs


def kernel_moments(n: int) -> np.ndarray:
    """`A = E[z z^T]` under the Shapley kernel: `[n, n]`."""
    p = shapley_kernel_size_probs(n)
    k = np.arange(n + 1)
    diag = np.sum(p * k / n)
    off = np.sum(p * k * (k - 1) / (n * (n - 1)))
    return np.full((n, n), off) + np.eye(n) * (diag - off)


@functools.lru_cache(maxsize=16)
def _projection(n: int):
    """(P, r): phi = P b + r D, the constrained solution's linear map."""
    a_inv = np.linalg.inv(kernel_moments(n))
    ones = np.ones(n)
    a1 = a_inv @ ones
    denom = ones @ a1
    return jnp.asarray(a_inv - np.outer(a1, a1) / denom, jnp.float32), jnp.asarray(a1 / denom, jnp.float32)


@functools.partial(jax.jit, static_argnames=("pairs", "n"))
def _step(key, images, null, proj, value_fn, *, pairs: int, n: int):
    """Sums over `pairs` coalition pairs of each pair's contribution to phi (minus r D), and of its
    square: `[B, n, C]` each."""
    masks = shapley_kernel_coalitions(key, (images.shape[0],), n, 2 * pairs, paired=True)  # [B, 2P, n]
    values = (
        jnp.concatenate(value_pairs(value_fn, images, masks[:, :pairs]), axis=1) - null[:, None]
    )  # [B, 2P, C]
    z = masks.astype(values.dtype)
    contrib = z[..., None] * values[:, :, None, :]  # z (v(z) - v(0)): [B, 2P, n, C]
    pair = 0.5 * (contrib[:, :pairs] + contrib[:, pairs:])  # paired average
    u = jnp.einsum("ij,bpjc->bpic", proj, pair)
    return u.sum(1), (u**2).sum(1)


@functools.partial(jax.jit, static_argnames=("n",))
def _ends(images, value_fn, *, n: int):
    """v(empty) and v(all) - v(empty): `[B, C]` each."""
    full, empty = value_pairs(value_fn, images, jnp.ones((images.shape[0], 1, n), bool))
    return empty[:, 0], full[:, 0] - empty[:, 0]


def kernelshap(
    value_fn,
    images,
    n: int,
    *,
    key,
    threshold: float | None = 0.01,
    pairs_per_step: int = 256,
    max_evals: int = 1_000_000,
):
    """Estimates Shapley values `[B, n, C]` of `value_fn` for each image.

    Args:
      value_fn: `(images [B, ...], masks [B, M, n]) -> [B, M, C]`.
      key: a jax PRNG key.
      threshold: stop when every image's largest standard error is at most this fraction of the range of
        its estimates; None runs until `max_evals`.
      pairs_per_step: coalition pairs evaluated per jitted step (2 evaluations each).
      max_evals: cap on evaluations per image (counting v(empty) and v(all)).

    Returns:
      (phi `[B, n, C]`, info) with info = {"evals": evaluations per image, "std_error": `[B, n, C]`,
      "converged": bool `[B]`}.
    """
    proj, r = _projection(n)
    value_fn = as_game(value_fn)
    null, total = _ends(images, value_fn, n=n)  # [B, C] each

    count, s1, s2, evals = 0, 0.0, 0.0, 2
    while True:
        key, sub = jax.random.split(key)
        a, a2 = _step(sub, images, null, proj, value_fn, pairs=pairs_per_step, n=n)
        s1, s2, count = s1 + a, s2 + a2, count + pairs_per_step
        evals += 2 * pairs_per_step
        mean = s1 / count
        phi = mean + r[None, :, None] * total[:, None, :]
        std = jnp.sqrt(jnp.maximum(s2 / count - mean**2, 0.0) / max(count - 1, 1))
        spread = phi.max(axis=(1, 2)) - phi.min(axis=(1, 2))
        converged = std.max(axis=(1, 2)) <= (threshold or 0.0) * spread
        if (threshold is not None and bool(converged.all())) or evals + 2 * pairs_per_step > max_evals:
            return phi, {"evals": evals, "std_error": std, "converged": converged}
