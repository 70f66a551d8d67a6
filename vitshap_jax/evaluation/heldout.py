"""How well a model predicts with patches held out: KL to the classifier and accuracy, per held-out share.

One definition serves both the surrogate stage's validation (`kl_heldout_0.50` in its results.json) and
the evaluation's curves (each surrogate run, and the classifier itself under each masking strategy): for
each share f of `HELD_OUT_FRACTIONS`, every image gets one coalition with exactly round((1 - f) n)
visible patches, drawn from a key fixed by the image's index in the split (the same coalitions every
epoch and every run), and the model's prediction on it is compared with the classifier's on the full
image. `surrogate_curves` gathers them for the evaluation.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from vitshap_jax import checkpoints as ckpt_lib
from vitshap_jax import losses, parallel, shapley
from vitshap_jax.config import MASKINGS, split_list
from vitshap_jax.data import open_split
from vitshap_jax.data.loader import per_example
from vitshap_jax.errors import StageError
from vitshap_jax.files import absolute, read_json
from vitshap_jax.models import architecture, build_model
from vitshap_jax.shapley.sampling import eval_keys

HELD_OUT_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 0.9)
KEY_SALT = 1  # eval_keys salt of the held-out coalitions (the surrogate's random coalitions share it)


def metric_name(metric: str, fraction: float) -> str:
    """`kl` at 0.5 -> "kl_heldout_0.50", the key in results and curves."""
    return f"{metric}_heldout_{fraction:.2f}"


def fixed_fraction_coalitions(keys, n: int, held_out: float):
    """One coalition per key with exactly round((1 - held_out) * n) visible players: `[B, n]`."""
    visible = round((1 - held_out) * n)
    return jax.vmap(lambda k: shapley.coalitions_of_size(k, jnp.asarray(visible), n))(keys)


def heldout_metrics(model, params, teacher_logits, images, labels, keys, target: str) -> dict:
    """Per image `[B]`: KL(teacher || model) and accuracy with each share of `HELD_OUT_FRACTIONS` of the
    patches held out (`keys [B]`: one per image)."""
    n = (images.shape[1] // model.patch_size) ** 2
    out = {}
    for f in HELD_OUT_FRACTIONS:
        logits = model.apply({"params": params}, images, fixed_fraction_coalitions(keys, n, f))
        out[metric_name("kl", f)] = losses.kl_from_logits(teacher_logits, logits, target)
        out[metric_name("accuracy", f)] = (losses.predictions(logits, target) == labels).astype(jnp.float32)
    return out


def heldout_step(params, classifier_params, batch, *, model, classifier, target: str, seed: int) -> dict:
    """`heldout_metrics` of `model` for a batch of a split, the teacher being `classifier` on the full
    images; jit it with `stages.common.jit_eval_step`-style shardings or plain `jax.jit`."""
    teacher = classifier.apply({"params": classifier_params}, batch["image"])
    keys = eval_keys(seed, batch["index"], salt=KEY_SALT)
    return heldout_metrics(model, params, teacher, batch["image"], batch["label"], keys, target)


def surrogate_curves(config, run, classifier, classifier_params, mesh) -> dict:
    """KL and accuracy against the held-out share for each surrogate run (`run.surrogate_dir` and
    `config.extra_surrogates`, read from their results.json) and, as reference lines, for the classifier
    itself under each masking strategy (computed here on `config.split` of the run's dataset)."""
    split = config.split if config.split != "train" else "validation"  # what a surrogate run reports
    kl, acc = {}, {}
    for path in [run.surrogate_dir] + [absolute(d) for d in split_list(config.extra_surrogates)]:
        results_file = os.path.join(path, "results.json")
        if not os.path.exists(results_file):
            raise StageError(f"{path} has no results.json: is it a finished surrogate run?")
        test = read_json(results_file)[split]
        masking = ckpt_lib.read_config(path)["model"]["masking"]
        name = f"surrogate, {masking} ({os.path.basename(os.path.dirname(path)) or path})"
        if name in kl:  # another run in a folder of the same name
            name = f"surrogate, {masking} ({path})"
        kl[name] = [test[metric_name("kl", f)] for f in HELD_OUT_FRACTIONS]
        acc[name] = [test[metric_name("accuracy", f)] for f in HELD_OUT_FRACTIONS]
    source = open_split(run.config, config.split)
    c_params = jax.device_put(classifier_params, parallel.replicated(mesh))
    classifier_config = run.classifier_config
    for masking in MASKINGS[architecture(classifier_config)]:
        model = build_model(classifier_config, masking=masking)
        step = jax.jit(
            functools.partial(
                heldout_step, model=model, classifier=classifier, target=run.target, seed=config.seed
            )
        )
        out = per_example(step, (c_params, c_params), run.config, source, mesh)
        name = f"classifier, {masking} masking (no fine-tuning)"
        kl[name] = [float(out[metric_name("kl", f)].mean()) for f in HELD_OUT_FRACTIONS]
        acc[name] = [float(out[metric_name("accuracy", f)].mean()) for f in HELD_OUT_FRACTIONS]
    return {"fractions": [float(f) for f in HELD_OUT_FRACTIONS], "kl": kl, "accuracy": acc}
