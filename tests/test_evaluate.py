"""The evaluation run on a finished tiny pipeline: every method, the table, the files."""

import json

import jax
import numpy as np
import PIL.Image
import pytest

from tests.helpers import load, order_two_games
from vitshap_jax import parallel
from vitshap_jax.commands import evaluate
from vitshap_jax.config import EVALUATION_METHODS, ConfigError, validate
from vitshap_jax.errors import StageError
from vitshap_jax.evaluation import ground_truth, methods, pictures
from vitshap_jax.runs import load_explainer
from vitshap_jax.viz.curves import curve_size
from vitshap_jax.viz.heatmaps import figure_size


def small(**kw):
    c = load("evaluate", "imagenette")
    c.update(
        dict(
            num_images=5,
            batch_size=8,
            kernelshap_budgets="16,512",
            permutation_budgets="34,512",
            rise_masks=100,
            noise_samples=4,
            ig_steps=4,
        )
        | kw
    )
    validate(c)
    return c


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation")
    config = small(output_dir=str(out), num_heatmaps=2)
    results = evaluate.run(config, str(trained_run), parallel.make_mesh())
    return out, results


def test_every_method_gets_a_row(evaluated):
    out, results = evaluated
    methods = results["methods"]
    sampled = ["kernelshap_16", "kernelshap_512", "permutation_34", "permutation_512"]
    expected = [m for m in EVALUATION_METHODS if m not in ("kernelshap", "permutation")] + sampled
    assert sorted(methods) == sorted(expected)
    assert results["ground_truth"]["method"] == "exact" and results["players"] == 16
    for name, row in methods.items():
        assert 0 <= row["insertion_auc"] <= 1 and 0 <= row["deletion_auc"] <= 1, name
        assert row["seconds_per_image"] > 0, name
        assert (row["mse"] is None) == (name not in ("explainer", "leave_one_out", *sampled))
    # More evaluations, closer to the exact values.
    assert methods["kernelshap_512"]["mse"] < methods["kernelshap_16"]["mse"]
    assert methods["permutation_512"]["mse"] < methods["permutation_34"]["mse"]
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == len(methods) + 1  # header + one row per method
    assert json.loads((out / "results.json").read_text())["num_images"] == 5


def test_ground_truth_and_explainer_are_efficient(evaluated, trained_run):
    out, _ = evaluated
    values = np.load(out / "values.npz")
    explain = load_explainer(str(trained_run))
    assert values["ground_truth"].shape == (5, 16) and values["explainer"].shape == (5, 16)
    # The game's total for the explained class: both must sum to it (efficiency).
    from vitshap_jax.data import open_split

    source = open_split(explain.config, "test")
    x = np.stack([explain.preprocess(np.asarray(source[i]["image"])) for i in range(5)])
    out_all = explain(x)
    total = np.take_along_axis(
        np.asarray(out_all["v_all"] - out_all["v_empty"]), values["classes"][:, None], 1
    )[:, 0]
    np.testing.assert_allclose(values["ground_truth"].sum(1), total, atol=1e-4)
    np.testing.assert_allclose(values["explainer"].sum(1), total, atol=1e-4)
    np.testing.assert_array_equal(values["classes"], values["labels"])  # explain_class="label"


def test_pictures(evaluated):
    out, results = evaluated
    for name in ("kl_curves.png", "accuracy_curves.png", "insertion_deletion.png"):
        with PIL.Image.open(out / name) as png:
            assert png.size == curve_size(), name
    methods = 1 + len(results["methods"])  # ground truth first
    for i in range(2):
        with PIL.Image.open(out / "heatmaps" / f"{i:03d}_methods.png") as png:
            assert png.size == figure_size(methods, pictures.HEATMAP_COLUMNS)
        assert (out / "heatmaps" / f"{i:03d}_shapley.png").exists()
    assert not (out / "heatmaps" / "002_methods.png").exists()
    curves = results["surrogate_curves"]
    assert len(curves["kl"]) == 3  # the surrogate run, the classifier under each masking strategy
    assert all(len(v) == len(curves["fractions"]) for v in curves["kl"].values())


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("methods", "explainer,shap", r"config.methods='explainer,shap': unknown \['shap'\]"),
        ("kernelshap_budgets", "64,many", "give comma-separated integers"),
        ("kernelshap_budgets", "2", "each budget must be >= 4"),
        ("permutation_budgets", "1024,x", "config.permutation_budgets='1024,x': give comma-separated"),
        ("kernelshap_estimator", "fast", "must be one of standard, unbiased"),
        ("ground_truth", "shap", "must be one of auto, exact, kernelshap, permutation"),
        ("explain_class", "top", "must be one of label, predicted"),
        ("num_images", 0, "must be positive"),
    ],
)
def test_bad_evaluate_config(field, value, message):
    c = load("evaluate", "digits")
    c[field] = value
    with pytest.raises(ConfigError, match=message):
        validate(c)


def test_a_permutation_budget_below_one_pair_of_permutations_is_refused(trained_run):
    c = small(methods="permutation", permutation_budgets="31")  # 16 patches: one pair costs 2 + 30
    with pytest.raises(StageError, match="costs 32 evaluations with 16 patches"):
        evaluate.run(c, str(trained_run), parallel.make_mesh())


