"""The FastSHAP-style study (`configs/compare.py`): every classifier variant with every surrogate variant.

For each classifier variant C a classifier run in `{workdir}/C/classifier`; for each surrogate variant S a
surrogate distilled from it and an explainer against that surrogate in `{workdir}/C/S/` (a surrogate of
C's own variant starts from the classifier, another one from scratch or `model.pretrained`). Each run
follows the pipeline's rules (`pipeline.run_stage`: finished runs are skipped, unfinished ones resume).

Then, from the runs' results and the test split: `{workdir}/compare.json` and `compare.md` with, per
(classifier, surrogate) pair, the classifier's test accuracy, the surrogate's validation and test KL to
the classifier (one random coalition per image) and accuracy (all patches visible, one random coalition,
half of the patches held out), the explainer's test loss; per
pair of classifiers, how often both are right, only one is, or both are wrong (FastSHAP's agreement
subsets: explanations of models that agree can still differ); and per pair a heatmap grid of the first
`num_images` test images with the explainer's values for every class (`{workdir}/heatmaps/C-S.png`).
"""

from __future__ import annotations

import functools
import itertools
import os

import jax
import numpy as np
from absl import logging
from ml_collections import config_dict

from vitshap_jax import checkpoints as ckpt_lib
from vitshap_jax import data, parallel
from vitshap_jax.config import MASKINGS, apply_variant, default_masking, split_list, validate, variant_fields
from vitshap_jax.data.loader import per_example
from vitshap_jax.files import absolute, write_json
from vitshap_jax.models import abstract_params, build_model
from vitshap_jax.runs import TrainedRun
from vitshap_jax.stages import classifier, common
from vitshap_jax.stages.pipeline import run_stage
from vitshap_jax.viz.heatmaps import save_grid


def _copy(template) -> config_dict.ConfigDict:
    return config_dict.ConfigDict(template.to_dict())


def run(config, workdir: str, mesh) -> dict:
    root = absolute(workdir)
    classifiers, surrogates = split_list(config.classifiers), split_list(config.surrogates)
    pairs, accuracy, predictions = {}, {}, {}
    for name in classifiers:
        c = _copy(config.classifier)
        apply_variant(c, name, masking=default_masking(variant_fields(name)["architecture"]))
        validate(c)
        logging.info("compare: classifier %s", name)
        accuracy[name] = run_stage("classifier", c, os.path.join(root, name), mesh)["test"]["accuracy"]
        predictions[name] = _predictions(os.path.join(root, name, "classifier"), mesh)
        for surrogate_name in surrogates:
            pair_dir = os.path.join(root, name, surrogate_name)
            s = _copy(config.surrogate)
            kind = variant_fields(surrogate_name)["architecture"]
            keep = s.model.masking in MASKINGS[kind]  # the template's masking, where it fits
            apply_variant(s, surrogate_name, masking=s.model.masking if keep else "auto")
            s.upstream = os.path.join(root, name, "classifier")
            validate(s)
            logging.info("compare: surrogate %s of classifier %s", surrogate_name, name)
            sur = run_stage("surrogate", s, pair_dir, mesh, "classifier")
            e = _copy(config.explainer)
            exp = run_stage("explainer", e, pair_dir, mesh, "surrogate")
            pairs[f"{name}/{surrogate_name}"] = {
                "classifier": name,
                "surrogate": surrogate_name,
                "classifier_accuracy": accuracy[name],
                "validation_kl": sur["validation"]["kl"],
                "test_kl": sur["test"]["kl"],
                "test_accuracy": sur["test"]["accuracy_heldout_0.00"],
                "test_accuracy_coalition": sur["test"]["accuracy"],
                "test_accuracy_heldout_0.50": sur["test"]["accuracy_heldout_0.50"],
                "explainer_test_loss": exp["test"]["loss"],
                "heatmaps": _heatmaps(pair_dir, root, f"{name}-{surrogate_name}", config.num_images),
            }
    labels = next(iter(predictions.values()))[1]
    agreement = {
        f"{a}/{b}": _agreement(predictions[a][0], predictions[b][0], labels)
        for a, b in itertools.combinations(classifiers, 2)
    }
    results = {"pairs": pairs, "agreement": agreement, "test_images": int(len(labels))}
    if jax.process_index() == 0:
        write_json(os.path.join(root, "compare.json"), results)
        text = report(results)
        with open(os.path.join(root, "compare.md"), "w") as f:
            f.write(text + "\n")
        print(text)
    return results


def _predictions(classifier_dir: str, mesh) -> tuple[np.ndarray, np.ndarray]:
    """(predicted classes, labels) of a classifier run's best checkpoint on its test split, in split order."""
    c = config_dict.ConfigDict(ckpt_lib.read_config(classifier_dir))
    model = build_model(c)
    rep = parallel.replicated(mesh)
    params = ckpt_lib.load_best_params(classifier_dir, abstract_params(model, c.dataset.image_size, rep))
    step = functools.partial(classifier.eval_step, model=model, target=c.dataset.target)
    ev = common.jit_eval_step(step, mesh, 1)
    out = per_example(ev, (params,), c, data.open_split(c, "test"), mesh)
    return out["predicted"], out["label"]


def _agreement(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> dict:
    """FastSHAP's subsets of the test images for two classifiers' predictions."""
    right_a, right_b = a == labels, b == labels
    return {
        "both_right": int((right_a & right_b).sum()),
        "only_first_right": int((right_a & ~right_b).sum()),
        "only_second_right": int((~right_a & right_b).sum()),
        "both_wrong": int((~right_a & ~right_b).sum()),
        "same_prediction": int((a == b).sum()),
    }


def _heatmaps(pair_dir: str, root: str, name: str, count: int) -> str:
    """The heatmap grid of a pair's explainer on the first `count` test images; returns its path."""
    run = TrainedRun.load(pair_dir)
    views, inputs, _ = run.examples("test", count)
    phi = np.asarray(run(inputs)["phi"])
    path = os.path.join(root, "heatmaps", f"{name}.png")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_grid(views, phi, run.class_names, path)
    return path


def report(results: dict) -> str:
    """The study's tables (markdown)."""
    lines = [
        "| classifier | surrogate | classifier accuracy | surrogate KL (validation) | KL (test) | surrogate "
        "accuracy, all patches | random coalition | 50% held out | explainer loss (test) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in results["pairs"].values():
        lines.append(
            f"| {p['classifier']} | {p['surrogate']} | {p['classifier_accuracy']:.4f} | "
            f"{p['validation_kl']:.4f} | {p['test_kl']:.4f} | {p['test_accuracy']:.4f} | "
            f"{p['test_accuracy_coalition']:.4f} | {p['test_accuracy_heldout_0.50']:.4f} | "
            f"{p['explainer_test_loss']:.5f} |"
        )
    if results["agreement"]:
        lines += [
            "",
            f"Agreement of the classifiers on the {results['test_images']} test images:",
            "",
            "| classifiers (A/B) | both right | only A right | only B right | both wrong | same prediction |",
            "|---|---|---|---|---|---|",
        ]
        for names, a in results["agreement"].items():
            lines.append(
                f"| {names} | {a['both_right']} | {a['only_first_right']} | {a['only_second_right']} | "
                f"{a['both_wrong']} | {a['same_prediction']} |"
            )
    return "\n".join(lines)
