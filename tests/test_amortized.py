"""Training signals of the explainer: the reference-compatible sampler against its definition, the
stochastic-amortization targets against exact Shapley values (unbiased, efficient), the losses at the
true values, and one explainer step per signal and sampler."""

import dataclasses
import functools
import itertools
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import PIL.Image
import pytest
import scipy.stats

from tests.helpers import tiny
from vitshap_jax import losses, parallel, shapley
from vitshap_jax.config import ConfigError, validate
from vitshap_jax.data.loader import FixedViews
from vitshap_jax.shapley import amortized
from vitshap_jax.shapley.kernelshap import constrained_solve
from vitshap_jax.shapley.sampling import reference_compat_coalitions, reference_compat_size_probs

N = 6  # players of the table games
DRAWS = 4000


def _chi2(counts, probs):
    keep = probs > 0
    assert counts[~keep].sum() == 0, "sizes drawn outside the support"
    return scipy.stats.chisquare(counts[keep], probs[keep] * counts.sum()).pvalue


def test_reference_compat_sizes_follow_their_definition():
    n = 10
    # The definition, written independently: j ~ kernel weight of size j + 1 (j = 0..n-2), then each
    # player visible with probability 1 - j / n.
    w = np.array([1 / (k * (n - k)) for k in range(1, n)])
    w /= w.sum()
    mixture = sum(w[j] * scipy.stats.binom.pmf(np.arange(n + 1), n, 1 - j / n) for j in range(n - 1))
    probs = reference_compat_size_probs(n)
    np.testing.assert_allclose(probs, mixture, rtol=1e-12)
    masks = np.asarray(reference_compat_coalitions(jax.random.key(0), (DRAWS,), n, num=8, paired=True))
    np.testing.assert_array_equal(masks[:, 4:], ~masks[:, :4])
    counts = np.bincount(masks[:, :4].sum(-1).ravel(), minlength=n + 1)
    assert _chi2(counts, probs) > 1e-3
    # The test has power: the same sizes are far from the Shapley kernel, also on its support 1..n-1.
    assert counts[0] + counts[n] > 0.1 * counts.sum()  # the full coalition (j = 0) is the likeliest draw
    kernel = shapley.shapley_kernel_size_probs(n)
    inner = counts.copy()
    inner[[0, n]] = 0
    assert _chi2(inner, kernel) < 1e-12


def _table(seed, batch, classes=2):
    """A random game of every order `[batch, 2^N, classes]` (the same game in every row)."""
    table = np.random.default_rng(seed).standard_normal((1, 2**N, classes)).astype(np.float32)
    return jnp.broadcast_to(jnp.asarray(table), (batch, 2**N, classes))


def _unbiased(draws, exact, draws_axis=0):
    """Every player's and class's mean over the draws within 5 standard errors of the exact value."""
    mean, se = draws.mean(draws_axis), draws.std(draws_axis) / np.sqrt(draws.shape[draws_axis])
    assert (se > 1e-3).all()  # the target is noisy: the check is not vacuous
    z = np.abs(mean - exact) / se
    assert z.max() < 5, z.max()


def _table_setup(seed):
    table = _table(seed, DRAWS)
    game = shapley.table_game(table)
    images = jnp.zeros((DRAWS, 1))
    exact = np.asarray(shapley.exact_shapley(game, images[:1], N))[0]
    null, full = table[:, 0], table[:, -1]
    return game, images, exact, null, full


def test_kernelshap_target_is_unbiased_and_efficient():
    game, images, exact, null, full = _table_setup(0)
    masks = shapley.shapley_kernel_coalitions(jax.random.key(1), (DRAWS,), N, num=4, paired=True)
    values = game(images, masks)
    targets = np.asarray(amortized.kernelshap_target(masks, values, null, full - null))
    _unbiased(targets, exact)
    np.testing.assert_allclose(targets.sum(1), np.asarray(full - null), atol=1e-5)


