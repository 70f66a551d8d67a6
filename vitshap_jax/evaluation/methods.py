"""The methods an evaluation compares, and the timed, batched harness that runs them.

`method_functions` maps each name of `config.methods` (configs/evaluate.py, configs/roar.py) to a
function `fn(images [B, S, S, 3], classes [B], key) -> scores [B, n]` of the explained class: the trained
explainer, KernelSHAP and permutation sampling at each budget, and the baselines (`baselines.py`).
Removal-based methods query the surrogate's game (as ViT-Shapley does), gradient- and attention-based
ones the classifier. `run_batched` runs one over many images and times it.
"""

from __future__ import annotations

import functools
import time

import jax
import numpy as np
from absl import logging

from vitshap_jax.config import budgets, split_list
from vitshap_jax.errors import StageError
from vitshap_jax.evaluation import baselines
from vitshap_jax.models import ViT
from vitshap_jax.shapley.game import select_class, surrogate_game
from vitshap_jax.shapley.permutation import evals_per_pair

# Methods whose values are in the game's units (comparable to Shapley values by squared error).
VALUE_SCALE = ("explainer", "kernelshap", "permutation", "leave_one_out")
# Methods that read a transformer's tokens or attention maps: they need a ViT classifier.
VIT_ONLY = ("gradcam", "transformer_attribution", "generic_attention", "attention_rollout", "attention_last")


def in_game_units(name: str) -> bool:
    """Whether a method's scores (a row name such as "kernelshap_256") are in the game's units."""
    return any(name.startswith(v) for v in VALUE_SCALE)


def method_functions(config, run, classifier, classifier_params, n: int) -> dict:
    """{row name: fn(images, classes, key) -> scores [B, n]} for the methods of `config.methods`, with
    `run` a `runs.TrainedRun` and (`classifier`, `classifier_params`) its classifier.

    Parameters are arguments of the jitted functions (not constants compiled into them). Budgets too
    small for one antithetic permutation pair are refused before anything runs."""
    p, target, surrogate = run.patch_size, run.target, run.surrogate
    params = {"classifier": classifier_params, "surrogate": run.surrogate_params}

    def logits(pr):
        return lambda x: classifier.apply({"params": pr["classifier"]}, x)

    def game(pr):
        return surrogate_game(surrogate, pr["surrogate"], target)

    noise = dict(patch_size=p, samples=config.noise_samples, noise=config.noise)
    cores = {
        "leave_one_out": lambda pr, x, c, k: baselines.leave_one_out(game(pr), x, c, n=n),
        "rise": lambda pr, x, c, k: baselines.rise(game(pr), x, c, k, n=n, num_masks=config.rise_masks),
        "integrated_gradients": lambda pr, x, c, k: baselines.integrated_gradients(
            logits(pr), x, c, patch_size=p, steps=config.ig_steps
        ),
        "vanilla_gradient": lambda pr, x, c, k: baselines.vanilla_gradient(logits(pr), x, c, patch_size=p),
        "smoothgrad": lambda pr, x, c, k: baselines.smoothgrad(logits(pr), x, c, k, **noise),
        "vargrad": lambda pr, x, c, k: baselines.vargrad(logits(pr), x, c, k, **noise),
        "gradcam": lambda pr, x, c, k: baselines.gradcam(classifier, pr["classifier"], x, c),
        "transformer_attribution": lambda pr, x, c, k: baselines.transformer_attribution(
            classifier, pr["classifier"], x, c
        ),
        "generic_attention": lambda pr, x, c, k: baselines.generic_attention(
            classifier, pr["classifier"], x, c
        ),
        "attention_rollout": lambda pr, x, c, k: baselines.attention_rollout(classifier, pr["classifier"], x),
        "attention_last": lambda pr, x, c, k: baselines.attention_last(classifier, pr["classifier"], x),
        "random": lambda pr, x, c, k: baselines.random_scores(x, c, k, n=n),
    }

    def explainer(images, classes, key):  # run.fn is jitted with its parameters as arguments
        return select_class(run(images)["phi"], classes)

    out = {}
    for name in split_list(config.methods):
        if name in VIT_ONLY and not isinstance(classifier, ViT):
            logging.warning(
                "config.methods: %s skipped: it reads a ViT's tokens or attention; this run's classifier is "
                "a %s",
                name,
                type(classifier).__name__,
            )
            continue
        if name == "explainer":
            out[name] = explainer
        elif name == "kernelshap":  # a loop of jitted steps; the game carries the parameters
            for b in budgets(config):
                out[f"kernelshap_{b}"] = lambda x, c, k, b=b: baselines.kernelshap_budget(
                    game(params), x, c, k, n=n, evals=b, estimator=config.kernelshap_estimator
                )
        elif name == "permutation":
            for b in budgets(config, "permutation_budgets"):
                if b < 2 + evals_per_pair(n):
                    raise StageError(
                        f"config.permutation_budgets={config.permutation_budgets!r}: one antithetic pair of "
                        f"permutations costs {2 + evals_per_pair(n)} evaluations with {n} patches; give "
                        "budgets at least that large"
                    )
                out[f"permutation_{b}"] = lambda x, c, k, b=b: baselines.permutation_budget(
                    game(params), x, c, k, n=n, evals=b
                )
        else:
            out[name] = functools.partial(jax.jit(cores[name]), params)
    return out


def pad_rows(x, multiple: int) -> np.ndarray:
    """`x` with copies of its first row appended up to a multiple of `multiple` rows (one batch shape)."""
    return np.concatenate([x, np.repeat(x[:1], -len(x) % multiple, 0)])


def run_batched(fn, images, classes, *, batch_size: int, key, put) -> tuple[np.ndarray, float]:
    """Scores `[N, n]` of `fn` over all images in batches, and seconds per explained image. The last batch
    is padded to one shape (its padding counts in the time, not in N); compilation is excluded (the first
    batch runs once before the clock starts). `put` places a batch on the devices."""
    count = images.shape[0]
    images, classes = pad_rows(images, batch_size), pad_rows(classes, batch_size)
    batches = [
        (put(images[s : s + batch_size]), put(classes[s : s + batch_size]), jax.random.fold_in(key, s))
        for s in range(0, len(images), batch_size)
    ]
    jax.block_until_ready(fn(*batches[0]))
    start, outputs = time.perf_counter(), []
    for batch in batches:
        outputs.append(jax.block_until_ready(fn(*batch)))
    seconds = time.perf_counter() - start
    return np.concatenate([np.asarray(o) for o in outputs])[:count], seconds / count
