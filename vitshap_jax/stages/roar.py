"""ROAR, remove and retrain (Hooker et al. 2019): does a method find the patches a model needs?

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

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import config_dict

from vitshap_jax import checkpoints as ckpt_lib
from vitshap_jax import parallel
from vitshap_jax.config import fractions as parse_fractions
from vitshap_jax.config import num_outputs
from vitshap_jax.data import open_split
from vitshap_jax.evaluation.metrics import importance_order
from vitshap_jax.explain import load_explainer
from vitshap_jax.models import build_model, load_pretrained_into, num_patches
from vitshap_jax.models.vit import patch_mask_to_pixels
from vitshap_jax.stages import classifier as classifier_stage
from vitshap_jax.stages import common
from vitshap_jax.stages.evaluate import load_classifier, method_functions, run_batched
from vitshap_jax.viz.curves import save_kl_curves


def split_arrays(loaded, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Every image of a split as the model sees it in evaluation `[N, S, S, 3]`, and the labels."""
    source = open_split(loaded.config, split)
    examples = [source[i] for i in range(len(source))]
    images = np.stack([loaded.preprocess(np.asarray(e["image"])) for e in examples])
    return images, np.asarray([int(e["label"]) for e in examples], np.int32)


def remove_top(images, scores, fraction: float, patch_size: int, key) -> np.ndarray:
    """`images` with the round(fraction * n) highest-scoring patches of each set to zero."""
    n = scores.shape[1]
    k = round(fraction * n)
    rank = jnp.argsort(importance_order(jnp.asarray(scores), key), axis=-1)  # rank of each patch
    keep = rank >= k
    side = images.shape[1] // patch_size
    return np.asarray(images * patch_mask_to_pixels(keep, (side, side), patch_size))


def retrain(classifier_config, train, test, *, epochs: int, batch_size: int, seed: int, mesh) -> float:
    """Trains a fresh classifier (the run's architecture, init and optimizer) on `train` = (images, labels)
    and returns its accuracy on `test`."""
    c = classifier_config
    target = c.dataset.target
    model = build_model(c)
    params = model.init(jax.random.key(seed), jnp.zeros((1, *train[0].shape[1:])))["params"]
    if c.model.pretrained:
        params = load_pretrained_into(c, params)
    images, labels = train
    steps_per_epoch = len(images) // batch_size
    if steps_per_epoch == 0:
        raise common.StageError(
            f"config.batch_size={batch_size} is larger than the {len(images)} train images"
        )
    tx = common.make_optimizer(c, steps_per_epoch * epochs)
    state = common.create_state(jax.device_put(params, parallel.replicated(mesh)), tx, mesh)
    step = common.jit_train_step(
        functools.partial(
            classifier_stage.train_step, model=model, tx=tx, target=target, seed=seed, mask_patches=False
        ),
        mesh,
    )
    sharding = parallel.batch_sharding(mesh)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(images))
        for s in range(steps_per_epoch):
            rows = order[s * batch_size : (s + 1) * batch_size]
            batch = {"image": images[rows], "label": labels[rows]}
            state, _ = step(state, jax.device_put(batch, sharding))

    @jax.jit
    def predict(params, x):
        return classifier_stage.predictions(model.apply({"params": params}, x), target)

    test_images, test_labels = test
    predicted = np.concatenate(
        [
            np.asarray(predict(state["params"], test_images[s : s + batch_size]))
            for s in range(0, len(test_images), batch_size)
        ]
    )
    return float((predicted == test_labels).mean())


def run(config, workdir: str, mesh) -> dict:
    if jax.process_count() > 1:
        raise common.StageError("ROAR runs in a single process (on all of its devices): drop --distributed")
    parallel.check_batch_size(config.batch_size, mesh)
    loaded = load_explainer(workdir)
    if loaded.config.dataset.name != config.dataset:
        raise common.StageError(
            f"the run in {workdir} was trained on {loaded.config.dataset.name}, not {config.dataset}: "
            f"use configs/roar.py:{loaded.config.dataset.name}"
        )
    classifier, classifier_params, classifier_dir = load_classifier(loaded)
    classifier_config = config_dict.ConfigDict(ckpt_lib.read_config(classifier_dir))
    out_dir = os.path.abspath(os.path.expanduser(config.output_dir or os.path.join(workdir, "roar")))
    os.makedirs(out_dir, exist_ok=True)
    results_file = os.path.join(out_dir, "results.json")
    results = {"accuracy": {}, "seconds": {}}
    if os.path.exists(results_file):
        with open(results_file) as f:
            results = json.load(f)
    settings = {"epochs": config.epochs, "seed": config.seed, "run": os.path.abspath(workdir)}
    if results.get("settings", settings) != settings:
        raise common.StageError(
            f"{results_file} holds ROAR results with other settings ({results['settings']}, now {settings}): "
            "use another --config.output_dir, or delete it to start over"
        )
    results["settings"] = settings
    results["fractions"] = [0.0] + parse_fractions(config)

    def save():
        tmp = results_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, results_file)  # never a half-written file

    rep = parallel.replicated(mesh)
    classifier_params = jax.device_put(classifier_params, rep)
    loaded.params = jax.device_put(loaded.params, rep)
    train, test = split_arrays(loaded, "train"), split_arrays(loaded, "test")
    kw = dict(epochs=config.epochs, batch_size=config.batch_size, seed=config.seed, mesh=mesh)
    if "reference" not in results["accuracy"]:
        logging.info("roar: reference (nothing removed)")
        results["accuracy"]["reference"] = retrain(classifier_config, train, test, **kw)
        save()
    n = num_patches(loaded.image_size, loaded.patch_size)
    sharding = parallel.batch_sharding(mesh)
    fns = method_functions(config, loaded, classifier, classifier_params, n)
    key = jax.random.key(config.seed)
    for name, fn in fns.items():
        row = results["accuracy"].setdefault(name, {})
        todo = [f for f in parse_fractions(config) if f"{f:g}" not in row]
        if not todo:
            continue
        scores, start = {}, time.perf_counter()
        for i, (split, (images, labels)) in enumerate((("train", train), ("test", test))):
            classes = np.zeros_like(labels) if num_outputs(loaded.config) == 1 else labels
            scores[split], _ = run_batched(
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
                (remove_top(x, scores[split], f, loaded.patch_size, jax.random.fold_in(key, 10 + i)), y)
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
    text = table(results["fractions"], lines)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return results


def table(fractions, lines: dict) -> str:
    """Test accuracy of the retrained classifier, one row per method, one column per removed share."""
    header = "| method | " + " | ".join(f"{f:g} removed" for f in fractions) + " |"
    rows = [header, "|---" * (len(fractions) + 1) + "|"]
    rows += [f"| {name} | " + " | ".join(f"{a:.3f}" for a in acc) + " |" for name, acc in lines.items()]
    return "\n".join(rows)