def test_permutation_target_is_unbiased_and_efficient():
    game, images, exact, null, full = _table_setup(2)
    target = jax.jit(functools.partial(amortized.permutation_target, budget=2 * (N - 1), n=N))
    targets = np.asarray(target(jax.random.key(3), images, null, full, game))
    _unbiased(targets, exact)
    np.testing.assert_allclose(targets.sum(1), np.asarray(full - null), atol=1e-5)
    with pytest.raises(ValueError, match="does not pay for one antithetic pair"):
        amortized.permutation_target(jax.random.key(3), images, null, full, game, budget=9, n=N)


def test_regression_loss_is_zero_at_the_true_values_and_minimized_there():
    rng = np.random.default_rng(4)
    w, pair = rng.standard_normal(N), rng.standard_normal((N, N))
    codes = np.arange(2**N)
    z = (codes[:, None] >> np.arange(N)) & 1
    table = (z @ w + np.einsum("mi,ij,mj->m", z, np.triu(pair, 1), z))[None, :, None].astype(np.float32)
    game, images = shapley.table_game(np.repeat(table, 8, 0)), jnp.zeros((8, 1))
    exact = shapley.exact_shapley(game, images, N)
    null, full = jnp.asarray(table[:, 0]).repeat(8, 0), jnp.asarray(table[:, -1]).repeat(8, 0)
    # On a game of order 2 one antithetic pair of orders is exact: the loss is zero at the true values.
    one_pair = dict(budget=2 * (N - 1), n=N)
    target = amortized.permutation_target(jax.random.key(5), images, null, full, game, **one_pair)
    assert float(losses.regression_loss(exact, target).max()) < 1e-10
    assert float(losses.regression_loss(exact + 0.1, target).min()) > 1e-3
    # On any game its expectation is the distance to the true values plus the target's variance.
    game, images, exact, null, full = _table_setup(6)
    masks = shapley.shapley_kernel_coalitions(jax.random.key(7), (DRAWS,), N, num=4, paired=True)
    targets = amortized.kernelshap_target(masks, game(images, masks), null, full - null)
    shift = 0.05 * jnp.asarray(np.random.default_rng(8).standard_normal(exact.shape), jnp.float32)
    at_truth = float(losses.regression_loss(jnp.asarray(exact)[None], targets).mean())
    shifted = float(losses.regression_loss(jnp.asarray(exact + shift)[None], targets).mean())
    np.testing.assert_allclose(shifted - at_truth, float((shift**2).mean()), rtol=0.2)


def _expected_wls_minimizer(table, size_probs):
    """The constrained minimizer of the WLS objective's exact expectation when coalitions of size k have
    probability `size_probs[k]` (uniform within a size), paired with their complements."""
    n = len(size_probs) - 1
    z = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(np.float64)
    sizes = z.sum(1).astype(int)
    paired = 0.5 * (size_probs + size_probs[::-1])  # each coalition comes with its complement
    weight = paired[sizes] / np.array([math.comb(n, k) for k in range(n + 1)])[sizes]
    a = np.einsum("m,mi,mj->ij", weight, z, z)
    b = np.einsum("m,mi,mc->ic", weight, z, table - table[:1])
    return np.asarray(constrained_solve(a[None], b[None], (table[-1] - table[0])[None]))[0]


def test_the_wls_objective_gives_shapley_values_under_the_kernel_only():
    """The expected WLS loss (over all coalitions) is minimized at the Shapley values under the exact
    kernel, and elsewhere under the reference implementation's sampler."""
    jax.config.update("jax_enable_x64", True)
    try:
        table = np.random.default_rng(9).standard_normal((2**N, 3))
        game = shapley.table_game(table[None])
        exact = np.asarray(shapley.exact_shapley(game, jnp.zeros((1, 1)), N))[0]
        kernel = _expected_wls_minimizer(table, shapley.shapley_kernel_size_probs(N))
        np.testing.assert_allclose(kernel, exact, atol=1e-9)
        reference = _expected_wls_minimizer(table, reference_compat_size_probs(N))
        assert np.abs(reference - exact).max() > 1e-2
    finally:
        jax.config.update("jax_enable_x64", False)


