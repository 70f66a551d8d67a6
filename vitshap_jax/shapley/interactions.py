"""Pairwise interactions of patches: k-SII of order 2 and the faithful Shapley interaction index (FSII).

Both describe a game by one value per player and one per pair, summing (with v(empty)) to v(all):

* **k-SII** (order 2; Bordt & von Luxburg 2023, what shapiq's ViT example draws): the pairs get the
  Shapley interaction index `SII_ij = sum_{S without i, j} (n-s-2)! s! / (n-1)! * [v(S+ij) - v(S+i) -
  v(S+j) + v(S)]`, the players their Shapley value minus half their pairs: `phi_i = SV_i - 1/2 sum_j
  SII_ij`.
* **FSII** (Tsai, Yeh & Ravikumar 2023): the best approximation of the game by a sum of player and pair
  terms in the Shapley kernel's weighted least squares, exact at the empty and the full coalition.

Every quantity is a weighted sum over coalitions T of `v'(T) x(T)`, with v' = v - v(empty) and
`x(T) = [1, a_i, a_i a_j (i < j)]` (a = membership), with weights that depend on |T| only (FSII adds
`sum w x x^T`). So one jitted pass over coalitions serves both, each coalition evaluated with its
complement (`game.value_pairs`: one n + 2 token pass for an attention-masked surrogate's own game; a
game restricted to some players evaluates the two separately):

* **exact**: all 2^n coalitions (up to about 20 players), in chunks, each chunk's sums added in float64
  on the host;
* **sampled** (above, or with a budget): coalitions drawn from the Shapley kernel, each with its
  complement (`sampling.shapley_kernel_coalitions`), the full coalition added exactly. FSII is then the
  regression on the sampled coalitions (as KernelSHAP is for Shapley values): exact on every game of
  order <= 2 once the sampled moment matrix has full rank. k-SII is the unbiased Monte Carlo estimate of
  its sums (importance weights, as SHAP-IQ, Fumagalli et al. 2023); its error falls as 1/sqrt(budget).

`players` restricts the game to some patches per image (e.g. the top-k of an explanation), the other
patches staying visible: the values then split v(all) - v(all but those players).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from vitshap_jax.config import FSII_MAX_PLAYERS, INTERACTION_INDICES
from vitshap_jax.shapley.exact import all_coalitions, shapley_weights
from vitshap_jax.shapley.game import as_game, value_pairs
from vitshap_jax.shapley.kernelshap import null_and_total
from vitshap_jax.shapley.sampling import shapley_kernel_coalitions, shapley_kernel_size_probs

INDICES = INTERACTION_INDICES
MAX_EXACT_PLAYERS = 22
MAX_FSII_PLAYERS = FSII_MAX_PLAYERS  # FSII solves a system of n + n(n-1)/2 + 1 unknowns per image


def _restricted(game, players, patches, images, masks):
    hit = players[:, None, :, None] == patches  # [B, 1, k, n]
    absent = (hit & ~masks[..., None]).any(-2)  # [B, M, n]: a chosen player left out
    return game(images, ~absent)


def restrict(value_fn, players, n: int):
    """The game over `players [B, k]` (patch indices per image) of `value_fn` over n patches, the other
    patches always present: a coalition `[B, M, k]` of the chosen players -> the game's value. (A pytree:
    the game and the players are arguments of jitted code, not constants.)"""
    return jax.tree_util.Partial(
        _restricted, as_game(value_fn), jnp.asarray(players, jnp.int32), jnp.arange(n)
    )


def _pairs(n: int):
    return np.triu_indices(n, 1)


def _size_weights(n: int) -> np.ndarray:
    """Weights by coalition size `[6, n + 1]` (float64): rows SV_in + SV_out, SV_out, and the SII weights
    for both / one / none of a pair in the coalition (as sums: alpha + 2 beta + gamma, beta + gamma,
    gamma), and the Shapley kernel (FSII)."""
    w_in, w_out = shapley_weights(n)
    w = np.zeros(n + 1)  # (n-s-2)! s! / (n-1)! for a coalition S of size s without i and j
    for s in range(max(n - 1, 0)):
        w[s] = math.factorial(n - s - 2) * math.factorial(s) / math.factorial(n - 1)
    alpha, beta, gamma = np.zeros(n + 1), np.zeros(n + 1), w.copy()
    alpha[2:] = w[: n - 1]  # T = S + {i, j}
    beta[1:] = w[:n]  # T = S + {i}
    kernel = np.zeros(n + 1)
    for s in range(1, n):
        kernel[s] = (n - 1) / (math.comb(n, s) * s * (n - s))
    return np.stack([w_in + w_out, w_out, alpha + 2 * beta + gamma, beta + gamma, gamma, kernel])


def _features(masks):
    """`x(T) = [1, a_i, a_i a_j (i < j)]`: `[B, M, 1 + n + n(n-1)/2]` float32."""
    n = masks.shape[-1]
    a = masks.astype(jnp.float32)
    i, j = _pairs(n)
    return jnp.concatenate([jnp.ones((*a.shape[:-1], 1)), a, a[..., i] * a[..., j]], axis=-1)


@functools.partial(jax.jit, static_argnames="fsii")
def _chunk(images, half, null, value_fn, table, *, fsii: bool = False):
    """This chunk's `sum_T w_k(|T|) v'(T) x(T)` `[B, K, p, C]` and, for FSII, `sum_T w(|T|) x x^T`, over
    the coalitions `half [B, M, n]` and their complements (evaluated as pairs: `game.value_pairs`, one
    n + 2 token pass each for an attention-masked surrogate)."""
    inside, outside = value_pairs(value_fn, images, half)
    masks = jnp.concatenate([half, ~half], axis=1)
    values = jnp.concatenate([inside, outside], axis=1) - null[:, None]  # [B, 2M, C]
    x = _features(masks)
    w = table[:, masks.sum(-1)]  # [K, B, M]
    xv = jnp.einsum("kbm,bmp,bmc->bkpc", w, x, values)
    xx = jnp.einsum("bm,bmp,bmq->bpq", w[-1], x, x) if fsii else jnp.zeros((1, 1, 1))
    return xv, xx


def interactions(
    value_fn,
    images,
    n: int,
    *,
    index: str = "k-SII",
    players=None,
    budget: int | None = None,
    key=None,
    chunk: int = 2048,
) -> dict:
    """Order-2 interactions of `value_fn` (a game over n patches) for each image and class.

    `index`: "k-SII" or "FSII". `players [B, k]`: restrict to these patches of each image (`restrict`).
    `budget`: coalitions to evaluate; exact (all 2^k) when None or when 2^k fits in it, else sampled
    (`budget` rounded down to even: pairs from the Shapley kernel; `key` required). `chunk`: coalition
    pairs per jitted call and image (memory: 2 x chunk x B model passes at once). Returns numpy arrays:
    "values" `[B, k, C]` (order 1), "pairs" `[B, k, k, C]` (symmetric, zero diagonal), "baseline"
    v(empty) and "total" v(all) - v(empty) `[B, C]` of the (restricted) game, "players" (or None),
    "exact", "evals" per image (coalitions evaluated, v(empty) and v(all) included).
    Efficiency: `values.sum(1) + pairs.sum((1, 2)) / 2 == total`.
    """
    if index not in INDICES:
        raise ValueError(f"index={index!r}: must be one of {', '.join(INDICES)}")
    game = as_game(value_fn)
    if players is not None:
        players = np.asarray(players, np.int32)
        game, n = restrict(game, players, n), players.shape[1]
    fsii = index == "FSII"
    if fsii and n > MAX_FSII_PLAYERS:
        raise ValueError(f"FSII of {n} players: restrict to at most {MAX_FSII_PLAYERS} (players=top-k)")
    exact = budget is None or (n <= MAX_EXACT_PLAYERS and 2**n <= budget)
    if exact and n > MAX_EXACT_PLAYERS:
        raise ValueError(f"{n} players means {2**n:,} coalitions per image: give a budget (sampling)")
    if not exact and key is None:
        raise ValueError("sampled interactions need a key")
    images = jnp.asarray(images)
    b = images.shape[0]
    null, total = null_and_total(images, game, n=n)
    total = np.asarray(total, np.float64)
    table = _size_weights(n)
    xv = xx = None
    if exact:
        evals, count = 2**n + 2, 2 ** (n - 1)  # the coalitions without the last player, and complements
        for start in range(0, count, chunk):
            masks = jnp.asarray(all_coalitions(n, start, min(chunk, count - start)))
            part = _chunk(
                images,
                jnp.broadcast_to(masks, (b, *masks.shape)),
                null,
                game,
                jnp.asarray(table, jnp.float32),
                fsii=fsii,
            )
            xv, xx = _add((xv, xx), part)
    else:
        # Importance weights: a coalition of size s is drawn with probability q_s / C(n, s).
        q = shapley_kernel_size_probs(n)
        ratio = np.array([math.comb(n, s) / q[s] if 0 < s < n else 0.0 for s in range(n + 1)])
        sampled = jnp.asarray(table * ratio, jnp.float32)
        budget = max(2, budget - budget % 2)
        pairs_per_chunk = max(1, min(chunk, budget // 2))
        drawn = 0
        while drawn < budget:
            size = 2 * min(pairs_per_chunk, (budget - drawn) // 2)
            masks = shapley_kernel_coalitions(jax.random.fold_in(key, drawn), (b,), n, size, paired=True)
            xv, xx = _add((xv, xx), _chunk(images, masks[:, : size // 2], null, game, sampled, fsii=fsii))
            drawn += size
        xv, xx = xv / drawn, xx / drawn
        # The full coalition (never sampled) with its exact weight; the empty one has v' = 0.
        ones = np.asarray(_features(jnp.ones((1, 1, n), bool)))[0, 0]
        xv = xv + np.einsum("k,p,bc->bkpc", table[:, n], ones, total)
        evals = drawn + 2
    out = _fsii(xv, xx, total, n) if fsii else _ksii(xv, n)
    return out | {
        "baseline": np.asarray(null, np.float64),
        "total": total,
        "players": players,
        "exact": exact,
        "evals": evals,
        "index": index,
    }


def _add(acc, part):
    xv, xx = (np.asarray(p, np.float64) for p in part)
    return (xv, xx) if acc[0] is None else (acc[0] + xv, acc[1] + xx)


def _square(pair_values, n: int):
    """`[B, n(n-1)/2, C]` (i < j order) -> symmetric `[B, n, n, C]`, zero diagonal."""
    i, j = _pairs(n)
    out = np.zeros((pair_values.shape[0], n, n, pair_values.shape[-1]))
    out[:, i, j] = pair_values
    out[:, j, i] = pair_values
    return out


def _ksii(xv, n: int) -> dict:
    sv = xv[:, 0, 1 : n + 1] - xv[:, 1, :1]
    single = xv[:, 3, 1 : n + 1]
    i, j = _pairs(n)
    sii = xv[:, 2, n + 1 :] - single[:, i] - single[:, j] + xv[:, 4, :1]
    pairs = _square(sii, n)
    return {"values": sv - 0.5 * pairs.sum(2), "pairs": pairs}


def _fsii(xv, xx, total, n: int) -> dict:
    """Solves `min phi^T G phi - 2 b^T phi` subject to `sum phi = total` (per image and class)."""
    g, rhs = xx[:, 1:, 1:], xv[:, 5, 1:]  # drop the constant feature: v(empty) is fixed
    p = g.shape[-1]
    phi = np.zeros((g.shape[0], p, rhs.shape[-1]))
    for k in range(g.shape[0]):  # one KKT matrix per image, every class at once
        kkt = np.zeros((p + 1, p + 1))
        kkt[:p, :p], kkt[:p, p], kkt[p, :p] = g[k], 1.0, 1.0
        phi[k] = np.linalg.lstsq(kkt, np.concatenate([rhs[k], total[k][None]]), rcond=None)[0][:p]
    return {"values": phi[:, :n], "pairs": _square(phi[:, n:], n)}
