"""Baselines: each against a model whose right answer is known, or a documented property."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import BASELINE_CLASSES as CLASSES
from tests.helpers import BASELINE_PATCH as P
from tests.helpers import vit
from vitshap_jax.evaluation import baselines, lrp
from vitshap_jax.shapley.exact import exact_shapley
from vitshap_jax.shapley.game import table_game


def test_inspect_path_matches_fused_attention():
    model, params, images = vit()
    mask = jax.random.bernoulli(jax.random.key(3), 0.5, (3, 16))
    fused = model.apply({"params": params}, images, mask)
    logits, inter = model.clone(inspect=True).apply(
        {"params": params}, images, mask, mutable=["intermediates"]
    )
    np.testing.assert_allclose(logits, fused, atol=1e-5)
    a = inter["intermediates"]["Transformer"]["encoderblock_1"]["MultiHeadDotProductAttention_1"][
        "attention"
    ][0]
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
    hidden = ~jnp.concatenate([jnp.ones((3, 1), bool), mask], 1)  # held-out keys get no attention
    assert float(jnp.abs(jnp.where(hidden[:, None, None, :], a, 0)).max()) == 0.0


def test_attention_methods_on_uniform_attention():
    # Zero key projections make every attention logit equal: each layer attends uniformly, A = U.
    model, params, images = vit()
    for i in range(2):
        k = params["Transformer"][f"encoderblock_{i}"]["MultiHeadDotProductAttention_1"]["key"]
        k["kernel"], k["bias"] = jnp.zeros_like(k["kernel"]), jnp.zeros_like(k["bias"])
    n = 16
    np.testing.assert_allclose(baselines.attention_last(model, params, images), 1 / (n + 1), rtol=1e-5)
    # (0.5 U + 0.5 I)^2 = 0.75 U + 0.25 I, since U^2 = U: off-diagonal entries 0.75 / (n + 1).
    np.testing.assert_allclose(baselines.attention_rollout(model, params, images), 0.75 / (n + 1), rtol=1e-5)


def test_intermediate_gradients_match_finite_differences():
    model, params, images = vit()
    inter, grads = baselines._intermediate_grads(model, params, images, CLASSES)
    net = model.clone(inspect=True)
    _, state = net.apply({"params": params}, images, mutable=["perturbations"])
    zeros = state["perturbations"]

    def logit_sum(perturbations):
        logits = net.apply({"params": params, "perturbations": perturbations}, images)
        return float(jnp.take_along_axis(logits, CLASSES[:, None], 1).sum())

    base, eps = logit_sum(zeros), 1e-2
    where = [
        (("Transformer", "encoderblock_0", "MultiHeadDotProductAttention_1", "attention"), (1, 1, 0, 5)),
        (("Transformer", "encoderblock_1", "MultiHeadDotProductAttention_1", "attention"), (2, 0, 0, 7)),
        (("Transformer", "last_block_input"), (0, 3, 4)),
    ]
    for path, index in where:
        bumped = jax.tree.map(lambda x: x, zeros)
        node = bumped
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = node[path[-1]].at[index].add(eps)
        g = grads
        for key in path[1:]:
            g = g[key]
        assert (logit_sum(bumped) - base) / eps == pytest.approx(float(g[index]), rel=0.05, abs=1e-3)


def test_gradcam_and_attention_gradient_formulas():
    model, params, images = vit(depth=1)
    inter, grads = baselines._intermediate_grads(model, params, images, CLASSES)
    tokens, g = inter["last_block_input"][0], grads["last_block_input"]
    expected = np.maximum(
        (np.asarray(g[:, 1:]).mean(1, keepdims=True) * np.asarray(tokens[:, 1:])).sum(-1), 0
    )
    np.testing.assert_allclose(
        baselines.gradcam(model, params, images, CLASSES), expected, rtol=1e-5, atol=1e-6
    )
    a = inter["encoderblock_0"]["MultiHeadDotProductAttention_1"]["attention"][0]
    ga = grads["encoderblock_0"]["MultiHeadDotProductAttention_1"]["attention"]
    relevance, _ = lrp.relevance(model, params, images, CLASSES)
    for method, weight in (
        (baselines.generic_attention, a),
        (baselines.transformer_attribution, relevance[0]),
    ):
        cam = np.maximum(np.asarray(ga * weight), 0).mean(1)  # depth 1: I + cam, class-token row
        got = method(model, params, images, CLASSES)
        np.testing.assert_allclose(got, cam[:, 0, 1:], rtol=1e-5, atol=1e-7)
        assert float(got.min()) >= 0 and float(got.max()) > 0
        other = method(model, params, images, jnp.array([1, 1, 1]))
        assert not np.allclose(got, other)  # class-specific, unlike raw attention


def test_transformer_attribution_rolls_out_over_layers():
    model, params, images = vit(depth=3)
    _, grads = baselines._intermediate_grads(model, params, images, CLASSES)
    relevance, _ = lrp.relevance(model, params, images, CLASSES)
    rollout = np.broadcast_to(np.eye(17), (3, 17, 17))
    for i in range(3):  # Abar_3 Abar_2 Abar_1, Abar_l = I + mean_heads((grad * R^A)^+)
        ga = np.asarray(grads[f"encoderblock_{i}"]["MultiHeadDotProductAttention_1"]["attention"])
        rollout = (np.eye(17) + np.maximum(ga * np.asarray(relevance[i]), 0).mean(1)) @ rollout
    got = baselines.transformer_attribution(model, params, images, CLASSES)
    np.testing.assert_allclose(got, rollout[:, 0, 1:], rtol=1e-4, atol=1e-7)


def linear_logits():
    w = jax.random.normal(jax.random.key(5), (8, 8, 3, 3))
    return w, lambda x: jnp.einsum("bhwc,hwck->bk", x, w)


def test_gradient_methods_on_a_linear_model():
    w, fn = linear_logits()
    images = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
    wc = jnp.moveaxis(w, -1, 0)[CLASSES]  # [B, 8, 8, 3]
    key = jax.random.key(0)
    np.testing.assert_allclose(
        baselines.vanilla_gradient(fn, images, CLASSES, patch_size=P),
        baselines.patch_sum(jnp.abs(wc), P),
        rtol=1e-5,
    )
    ig = baselines.integrated_gradients(fn, images, CLASSES, patch_size=P, steps=4)
    np.testing.assert_allclose(ig, baselines.patch_sum(images * wc, P), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        baselines.smoothgrad(fn, images, CLASSES, key, patch_size=P),
        baselines.patch_sum(jnp.abs(wc), P),
        rtol=1e-4,
    )
    np.testing.assert_allclose(baselines.vargrad(fn, images, CLASSES, key, patch_size=P), 0.0, atol=1e-8)


def test_vargrad_on_a_quadratic_model():
    # logit = |x|^2 / 2: the gradient is x + noise, so its variance is the noise variance everywhere.
    images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    fn = lambda x: jnp.stack([0.5 * (x**2).sum((1, 2, 3))] * 2, -1)  # noqa: E731
    got = baselines.vargrad(
        fn, images, jnp.array([0, 1]), jax.random.key(0), patch_size=P, samples=2000, noise=0.1
    )
    scale = 0.1 * (images.max((1, 2, 3)) - images.min((1, 2, 3)))
    expected = (scale**2 * P * P * 3)[:, None]
    np.testing.assert_allclose(got, jnp.broadcast_to(expected, got.shape), rtol=0.15)


def test_integrated_gradients_completeness_on_a_vit():
    model, params, images = vit()
    fn = lambda x: model.apply({"params": params}, x)  # noqa: E731
    ig = baselines.integrated_gradients(fn, images, CLASSES, patch_size=P, steps=256)
    gap = jnp.take_along_axis(fn(images) - fn(jnp.zeros_like(images)), CLASSES[:, None], 1)[:, 0]
    np.testing.assert_allclose(ig.sum(1), gap, rtol=0.02, atol=1e-3)


def additive_game(n=6):
    codes = np.arange(2**n)
    members = (codes[:, None] >> np.arange(n)) & 1
    w = np.array([[0.5, -1.0, 2.0, 0.0, 0.3, 1.2], [1.0, 0.0, -0.5, 0.25, 0.0, 2.0]])  # two classes
    return w, table_game((members @ w.T)[None].astype(np.float32))


def test_removal_methods_on_an_additive_game():
    w, game = additive_game()
    images, cls = jnp.zeros((1, 1)), jnp.array([1])
    np.testing.assert_allclose(baselines.leave_one_out(game, images, cls, n=6)[0], w[1], atol=1e-6)
    got = baselines.rise(game, images, cls, jax.random.key(0), n=6, num_masks=20000, p=0.5)[0]
    np.testing.assert_allclose(got, 0.5 * w[1], atol=0.05)  # (1 - p) w for an additive game
    ks = baselines.kernelshap_budget(game, images, cls, jax.random.key(0), n=6, evals=30)[0]
    np.testing.assert_allclose(ks, w[1], atol=1e-5)  # the standard estimator is exact on additive games
    assert float(ks.sum()) == pytest.approx(w[1].sum(), abs=1e-5)  # efficient at any budget
    unbiased = baselines.kernelshap_budget(
        game, images, cls, jax.random.key(0), n=6, evals=20002, estimator="unbiased"
    )[0]
    assert np.abs(unbiased - w[1]).max() > 1e-3  # not exact: the estimator option reaches the estimator
    assert float(unbiased.sum()) == pytest.approx(w[1].sum(), abs=1e-5)
    perm = baselines.permutation_budget(game, images, cls, jax.random.key(0), n=6, evals=12)[0]
    np.testing.assert_allclose(perm, w[1], atol=1e-5)  # one antithetic pair: exact on additive games


def test_kernelshap_budget_error_shrinks_with_budget():
    n = 8
    table = np.random.default_rng(0).standard_normal((4, 2**n, 1)).astype(np.float32)
    game, images, cls = table_game(table), jnp.zeros((4, 1)), jnp.zeros(4, jnp.int32)
    truth = np.asarray(exact_shapley(game, images, n))[..., 0]
    errors = [
        float(
            (
                (baselines.kernelshap_budget(game, images, cls, jax.random.key(1), n=n, evals=e) - truth) ** 2
            ).mean()
        )
        for e in (34, 514, 8194)
    ]
    assert errors[0] > errors[1] > errors[2]


def test_random_scores_depend_on_the_key():
    images = jnp.zeros((2, 8, 8, 3))
    a = baselines.random_scores(images, CLASSES[:2], jax.random.key(0), n=16)
    assert a.shape == (2, 16)
    assert not np.allclose(a, baselines.random_scores(images, CLASSES[:2], jax.random.key(1), n=16))