def test_signal_and_sampler_are_validated():
    c = tiny("explainer", "digits", "/nonexistent")
    c.dataset.image_size, c.dataset.resize_size, c.model.patch_size = 8, 8, 2
    for signal, sampler, coalitions, field in [
        ("ols", "shapley", 32, "explainer.signal"),
        ("wls", "exact", 32, "explainer.sampler"),
        ("kernelshap", "reference_compat", 32, "explainer.sampler"),
        ("permutation", "shapley", 28, "explainer.num_coalitions"),
    ]:
        c.explainer.update(dict(signal=signal, sampler=sampler, num_coalitions=coalitions))
        with pytest.raises(ConfigError, match=f"config.{field}="):
            validate(c)
    c.explainer.update(dict(signal="permutation", sampler="shapley", num_coalitions=30))
    validate(c)
    for signal, views, message in [
        ("wls", 2, "applies to signal=precomputed only"),
        ("precomputed", 0, "must be at least 1"),
    ]:
        c.explainer.update(dict(signal=signal, target_views=views))
        with pytest.raises(ConfigError, match=f"config.explainer.target_views={views}: {message}"):
            validate(c)
    c.explainer.update(dict(signal="precomputed", target_views=3))
    validate(c)
    for views, mix, message in [(3, 1.0, "must be in"), (3, -0.1, "must be in"), (1, 0.5, "target_views")]:
        c.explainer.update(dict(target_views=views, view_mix=mix))
        with pytest.raises(ConfigError, match=f"config.explainer.view_mix={mix}: .*{message}"):
            validate(c)
    c.explainer.update(dict(target_views=3, view_mix=0.5))
    validate(c)
    c.explainer.update(dict(signal="wls", target_views=1, view_mix=0.0, teachers="runs/a"))
    with pytest.raises(ConfigError, match="config.explainer.teachers='runs/a': labels the views of signal"):
        validate(c)


@pytest.mark.parametrize(
    "signal,sampler,coalitions",
    [("wls", "reference_compat", 4), ("kernelshap", "shapley", 4), ("permutation", "shapley", 30)],
)
def test_one_explainer_step_per_signal(tmp_path, signal, sampler, coalitions):
    """One jitted train step on digits-sized images (8 px, 16 patches) over the 8-device mesh: a finite
    loss that moves the parameters."""
    from vitshap_jax.models import build_explainer, build_model
    from vitshap_jax.stages import common, explainer

    config = tiny("explainer", "digits", tmp_path)
    config.dataset.image_size, config.dataset.resize_size, config.model.patch_size = 8, 8, 2
    config.optim.update(dict(warmup_steps=0, lr=1e-3))  # warmup would make the first step's lr 0
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.standard_normal((8, 8, 8, 3)).astype(np.float32),
        "label": rng.integers(0, 10, 8).astype(np.int32),
        "index": np.arange(8, dtype=np.int32),
        "valid": np.ones(8, bool),
    }
    vit, model = build_model(config), build_explainer(config)
    vit_params = vit.init(jax.random.key(1), batch["image"][:1])["params"]
    params = model.init(jax.random.key(2), batch["image"][:1])["params"]
    tx = common.make_optimizer(config, 100)
    fn = functools.partial(
        explainer.train_step,
        explainer=model,
        surrogate=vit,
        tx=tx,
        target="multiclass",
        seed=0,
        num_coalitions=coalitions,
        paired=True,
        packed=True,
        signal=signal,
        sampler=sampler,
    )
    mesh = parallel.make_mesh()
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    state = jax.device_put(jax.tree.map(jnp.copy, state), parallel.replicated(mesh))
    frozen = jax.device_put(vit_params, parallel.replicated(mesh))
    new, metrics = common.jit_train_step(fn, mesh, num_frozen=1)(
        state, parallel.global_batch(batch, mesh), frozen
    )
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), jax.device_get(new["params"]), params)
    assert max(jax.tree.leaves(moved)) > 0


