"""Stage 3: train the explainer against the frozen surrogate with the Shapley weighted-least-squares loss
(or, as an option, by stochastic amortization).

The explainer is a ViT backbone with an explainer head (`models/explainer_head.py`), or with
`explainer.architecture=unet` FastSHAP's UNet (`models/unet.py`). The backbone starts from the
surrogate's best parameters (its classification head dropped) when they share the architecture (else
from `config.model.pretrained` or fresh), the head from scratch. The surrogate may be any model a
surrogate stage trains (a ViT, a ResNet). For each image: phi_raw = explainer(x); v(all)
and v(empty) come from the surrogate (same masking strategy as the surrogate run); phi is made
efficient (`sum_i phi_i = v(all) - v(empty)`); `num_coalitions` coalitions are drawn from the Shapley
kernel (paired: each with its complement), the surrogate is evaluated on all of them as one
vectorized (`vmap`) batch inside the jitted step, and the loss is
`n * mean((v(empty) + 1_S . phi - v(S))^2)`. `freeze_backbone` trains the head only. With paired
sampling and attention masking, each coalition and its complement (and v(all) with v(empty)) run as one
sequence of n + 2 tokens (`explainer.packed`, `models/vit.py`): the same values at about half the cost.

`explainer.sampler="reference_compat"` draws the coalitions as the reference implementation does
(`shapley/sampling.py`: not exactly the Shapley kernel). `explainer.signal` picks the training signal:
"wls" (the loss above, the default), or stochastic amortization (Covert et al., 2024;
`shapley/amortized.py`): regress phi on a noisy unbiased estimate of the Shapley values computed in the
step from the same surrogate evaluations, `mean((phi - t)^2)`, with t the unbiased KernelSHAP estimate
from the step's kernel coalitions ("kernelshap") or antithetic permutation sampling with as many
permutation pairs as `num_coalitions` evaluations pay for ("permutation", 2 (n - 1) each). See
docs/explainer_training.md for the comparison at equal compute. "precomputed" is stochastic amortization
with fixed labels: before training, the standard KernelSHAP estimate of every training image
(`target_evals` evaluations each, `precompute_targets`, saved in the stage directory as
`targets.npz`), then `mean((phi - t)^2)` with each image's own estimate in every epoch (kept on the
host, each batch carrying its images' estimates to the devices: `data.loader.WithTargets`); the training
images are then read without augmentation (the estimates are of the images as evaluated) and a step
evaluates the surrogate nowhere (efficiency's v(all) - v(empty) is the target's sum). With
`target_views` = K > 1 the training set is K fixed views of every image (the image and K - 1 random
crops drawn once, `data.loader.FixedViews`), each with its own label: augmentation that keeps its
labels, at K times their cost; an epoch then passes over all K x N views. With `teachers` (finished
explainer runs against the same surrogate) the labels are the mean of their outputs instead:
distillation of an ensemble into one explainer, whose labels cost no surrogate evaluation. With
`extra_images` (a folder) its images follow the training split as more training examples under every
signal: the explainer's targets come from the surrogate, so they need no class.

Validation reports the WLS loss with Shapley-kernel coalitions fixed per image, whatever the signal and
sampler (so it is comparable across them), and the efficiency gap
`max |sum_i phi_i - (v(all) - v(empty))|`. The best checkpoint has the lowest loss.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vitshap_jax import data, losses, parallel, shapley
from vitshap_jax.config import ConfigError
from vitshap_jax.data.loader import FixedViews, WithTargets, per_example
from vitshap_jax.files import absolute
from vitshap_jax.models import (
    build_explainer,
    build_model,
    load_pretrained_into,
    num_patches,
    transfer_params,
)
from vitshap_jax.runs import TrainedRun
from vitshap_jax.shapley import amortized, kernelshap
from vitshap_jax.shapley.game import coalition_values, grand_and_null, surrogate_game
from vitshap_jax.shapley.sampling import SAMPLERS, eval_keys
from vitshap_jax.stages import common
from vitshap_jax.train.loop import Task


def train_step(
    state,
    batch,
    surrogate_params,
    *,
    explainer,
    surrogate,
    tx,
    target,
    seed,
    num_coalitions,
    paired,
    packed,
    signal="wls",
    sampler="shapley",
):
    rng = jax.random.fold_in(jax.random.key(seed), state["step"])
    k_dropout, k_mask = jax.random.split(rng)
    images = batch["image"]
    n = num_patches(images.shape[1], surrogate.patch_size)
    if signal == "permutation" and amortized.permutations_for(num_coalitions, n) < 1:
        raise ConfigError(
            f"config.explainer.num_coalitions={num_coalitions}: signal=permutation needs at least "
            f"{2 * (n - 1)} (one antithetic pair of permutations of {n} players)"
        )
    if signal == "precomputed":  # each image's own estimate (`WithTargets`), efficient: v(all) - v(empty)
        goal = batch["target"]
        total = goal.sum(1)
    else:
        grand, null = grand_and_null(surrogate, surrogate_params, images, target, packed=packed)
        total = grand - null
    if signal == "permutation":  # as many antithetic pairs of orders as num_coalitions evaluations pay for
        game = surrogate_game(surrogate, surrogate_params, target, packed=packed)
        goal = amortized.permutation_target(k_mask, images, null, grand, game, budget=num_coalitions, n=n)
    elif signal != "precomputed":
        masks = SAMPLERS[sampler](k_mask, (images.shape[0],), n, num_coalitions, paired)
        values = coalition_values(
            surrogate, surrogate_params, images, masks, target, paired=paired, packed=packed
        )
        if signal == "kernelshap":
            goal = amortized.kernelshap_target(masks, values, null, total)

    def loss_fn(params):
        phi_raw = explainer.apply({"params": params}, images, train=True, rngs={"dropout": k_dropout})
        phi = shapley.additive_efficient_normalization(phi_raw, total)
        if signal == "wls":
            return jnp.mean(losses.shapley_loss(null, phi, masks, values))
        return jnp.mean(losses.regression_loss(phi, goal))

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    new_state = common.apply_gradients(state, grads, tx)
    return new_state, {"loss": loss}


def eval_step(
    params, surrogate_params, batch, *, explainer, surrogate, target, seed, num_coalitions, paired, packed
):
    images = batch["image"]
    grand, null = grand_and_null(surrogate, surrogate_params, images, target, packed=packed)
    n = num_patches(images.shape[1], surrogate.patch_size)
    keys = eval_keys(seed, batch["index"], salt=2)
    masks = jax.vmap(lambda k: shapley.shapley_kernel_coalitions(k, (), n, num_coalitions, paired))(keys)
    values = coalition_values(
        surrogate, surrogate_params, images, masks, target, paired=paired, packed=packed
    )
    phi = shapley.additive_efficient_normalization(explainer.apply({"params": params}, images), grand - null)
    gap = jnp.max(jnp.abs(phi.sum(1) - (grand - null)), axis=-1)
    return {"loss": losses.shapley_loss(null, phi, masks, values), "efficiency_gap": gap}


TARGETS_FILE = "targets.npz"


def teacher_paths(config) -> list[str]:
    """`config.explainer.teachers` as absolute paths, in the given order."""
    return [absolute(p.strip()) for p in config.explainer.get("teachers", "").split(",") if p.strip()]


def load_teachers(config, surrogate_params, surrogate_config: dict, mesh) -> list[TrainedRun]:
    """The finished explainer runs of `config.explainer.teachers`, their explainers' parameters placed on
    `mesh` and their surrogate parameters this stage's (`surrogate_params`), after checking that
    each explains this stage's game: the same dataset, image size and patches, and a surrogate with the same
    model config and the same parameters as this stage's (`surrogate_params`), so their mean output is an
    estimate of the same Shapley values."""
    teachers = []
    d = config.dataset
    ours = jax.tree.leaves(jax.device_get(surrogate_params))  # fetched once, compared with each teacher's
    shared = jax.device_put(surrogate_params, parallel.replicated(mesh))  # no copy where already placed
    for path in teacher_paths(config):
        run = TrainedRun.load(path)
        field = "config.explainer.teachers"
        shape = (run.config.dataset.name, run.image_size, run.patch_size)
        if shape != (d.name, d.image_size, config.model.patch_size):
            raise common.StageError(
                f"{field}: {path} explains {shape[0]} at {shape[1]} px with {shape[2]} px patches, this "
                f"stage {d.name} at {d.image_size} px with {config.model.patch_size} px patches: give "
                "explainer runs of this dataset and surrogate"
            )
        same = run.surrogate_config.get("model") == surrogate_config.get("model") and all(
            a.shape == b.shape and np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(jax.device_get(run.surrogate_params)), ours, strict=True)
        )
        if not same:
            raise common.StageError(
                f"{field}: {path} was trained against the surrogate in {run.surrogate_dir}, whose model or "
                "parameters differ from this stage's surrogate: a teacher must explain the same game (train "
                "it with --config.upstream at this stage's surrogate)"
            )
        placed = jax.device_put(run.params["explainer"], parallel.replicated(mesh))
        teachers.append(dataclasses.replace(run, params={"explainer": placed, "surrogate": shared}))
    return teachers


def teacher_targets(config, teachers: list[TrainedRun], source, mesh) -> np.ndarray:
    """The mean of the teachers' outputs `[N, n, C]` on every image of `source` (as evaluation reads
    it): efficient for the shared surrogate, as each teacher's is. The efficient normalization is linear
    (it adds `(v(all) - v(empty) - sum_i raw_i) / n` to every player), so the mean of the teachers'
    normalized outputs is the normalization of their mean raw output: the surrogate runs once per image,
    not once per teacher (`load_teachers` checked that they share it)."""
    target, surrogate = config.dataset.target, teachers[0].surrogate

    @jax.jit
    def estimate(surrogate_params, explainer_params, batch):
        images = batch["image"]
        grand, null = grand_and_null(surrogate, surrogate_params, images, target)
        raw = [
            t.explainer.apply({"params": p}, images) for t, p in zip(teachers, explainer_params, strict=True)
        ]
        return {"phi": shapley.additive_efficient_normalization(sum(raw) / len(raw), grand - null)}

    params = [t.params["explainer"] for t in teachers]
    return per_example(estimate, (teachers[0].surrogate_params, params), config, source, mesh)["phi"]


def precompute_targets(config, game, source, mesh, path: str, teachers=()) -> np.ndarray:
    """The labels of `signal="precomputed"` `[N, n, C]` for every image of `source` (the training split,
    or its `FixedViews` with `explainer.target_views` > 1, read as evaluation reads it): the standard
    KernelSHAP estimate under `game`, `config.explainer.target_evals` evaluations each, or with
    `teachers` (`load_teachers`) the mean of their outputs (distillation). KernelSHAP runs in batches of
    `config.train.batch_size` images sharded over the mesh, the surrogate evaluated on
    `num_coalitions / 2` pairs per image at a time (a training step's load).
    Saved as `{path}/targets.npz` (`targets`, `evals` (0 for teachers), `teachers` (their paths, comma-
    separated), and the `seconds` computing them took; process 0, written whole or not at all) and read
    back from there when the stage resumes."""
    e = config.explainer
    file = os.path.join(path, TARGETS_FILE)
    n = num_patches(config.dataset.image_size, config.model.patch_size)
    names = ",".join(teacher_paths(config))

    def source_of(teachers: str, evals: int) -> str:
        if teachers:
            return f"the mean of config.explainer.teachers={teachers}"
        return f"KernelSHAP at config.explainer.target_evals={evals}"

    want = source_of(names, e.target_evals)
    if os.path.exists(file):
        with np.load(file) as saved:
            targets, evals = saved["targets"], int(saved["evals"])
            have = source_of(str(saved["teachers"]) if "teachers" in saved else "", evals)
        if len(targets) == len(source) and targets.shape[1] == n and have == want:
            logging.info("explainer: targets (%s) read back from %s", want, file)
            return targets
        raise common.StageError(
            f"{file} holds {len(targets)} targets of {targets.shape[1]} players from {have}, not "
            f"{len(source)} of {n} (training images x config.explainer.target_views) from {want}: it is a "
            "cache of this run's labels; delete it to compute them again"
        )
    if bool(names) != bool(teachers):
        raise ValueError(f"config.explainer.teachers={e.teachers!r} but {len(teachers)} teachers given")
    start = time.perf_counter()
    if teachers:
        targets = teacher_targets(config, teachers, source, mesh)
    else:
        targets = kernelshap_targets(config, game, source, mesh)
    if jax.process_index() == 0:
        with open(f"{file}.tmp", "wb") as f:
            seconds = np.float64(time.perf_counter() - start)  # for the cost accounting of benchmarks
            evals = np.int64(0 if teachers else e.target_evals)
            np.savez(f, targets=targets, evals=evals, teachers=np.str_(names), seconds=seconds)
        os.replace(f"{file}.tmp", file)
    return targets


def kernelshap_targets(config, game, source, mesh) -> np.ndarray:
    """The standard KernelSHAP estimate of every image of `source` (`precompute_targets`)."""
    e = config.explainer
    n = num_patches(config.dataset.image_size, config.model.patch_size)
    key = jax.random.fold_in(jax.random.key(config.seed), 3)
    numbers = itertools.count()
    batches = -(-len(source) // config.train.batch_size)

    def estimate(batch):
        number = next(numbers)
        logging.info("explainer: KernelSHAP targets, training batch %d / %d", number + 1, batches)
        phi, _ = kernelshap(
            game,
            batch["image"],
            n,
            key=jax.random.fold_in(key, number),
            threshold=None,
            max_evals=e.target_evals,
            pairs_per_step=max(1, e.num_coalitions // 2),
        )
        return {"phi": phi}

    return per_example(estimate, (), config, source, mesh)["phi"]  # in split order, padding removed


def initial_params(config, explainer, surrogate_config: dict, surrogate_params):
    """The explainer's starting point. A ViT explainer's backbone starts as the surrogate's encoder when
    the architectures agree (its heads and pooled-feature norm are not used), else from
    `config.model.pretrained`, else fresh; the head (and a UNet) start fresh."""
    size = config.dataset.image_size
    sample = jnp.zeros((1, size, size, 3))
    params = explainer.init(jax.random.key(config.seed), sample)["params"]
    if config.explainer.get("architecture", "vit") != "vit":
        return params
    if common.same_architecture(config.to_dict(), surrogate_config):
        source = surrogate_params
    elif config.model.pretrained:
        vit = build_model(config)
        source = load_pretrained_into(config, vit.init(jax.random.key(config.seed), sample)["params"])
    else:
        logging.info(
            "explainer: the backbone's shape differs from the surrogate's and no config.model.pretrained "
            "is given; backbone from scratch"
        )
        return params
    backbone, missing = transfer_params(source, params["backbone"])
    if missing:
        raise common.StageError(f"the explainer's backbone lacks {', '.join(missing)} in its source")
    return {**params, "backbone": backbone}


def run(config, workdir: str, mesh, *, stop_after: int | None = None) -> dict:
    common.resolve(config, common.upstream_config(config, workdir, "surrogate"))
    target, e = config.dataset.target, config.explainer
    if e.get("architecture", "vit") == "vit" and config.model.get("architecture", "vit") != "vit":
        raise common.StageError(
            f"a ViT explainer needs a ViT backbone, and config.model is a {config.model.architecture} (from "
            f"{config.model.pretrained or 'the upstream run'}): use --config.explainer.architecture=unet, or "
            "a ViT with model=<variant> (and no ResNet in config.model.pretrained)"
        )
    # The surrogate as it was trained: its own architecture and masking (the game it learned).
    surrogate_params, up, surrogate = common.upstream_params(config, workdir, "surrogate", mesh)
    splits = common.open_splits(config, mesh)  # every check before anything is written
    if e.get("extra_images", ""):  # unlabeled images after the training split (the game needs no class)
        splits = {**splits, "train": data.Concatenated(splits["train"], data.ImageFiles(e.extra_images))}
    views = e.get("target_views", 1)
    if e.signal == "precomputed" and views > 1:  # labels of fixed augmented views (FixedViews)
        d = config.dataset
        train = FixedViews(
            splits["train"],
            views,
            seed=config.seed,
            crop_scale_min=d.crop_scale_min,
            hflip=d.hflip,
            mix=e.get("view_mix", 0.0),
        )
        splits = {**splits, "train": train}
    teachers = load_teachers(config, surrogate_params, up, mesh) if e.signal == "precomputed" else []
    path = common.stage_dir(workdir, "explainer", config, up)  # after every check: nothing written on failure
    explainer = build_explainer(config)
    params = initial_params(config, explainer, up, surrogate_params)
    trainable = None
    if e.freeze_backbone:
        trainable = {k: jax.tree.map(lambda _, keep=(k != "backbone"): keep, v) for k, v in params.items()}
    tx = common.make_optimizer(config, common.total_steps(config, len(splits["train"])), trainable)
    state = common.create_state(params, tx, mesh, config.optim.get("ema_decay", 0.0))
    kw = dict(explainer=explainer, surrogate=surrogate, target=target, seed=config.seed)
    kw |= dict(num_coalitions=e.num_coalitions, paired=e.paired, packed=e.packed)
    signal = dict(signal=e.signal, sampler=e.sampler)  # training only: validation is always the WLS loss
    frozen = (surrogate_params,)
    if e.signal == "precomputed":
        game = surrogate_game(surrogate, surrogate_params, target, packed=e.packed)
        targets = precompute_targets(config, game, splits["train"], mesh, path, teachers)
        splits = {**splits, "train": WithTargets(splits["train"], targets)}  # on the host, sharded per batch
    step = common.jit_train_step(
        functools.partial(train_step, tx=tx, **signal, **kw), mesh, num_frozen=len(frozen)
    )
    ev = common.jit_eval_step(functools.partial(eval_step, **kw), mesh, 2)

    def evaluate(state, split):
        out = per_example(ev, (common.model_params(state), surrogate_params), config, splits[split], mesh)
        return {"loss": float(out["loss"].mean()), "efficiency_gap": float(out["efficiency_gap"].max())}

    augment = e.signal != "precomputed"  # the targets are of the images as evaluation reads them
    task = Task(
        state, lambda s, b: step(s, b, *frozen), evaluate, ("loss", "min"), common.model_params, augment
    )
    return common.train_and_test(task, config, path, mesh, splits, stop_after=stop_after)
