"""Stage 2: fine-tune the classifier into a surrogate g(x, S) that predicts well with patches held out.

The surrogate has the classifier's architecture and starts from its best checkpoint, unless
`config.model.variant` names another model (`configs/surrogate.py:<dataset>,model=resnet18`): then it
starts from `config.model.pretrained` or from scratch, and is distilled from the classifier all the same
(FastSHAP's finding: another architecture can approximate a classifier better). A ResNet surrogate
holds patches out by input masking (`models/resnet.py`). Each training image gets one coalition (a size
uniform in 0..n, then a uniform coalition of that size); the loss is KL(f(x) || g(x, S)) with f the
frozen classifier on the full image, evaluated in the same jitted step (Bernoulli KL for binary
targets). `config.model.masking` picks attention or zero masking.

Validation reports KL and accuracy with one coalition per image (fixed by the image's index, so epochs
compare), and at fixed held-out fractions (`kl_heldout_0.50` = half the patches held out;
`evaluation/heldout.py`, which the evaluation's curves share). The best checkpoint
has the lowest KL.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging

from vitshap_jax import losses, shapley
from vitshap_jax.data.loader import per_example
from vitshap_jax.evaluation import heldout
from vitshap_jax.models import build_model, load_pretrained_into, num_patches, transfer_params
from vitshap_jax.shapley.sampling import eval_keys
from vitshap_jax.stages import common
from vitshap_jax.train.loop import Task


def train_step(state, batch, classifier_params, *, model, classifier, tx, target: str, seed: int):
    rng = jax.random.fold_in(jax.random.key(seed), state["step"])
    k_dropout, k_mask = jax.random.split(rng)
    images = batch["image"]
    teacher = classifier.apply({"params": classifier_params}, images)
    masks = shapley.uniform_size_coalitions(
        k_mask, (images.shape[0],), num_patches(images.shape[1], model.patch_size)
    )

    def loss_fn(params):
        student = model.apply({"params": params}, images, masks, train=True, rngs={"dropout": k_dropout})
        return jnp.mean(losses.kl_from_logits(teacher, student, target))

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    new_state = common.apply_gradients(state, grads, tx)
    return new_state, {"loss": loss}


def eval_step(params, classifier_params, batch, *, model, classifier, target: str, seed: int):
    images, labels = batch["image"], batch["label"]
    n = num_patches(images.shape[1], model.patch_size)
    teacher = classifier.apply({"params": classifier_params}, images)
    keys = eval_keys(seed, batch["index"], salt=heldout.KEY_SALT)
    masks = jax.vmap(lambda k: shapley.uniform_size_coalitions(k, (), n))(keys)
    logits = model.apply({"params": params}, images, masks)
    out = {
        "kl": losses.kl_from_logits(teacher, logits, target),
        "accuracy": (losses.predictions(logits, target) == labels).astype(jnp.float32),
    }
    return out | heldout.heldout_metrics(model, params, teacher, images, labels, keys, target)


def initial_params(config, model, classifier_config: dict, classifier_params):
    """The surrogate's starting point: the classifier's parameters when the architectures agree (a mask
    channel the classifier lacks starts at zero), else `config.model.pretrained`, else a fresh init."""
    size = config.dataset.image_size
    params = model.init(jax.random.key(config.seed), jnp.zeros((1, size, size, 3)))["params"]
    if common.same_architecture(config.to_dict(), classifier_config):
        params, missing = transfer_params(classifier_params, params)
        if missing:
            raise common.StageError(f"the classifier's checkpoint lacks {', '.join(missing)}")
        if config.model.pretrained:
            logging.info("surrogate: starts from the classifier (same architecture); model.pretrained unused")
        return params
    if config.model.pretrained:
        logging.info(
            "surrogate: another architecture than the classifier's, from %s", config.model.pretrained
        )
        return load_pretrained_into(config, params)
    logging.info(
        "surrogate: another architecture than the classifier's (%s), from scratch", config.model.variant
    )
    return params


def run(config, workdir: str, mesh, *, stop_after: int | None = None) -> dict:
    common.resolve(config, common.upstream_config(config, workdir, "classifier"))
    target = config.dataset.target
    model = build_model(config)
    # The classifier as it was trained, always evaluated on full images.
    classifier_params, up, classifier = common.upstream_params(config, workdir, "classifier", mesh)
    splits = common.open_splits(config, mesh)  # every check before anything is written
    path = common.stage_dir(workdir, "surrogate", config, up)  # after every check: nothing written on failure
    params = initial_params(config, model, up, classifier_params)
    tx = common.make_optimizer(config, common.total_steps(config, len(splits["train"])))
    state = common.create_state(params, tx, mesh, config.optim.get("ema_decay", 0.0))
    step = common.jit_train_step(
        functools.partial(
            train_step, model=model, classifier=classifier, tx=tx, target=target, seed=config.seed
        ),
        mesh,
        num_frozen=1,
    )
    ev = common.jit_eval_step(
        functools.partial(eval_step, model=model, classifier=classifier, target=target, seed=config.seed),
        mesh,
        2,
    )

    def evaluate(state, split):
        out = per_example(ev, (common.model_params(state), classifier_params), config, splits[split], mesh)
        return {k: float(v.mean()) for k, v in out.items() if k != "label"}

    def train_step_with_classifier(state, batch):
        return step(state, batch, classifier_params)

    task = Task(state, train_step_with_classifier, evaluate, ("kl", "min"), common.model_params)
    return common.train_and_test(task, config, path, mesh, splits, stop_after=stop_after)
