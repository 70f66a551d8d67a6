"""Explanation metrics against direct computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from vitshap_jax.evaluation.metrics import estimate_errors, importance_order, insertion_deletion


def test_estimate_errors_against_scipy_and_by_hand():
    rng = np.random.default_rng(0)
    truth = rng.standard_normal((3, 10, 2))
    phi = truth + 0.3 * rng.standard_normal(truth.shape)
    e = estimate_errors(phi, truth, k=3)
    for i in range(3):
        for c in range(2):
            assert abs(e["pearson"][i, c] - scipy.stats.pearsonr(phi[i, :, c], truth[i, :, c])[0]) < 1e-10
            assert abs(e["spearman"][i, c] - scipy.stats.spearmanr(phi[i, :, c], truth[i, :, c])[0]) < 1e-10
    np.testing.assert_allclose(e["mse"], ((phi - truth) ** 2).mean(1))
    np.testing.assert_allclose(e["l2"], np.linalg.norm(phi - truth, axis=1))
    same = estimate_errors(truth, truth, k=3)
    assert (
        np.allclose(same["pearson"], 1)
        and np.allclose(same["top3_overlap"], 1)
        and np.allclose(same["top3_sign"], 1)
    )
    flipped = estimate_errors(-truth, truth, k=3)
    assert np.allclose(flipped["pearson"], -1) and np.allclose(flipped["top3_sign"], 0)


def test_top_k_overlap_and_sign_on_hand_computed_cases():
    truth = np.array([5.0, 4.0, 3.0, -6.0, 0.5, 0.1])[None, :, None]  # top-3 by value: players 0, 1, 2
    phi = np.array([5.0, -1.0, 3.0, -2.0, 4.0, 0.2])[None, :, None]  # top-3: players 0, 4, 2
    e = estimate_errors(phi, truth, k=3)
    assert e["top3_overlap"][0, 0] == pytest.approx(2 / 3)  # {0, 2} shared
    # The 3 largest |true| values: players 3 (-6), 0 (5), 1 (4); signs right for 3 and 0, wrong for 1.
    assert e["top3_sign"][0, 0] == pytest.approx(2 / 3)
    e = estimate_errors(phi, truth, k=1)
    assert e["top1_overlap"][0, 0] == 1.0 and e["top1_sign"][0, 0] == 1.0  # player 0 / player 3
    # phi reversed = [0.2, 4, -2, 3, -1, 5]: top-2 players 5 and 1, against 0 and 1: overlap 1/2; the 2
    # largest |true| are players 3 (-6, estimate +3: wrong) and 0 (+5, estimate +0.2: right): 1/2.
    e = estimate_errors(phi[:, ::-1], truth, k=2)
    assert e["top2_overlap"][0, 0] == 0.5 and e["top2_sign"][0, 0] == 0.5


def test_importance_order_is_descending_with_random_ties():
    phi = jnp.array([[0.1, 0.5, 0.5, -1.0]])
    orders = {tuple(np.asarray(importance_order(phi, jax.random.key(s)))[0]) for s in range(20)}
    assert orders == {(1, 2, 0, 3), (2, 1, 0, 3)}


def test_insertion_and_deletion_on_an_additive_game():
    w = jnp.array([[0.4, -0.2, 0.1, 0.3]])  # one image, one class: v(S) = sum of w over S

    def value_fn(images, masks):
        return (masks.astype(jnp.float32) * w[:, None, :]).sum(-1, keepdims=True)

    out = insertion_deletion(value_fn, jnp.zeros((1, 1)), w[..., None], jnp.array([0]), key=jax.random.key(0))
    sorted_w = np.array([0.4, 0.3, 0.1, -0.2])
    np.testing.assert_allclose(out["insertion"][0], np.r_[0, np.cumsum(sorted_w)], atol=1e-6)
    np.testing.assert_allclose(out["deletion"][0], sorted_w.sum() - np.r_[0, np.cumsum(sorted_w)], atol=1e-6)
    assert out["insertion_auc"][0] == np.mean(out["insertion"][0])
    # The true values are the best order for insertion and deletion; the reverse order is the worst.
    worst = insertion_deletion(
        value_fn, jnp.zeros((1, 1)), -w[..., None], jnp.array([0]), key=jax.random.key(0)
    )
    assert (
        out["insertion_auc"][0] > worst["insertion_auc"][0]
        and out["deletion_auc"][0] < worst["deletion_auc"][0]
    )
