"""The evaluation run: the explainer against ground truth, KernelSHAP budgets and every baseline.

For the first `num_images` images of a split, each with one explained class (its label, or the
classifier's prediction; the positive output for a binary target):

1. ground truth: exact Shapley values of the surrogate's game (all 2^n coalitions) when n <= 20, else
   the standard paired KernelSHAP (or antithetic permutation sampling) run until its standard error is
   below `ground_truth_threshold` of the values' range;
2. every method of `config.methods` (`vitshap_jax/baselines.py`): removal-based ones query the
   surrogate's game (as ViT-Shapley does), gradient- and attention-based ones the classifier;
3. per method: error against ground truth (`evaluation.metrics.estimate_errors`; squared and L2 errors
   only for methods in the game's units), insertion/deletion AUC of the surrogate's probability, and
   seconds per explained image (after compilation, batches of `batch_size` on all devices);
4. surrogate quality: KL(classifier || model) and accuracy against the held-out fraction for each
   surrogate run (the pipeline's and `extra_surrogates`) and, as reference lines, for the classifier
   itself under each masking strategy.

Writes `results.json`, `table.md` (printed too), `values.npz` (per image: explained class, ground truth,
every method's scores) and the pictures to `{workdir}/evaluation`.
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

from vitshap_jax import baselines, parallel
from vitshap_jax import checkpoints as ckpt_lib
from vitshap_jax.config import budgets, num_outputs, split_list
from vitshap_jax.data import open_split
from vitshap_jax.evaluation.metrics import estimate_errors, insertion_deletion
from vitshap_jax.explain import load_explainer
from vitshap_jax.models import build_model, num_patches
from vitshap_jax.shapley.exact import exact_shapley
from vitshap_jax.shapley.game import surrogate_game
from vitshap_jax.shapley.kernelshap import kernelshap
from vitshap_jax.shapley.permutation import evals_per_pair, permutation_shapley
from vitshap_jax.stages import common
from vitshap_jax.stages.classifier import predictions
from vitshap_jax.stages.surrogate import HELD_OUT_FRACTIONS
from vitshap_jax.stages.surrogate import eval_step as surrogate_eval_step
from vitshap_jax.viz.curves import save_insertion_deletion, save_kl_curves
from vitshap_jax.viz.heatmaps import save_explanation

EXACT_MAX_PLAYERS = 20
HEATMAP_COLUMNS = 6  # panels per row of the method comparison figures
# Methods whose values are in the game's units (comparable to Shapley values by squared error).
VALUE_SCALE = ("explainer", "kernelshap", "permutation", "leave_one_out")


def load_classifier(loaded):
    """(model, best params) of the classifier the surrogate was distilled from."""
    up = ckpt_lib.read_config(loaded.surrogate_dir)
    path = up.get("upstream") or os.path.join(os.path.dirname(loaded.surrogate_dir), "classifier")
    if not os.path.exists(os.path.join(path, ckpt_lib.CONFIG_FILE)):
        raise common.StageError(
            f"the surrogate in {loaded.surrogate_dir} was trained from {path}, which is missing"
        )
    model = build_model(loaded.config, masking="attention")
    sample = jnp.zeros((1, loaded.image_size, loaded.image_size, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), sample)["params"])
    return model, ckpt_lib.load_best_params(path, shapes), path


def first_images(loaded, split: str, count: int):
    """(uint8 views `[N, S, S, 3]`, model inputs `[N, S, S, 3]`, labels `[N]`) of a split's first images."""
    source = open_split(loaded.config, split)
    count = min(count, len(source))
    examples = [source[i] for i in range(count)]
    views = np.stack([loaded.crop(np.asarray(e["image"])) for e in examples])
    inputs = np.stack([loaded.preprocess(np.asarray(e["image"])) for e in examples])
    return views, inputs, np.asarray([int(e["label"]) for e in examples], np.int32)


