"""The evaluation command: the explainer against ground truth, KernelSHAP budgets and every baseline.

For the first `num_images` images of a split, each with one explained class (its label, or the
classifier's prediction; the positive output for a binary target):

1. ground truth: exact Shapley values of the surrogate's game, or converged KernelSHAP
   (`evaluation/ground_truth.py`);
2. every method of `config.methods` (`evaluation/methods.py`, `evaluation/baselines.py`), timed;
3. per method: error against ground truth (squared and L2 errors only for methods in the game's units),
   insertion/deletion AUC of the surrogate's probability (`evaluation/metrics.py`), seconds per image;
4. surrogate quality: KL and accuracy against the held-out share for each surrogate run and, as
   reference lines, the classifier under each masking strategy (`evaluation/heldout.py`).

Writes `results.json`, `table.md` (printed too), `values.npz` (per image: explained class, ground truth,
every method's scores) and the pictures to `{workdir}/evaluation` (`evaluation/reports.py`,
`evaluation/pictures.py`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vitshap_jax import losses, parallel
from vitshap_jax.errors import StageError
from vitshap_jax.evaluation import heldout, methods, metrics, pictures, reports
from vitshap_jax.evaluation.ground_truth import ground_truth
from vitshap_jax.files import absolute
from vitshap_jax.runs import TrainedRun


def run(config, workdir: str, mesh) -> dict:
    if jax.process_count() > 1:
        raise StageError(
            "the evaluation runs in a single process (on all of its devices): drop --distributed"
        )
    rep = parallel.replicated(mesh)
    trained = TrainedRun.load(workdir, dataset=config.dataset, command="evaluate").placed(rep)
    classifier, classifier_params = trained.classifier(rep)
    out_dir = absolute(config.output_dir or os.path.join(workdir, "evaluation"))
    os.makedirs(out_dir, exist_ok=True)
    n, c = trained.num_players, trained.num_outputs
    batch_ok = config.batch_size % mesh.devices.size == 0
    sharding = parallel.batch_sharding(mesh) if batch_ok else rep

    def put(x):
        return jax.device_put(np.asarray(x), sharding)

    views, images, labels = trained.examples(config.split, config.num_images)
    logits = jax.jit(classifier.apply)({"params": classifier_params}, jnp.asarray(images))
    predicted = np.asarray(losses.predictions(logits, trained.target))
    if c == 1:
        classes = np.zeros_like(labels)  # the single (positive-class) output
    else:
        classes = labels if config.explain_class == "label" else predicted.astype(np.int32)
    fns = methods.method_functions(config, trained, classifier, classifier_params, n)  # checks budgets first
    key = jax.random.key(config.seed)
    game = trained.game()
    logging.info("evaluate: ground truth for %d images (%d patches)", len(images), n)
    truth, gt_info = ground_truth(config, game, images, classes, n, put=put, key=jax.random.fold_in(key, 1))

    scores, rows = {}, {}
    for name, fn in fns.items():
        logging.info("evaluate: %s", name)
        scores[name], seconds = methods.run_batched(
            fn, images, classes, batch_size=config.batch_size, key=jax.random.fold_in(key, 2), put=put
        )
        rows[name] = {"seconds_per_image": seconds} | metrics.method_summary(
            scores[name],
            truth,
            game,
            images,
            classes,
            num_outputs=c,
            top_k=config.top_k,
            key=jax.random.fold_in(key, 3),
            units=methods.in_game_units(name),
        )
    results = {
        "workdir": absolute(workdir),
        "runs": {
            "classifier": trained.classifier_dir,
            "surrogate": trained.surrogate_dir,
            "explainer": trained.explainer_dir,
        },
        "split": config.split,
        "num_images": len(images),
        "players": n,
        "explain_class": config.explain_class if c > 1 else "positive output",
        "top_k": min(config.top_k, n),
        "classifier_accuracy_on_these": float((predicted == labels).mean()),
        "ground_truth": gt_info,
        "methods": rows,
        "surrogate_curves": heldout.surrogate_curves(config, trained, classifier, classifier_params, mesh),
    }
    pictures.save_evaluation_pictures(
        results, out_dir, views, truth, scores, classes, trained.class_names, config.num_heatmaps
    )
    text = reports.table(results)
    reports.write_report(out_dir, results, text, labels=labels, classes=classes, ground_truth=truth, **scores)
    print(text)
    print(f"results: {os.path.join(out_dir, 'results.json')}")
    return results
