"""LRP through the ViT (vitshap_jax/lrp.py): each rule against a hand computation, the replica against
the model, and conservation of relevance through every layer."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_baselines import CLASSES, vit
from vitshap_jax import lrp


def test_dense_rule_matches_the_alpha1_beta0_sum():
    x = jax.random.normal(jax.random.key(0), (2, 5))
    w = jax.random.normal(jax.random.key(1), (5, 4))
    r = jax.random.uniform(jax.random.key(2), (2, 4))
    xn, wn, rn = (np.asarray(t, np.float64) for t in (x, w, r))
    expected = np.zeros((2, 5))
    for b, j, i in itertools.product(range(2), range(5), range(4)):
        positive = np.maximum(xn[b, :, None] * wn, 0)  # (x_j' w_j'i)^+
        expected[b, j] += positive[j, i] / positive[:, i].sum() * rn[b, i]
    got = lrp.dense_relevance(x, w, r)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(got.sum(1), r.sum(1), rtol=1e-5)  # conserved
    assert float(got.min()) >= 0  # non-negative relevance stays non-negative


def test_two_input_rule_splits_by_contribution_and_conserves():
    # All positive: u + v = z, R^u_j = u_j / z_j R_j exactly (the rescaling changes nothing).
    u, v, r = jnp.array([[1.0, 3.0]]), jnp.array([[2.0, 2.0]]), jnp.array([[3.0, 5.0]])
    ru, rv = lrp.two_input_relevance(lambda a, b: a + b, u, v, r)
    np.testing.assert_allclose(ru, [[1.0, 3.0]], rtol=1e-6)
    np.testing.assert_allclose(rv, [[2.0, 2.0]], rtol=1e-6)
    # Mixed signs: raw R^u = [-1, 1] * ... is rescaled so u and v split the total by |sum|.
    u, v, r = jnp.array([[-1.0, 2.0]]), jnp.array([[2.0, 2.0]]), jnp.array([[1.0, 4.0]])
    ru, rv = lrp.two_input_relevance(lambda a, b: a + b, u, v, r)
    raw_u, raw_v = np.array([-1.0, 2.0]), np.array([2.0, 2.0])  # u/(u+v) R and v/(u+v) R
    su, sv = raw_u.sum(), raw_v.sum()
    np.testing.assert_allclose(ru[0], raw_u * (abs(su) / (abs(su) + abs(sv)) * 5.0 / su), rtol=1e-6)
    np.testing.assert_allclose(rv[0], raw_v * (abs(sv) / (abs(su) + abs(sv)) * 5.0 / sv), rtol=1e-6)
    np.testing.assert_allclose(float(ru.sum() + rv.sum()), 5.0, rtol=1e-6)
    # A matmul: both inputs' relevances are exactly conserved, per image.
    a = jax.random.uniform(jax.random.key(0), (2, 3, 4))
    b = jax.random.normal(jax.random.key(1), (2, 4, 5))
    r = jax.random.uniform(jax.random.key(2), (2, 3, 5))
    ra, rb = lrp.two_input_relevance(lambda p, q: p @ q, a, b, r)
    np.testing.assert_allclose(ra.sum((1, 2)) + rb.sum((1, 2)), r.sum((1, 2)), rtol=1e-4)


def test_replica_matches_the_model():
    model, params, images = vit(depth=2)
    logits, blocks, _ = lrp.forward(params, images, patch_size=model.patch_size, depth=model.depth)
    np.testing.assert_allclose(logits, model.apply({"params": params}, images), atol=1e-5)
    with pytest.raises(ValueError, match="not a multiple of patch_size 2"):
        lrp.forward(params, images[:, :7], patch_size=model.patch_size, depth=model.depth)
    _, state = model.clone(inspect=True).apply({"params": params}, images, mutable=["intermediates"])
    for i, blk in enumerate(blocks):
        sown = state["intermediates"]["Transformer"][f"encoderblock_{i}"]["MultiHeadDotProductAttention_1"]
        np.testing.assert_allclose(blk["a"], sown["attention"][0], atol=1e-5)


def test_relevance_is_conserved_and_starts_at_the_class_token():
    model, params, images = vit(depth=3)
    attention, tokens = lrp.relevance(model, params, images, CLASSES)
    assert len(attention) == 3 and attention[0].shape == (3, 2, 17, 17)
    np.testing.assert_allclose(tokens.sum((1, 2)), 1.0, rtol=1e-4)  # one-hot logit relevance, conserved
    # The head reads only the class token, so the last layer's relevance sits on its query row.
    assert float(jnp.abs(attention[-1][:, :, 1:]).max()) == 0.0
    assert float(jnp.abs(attention[-1][:, :, 0]).max()) > 0
    other, _ = lrp.relevance(model, params, images, jnp.array([1, 1, 1]))
    assert not np.allclose(attention[0], other[0])  # class-specific
    # Finite everywhere, also where a layer's output is exactly zero (zero bias, zero input).
    zeros, _ = lrp.relevance(model, params, jnp.zeros_like(images), CLASSES)
    assert all(bool(jnp.isfinite(a).all()) for a in zeros)
