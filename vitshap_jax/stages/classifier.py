"""Stage 1: fine-tune a ViT classifier (cross-entropy, or BCE with one logit for a binary target).

With `config.train.mask_patches=True` it trains on random coalitions from the start (a size uniform in
0..n, then a uniform coalition of that size), the reference's `training_classifier_masked`, so that
the classifier can serve directly as its own surrogate.

Validation: loss and accuracy (plus AUROC for a binary target); the best checkpoint has the highest
accuracy. The test split is evaluated with the best parameters at the end (`results.json`).

`retrain` trains the same classifier on in-memory arrays: ROAR's retraining on images with patches
removed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vitshap_jax import losses, parallel, shapley
from vitshap_jax.data.loader import per_example
from vitshap_jax.models import build_model, load_pretrained_into, num_patches
from vitshap_jax.stages import common
from vitshap_jax.train.loop import Task


def train_step(state, batch, *, model, tx, target: str, seed: int, mask_patches: bool):
    rng = jax.random.fold_in(jax.random.key(seed), state["step"])
    k_dropout, k_mask = jax.random.split(rng)
    images, labels = batch["image"], batch["label"]
    masks = None
    if mask_patches:
        masks = shapley.uniform_size_coalitions(
            k_mask, (images.shape[0],), num_patches(images.shape[1], model.patch_size)
        )

    def loss_fn(params):
        logits = model.apply({"params": params}, images, masks, train=True, rngs={"dropout": k_dropout})
        return jnp.mean(losses.classification_loss(logits, labels, target)), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    new_state = common.apply_gradients(state, grads, tx)
    accuracy = jnp.mean(losses.predictions(logits, target) == labels)
    return new_state, {"loss": loss, "accuracy": accuracy}


def eval_step(params, batch, *, model, target: str):
    logits = model.apply({"params": params}, batch["image"])
    predicted = losses.predictions(logits, target)
    return {
        "loss": losses.classification_loss(logits, batch["label"], target),
        "correct": (predicted == batch["label"]).astype(jnp.float32),
        "predicted": predicted,
        "score": losses.scores(logits, target),
    }


def summarize(out: dict, target: str) -> dict:
    metrics = {"loss": float(out["loss"].mean()), "accuracy": float(out["correct"].mean())}
    if target == "binary":
        from sklearn.metrics import roc_auc_score

        labels = out["label"]
        metrics["auroc"] = (
            float(roc_auc_score(labels, out["score"])) if 0 < labels.sum() < len(labels) else float("nan")
        )
    return metrics


def run(config, workdir: str, mesh, *, stop_after: int | None = None) -> dict:
    common.resolve(config)
    splits = common.open_splits(config, mesh)  # every check before anything is written
    path = common.stage_dir(workdir, "classifier", config)
    target = config.dataset.target
    model = build_model(config)
    sample = jnp.zeros((1, config.dataset.image_size, config.dataset.image_size, 3))
    params = model.init(jax.random.key(config.seed), sample)["params"]
    if config.model.pretrained:
        params = load_pretrained_into(config, params)
    params = jax.device_put(params, parallel.replicated(mesh))
    tx = common.make_optimizer(config, common.total_steps(config, len(splits["train"])))
    state = common.create_state(params, tx, mesh, config.optim.get("ema_decay", 0.0))
    step = common.jit_train_step(
        functools.partial(
            train_step,
            model=model,
            tx=tx,
            target=target,
            seed=config.seed,
            mask_patches=config.train.mask_patches,
        ),
        mesh,
    )
    ev = common.jit_eval_step(functools.partial(eval_step, model=model, target=target), mesh, 1)

    def evaluate(state, split):
        return summarize(per_example(ev, (common.model_params(state),), config, splits[split], mesh), target)

    task = Task(state, step, evaluate, ("accuracy", "max"), common.model_params)
    return common.train_and_test(task, config, path, mesh, splits, stop_after=stop_after)


def retrain(classifier_config, train, test, *, epochs: int, batch_size: int, seed: int, mesh) -> float:
    """Trains a fresh classifier (the architecture, init and optimizer of `classifier_config`, a
    classifier run's config) on in-memory `train` = (images, labels) for `epochs` epochs, without
    augmentation or masking, and returns its accuracy on `test`. ROAR's retraining
    (`commands/roar.py`)."""
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
    params = jax.device_put(params, parallel.replicated(mesh))
    state = common.create_state(params, tx, mesh, c.optim.get("ema_decay", 0.0))
    step = common.jit_train_step(
        functools.partial(train_step, model=model, tx=tx, target=target, seed=seed, mask_patches=False),
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
        return losses.predictions(model.apply({"params": params}, x), target)

    test_images, test_labels = test
    predicted = np.concatenate(
        [
            np.asarray(predict(common.model_params(state), test_images[s : s + batch_size]))
            for s in range(0, len(test_images), batch_size)
        ]
    )
    return float((predicted == test_labels).mean())
