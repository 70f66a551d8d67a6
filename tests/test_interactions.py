"""Pairwise interactions (k-SII, FSII) and shapiq interop, checked against the real shapiq 1.4.1: the
JSON round trip, shapiq's exact computer on our surrogate game through the adapter, and our games run
from shapiq's side."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import shapiq

from vitshap_jax.models import ViT
from vitshap_jax.shapiq_interop import complement_pairs, from_shapiq, shapiq_game, write_interaction_values
from vitshap_jax.shapley.exact import all_coalitions, exact_shapley
from vitshap_jax.shapley.game import surrogate_game, table_game
from vitshap_jax.shapley.interactions import interactions, restrict


def _vit_game(masking="attention", classes=3):
    """A tiny random ViT on 6x6 images with 2x2 patches: a surrogate game of 9 players."""
    model = ViT(
        num_classes=classes, patch_size=2, hidden_size=16, depth=2, num_heads=2, mlp_dim=32, masking=masking
    )
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    params = model.init(jax.random.key(1), x[:1])["params"]
    return surrogate_game(model, params, "multiclass"), x


def _order_two_table(n, seed=0, offset=2.0):
    """A game of order 2: v(S) = offset + sum_i a_i + sum_{i<j} b_ij (all values of one image, 1 class)."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), np.triu(rng.normal(size=(n, n)), 1)
    m = all_coalitions(n, 0, 2**n).astype(np.float64)
    values = offset + m @ a + np.einsum("mi,ij,mj->m", m, b, m)
    return values[None, :, None].astype(np.float32), a, b + b.T


def _tanh_table(n, seed=0):
    rng = np.random.default_rng(seed)
    m = all_coalitions(n, 0, 2**n).astype(np.float64)
    hidden = np.tanh(m @ rng.normal(size=(n, 8)) + rng.normal(size=8))
    return (hidden @ rng.normal(size=8))[None, :, None].astype(np.float32)


@pytest.mark.parametrize("masking", ["attention", "zero"])
def test_shapiq_exact_computer_on_our_game_agrees_with_our_values(masking):
    game, x = _vit_game(masking)
    n, image, cls = 9, x[0], 2
    computer = shapiq.ExactComputer(shapiq_game(game, image, cls, n, batch_size=128), n_players=n)
    sv = computer("SV", 1)
    ours = np.asarray(exact_shapley(game, image[None], n))[0, :, cls]
    np.testing.assert_allclose([sv[(i,)] for i in range(n)], ours, atol=1e-5)
    for index in ("k-SII", "FSII"):
        ref = computer(index, 2)
        mine = interactions(game, image[None], n, index=index)
        assert mine["exact"] and mine["evals"] == 2**n + 2  # every coalition, and v(empty), v(all) again
        np.testing.assert_allclose([ref[(i,)] for i in range(n)], mine["values"][0, :, cls], atol=1e-5)
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        np.testing.assert_allclose(
            [ref[p] for p in pairs], [mine["pairs"][0, i, j, cls] for i, j in pairs], atol=1e-5
        )
        assert abs(ref.baseline_value - mine["baseline"][0, cls]) < 1e-5
        total = mine["values"].sum(1) + mine["pairs"].sum((1, 2)) / 2
        np.testing.assert_allclose(total, mine["total"], atol=1e-5)  # efficiency


def test_a_shapiq_game_runs_through_our_estimators():
    """The reverse adapter: shapiq's own game object (and a plain numpy function) as our value_fn."""
    game, x = _vit_game()
    n, cls = 9, 1
    theirs = shapiq_game(game, x[0], cls, n)
    ours = np.asarray(exact_shapley(game, x[:1], n))[0, :, cls]
    back = from_shapiq(theirs)
    np.testing.assert_allclose(
        np.asarray(exact_shapley(back, jnp.zeros((1, 1)), n))[0, :, 0], ours, atol=1e-5
    )
    plain = from_shapiq(lambda coalitions: coalitions.sum(1) ** 2)  # v(S) = |S|^2: every phi_i = n
    np.testing.assert_allclose(
        np.asarray(exact_shapley(plain, jnp.zeros((1, 1)), 5))[0, :, 0], 5.0, rtol=1e-6
    )


