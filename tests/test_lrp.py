"""LRP through the ViT (vitshap_jax/evaluation/lrp.py): each rule against a hand computation, the replica
against the model, and conservation of relevance through every layer."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import BASELINE_CLASSES as CLASSES
from tests.helpers import perturbed, vit
from vitshap_jax.evaluation import lrp


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


def _dense64(x, w, r):
    """The paper's Eq. 2 written out: R_j = sum_i (x_j w_ji)^+ / sum_j' (x_j' w_j'i)^+ R_i, one row."""
    out = np.zeros(len(x))
    for i in range(w.shape[1]):
        pos = np.array([max(x[j] * w[j, i], 0.0) for j in range(len(x))])
        if pos.sum() > 1e-9:
            out += pos / pos.sum() * r[i]
    return out


def _rescale64(ru, rv, total):
    """Eqs. 5-6: u and v split the incoming total in proportion to |sum R^u| and |sum R^v|."""
    su, sv = ru.sum(), rv.sum()
    return ru * abs(su) / (abs(su) + abs(sv)) * total / su, rv * abs(sv) / (abs(su) + abs(sv)) * total / sv


def _ln64(x, p):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6) * p["scale"] + p["bias"]


def test_attention_relevance_against_a_float64_hand_computation():
    """Depth 1, one head, width 4, 2x2 patches of a 4x4 image (5 tokens): every rule written out in
    float64 loops from the paper's equations, independently of lrp.py, down to R^A of the one block."""
    from scipy.special import erf

    from vitshap_jax.models import ViT

    model = ViT(num_classes=3, patch_size=2, hidden_size=4, depth=1, num_heads=1, mlp_dim=8)
    image = jax.random.normal(jax.random.key(3), (1, 4, 4, 3))
    params = perturbed(model.init(jax.random.key(0), image)["params"], 0.5, 4)
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    cls_index = 2
    # Forward in float64.
    x_img = np.asarray(image, np.float64)[0]
    patches = x_img.reshape(2, 2, 2, 2, 3).transpose(0, 2, 1, 3, 4).reshape(4, 12)
    tokens = patches @ p["embedding"]["kernel"].reshape(12, 4) + p["embedding"]["bias"]
    x = np.concatenate([p["cls"][0], tokens]) + p["Transformer"]["posembed_input"]["pos_embedding"][0]
    bp = p["Transformer"]["encoderblock_0"]
    att, mlp = bp["MultiHeadDotProductAttention_1"], bp["MlpBlock_3"]
    y = _ln64(x, bp["LayerNorm_0"])
    q, k, v = (y @ att[n]["kernel"][:, 0] + att[n]["bias"][0] for n in ("query", "key", "value"))  # [5, 4]
    s = q @ k.T / 2.0  # sqrt(head_dim = 4)
    a = np.exp(s - s.max(1, keepdims=True))
    a /= a.sum(1, keepdims=True)
    o = a @ v
    attn = o @ att["out"]["kernel"][0] + att["out"]["bias"]
    x_mid = x + attn
    h = _ln64(x_mid, bp["LayerNorm_2"]) @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"]
    g = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    m = g @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]
    cls = _ln64(x_mid + m, p["Transformer"]["encoder_norm"])[0]
    # Relevance: one-hot on the logit, the head's Dense rule, the final LayerNorm unchanged.
    r_out = np.zeros((5, 4))
    r_out[0] = _dense64(cls, p["head"]["kernel"], np.eye(3)[cls_index])
    # x_out = x_mid + m: the gradient rule of a sum is R * u / (u + v), then the rescaling.
    r_mid, r_m = _rescale64(r_out * x_mid / (x_mid + m), r_out * m / (x_mid + m), r_out.sum())
    r_g = np.stack([_dense64(g[t], mlp["Dense_1"]["kernel"], r_m[t]) for t in range(5)])
    y2 = _ln64(x_mid, bp["LayerNorm_2"])
    r_mid = r_mid + np.stack([_dense64(y2[t], mlp["Dense_0"]["kernel"], r_g[t]) for t in range(5)])
    _, r_attn = _rescale64(r_mid * x / x_mid, r_mid * attn / x_mid, r_mid.sum())
    r_o = np.stack([_dense64(o[t], att["out"]["kernel"][0], r_attn[t]) for t in range(5)])
    # o = A V: R^A_qk = A_qk sum_d V_kd R^o_qd / o_qd, R^V_kd = V_kd sum_q A_qk R^o_qd / o_qd, rescaled.
    ratio = r_o / o
    r_a, _ = _rescale64(a * (ratio @ v.T), v * (a.T @ ratio), r_o.sum())
    attention, _ = lrp.relevance(model, params, image, jnp.array([cls_index]))
    np.testing.assert_allclose(np.asarray(attention[0][0, 0]), r_a, rtol=2e-3, atol=1e-5 * np.abs(r_a).max())
    assert np.abs(r_a).max() > 1e-3
