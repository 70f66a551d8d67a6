"""Samplers against their formulas (chi-square), normalization, and losses against direct formulas."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from vitshap_jax import losses, shapley

N = 10


def _chi2_pvalue(observed_sizes, probs):
    counts = np.bincount(observed_sizes, minlength=len(probs))
    keep = probs > 0
    assert counts[~keep].sum() == 0, "sizes drawn outside the support"
    expected = probs[keep] * counts.sum()
    return scipy.stats.chisquare(counts[keep], expected).pvalue


def test_shapley_kernel_sizes_follow_the_kernel():
    masks = shapley.shapley_kernel_coalitions(jax.random.key(0), (4000,), N, num=16, paired=False)
    sizes = np.asarray(masks.sum(-1)).ravel()
    probs = shapley.shapley_kernel_size_probs(N)
    weights = np.array([1 / (k * (N - k)) for k in range(1, N)])
    np.testing.assert_allclose(probs[1:N], weights / weights.sum())
    assert _chi2_pvalue(sizes, probs) > 1e-3
    # The test has power: the same sizes are far from a uniform size distribution.
    uniform = np.r_[0, np.full(N - 1, 1 / (N - 1)), 0]
    assert _chi2_pvalue(sizes, uniform) < 1e-12


def test_uniform_sizes_are_uniform_over_0_to_n():
    masks = shapley.uniform_size_coalitions(jax.random.key(1), (20000,), N)
    sizes = np.asarray(masks.sum(-1))
    assert _chi2_pvalue(sizes, np.full(N + 1, 1 / (N + 1))) > 1e-3
    assert _chi2_pvalue(sizes, shapley.shapley_kernel_size_probs(N) * 0.5 + 0.5 / (N + 1)) < 1e-12


def test_coalitions_of_a_size_are_uniform_among_them():
    masks = np.asarray(shapley.coalitions_of_size(jax.random.key(2), jnp.full((12000,), 2), 4))
    assert (masks.sum(-1) == 2).all()
    codes = masks @ (1 << np.arange(4))
    subsets = [sum(1 << i for i in c) for c in itertools.combinations(range(4), 2)]
    counts = np.array([(codes == s).sum() for s in subsets])
    assert counts.sum() == 12000
    assert scipy.stats.chisquare(counts).pvalue > 1e-3


def test_paired_coalitions_are_complements():
    masks = np.asarray(shapley.shapley_kernel_coalitions(jax.random.key(3), (5,), N, num=8, paired=True))
    assert masks.shape == (5, 8, N)
    np.testing.assert_array_equal(masks[:, 4:], ~masks[:, :4])
    with pytest.raises(ValueError, match="even number"):
        shapley.shapley_kernel_coalitions(jax.random.key(3), (5,), N, num=7, paired=True)


def test_additive_efficient_normalization_gives_efficiency():
    phi_raw = jax.random.normal(jax.random.key(4), (3, N, 5))
    total = jax.random.normal(jax.random.key(5), (3, 5))
    phi = shapley.additive_efficient_normalization(phi_raw, total)
    np.testing.assert_allclose(np.asarray(phi.sum(1)), np.asarray(total), atol=1e-5)
    shift = np.asarray(phi - phi_raw)  # the same shift for every player
    np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :1], shift.shape), atol=1e-6)


def test_losses_against_direct_formulas():
    rng = np.random.default_rng(0)
    t, s = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)
    p, q = np.exp(t) / np.exp(t).sum(1, keepdims=True), np.exp(s) / np.exp(s).sum(1, keepdims=True)
    np.testing.assert_allclose(
        losses.kl_from_logits(t, s, "multiclass"), (p * np.log(p / q)).sum(1), rtol=1e-5
    )
    tb, sb = t[:, :1], s[:, :1]
    pb, qb = 1 / (1 + np.exp(-tb[:, 0])), 1 / (1 + np.exp(-sb[:, 0]))
    bern = pb * np.log(pb / qb) + (1 - pb) * np.log((1 - pb) / (1 - qb))
    np.testing.assert_allclose(losses.kl_from_logits(tb, sb, "binary"), bern, rtol=1e-5)
    labels = np.array([0, 2, 1, 1])
    np.testing.assert_allclose(
        losses.classification_loss(s, labels, "multiclass"), -np.log(q[np.arange(4), labels]), rtol=1e-5
    )
    y = np.array([0, 1, 1, 0])
    np.testing.assert_allclose(
        losses.classification_loss(sb, y, "binary"), -(y * np.log(qb) + (1 - y) * np.log(1 - qb)), rtol=1e-5
    )
    np.testing.assert_allclose(losses.link(sb, "binary"), qb[:, None], rtol=1e-6)
    np.testing.assert_allclose(losses.link(s, "multiclass"), q, rtol=1e-6)


def test_shapley_loss_against_a_loop():
    rng = np.random.default_rng(1)
    b, m, n, c = 2, 6, 5, 3
    null, phi = rng.standard_normal((b, c)), rng.standard_normal((b, n, c))
    masks, values = rng.random((b, m, n)) < 0.5, rng.standard_normal((b, m, c))
    expected = np.zeros(b)
    for i in range(b):
        for j in range(m):
            for k in range(c):
                approx = null[i, k] + sum(phi[i, p, k] for p in range(n) if masks[i, j, p])
                expected[i] += (approx - values[i, j, k]) ** 2
    expected *= n / (m * c)
    np.testing.assert_allclose(losses.shapley_loss(null, phi, masks, values), expected, rtol=1e-5)


def test_exact_shapley_values_minimize_the_loss():
    """On an additive game the Shapley values are the weights, and the loss is zero there and only there."""
    n, w = 6, jnp.array([0.5, -1.0, 2.0, 0.0, 0.3, 1.2])
    masks = shapley.shapley_kernel_coalitions(jax.random.key(6), (1,), n, num=64)
    values = (masks.astype(jnp.float32) @ w)[..., None]
    null = jnp.zeros((1, 1))
    exact = w[None, :, None]
    assert float(losses.shapley_loss(null, exact, masks, values)[0]) < 1e-10
    assert (
        float(losses.shapley_loss(null, exact + 0.1 * jnp.eye(n)[0][None, :, None], masks, values)[0]) > 1e-4
    )
