"""Ground-truth estimators against closed-form games and against each other."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import members, order_two_games, perturbed
from vitshap_jax.shapley.exact import exact_shapley
from vitshap_jax.shapley.game import table_game
from vitshap_jax.shapley.kernelshap import border_sizes, kernel_moments, kernelshap
from vitshap_jax.shapley.permutation import evals_per_pair, permutation_shapley


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


def brute_force_sums(table, n):
    """Shapley values in float64 straight from the subset-sum definition (no pairing, no chunks):
    phi_i = sum_S w(S, i) v(S), weights from math.factorial."""
    z = members(n)
    k = z.sum(1).astype(int)
    f = math.factorial
    w_in = np.array([f(s - 1) * f(n - s) / f(n) if s >= 1 else 0.0 for s in range(n + 1)])
    w_out = np.array([f(s) * f(n - s - 1) / f(n) if s <= n - 1 else 0.0 for s in range(n + 1)])
    w = np.where(z > 0, w_in[k][:, None], -w_out[k][:, None])  # [2^n, n]
    return np.einsum("mn,bmc->bnc", w, np.asarray(table, np.float64))


def relative_error(phi, exact):
    return float(np.linalg.norm(np.asarray(phi) - exact) / np.linalg.norm(exact))


@pytest.mark.parametrize("game", ["additive", "pairwise"])
def test_standard_kernelshap_is_exact_on_games_of_order_two(game):
    n = 12
    table = order_two_games(n)[game].astype(np.float32)
    exact = brute_force_sums(table, n)
    scale = np.abs(exact).max()
    x = jnp.zeros((1, 1))
    for budget in (30, 66, 1026):  # from 14 pairs (barely more than n / 2) up
        phi, info = kernelshap(
            table_game(table),
            x,
            n,
            key=jax.random.key(budget),
            threshold=None,
            max_evals=budget,
            pairs_per_step=32,
        )
        assert info["evals"] == budget and info["estimator"] == "standard"
        np.testing.assert_allclose(np.asarray(phi), exact, atol=2e-5 * scale)
    # The unbiased variant is not exact on such games: the property is the standard estimator's.
    phi, _ = kernelshap(
        table_game(table), x, n, key=jax.random.key(0), threshold=None, max_evals=1026, estimator="unbiased"
    )
    assert np.abs(np.asarray(phi) - exact).max() > 100 * 2e-5 * scale


def test_standard_kernelshap_beats_the_unbiased_variant_and_improves_with_budget():
    n, b = 12, 16
    table = np.repeat(order_two_games(n)["mlp"], b, 0).astype(np.float32)  # 16 independent runs
    exact = brute_force_sums(table, n)
    x = jnp.zeros((b, 1))
    errors = {}
    for estimator in ("standard", "unbiased"):
        for budget in (258, 1026, 4098):
            phi, _ = kernelshap(
                table_game(table),
                x,
                n,
                key=jax.random.key(7),
                threshold=None,
                max_evals=budget,
                pairs_per_step=32,
                estimator=estimator,
            )
            errors[estimator, budget] = relative_error(phi, exact)
    for budget in (258, 1026, 4098):
        assert errors["standard", budget] < errors["unbiased", budget]
    assert errors["standard", 258] > errors["standard", 1026] > errors["standard", 4098]
    # Error ~ 1 / sqrt(evaluations): each quadrupling should roughly halve it.
    assert errors["standard", 4098] < 0.7 * errors["standard", 1026]


@pytest.mark.parametrize("estimator", ["standard", "unbiased"])
def test_kernelshap_standard_error_is_calibrated(estimator):
    """Over 64 independent runs, (estimate - exact) / SE has mean square near 1 and 95% intervals cover
    near 95%: an SE that is too small or too large fails."""
    n, b = 10, 64
    table = np.repeat(order_two_games(n, seed=3)["mlp"], b, 0).astype(np.float32)
    exact = brute_force_sums(table, n)
    phi, info = kernelshap(
        table_game(table),
        jnp.zeros((b, 1)),
        n,
        key=jax.random.key(11),
        threshold=None,
        max_evals=2050,
        pairs_per_step=32,
        estimator=estimator,
    )
    z = (np.asarray(phi) - exact) / np.asarray(info["std_error"])
    assert 0.7 < np.mean(z**2) < 1.4
    assert 0.91 < np.mean(np.abs(z) < 1.96) < 0.985


@pytest.mark.parametrize("estimator", ["standard", "unbiased"])
def test_kernelshap_stops_at_its_threshold_and_keeps_efficiency(estimator):
    n = 8
    table = np.random.default_rng(1).standard_normal((3, 2**n, 2)).astype(np.float32)
    game = table_game(table)
    exact = np.asarray(exact_shapley(game, jnp.zeros((3, 1)), n))
    phi, info = kernelshap(
        game, jnp.zeros((3, 1)), n, key=jax.random.key(0), threshold=0.01, estimator=estimator
    )
    phi, std = np.asarray(phi), np.asarray(info["std_error"])
    assert bool(info["converged"].all()) and 2 < info["evals"] < 1_000_000
    spread = exact.max(axis=(1, 2)) - exact.min(axis=(1, 2))
    assert (std.max(axis=(1, 2)) <= 0.0105 * spread).all()  # the rule it stopped by
    assert np.abs(phi - exact).max() < 6 * std.max()
    np.testing.assert_allclose(phi.sum(1), table[:, -1] - table[:, 0], atol=1e-4)


def test_border_sizes_by_hand():
    """n = 16, p(k) ~ 1 / (k (16 - k)), sum over k = 1..15 = H_15 / 8 = 0.41478. Budget 4094: sizes 1 and
    15 hold 0.3214 of the mass, 4094 x 0.3214 = 1316 >= 32 coalitions: enumerated; sizes 2 and 14: 4062 x
    0.1722 / 0.6786 = 1031 >= 240: enumerated; sizes 3 and 13: 3822 x 0.1236 / 0.5064 = 933 < 1120: not.
    Budget 62: 62 x 0.3214 = 20 < 32: nothing."""
    assert border_sizes(16, 4094) == [1, 2]
    assert border_sizes(16, 62) == []
    assert border_sizes(9, 2**9 - 2) == [1, 2, 3, 4]  # everything: the estimate is exact


def test_standard_kernelshap_enumerating_every_size_is_exact():
    n = 9
    table = order_two_games(n, seed=8)["mlp"].astype(np.float32)
    phi, info = kernelshap(
        table_game(table), jnp.zeros((1, 1)), n, key=jax.random.key(0), threshold=None, max_evals=2**n
    )
    assert info["enumerated_sizes"] == [1, 2, 3, 4] and info["evals"] == 2**n
    np.testing.assert_allclose(np.asarray(phi), brute_force_sums(table, n), atol=1e-5)
    assert (np.asarray(info["std_error"]) == 0).all()


def test_standard_kernelshap_below_n_over_2_pairs_is_finite_and_efficient():
    """Too few pairs for an invertible A: the minimizer closest to the equal split, not NaN."""
    n = 16
    table = order_two_games(n)["mlp"].astype(np.float32)
    phi, info = kernelshap(
        table_game(table), jnp.zeros((1, 1)), n, key=jax.random.key(0), threshold=None, max_evals=10
    )
    phi = np.asarray(phi)
    assert info["evals"] == 10 and np.isfinite(phi).all() and np.isnan(np.asarray(info["std_error"])).all()
    np.testing.assert_allclose(phi.sum(1), table[:, -1] - table[:, 0], atol=1e-5)


def test_kernelshap_budget_is_used_exactly_and_error_shrinks_with_budget():
    n = 8
    table = np.random.default_rng(2).standard_normal((2, 2**n, 1)).astype(np.float32)
    game = table_game(table)
    exact = np.asarray(exact_shapley(game, jnp.zeros((2, 1)), n))
    errors = []
    for budget in (40, 1000, 16386):  # not multiples of a step: the last step takes the remainder
        phi, info = kernelshap(
            game,
            jnp.zeros((2, 1)),
            n,
            key=jax.random.key(3),
            threshold=None,
            pairs_per_step=32,
            max_evals=budget,
        )
        assert info["evals"] == budget
        errors.append(np.abs(np.asarray(phi) - exact).mean())
    assert errors[0] > errors[1] > errors[2]
    with pytest.raises(ValueError, match="estimator"):
        kernelshap(game, jnp.zeros((2, 1)), n, key=jax.random.key(0), estimator="fast")


@pytest.mark.parametrize("game", ["additive", "pairwise"])
def test_permutation_sampling_is_exact_on_games_of_order_two(game):
    n = 10
    table = order_two_games(n, seed=5)[game].astype(np.float32)
    exact = brute_force_sums(table, n)
    phi, info = permutation_shapley(
        table_game(table),
        jnp.zeros((1, 1)),
        n,
        key=jax.random.key(0),
        threshold=None,
        max_evals=2 + evals_per_pair(n),
    )  # one antithetic pair
    assert info["evals"] == 2 + 2 * (n - 1) and info["permutations"] == 2
    np.testing.assert_allclose(np.asarray(phi), exact, atol=2e-5 * np.abs(exact).max())


def test_permutation_sampling_is_unbiased_efficient_and_calibrated():
    n, b = 10, 128
    table = np.repeat(order_two_games(n, seed=6)["mlp"], b, 0).astype(np.float32)
    exact = brute_force_sums(table, n)
    phi, info = permutation_shapley(
        table_game(table),
        jnp.zeros((b, 1)),
        n,
        key=jax.random.key(4),
        threshold=None,
        max_evals=2 + 16 * evals_per_pair(n),
    )
    phi, std = np.asarray(phi), np.asarray(info["std_error"])
    assert info["permutations"] == 32
    # Unbiased: the mean of 128 independent estimates is within 4 standard errors of the exact values.
    sem = phi.std(0, ddof=1) / np.sqrt(b)
    assert (np.abs(phi.mean(0) - exact[0]) < 4 * sem + 1e-7).all()
    z = (phi - exact) / std
    assert 0.7 < np.mean(z**2) < 1.5 and 0.9 < np.mean(np.abs(z) < 1.96) < 0.985
    np.testing.assert_allclose(phi.sum(1), table[:, -1] - table[:, 0], atol=1e-5)
    # The threshold rule stops it.
    phi, info = permutation_shapley(
        table_game(table[:2]), jnp.zeros((2, 1)), n, key=jax.random.key(1), threshold=0.02
    )
    spread = exact.max() - exact.min()
    assert (
        bool(info["converged"].all())
        and (np.asarray(info["std_error"]).max(axis=(1, 2)) <= 0.02 * spread).all()
    )


def large_games(n):
    """16-player tables `[1, 2^n, 1]` where float32 sums lose digits: a large offset, max- and
    min-shaped values of large player values, and a symmetric (size-only) game."""
    rng = np.random.default_rng(0)
    z = members(n) > 0
    x = 5e3 + 1e3 * rng.normal(size=n)
    big = np.where(z, x, -np.inf).max(1)
    small = np.where(z, x, np.inf).min(1)
    return {
        "offset": 5e4 + 1e3 * rng.normal(size=2**n),
        "max": np.where(z.any(1), big, 0.0),
        "min": np.where(z.any(1), small, 0.0),
        "symmetric": 1e4 * z.sum(1) ** 2,
    }


@pytest.mark.parametrize("game", ["offset", "max", "min", "symmetric"])
def test_exact_shapley_in_float32_within_1e_5_of_a_float64_brute_force(game):
    n = 16
    table = large_games(n)[game][None, :, None].astype(np.float32)
    truth = brute_force_sums(table, n)  # the same float32 values, summed in float64
    scale = np.abs(table).max()
    for chunk in (4096, 32768):  # the error must not grow with the chunk
        phi = np.asarray(exact_shapley(table_game(table), jnp.zeros((1, 1)), n, chunk=chunk), np.float64)
        assert np.abs(phi - truth).max() <= 1e-5 * scale
        efficiency = phi.sum(1) - (table[:, -1].astype(np.float64) - table[:, 0])
        assert np.abs(efficiency).max() <= 1e-5 * scale
    if game == "symmetric":  # every player has the same value
        np.testing.assert_allclose(phi, np.full_like(phi, phi.mean()), rtol=1e-5)


@pytest.mark.parametrize("game", ["offset", "max", "min", "symmetric"])
def test_exact_shapley_in_float64_within_1e_10(game):
    n = 16
    with jax.enable_x64(True):
        table = large_games(n)[game][None, :, None]
        phi = exact_shapley(table_game(table), jnp.zeros((1, 1)), n)
        assert phi.dtype == jnp.float64
        phi = np.asarray(phi)
    truth = brute_force_sums(table, n)
    scale = np.abs(table).max()
    assert np.abs(phi - truth).max() <= 1e-10 * scale
    assert np.abs(phi.sum(1) - (table[:, -1] - table[:, 0])).max() <= 1e-10 * scale


def test_packed_pairs_give_the_same_estimates_on_a_vit_surrogate():
    from vitshap_jax.models import ViT
    from vitshap_jax.shapley.game import surrogate_game

    model = ViT(num_classes=3, patch_size=4, hidden_size=16, depth=2, num_heads=2, mlp_dim=32)
    images = jax.random.normal(jax.random.key(1), (2, 12, 12, 3))  # 9 players
    params = perturbed(model.init(jax.random.key(0), images)["params"], 0.3, 2)
    packed, plain = (surrogate_game(model, params, "multiclass", packed=p) for p in (True, False))
    np.testing.assert_allclose(exact_shapley(packed, images, 9), exact_shapley(plain, images, 9), atol=1e-5)
    a, _ = kernelshap(
        packed, images, 9, key=jax.random.key(3), threshold=None, max_evals=130, pairs_per_step=32
    )
    b, _ = kernelshap(
        plain, images, 9, key=jax.random.key(3), threshold=None, max_evals=130, pairs_per_step=32
    )
    np.testing.assert_allclose(a, b, atol=1e-5)