def test_the_permutation_step_refuses_a_budget_below_one_pair(tmp_path):
    from vitshap_jax.models import build_explainer, build_model
    from vitshap_jax.stages import explainer

    config = tiny("explainer", "digits", tmp_path)
    config.dataset.image_size, config.dataset.resize_size, config.model.patch_size = 8, 8, 2
    images = jnp.zeros((2, 8, 8, 3))
    vit, model = build_model(config), build_explainer(config)
    state = {"step": jnp.zeros((), jnp.int32), "params": model.init(jax.random.key(0), images)["params"]}
    kw = dict(explainer=model, surrogate=vit, tx=None, target="multiclass", seed=0, paired=True, packed=True)
    step = functools.partial(explainer.train_step, num_coalitions=16, signal="permutation", **kw)
    with pytest.raises(ConfigError, match="config.explainer.num_coalitions=16: signal=permutation needs"):
        jax.eval_shape(step, state, {"image": images}, vit.init(jax.random.key(1), images)["params"])


def test_the_table_games_are_of_every_order():
    """Guard for the unbiasedness tests: the random games are not of order <= 2, where antithetic
    permutations (and paired KernelSHAP) would be exact and the tests trivially pass."""
    table = np.asarray(_table(0, 1))[0, :, 0]
    z = (np.arange(2**N)[:, None] >> np.arange(N)) & 1
    features = [np.ones(2**N)] + [
        np.prod(z[:, list(s)], 1) for k in (1, 2) for s in itertools.combinations(range(N), k)
    ]
    x = np.stack(features, 1)
    residual = table - x @ np.linalg.lstsq(x, table, rcond=None)[0]
    assert np.abs(residual).max() > 0.1


def test_the_precomputed_step_regresses_on_each_images_own_target_without_the_surrogate():
    """signal=precomputed: the step regresses on `batch["target"]` and evaluates no surrogate
    (it runs with no surrogate parameters at all); its loss is the mean squared distance of the
    efficient explainer output to them, zero when the explainer's raw output is the targets."""
    from vitshap_jax.models import build_explainer, build_model
    from vitshap_jax.stages import explainer

    config = tiny("explainer", "digits", "/nonexistent")
    config.dataset.image_size, config.dataset.resize_size, config.model.patch_size = 8, 8, 2
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((4, 8, 8, 3)), jnp.float32)
    model = build_explainer(config)
    params = model.init(jax.random.key(2), images[:1])["params"]
    raw = np.asarray(model.apply({"params": params}, images))  # [4, 16, 10]
    targets = jnp.asarray(rng.standard_normal((20, 16, 10)), jnp.float32)
    index = jnp.asarray([7, 3, 19, 0], jnp.int32)
    kw = dict(explainer=model, surrogate=build_model(config), target="multiclass", seed=0)
    kw |= dict(num_coalitions=4, paired=True, packed=True, signal="precomputed")
    state = {"step": jnp.zeros((), jnp.int32), "params": params}
    tx = optax.sgd(0.0)
    state["opt_state"] = tx.init(params)
    step = jax.jit(functools.partial(explainer.train_step, tx=tx, **kw))
    _, metrics = step(state, {"image": images, "target": targets[index]}, None)
    goal = np.asarray(targets)[np.asarray(index)]
    phi = np.asarray(shapley.additive_efficient_normalization(jnp.asarray(raw), goal.sum(1)))
    np.testing.assert_allclose(float(metrics["loss"]), ((phi - goal) ** 2).mean(), rtol=1e-5)
    own = targets.at[index].set(raw)  # targets that are the explainer's own output: zero loss
    _, metrics = step(state, {"image": images, "target": own[index]}, None)
    assert float(metrics["loss"]) < 1e-10


