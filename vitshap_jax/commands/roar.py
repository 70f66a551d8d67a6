"""The ROAR command, remove and retrain (Hooker et al. 2019): does a method find the patches a model needs?

For every method of `config.methods`, every train and test image is explained (the image's label; the
positive output for a binary target) with the finished pipeline in the workdir. For each fraction k,
the round(k n) highest-ranked patches of every image are set to zero (the dataset mean after
normalization; ties broken at random), a classifier with the run's architecture and optimizer settings
is trained from scratch on the train images for `config.epochs` epochs (no augmentation: the patches
are removed from the fixed evaluation view) and its test accuracy is recorded. k = 0 (nothing removed)
is the shared reference. A lower accuracy at a given k means the method ranked the informative patches
higher. Results are written after every cell; a rerun skips the cells already in `results.json`.

The splits are held in memory as preprocessed arrays: meant for digits-sized data.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import logging
from ml_collections import config_dict

from vitshap_jax import checkpoints as ckpt_lib
from vitshap_jax import parallel
from vitshap_jax.config import fractions as parse_fractions
from vitshap_jax.errors import StageError
from vitshap_jax.evaluation import methods, reports
from vitshap_jax.evaluation.removal import remove_top
from vitshap_jax.files import absolute, read_json, write_json
from vitshap_jax.runs import TrainedRun
from vitshap_jax.stages.classifier import retrain
from vitshap_jax.viz.curves import save_kl_curves


def run(config, workdir: str, mesh) -> dict:
    if jax.process_count() > 1:
        raise StageError("ROAR runs in a single process (on all of its devices): drop --distributed")
    try:
        parallel.check_batch_size(config.batch_size, mesh)
    except ValueError as e:
        raise StageError(str(e)) from None
    rep = parallel.replicated(mesh)
    trained = TrainedRun.load(workdir, dataset=config.dataset, command="roar").placed(rep)
    classifier, classifier_params = trained.classifier(rep)
    classifier_config = config_dict.ConfigDict(ckpt_lib.read_config(trained.classifier_dir))
    out_dir = absolute(config.output_dir or os.path.join(workdir, "roar"))
    os.makedirs(out_dir, exist_ok=True)
    results_file = os.path.join(out_dir, "results.json")
    results = {"accuracy": {}, "seconds": {}}
    if os.path.exists(results_file):
        results = read_json(results_file)
    settings = {"epochs": config.epochs, "seed": config.seed, "run": absolute(workdir)}
    if results.get("settings", settings) != settings:
        raise StageError(
            f"{results_file} holds ROAR results with other settings ({results['settings']}, now {settings}): "
            "use another --config.output_dir, or delete it to start over"
        )
    results["settings"] = settings
    results["fractions"] = [0.0] + parse_fractions(config)

    def save():
        write_json(results_file, results)  # after every cell; never a half-written file

    train, test = (trained.examples(split, views=False)[1:] for split in ("train", "test"))
    kw = dict(epochs=config.epochs, batch_size=config.batch_size, seed=config.seed, mesh=mesh)
    if "reference" not in results["accuracy"]:
        logging.info("roar: reference (nothing removed)")
        results["accuracy"]["reference"] = retrain(classifier_config, train, test, **kw)
        save()
    sharding = parallel.batch_sharding(mesh)
    fns = methods.method_functions(config, trained, classifier, classifier_params, trained.num_players)
    key = jax.random.key(config.seed)
    for name, fn in fns.items():
        row = results["accuracy"].setdefault(name, {})
        todo = [f for f in parse_fractions(config) if f"{f:g}" not in row]
        if not todo:
            continue
        scores, start = {}, time.perf_counter()
        for i, (split, (images, labels)) in enumerate((("train", train), ("test", test))):
            classes = np.zeros_like(labels) if trained.num_outputs == 1 else labels
            scores[split], _ = methods.run_batched(
                fn,
                images,
                classes,
                batch_size=config.batch_size,
                key=jax.random.fold_in(key, i),
                put=lambda x: jax.device_put(np.asarray(x), sharding),
            )
        results["seconds"][name] = time.perf_counter() - start
        for f in todo:
            logging.info("roar: %s, %g of the patches removed", name, f)
            masked = [
                (remove_top(x, scores[split], f, trained.patch_size, jax.random.fold_in(key, 10 + i)), y)
                for i, (split, (x, y)) in enumerate((("train", train), ("test", test)))
            ]
            row[f"{f:g}"] = retrain(classifier_config, masked[0], masked[1], **kw)
            save()
    lines = {
        name: [results["accuracy"]["reference"]] + [row[f"{f:g}"] for f in parse_fractions(config)]
        for name, row in results["accuracy"].items()
        if name != "reference" and name in fns
    }
    save_kl_curves(
        results["fractions"], lines, os.path.join(out_dir, "roar.png"), ylabel="test accuracy (retrained)"
    )
    text = reports.roar_table(results["fractions"], lines)
    reports.write_table(out_dir, text)
    print(text)
    return results