def test_interaction_values_json_loads_in_shapiq(tmp_path):
    n = 5
    rng = np.random.default_rng(0)
    values, pairs = rng.normal(size=n), rng.normal(size=(n, n))
    pairs = pairs + pairs.T
    np.fill_diagonal(pairs, 0)
    path = write_interaction_values(
        str(tmp_path / "x.json"),
        values,
        0.25,
        pairs=pairs,
        index="k-SII",
        estimated=True,
        budget=64,
        patch_grid=[3, 3],
        players=[0, 2, 4, 6, 8],
        class_name="cat",
    )
    iv = shapiq.InteractionValues.load(path)
    assert (iv.index, iv.max_order, iv.min_order, iv.n_players) == ("k-SII", 2, 0, n)
    assert iv.baseline_value == 0.25 and iv[()] == 0.25 and iv.estimated and iv.estimation_budget == 64
    np.testing.assert_allclose([iv[(i,)] for i in range(n)], values)
    assert {k for k in iv.interaction_lookup if len(k) == 2} == {
        (i, j) for i in range(n) for j in range(i + 1, n)
    }
    np.testing.assert_allclose([iv[(1, 3)], iv[(0, 4)]], [pairs[1, 3], pairs[0, 4]])
    sv = shapiq.InteractionValues.load(write_interaction_values(str(tmp_path / "sv.json"), values, -1.0))
    assert (sv.index, sv.max_order, sv.baseline_value) == ("SV", 1, -1.0)
    np.testing.assert_allclose([sv[(i,)] for i in range(n)], values)
    import matplotlib

    matplotlib.use("Agg")
    for plot in (iv.plot_force, iv.plot_waterfall, iv.plot_network):  # shapiq's own plots read the file
        plot(show=False)
        matplotlib.pyplot.close("all")
    with pytest.raises(ValueError, match="ending in .json"):
        write_interaction_values(str(tmp_path / "x.txt"), values, 0.0)


def test_sampled_fsii_is_exact_on_a_game_of_order_two():
    n = 12
    table, a, b = _order_two_table(n)
    out = interactions(
        table_game(table), jnp.zeros((1, 1)), n, index="FSII", budget=600, key=jax.random.key(0)
    )
    assert not out["exact"] and out["evals"] == 602
    np.testing.assert_allclose(out["values"][0, :, 0], a, atol=2e-4)  # FSII of an order-2 game: its terms
    np.testing.assert_allclose(out["pairs"][0, :, :, 0], b, atol=2e-4)


@pytest.mark.parametrize("index", ["k-SII", "FSII"])
def test_sampled_error_falls_with_the_budget(index):
    n = 11
    game = table_game(_tanh_table(n))
    truth = interactions(game, jnp.zeros((1, 1)), n, index=index)["pairs"]
    errors = []
    for budget in (128, 2000):
        runs = [
            interactions(game, jnp.zeros((1, 1)), n, index=index, budget=budget, key=jax.random.key(s))[
                "pairs"
            ]
            for s in range(4)
        ]
        errors.append(np.mean([np.sqrt(((r - truth) ** 2).mean()) for r in runs]))
    assert errors[1] < errors[0] / 2, errors


def test_restricting_to_some_patches_keeps_the_others_visible():
    n, chosen = 8, np.array([[1, 4, 6]])
    table = _tanh_table(n, seed=3)
    game = table_game(table)
    out = interactions(game, jnp.zeros((1, 1)), n, index="k-SII", players=chosen)
    assert out["values"].shape == (1, 3, 1) and out["pairs"].shape == (1, 3, 3, 1)

    def sub(coalitions):  # the 3-player game by hand: the other 5 patches always present
        full = np.ones((len(coalitions), n), bool)
        full[:, chosen[0]] = coalitions
        codes = (full.astype(np.int64) << np.arange(n)).sum(1)
        return table[0, codes, 0]

    ref = shapiq.ExactComputer(sub, n_players=3)("k-SII", 2)
    np.testing.assert_allclose(out["values"][0, :, 0], [ref[(i,)] for i in range(3)], atol=1e-5)
    np.testing.assert_allclose(out["pairs"][0, 0, 2, 0], ref[(0, 2)], atol=1e-5)
    restricted = restrict(game, chosen, n)
    np.testing.assert_allclose(
        np.asarray(restricted(jnp.zeros((1, 1)), jnp.zeros((1, 1, 3), bool)))[0, 0, 0],
        sub(np.zeros((1, 3), bool))[0],
    )


def test_complement_pairs_finds_each_pair_once():
    c = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 1, 1], [0, 0, 1], [1, 0, 1]], bool)
    first, second, alone = complement_pairs(c)
    assert sorted(zip(first.tolist(), second.tolist(), strict=True)) == [(0, 1), (2, 4)]
    assert alone.tolist() == [3, 5]  # a repeated row pairs once; [1, 0, 1] has no complement here


def test_shapiq_kernelshap_on_the_adapter_matches_a_per_coalition_game():
    """Paired requests go through value_pairs (one packed pass per pair); the values are the same."""
    game, x = _vit_game()
    n, cls = 9, 0
    ours = shapiq_game(game, x[0], cls, n, batch_size=64)
    one = jax.jit(lambda m: game(x[:1], m[None, None])[0, 0, cls])
    plain = shapiq.Game(n_players=n, normalize=False)
    plain.value_function = lambda coalitions: np.array([float(one(jnp.asarray(c))) for c in coalitions])
    a = shapiq.KernelSHAP(n=n, random_state=0).approximate(budget=200, game=ours)
    b = shapiq.KernelSHAP(n=n, random_state=0).approximate(budget=200, game=plain)
    np.testing.assert_allclose([a[(i,)] for i in range(n)], [b[(i,)] for i in range(n)], atol=1e-5)
