"""Exact Shapley values by enumerating all 2^n coalitions (for games up to about 20 players).

phi_i = sum over S of v(S) * (w_in(|S|) if i in S else -w_out(|S|)), with
w_in(k) = (k-1)! (n-k)! / n! and w_out(k) = k! (n-k-1)! / n!. The coalitions are evaluated in chunks
(jitted, on the accelerator) in pairs with their complements, and the sum is accumulated, so memory
stays at one chunk.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from vitshap_jax.shapley.game import as_game, value_pairs


def shapley_weights(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(w_in[k], w_out[k]) for k = 0..n (zero where undefined)."""
    w_in, w_out = np.zeros(n + 1), np.zeros(n + 1)
    for k in range(n + 1):
        if k >= 1:
            w_in[k] = math.factorial(k - 1) * math.factorial(n - k) / math.factorial(n)
        if k <= n - 1:
            w_out[k] = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
    return w_in, w_out


def all_coalitions(n: int, start: int, count: int) -> np.ndarray:
    """Coalitions number start..start+count-1 (binary codes) as bool `[count, n]`."""
    codes = np.arange(start, start + count, dtype=np.int64)
    return ((codes[:, None] >> np.arange(n)) & 1).astype(bool)


def _signed_weights(masks, n: int, dtype):
    w_in, w_out = (jnp.asarray(w, jnp.float32) for w in shapley_weights(n))
    sizes = masks.sum(-1)
    return jnp.where(masks, w_in[sizes][:, None], -w_out[sizes][:, None]).astype(dtype)  # [M, n]


@jax.jit
def _contribution(images, masks, value_fn):
    """The signed, weighted values of the coalitions `masks [M, n]` and of their complements, summed:
    `[B, n, C]`."""
    n = masks.shape[-1]
    both = value_pairs(value_fn, images, jnp.broadcast_to(masks, (images.shape[0], *masks.shape)))
    total = 0.0
    for m, values in zip((masks, ~masks), both, strict=True):  # values [B, M, C]
        total = total + jnp.einsum("mn,bmc->bnc", _signed_weights(m, n, values.dtype), values)
    return total


def exact_shapley(value_fn, images, n: int, *, chunk: int = 4096):
    """Exact Shapley values `[B, n, C]` of `value_fn` for each image (2^n evaluations per image).

    The coalitions without the last player are enumerated, each evaluated with its complement
    (`game.value_pairs`), `chunk` pairs per jitted call."""
    if n > 24:
        raise ValueError(f"{n} players means {2**n:,} coalitions per image: use kernelshap instead")
    total, phi, game = 2 ** (n - 1), None, as_game(value_fn)
    for start in range(0, total, chunk):
        masks = jnp.asarray(all_coalitions(n, start, min(chunk, total - start)))
        part = _contribution(images, masks, game)
        phi = part if phi is None else phi + part
    return phi