def test_the_predicted_class_is_explained_when_asked(trained_run, tmp_path):
    import jax.numpy as jnp

    from vitshap_jax.losses import predictions

    c = small(methods="explainer", explain_class="predicted", output_dir=str(tmp_path), num_heatmaps=0)
    results = evaluate.run(c, str(trained_run), parallel.make_mesh())
    values = np.load(tmp_path / "values.npz")
    loaded = load_explainer(str(trained_run))
    classifier, params = loaded.classifier()
    _, images, labels = loaded.examples("test", 5)
    predicted = np.asarray(
        predictions(classifier.apply({"params": params}, jnp.asarray(images)), "multiclass")
    )
    assert (predicted != labels).any()  # the tiny run is wrong on some: label and prediction differ
    np.testing.assert_array_equal(values["classes"], predicted)
    np.testing.assert_array_equal(values["labels"], labels)
    assert results["explain_class"] == "predicted"
    assert results["classifier_accuracy_on_these"] == pytest.approx(float((predicted == labels).mean()))


def test_wrong_dataset_is_refused(trained_run):
    c = small()
    c.dataset = "digits"
    with pytest.raises(StageError, match="trained on imagenette, not digits"):
        evaluate.run(c, str(trained_run), parallel.make_mesh())


def test_extra_surrogates_add_curves(trained_run, tmp_path):
    mesh = parallel.make_mesh()
    loaded = load_explainer(str(trained_run))
    c = small(methods="explainer", extra_surrogates=str(trained_run / "surrogate"), output_dir=str(tmp_path))
    from vitshap_jax.evaluation.heldout import surrogate_curves

    classifier, params = loaded.classifier()
    curves = surrogate_curves(c, loaded, classifier, params, mesh)
    assert len(curves["kl"]) == 4  # the run's surrogate twice (listed again), the classifier twice
    c.extra_surrogates = str(tmp_path / "nowhere")
    with pytest.raises(StageError, match="nowhere has no results.json"):
        surrogate_curves(c, loaded, classifier, params, mesh)


@pytest.mark.parametrize("kind", ["kernelshap", "permutation"])
def test_sampled_ground_truth_agrees_with_the_exact_one(kind):
    """The evaluation's sampled ground-truth branch (the one runs with more than 20 patches take), on
    12-player table games with 3 classes: close to the exact values of each image's explained class,
    and not equal to them (so it did sample)."""
    from vitshap_jax.shapley.game import table_game

    n, b = 12, 5
    rng = np.random.default_rng(0)
    tables = np.stack([order_two_games(n, seed=s)["mlp"][0, :, 0] for s in range(3)], -1)  # [2^n, 3]
    table = (tables[None] * rng.uniform(0.5, 2.0, (b, 1, 3))).astype(np.float32)  # 5 images
    padded = np.concatenate([table, np.repeat(table[:1], 3, 0)])  # as ground_truth pads to batch_size 8
    images, classes = np.zeros((b, 1), np.float32), np.array([0, 1, 2, 1, 0], np.int32)
    c = small(batch_size=8, ground_truth_threshold=0.005)
    truth = {}
    for k in ("exact", kind):
        c.ground_truth = k
        truth[k], info = ground_truth.ground_truth(
            c, table_game(padded), images, classes, n, put=lambda x: x, key=jax.random.key(1)
        )
    assert truth[kind].shape == (b, n)
    assert info["method"].startswith(kind) and info["converged"] == 1.0 and 2 < info["evals_per_image"]
    scale = np.abs(truth["exact"]).max()
    np.testing.assert_allclose(truth[kind], truth["exact"], atol=0.03 * scale)
    assert np.abs(truth[kind] - truth["exact"]).max() > 1e-6 * scale  # sampled, not enumerated


def test_the_table_is_the_metrics_of_the_saved_values(evaluated):
    """Every row of results.json and table.md recomputed from values.npz with the metric functions."""
    from vitshap_jax.evaluation.metrics import estimate_errors

    out, results = evaluated
    values = np.load(out / "values.npz")
    table = (out / "table.md").read_text().splitlines()
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in table if line.startswith("| ")}
    for name, row in results["methods"].items():
        e = estimate_errors(values[name][..., None], values["ground_truth"][..., None], k=results["top_k"])
        assert row["pearson"] == pytest.approx(np.nanmean(e["pearson"]), abs=1e-9), name
        assert row["spearman"] == pytest.approx(np.nanmean(e["spearman"]), abs=1e-9), name
        assert row["overlap"] == pytest.approx(e[f"top{results['top_k']}_overlap"].mean(), abs=1e-9), name
        if row["mse"] is not None:
            assert row["mse"] == pytest.approx(e["mse"].mean(), rel=1e-9), name
            assert f"| {row['mse']:.2e} |" in rows[name]
        assert f"| {row['pearson']:.3f} | {row['spearman']:.3f} | {row['overlap']:.3f} |" in rows[name]
        assert f"| {row['deletion_auc']:.3f} |" in rows[name]
        assert row["insertion_auc"] == pytest.approx(np.mean(row["insertion_curve"]), abs=1e-6), name


def test_seconds_per_image_divide_by_the_images_not_the_padding():
    import time

    def slow(images, classes, key):
        time.sleep(0.2)  # per call: 2 batches of 4 for 5 images, after one warm-up call
        return np.zeros((images.shape[0], 3))

    images, classes = np.zeros((5, 2), np.float32), np.zeros(5, np.int32)
    scores, seconds = methods.run_batched(
        slow, images, classes, batch_size=4, key=jax.random.key(0), put=lambda x: x
    )
    assert scores.shape == (5, 3)
    assert seconds >= 2 * 0.2 / 5  # at least 0.08; dividing by the 8 padded rows would give about 0.05
