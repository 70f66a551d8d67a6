"""ROAR: patch removal, retraining, resumable results."""

import json

import jax
import numpy as np
import PIL.Image
import pytest

from tests.helpers import load
from vitshap_jax import parallel
from vitshap_jax.commands import roar
from vitshap_jax.config import ConfigError, validate
from vitshap_jax.stages import common
from vitshap_jax.viz.curves import curve_size


def test_remove_top_zeroes_the_highest_ranked_patches():
    images = np.ones((2, 4, 4, 3), np.float32)  # 2x2 patches of 2x2 pixels
    scores = np.array([[0.1, 0.9, 0.5, -1.0], [3.0, 2.0, 1.0, 0.0]])
    out = roar.remove_top(images, scores, 0.5, 2, jax.random.key(0))
    patches = out.reshape(2, 2, 2, 2, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, -1)
    np.testing.assert_array_equal(patches.max(-1), [[1, 0, 0, 1], [0, 0, 1, 1]])
    assert np.all(patches.min(-1) == patches.max(-1))  # whole patches, nothing partial


def small(out, **kw):
    c = load("roar", "imagenette")
    c.update(dict(methods="explainer,leave_one_out,random", fractions="0.5", epochs=1, batch_size=8) | kw)
    c.output_dir = str(out)
    validate(c)
    return c


def test_roar_run_and_rerun(trained_run, tmp_path):
    mesh = parallel.make_mesh()
    results = roar.run(small(tmp_path), str(trained_run), mesh)
    acc = results["accuracy"]
    assert set(acc) == {"reference", "explainer", "leave_one_out", "random"}
    assert all(0 <= acc[m]["0.5"] <= 1 for m in ("explainer", "leave_one_out", "random"))
    assert results["fractions"] == [0.0, 0.5]
    with PIL.Image.open(tmp_path / "roar.png") as png:
        assert png.size == curve_size()
    assert [line.split(" |")[0] for line in (tmp_path / "table.md").read_text().splitlines()[2:]] == [
        "| explainer",
        "| leave_one_out",
        "| random",
    ]
    # A rerun keeps finished cells (marked here) and only adds new fractions.
    saved = json.loads((tmp_path / "results.json").read_text())
    saved["accuracy"]["random"]["0.5"] = 0.123
    (tmp_path / "results.json").write_text(json.dumps(saved))
    again = roar.run(small(tmp_path, fractions="0.5,0.75"), str(trained_run), mesh)
    assert again["accuracy"]["random"]["0.5"] == 0.123 and "0.75" in again["accuracy"]["random"]
    # Other settings: refused, and the results file is left as it was.
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(common.StageError, match="other settings"):
        roar.run(small(tmp_path, epochs=2), str(trained_run), mesh)
    assert (tmp_path / "results.json").read_text() == before


@pytest.mark.parametrize("value", ["0", "0.5,1.0", "half", ""])
def test_bad_fractions(value):
    c = load("roar", "digits")
    c.fractions = value
    with pytest.raises(ConfigError, match="config.fractions"):
        validate(c)


def test_roar_removes_the_share_it_names_and_retrains_from_fresh_parameters(
    trained_run, tmp_path, monkeypatch
):
    """Every retraining gets train and test images with exactly round(f n) whole patches zeroed (f = 0 for
    the reference), and starts from the run architecture's fresh initialization, not from the trained
    classifier."""
    from flax import traverse_util

    from vitshap_jax.runs import TrainedRun

    calls, starts = [], []
    real_retrain, real_create = roar.retrain, common.create_state

    def spy_retrain(classifier_config, train, test, **kw):
        calls.append((train[0], test[0]))
        return real_retrain(classifier_config, train, test, **kw)

    def spy_create(params, tx, mesh, *ema):
        starts.append(jax.tree.map(np.asarray, params))
        return real_create(params, tx, mesh, *ema)

    monkeypatch.setattr(roar, "retrain", spy_retrain)
    monkeypatch.setattr(common, "create_state", spy_create)
    roar.run(
        small(tmp_path, methods="explainer,random", fractions="0.25,0.5"),
        str(trained_run),
        parallel.make_mesh(),
    )
    assert len(calls) == 1 + 2 * 2  # the reference, then 2 methods x 2 fractions
    removed = []
    for train, test in calls:
        shares = []
        for images in (train, test):
            patches = (
                images.reshape(len(images), 4, 4, 4, 4, 3)
                .transpose(0, 1, 3, 2, 4, 5)
                .reshape(len(images), 16, -1)
            )
            zero = (patches == 0).all(-1)  # [N, 16] whole patches at the dataset mean
            shares.append(set(zero.sum(1).tolist()))
        removed.append(shares)
    assert removed == [[{0}, {0}]] + [[{4}, {4}], [{8}, {8}]] * 2  # 16 patches: 0, 25% and 50% removed
    model, trained = TrainedRun.load(str(trained_run)).classifier()
    fresh = model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))["params"]  # config.seed = 0
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(fresh, sep="/").items()}
    trained = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(trained, sep="/").items()}
    for start in starts:
        start = traverse_util.flatten_dict(start, sep="/")
        for k in flat:
            np.testing.assert_array_equal(start[k], flat[k], err_msg=k)
        assert any(not np.array_equal(start[k], trained[k]) for k in trained)
