"""Classifiers and surrogates of different architectures (FastSHAP's study), end to end on digits through
the study command: a ViT classifier -> a ResNet surrogate (from scratch, input masking) -> a UNet
explainer. (A surrogate of the classifier's own architecture starting from it: tests/test_stages.py.)"""

import json

import jax
import numpy as np
from flax import traverse_util

from tests.helpers import load
from vitshap_jax import checkpoints, parallel
from vitshap_jax.models import abstract_params, build_model
from vitshap_jax.runs import TrainedRun


def _study(data_dir):
    c = load("compare", "digits,classifiers=micro,surrogates=resnet18")
    c.dataset.data_dir = str(data_dir)
    c.dataset.read_threads = 1
    for stage in ("classifier", "surrogate", "explainer"):
        c[stage].train.update(dict(batch_size=256, epochs=1, log_every_steps=1))
        c[stage].optim.warmup_steps = 1
    c.explainer.explainer.update(dict(num_coalitions=4, unet_width=8))
    c.num_images = 2
    return c


def _best(stage_dir):
    config = checkpoints.read_config(stage_dir)
    params = checkpoints.load_best_params(stage_dir, abstract_params(build_model(config), 8))
    return config, {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def test_the_study_trains_every_pair_and_reports_them(tmp_path, monkeypatch):
    from vitshap_jax import config as names
    from vitshap_jax.config import validate
    from vitshap_jax.evaluation import methods
    from vitshap_jax.stages import compare

    monkeypatch.setitem(names.RESNET_VARIANTS["resnet18"], "hidden_size", 16)  # a narrow ResNet-18: faster
    config = _study(tmp_path / "tfds")
    validate(config)
    mesh = parallel.make_mesh()
    results = compare.run(config, str(tmp_path / "study"), mesh)
    root = tmp_path / "study"
    assert set(results["pairs"]) == {"micro/resnet18"} and results["agreement"] == {}
    assert "| micro | resnet18 |" in (root / "compare.md").read_text()
    assert json.loads((root / "compare.json").read_text())["pairs"].keys() == results["pairs"].keys()

    # ViT classifier -> ResNet surrogate (from scratch, input masking) -> UNet explainer.
    surrogate_config, surrogate = _best(str(root / "micro" / "resnet18" / "surrogate"))
    assert surrogate_config["model"]["architecture"] == "resnet"
    assert surrogate_config["model"]["masking"] == "input" and "conv1/kernel" in surrogate
    explainer_results = json.loads((root / "micro" / "resnet18" / "explainer" / "results.json").read_text())
    assert explainer_results["test"]["efficiency_gap"] < 1e-5
    run = TrainedRun.load(str(root / "micro" / "resnet18"))
    assert type(run.explainer).__name__ == "UNetExplainer" and type(run.surrogate).__name__ == "ResNet"
    _, inputs, _ = run.examples("test", 3)
    out = run(inputs)
    np.testing.assert_allclose(out["phi"].sum(1), out["v_all"] - out["v_empty"], atol=1e-5)
    assert (root / "heatmaps" / "micro-resnet18.png").exists()

    # Baselines that read a transformer's tokens skip a ResNet classifier; the others stay.
    evaluate = load("evaluate", "digits")
    evaluate.methods = "explainer,gradcam,random"
    fns = methods.method_functions(evaluate, run, run.surrogate, run.surrogate_params, run.num_players)
    assert set(fns) == {"explainer", "random"}

    jax.clear_caches()


def test_agreement_subsets_and_the_report():
    from vitshap_jax.stages.compare import _agreement, report

    labels = np.array([0, 1, 2, 3, 4, 5])
    a = np.array([0, 1, 2, 9, 9, 5])  # right on 0, 1, 2, 5
    b = np.array([0, 9, 2, 3, 8, 9])  # right on 0, 2, 3
    subsets = _agreement(a, b, labels)
    assert subsets == dict(
        both_right=2, only_first_right=2, only_second_right=1, both_wrong=1, same_prediction=2
    )
    pair = dict(
        classifier="vit", surrogate="resnet18", classifier_accuracy=0.9, validation_kl=0.2, test_kl=0.25
    )
    pair |= {"test_accuracy": 0.8, "test_accuracy_coalition": 0.7, "test_accuracy_heldout_0.50": 0.6}
    pair["explainer_test_loss"] = 1e-3
    text = report({"pairs": {"vit/resnet18": pair}, "agreement": {"vit/resnet18": subsets}, "test_images": 6})
    assert "| vit | resnet18 | 0.9000 | 0.2000 | 0.2500 | 0.8000 | 0.7000 | 0.6000 | 0.00100 |" in text
    assert "| vit/resnet18 | 2 | 2 | 1 | 1 | 2 |" in text