def test_precomputed_targets_are_the_exact_values_when_the_budget_enumerates(tmp_path):
    """A stage run with signal=precomputed on digits at 12 px with 4 px patches (9 players), its own masked
    classifier as the surrogate: target_evals=512 enumerates all 2^9 coalitions (every size is a border
    size of an odd n), so the saved targets must be the exact Shapley values (by enumeration,
    `exact_shapley`) of the training images as evaluation reads them, and with target_views=2 of their
    fixed random crops after them; a rerun reads them back, and a cache of other targets is refused."""
    from vitshap_jax import data
    from vitshap_jax.runs import TrainedRun
    from vitshap_jax.stages import classifier, common, explainer

    def shrink(c):
        c.dataset.image_size, c.dataset.resize_size = 12, 12
        c.train.update(dict(batch_size=64, log_every_steps=50))
        return c

    mesh = parallel.make_mesh()
    c = shrink(tiny("classifier", "digits", tmp_path / "tfds", epochs=2, eval_every_epochs=2))
    c.train.mask_patches = True
    first = classifier.run(c, str(tmp_path), mesh)
    lines = [json.loads(line) for line in open(tmp_path / "classifier" / "metrics.jsonl")]
    assert [line["epoch"] for line in lines if "epoch" in line] == [2]  # eval_every_epochs=2
    e = shrink(tiny("explainer", "digits", tmp_path / "tfds"))
    e.upstream = first["path"]
    e.explainer.update(dict(signal="precomputed", target_evals=512, num_coalitions=64, target_views=2))
    result = explainer.run(e, str(tmp_path), mesh)
    assert result["test"]["efficiency_gap"] < 1e-5
    file = tmp_path / "explainer" / explainer.TARGETS_FILE
    targets = np.load(file)["targets"]
    run = TrainedRun.load(str(tmp_path))
    split = data.open_split(e, "train")
    n = len(split)
    source = FixedViews(split, 2, seed=e.seed, crop_scale_min=e.dataset.crop_scale_min, hflip=False)
    picked = [*range(64), *range(n, n + 64)]  # the first 64 images, then their crops, in split order
    images = np.stack([run.preprocess(np.asarray(source[j]["image"])) for j in picked])
    assert not np.allclose(images[:64], images[64:])  # the crops are other images
    truth = np.asarray(shapley.exact_shapley(run.game(), jnp.asarray(images), 9))
    assert targets.shape == (2 * n, 9, 10)
    np.testing.assert_allclose(targets[picked], truth, atol=2e-5)

    again = explainer.precompute_targets(e, None, source, mesh, str(tmp_path / "explainer"))  # no game
    np.testing.assert_array_equal(again, targets)
    e.explainer.target_evals = 256
    with pytest.raises(common.StageError, match=r"from KernelSHAP at config.explainer.target_evals=256: it"):
        explainer.precompute_targets(e, None, source, mesh, str(tmp_path / "explainer"))
    e.explainer.target_evals = 512
    with pytest.raises(common.StageError, match=f"holds {2 * n} targets .* not {n} of 9"):
        explainer.precompute_targets(e, None, split, mesh, str(tmp_path / "explainer"))  # one view

    # More images (explainer.extra_images): a folder's images follow the (here first 64) training
    # images, each labelled like them: its exact values as evaluation reads it, whatever its size/mode.
    folder = tmp_path / "more"
    (folder / "deep").mkdir(parents=True)
    pixels = np.random.default_rng(5).integers(0, 255, (20, 14, 3), np.uint8)
    PIL.Image.fromarray(pixels[:8, :8, 0], "L").save(folder / "a.png")
    PIL.Image.fromarray(pixels).save(folder / "deep" / "b.png")
    (folder / "notes.txt").write_text("not an image")
    x = shrink(tiny("explainer", "digits", tmp_path / "tfds"))
    x.upstream, x.dataset.train_examples = first["path"], 64
    x.explainer.update(
        dict(signal="precomputed", target_evals=512, num_coalitions=64, extra_images=str(folder))
    )
    explainer.run(x, str(tmp_path / "more-run"), mesh)
    more = np.load(tmp_path / "more-run" / "explainer" / explainer.TARGETS_FILE)["targets"]
    assert more.shape == (66, 9, 10)
    np.testing.assert_allclose(more[:64], truth[:64], atol=2e-5)  # the first 64 training images
    extra = np.stack(
        [run.preprocess(data.read_image(str(f))) for f in (folder / "a.png", folder / "deep" / "b.png")]
    )
    np.testing.assert_allclose(more[64:], shapley.exact_shapley(run.game(), jnp.asarray(extra), 9), atol=2e-5)

    # Distillation: the explainer above as the teacher of another (explainer.teachers); the labels are its
    # outputs on the same fixed views, with no surrogate evaluation.
    d = shrink(tiny("explainer", "digits", tmp_path / "tfds"))
    d.upstream = first["path"]
    d.explainer.update(dict(signal="precomputed", target_views=2, teachers=str(tmp_path)))
    student = tmp_path / "student"
    explainer.run(d, str(student), mesh)
    labels = np.load(student / "explainer" / explainer.TARGETS_FILE)
    assert int(labels["evals"]) == 0 and str(labels["teachers"]) == str(tmp_path)
    # Equal up to bfloat16 matmul operands (matmul_precision=auto on this CPU): the batches differ, and
    # a last-bit difference before a cast can flip a bfloat16 rounding (2^-8 = 0.4%) in a rare image
    # (seen: one of the 128, all its values, by up to 0.41% of the largest); every other image agrees to
    # float32 rounding. An absolute bound of 1e-3 was met by one such image and missed by another.
    teacher = np.asarray(run(images)["phi"])
    difference = np.abs(labels["targets"][picked] - teacher)
    flipped = np.unique(np.nonzero(difference > 1e-5)[0])
    assert len(flipped) <= 2, f"images {flipped} of {len(picked)} differ from the teacher's outputs"
    assert difference.max() < 0.01 * np.abs(teacher).max() and np.median(difference) < 1e-7
    assert ((labels["targets"][picked] - truth) ** 2).mean() > 100 * (difference**2).mean()  # not the truth
    d.explainer.teachers = f"{tmp_path},{tmp_path}"
    one, two = (re.escape(f"config.explainer.teachers={t}") for t in (tmp_path, f"{tmp_path},{tmp_path}"))
    with pytest.raises(common.StageError, match=f"from the mean of {one}, not .* from the mean of {two}:"):
        explainer.precompute_targets(d, None, source, mesh, str(student / "explainer"), [run, run])
    up = json.load(open(tmp_path / "classifier" / "config.json"))
    other = jax.tree.map(lambda a: a + 1.0, run.surrogate_params)
    with pytest.raises(common.StageError, match="teachers: .* parameters differ from this stage's surrogate"):
        explainer.load_teachers(d, other, up, mesh)
    # Two different teachers: the labels are the mean of their (normalized) outputs, though the surrogate
    # runs once per image and the normalization is applied to the mean raw output.
    d.explainer.teachers = str(tmp_path)
    (first_teacher,) = explainer.load_teachers(d, run.surrogate_params, up, mesh)
    params = jax.tree.map(lambda a: a * 1.1, first_teacher.params["explainer"])
    second_teacher = dataclasses.replace(first_teacher, params={**first_teacher.params, "explainer": params})
    mean = explainer.teacher_targets(d, [first_teacher, second_teacher], split, mesh)[:64]
    a, b = (np.asarray(t(images[:64])["phi"]) for t in (first_teacher, second_teacher))
    assert np.abs(a - b).mean() > 1e-4  # two different teachers
    separate = (a + b) / 2
    # (bfloat16 operands again: a rare rounding flip, 1e-3 to 2e-3 on a handful of the 5,760 values.)
    assert np.abs(mean - separate).max() < 5e-3 and np.median(np.abs(mean - separate)) < 1e-6
    assert np.abs(mean - separate).mean() < 0.01 * np.abs(a - b).mean()