def method_functions(config, loaded, classifier, classifier_params, n: int) -> dict:
    """{row name: fn(images, classes, key) -> scores [B, n]} for the methods of `config.methods`.

    Parameters are arguments of the jitted functions (not constants compiled into them)."""
    p, target, surrogate = loaded.patch_size, loaded.config.dataset.target, loaded.surrogate
    params = {"classifier": classifier_params, "surrogate": loaded.surrogate_params}

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

    def explainer(images, classes, key):  # loaded.fn is jitted with its parameters as arguments
        phi = loaded(images)["phi"]
        return jnp.take_along_axis(phi, classes[:, None, None], axis=2)[..., 0]

    out = {}
    for name in split_list(config.methods):
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
                    raise common.StageError(
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
    batch runs once before the clock starts)."""
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


def ground_truth(config, game, images, classes, n: int, *, put, key) -> tuple[np.ndarray, dict]:
    """Shapley values of the explained class `[N, n]` and how they were obtained."""
    kind = config.ground_truth
    if kind == "auto":
        kind = "exact" if n <= EXACT_MAX_PLAYERS else "kernelshap"
    values, info = [], {"method": kind, "evals_per_image": 2**n if kind == "exact" else 0, "converged": 1.0}
    if kind == "kernelshap":
        info["method"] = f"kernelshap ({config.kernelshap_estimator})"
    start, converged = time.perf_counter(), []
    size = config.batch_size
    for s in range(0, len(images), size):
        chunk = images[s : s + size]
        x = put(pad_rows(chunk, size))
        if kind == "exact":
            phi = exact_shapley(game, x, n)
        else:
            estimate = kernelshap if kind == "kernelshap" else permutation_shapley
            options = {"estimator": config.kernelshap_estimator} if kind == "kernelshap" else {}
            phi, est = estimate(
                game,
                x,
                n,
                key=jax.random.fold_in(key, s),
                threshold=config.ground_truth_threshold,
                max_evals=config.ground_truth_max_evals,
                **options,
            )
            info["evals_per_image"] = max(info["evals_per_image"], est["evals"])
            converged += list(np.asarray(est["converged"])[: len(chunk)])
        c = classes[s : s + size]
        values.append(np.take_along_axis(np.asarray(phi)[: len(chunk)], c[:, None, None], axis=2)[..., 0])
    info["seconds_per_image"] = (time.perf_counter() - start) / len(images)
    if converged:
        info["converged"] = float(np.mean(converged))
    return np.concatenate(values), info


def _mean_sem(x) -> tuple[float, float]:
    x = np.asarray(x, np.float64).ravel()
    x = x[np.isfinite(x)]
    if not len(x):
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def surrogate_curves(config, loaded, classifier, classifier_params, mesh) -> dict:
    """KL and accuracy against the held-out fraction: each surrogate run (from its results.json) and the
    classifier itself under each masking strategy (computed on the split)."""
    fractions = [float(f) for f in HELD_OUT_FRACTIONS]
    kl, acc = {}, {}
    runs = [loaded.surrogate_dir] + [
        os.path.abspath(os.path.expanduser(d)) for d in split_list(config.extra_surrogates)
    ]
    for path in runs:
        results_file = os.path.join(path, "results.json")
        if not os.path.exists(results_file):
            raise common.StageError(f"{path} has no results.json: is it a finished surrogate run?")
        with open(results_file) as f:
            test = json.load(f)[config.split if config.split != "train" else "validation"]
        masking = ckpt_lib.read_config(path)["model"]["masking"]
        name = f"surrogate, {masking} ({os.path.basename(os.path.dirname(path)) or path})"
        if name in kl:  # another run in a folder of the same name
            name = f"surrogate, {masking} ({path})"
        kl[name] = [test[f"kl_heldout_{f:.2f}"] for f in fractions]
        acc[name] = [test[f"accuracy_heldout_{f:.2f}"] for f in fractions]
    source = open_split(loaded.config, config.split)
    rep = parallel.replicated(mesh)
    c_params = jax.device_put(classifier_params, rep)
    for masking in ("attention", "zero"):
        model = build_model(loaded.config, masking=masking)
        step = jax.jit(
            lambda p, c, b, model=model: surrogate_eval_step(
                p,
                c,
                b,
                model=model,
                classifier=classifier,
                target=loaded.config.dataset.target,
                seed=config.seed,
            )
        )
        out = common.per_example(step, (c_params, c_params), loaded.config, source, mesh)
        name = f"classifier, {masking} masking (no fine-tuning)"
        kl[name] = [float(out[f"kl_heldout_{f:.2f}"].mean()) for f in fractions]
        acc[name] = [float(out[f"accuracy_heldout_{f:.2f}"].mean()) for f in fractions]
    return {"fractions": fractions, "kl": kl, "accuracy": acc}


COLUMNS = (
    ("mse", "MSE vs truth", "{:.2e}"),
    ("pearson", "Pearson", "{:.3f}"),
    ("spearman", "Spearman", "{:.3f}"),
    ("overlap", "top-k overlap", "{:.3f}"),
    ("insertion_auc", "insertion AUC (higher better)", "{:.3f}"),
    ("deletion_auc", "deletion AUC (lower better)", "{:.3f}"),
    ("seconds_per_image", "s / image", "{:.2g}"),
)


def table(results: dict) -> str:
    """The comparison as a markdown table (one row per method)."""
    gt = results["ground_truth"]
    lines = [
        f"{results['num_images']} {results['split']} images, {results['players']} patches; explained class: "
        f"{results['explain_class']}; ground truth: {gt['method']} ({gt['evals_per_image']:,} evaluations, "
        f"{gt['seconds_per_image']:.2g} s per image); top-k with k = {results['top_k']}",
        "",
        "| method | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for name, m in results["methods"].items():
        cells = [
            fmt.format(m[key]) if m.get(key) is not None and np.isfinite(m[key]) else "n/a"
            for key, _, fmt in COLUMNS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(config, workdir: str, mesh) -> dict:
    if jax.process_count() > 1:
        raise common.StageError(
            "the evaluation runs in a single process (on all of its devices): drop --distributed"
        )
    loaded = load_explainer(workdir)
    run_config = loaded.config
    if run_config.dataset.name != config.dataset:
        raise common.StageError(
            f"the run in {workdir} was trained on {run_config.dataset.name}, not {config.dataset}: "
            f"use configs/evaluate.py:{run_config.dataset.name}"
        )
    classifier, classifier_params, classifier_dir = load_classifier(loaded)
    out_dir = os.path.abspath(os.path.expanduser(config.output_dir or os.path.join(workdir, "evaluation")))
    os.makedirs(os.path.join(out_dir, "heatmaps"), exist_ok=True)
    target = run_config.dataset.target
    n = num_patches(loaded.image_size, loaded.patch_size)
    devices = mesh.devices.size
    sharding = (
        parallel.batch_sharding(mesh) if config.batch_size % devices == 0 else parallel.replicated(mesh)
    )

    def put(x):
        return jax.device_put(np.asarray(x), sharding)

    rep = parallel.replicated(mesh)
    classifier_params = jax.device_put(classifier_params, rep)
    loaded.params = jax.device_put(loaded.params, rep)
    game = surrogate_game(loaded.surrogate, loaded.surrogate_params, target)

    views, images, labels = first_images(loaded, config.split, config.num_images)
    predicted = np.asarray(
        predictions(
            jax.jit(lambda x: classifier.apply({"params": classifier_params}, x))(jnp.asarray(images)), target
        )
    )
    if num_outputs(run_config) == 1:
        classes = np.zeros_like(labels)  # the single (positive-class) output
    else:
        classes = labels if config.explain_class == "label" else predicted.astype(np.int32)
    fns = method_functions(config, loaded, classifier, classifier_params, n)  # checks budgets first
    key = jax.random.key(config.seed)
    logging.info("evaluate: ground truth for %d images (%d patches)", len(images), n)
    truth, gt_info = ground_truth(config, game, images, classes, n, put=put, key=jax.random.fold_in(key, 1))

    scores, methods = {}, {}
    id_key = jax.random.fold_in(key, 3)
    c = num_outputs(run_config)
    for name, fn in fns.items():
        logging.info("evaluate: %s", name)
        s, seconds = run_batched(
            fn, images, classes, batch_size=config.batch_size, key=jax.random.fold_in(key, 2), put=put
        )
        scores[name] = s
        errors = estimate_errors(s[..., None], truth[..., None], k=config.top_k)
        full = np.zeros((len(s), n, c), np.float32)
        full[np.arange(len(s)), :, classes] = s
        curves = insertion_deletion(game, jnp.asarray(images), full, jnp.asarray(classes), key=id_key)
        row = {"seconds_per_image": seconds}
        for metric, values in errors.items():
            key_name = (
                "overlap" if metric.endswith("_overlap") else "sign" if metric.endswith("_sign") else metric
            )
            row[key_name], row[f"{key_name}_sem"] = _mean_sem(values)
        if not any(name.startswith(v) for v in VALUE_SCALE):
            for k in ("mse", "mse_sem", "l2", "l2_sem"):
                row[k] = None  # other units: squared error to Shapley values means nothing
        for kind in ("insertion_auc", "deletion_auc"):
            row[kind], row[f"{kind}_sem"] = _mean_sem(curves[kind])
        row["insertion_curve"] = curves["insertion"].mean(0).tolist()
        row["deletion_curve"] = curves["deletion"].mean(0).tolist()
        methods[name] = row

    curves = surrogate_curves(config, loaded, classifier, classifier_params, mesh)
    results = {
        "workdir": os.path.abspath(workdir),
        "runs": {
            "classifier": classifier_dir,
            "surrogate": loaded.surrogate_dir,
            "explainer": loaded.explainer_dir,
        },
        "split": config.split,
        "num_images": len(images),
        "players": n,
        "explain_class": config.explain_class if c > 1 else "positive output",
        "top_k": min(config.top_k, n),
        "classifier_accuracy_on_these": float((predicted == labels).mean()),
        "ground_truth": gt_info,
        "methods": methods,
        "surrogate_curves": curves,
    }
    _write_pictures(config, results, out_dir, loaded, views, truth, scores, classes)
    text = table(results)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    np.savez(  # per image: the explained class, ground truth and every method's scores [N, n]
        os.path.join(out_dir, "values.npz"), labels=labels, classes=classes, ground_truth=truth, **scores
    )
    print(text)
    print(f"results: {os.path.join(out_dir, 'results.json')}")
    return results


def _budget(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


def _write_pictures(config, results, out_dir, loaded, views, truth, scores, classes):
    curves = results["surrogate_curves"]
    save_kl_curves(curves["fractions"], curves["kl"], os.path.join(out_dir, "kl_curves.png"))
    save_kl_curves(
        curves["fractions"],
        curves["accuracy"],
        os.path.join(out_dir, "accuracy_curves.png"),
        ylabel="accuracy",
    )
    drawn = {
        name: {
            "insertion": np.asarray([m["insertion_curve"]]),
            "deletion": np.asarray([m["deletion_curve"]]),
            "insertion_auc": np.asarray([m["insertion_auc"]]),
            "deletion_auc": np.asarray([m["deletion_auc"]]),
        }
        for name, m in results["methods"].items()
        if name in ("explainer", "leave_one_out", "integrated_gradients", "attention_rollout", "random")
        or name
        == max((k for k in results["methods"] if k.startswith("kernelshap_")), key=_budget, default=None)
    }
    if drawn:
        save_insertion_deletion(drawn, os.path.join(out_dir, "insertion_deletion.png"))
    names = loaded.class_names
    for i in range(min(config.num_heatmaps, len(views))):
        columns = {"ground truth": truth[i], **{name: s[i] for name, s in scores.items()}}
        stacked = np.stack([v / (np.abs(v).max() or 1.0) for v in columns.values()], axis=1)
        label = names[classes[i]] if len(names) > classes[i] else str(classes[i])
        save_explanation(
            views[i],
            stacked,
            names,
            os.path.join(out_dir, "heatmaps", f"{i:03d}_methods.png"),
            titles=[f"{t} ({label}, scaled)" for t in columns],
            columns=HEATMAP_COLUMNS,
        )
        same_units = {"ground truth": truth[i]}
        same_units |= {k: s[i] for k, s in scores.items() if any(k.startswith(v) for v in VALUE_SCALE)}
        save_explanation(
            views[i],
            np.stack(list(same_units.values()), axis=1),
            names,
            os.path.join(out_dir, "heatmaps", f"{i:03d}_shapley.png"),
            titles=[f"{t} ({label})" for t in same_units],
        )
