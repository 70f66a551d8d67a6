"""Regression targets for stochastic amortization (Covert et al., NeurIPS 2024).

Instead of the weighted-least-squares objective (`losses.shapley_loss`), the explainer can regress on a
cheap, noisy, *unbiased* estimate t of each image's Shapley values, drawn afresh in every train step from
the same budget of surrogate evaluations (`losses.regression_loss`). As `E[t] = phi*`,
`E ||phi - t||^2 = ||phi - phi*||^2 + E ||t - phi*||^2`: the expected loss is minimized at the true values
whatever the noise, which only slows learning down. Both targets are efficient draw by draw
(`sum_i t_i = v(all) - v(empty)`), so no projection is needed to compare them with the explainer's
efficiency-normalized output.

* `kernelshap_target`: the unbiased KernelSHAP estimator (`kernelshap.unbiased_estimate`; Covert & Lee
  2021) from the step's Shapley-kernel coalitions, `t = P mean_m z_m (v(z_m) - v(0)) + r D`, with `A`
  in closed form; it uses exactly the coalitions and values the WLS loss would use.
* `permutation_target`: antithetic permutation sampling (`permutation.antithetic_estimates`), the mean of
  the marginal contributions along `perms` random orders and their reverses; one antithetic pair costs
  2 (n - 1) evaluations, so the budget must pay for at least one.
"""

from __future__ import annotations

import jax.numpy as jnp

from vitshap_jax.shapley.kernelshap import unbiased_estimate
from vitshap_jax.shapley.permutation import antithetic_estimates, evals_per_pair


def kernelshap_target(masks, values, null, total):
    """Unbiased KernelSHAP target `[B, n, C]` from `masks [B, M, n]` drawn from the Shapley kernel
    (paired or not), `values [B, M, C]` = v(S), `null [B, C]` = v(empty), `total [B, C]` =
    v(all) - v(empty)."""
    return unbiased_estimate(masks, values, null, total)


def permutations_for(budget: int, n: int) -> int:
    """Antithetic pairs of permutations that `budget` evaluations per image pay for (0 if none)."""
    return budget // evals_per_pair(n)


def permutation_target(key, images, null, full, value_fn, *, budget: int, n: int):
    """Antithetic permutation target `[B, n, C]`: as many antithetic pairs as `budget` evaluations per
    image pay for (`permutations_for`), `null`, `full` = v(empty), v(all) `[B, C]`."""
    perms = permutations_for(budget, n)
    if perms < 1:
        raise ValueError(
            f"a budget of {budget} evaluations per image does not pay for one antithetic pair of "
            f"permutations of {n} players ({evals_per_pair(n)} evaluations)"
        )
    estimates = antithetic_estimates(key, images, null, full, value_fn, perms=perms, n=n)
    return jnp.mean(estimates, axis=1)
