"""Additive efficient normalization: make raw per-player values sum to v(all) - v(empty)."""

import jax.numpy as jnp


def additive_efficient_normalization(phi_raw, total):
    """`phi_raw [B, n, C]`, `total [B, C]` (= v(all) - v(empty)) -> `phi [B, n, C]` with
    `phi.sum(1) == total`: the shortfall is shared equally among the n players."""
    n = phi_raw.shape[1]
    return phi_raw + ((total - jnp.sum(phi_raw, axis=1)) / n)[:, None, :]
