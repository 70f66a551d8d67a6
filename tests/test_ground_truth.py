"""Ground-truth estimators against closed-form games and against each other."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitshap_jax.shapley.exact import exact_shapley
from vitshap_jax.shapley.kernelshap import kernel_moments, kernelshap


def table_game(table):
    """A game given by a lookup table `[B, 2^n, C]` indexed by the coalition's binary code."""
    table = jnp.asarray(table)

    def value_fn(images, masks):
        codes = (masks.astype(jnp.int32) << jnp.arange(masks.shape[-1])).sum(-1)  # [B, M]
        return jnp.take_along_axis(table, codes[..., None], axis=1)

    return value_fn


def brute_force(table, n):
    """Shapley values from the permutation definition: average marginal contribution."""
    b, _, c = table.shape
    phi = np.zeros((b, n, c))
    for order in itertools.permutations(range(n)):
        code = 0
        for i in order:
            phi[:, i] += table[:, code | (1 << i)] - table[:, code]
            code |= 1 << i
    return phi / math.factorial(n)


def test_exact_matches_the_permutation_definition():
    n = 5
    table = np.random.default_rng(0).standard_normal((2, 2**n, 3)).astype(np.float32)
    phi = exact_shapley(table_game(table), jnp.zeros((2, 1)), n, chunk=8)  # several chunks
    np.testing.assert_allclose(np.asarray(phi), brute_force(table, n), atol=1e-5)


def test_exact_on_closed_form_games():
    n = 6
    codes = np.arange(2**n)
    members = (codes[:, None] >> np.arange(n)) & 1  # [2^n, n]
    w = np.array([0.5, -1.0, 2.0, 0.0, 0.3, 1.2])
    additive = (members @ w)[None, :, None]
    np.testing.assert_allclose(
        np.asarray(exact_shapley(table_game(additive), jnp.zeros((1, 1)), n))[0, :, 0], w, atol=1e-5
    )
    # Players 0 and 1 symmetric, player 5 a dummy: v = (x0 + x1) * x2 + x3 * x4.
    game = ((members[:, 0] + members[:, 1]) * members[:, 2] + members[:, 3] * members[:, 4])[None, :, None]
    phi = np.asarray(exact_shapley(table_game(game.astype(np.float32)), jnp.zeros((1, 1)), n))[0, :, 0]
    assert phi[0] == pytest.approx(phi[1], abs=1e-6) and phi[3] == pytest.approx(phi[4], abs=1e-6)
    assert phi[5] == pytest.approx(0.0, abs=1e-6)
    assert phi.sum() == pytest.approx(game[0, -1, 0] - game[0, 0, 0], abs=1e-5)  # efficiency


def test_kernel_moments_by_enumeration():
    n = 6
    codes = np.arange(2**n)
    z = ((codes[:, None] >> np.arange(n)) & 1).astype(float)
    sizes = z.sum(1).astype(int)
    from vitshap_jax.shapley.sampling import shapley_kernel_size_probs

    p = shapley_kernel_size_probs(n)
    weight = np.array([p[k] / math.comb(n, k) for k in sizes])
    np.testing.assert_allclose(kernel_moments(n), (z * weight[:, None]).T @ z, atol=1e-12)


def test_kernelshap_agrees_with_exact_and_keeps_efficiency():
    n = 8
    table = np.random.default_rng(1).standard_normal((3, 2**n, 2)).astype(np.float32)
    game = table_game(table)
    exact = np.asarray(exact_shapley(game, jnp.zeros((3, 1)), n))
    phi, info = kernelshap(game, jnp.zeros((3, 1)), n, key=jax.random.key(0), threshold=0.01)
    phi = np.asarray(phi)
    assert bool(info["converged"].all()) and info["evals"] > 2
    spread = exact.max() - exact.min()
    assert np.abs(phi - exact).max() < 0.05 * spread
    # The standard error is calibrated: errors are within a few standard errors.
    assert np.mean(np.abs(phi - exact) <= 3 * np.asarray(info["std_error"]) + 1e-6) > 0.95
    np.testing.assert_allclose(phi.sum(1), table[:, -1] - table[:, 0], atol=1e-4)


def test_kernelshap_budget_caps_evaluations_and_error_shrinks_with_budget():
    n = 8
    table = np.random.default_rng(2).standard_normal((2, 2**n, 1)).astype(np.float32)
    game = table_game(table)
    exact = np.asarray(exact_shapley(game, jnp.zeros((2, 1)), n))
    errors = []
    for budget in (66, 1026, 16386):
        phi, info = kernelshap(
            game,
            jnp.zeros((2, 1)),
            n,
            key=jax.random.key(3),
            threshold=None,
            pairs_per_step=32,
            max_evals=budget,
        )
        assert info["evals"] <= budget
        errors.append(np.abs(np.asarray(phi) - exact).mean())
    assert errors[0] > errors[1] > errors[2]


def test_packed_pairs_give_the_same_estimates_on_a_vit_surrogate():
    from vitshap_jax.models import ViT
    from vitshap_jax.shapley.game import surrogate_game

    model = ViT(num_classes=3, patch_size=4, hidden_size=16, depth=2, num_heads=2, mlp_dim=32)
    images = jax.random.normal(jax.random.key(1), (2, 12, 12, 3))  # 9 players
    params = model.init(jax.random.key(0), images)["params"]
    params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(2), x.shape), params)
    packed, plain = (surrogate_game(model, params, "multiclass", packed=p) for p in (True, False))
    np.testing.assert_allclose(exact_shapley(packed, images, 9), exact_shapley(plain, images, 9), atol=1e-5)
    a, _ = kernelshap(
        packed, images, 9, key=jax.random.key(3), threshold=None, max_evals=130, pairs_per_step=32
    )
    b, _ = kernelshap(
        plain, images, 9, key=jax.random.key(3), threshold=None, max_evals=130, pairs_per_step=32
    )
    np.testing.assert_allclose(a, b, atol=1e-5)
