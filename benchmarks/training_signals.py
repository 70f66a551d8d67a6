"""Explainer training signals compared at equal compute: accuracy against exact Shapley values.

    python benchmarks/training_signals.py --workdir=runs/digits --out=/tmp/signals --epochs=4 --seeds=0,1

For a finished pipeline (only its surrogate and test images are read), trains fresh explainers with
`--config.upstream` at its surrogate, one per configuration and seed, into `{out}/{name}-s{seed}`:

* the WLS objective with the exact Shapley-kernel sampler (the default) at 16, 32 and 64 coalitions per
  image, with 2x, 1x and 0.5x `--epochs`: the same surrogate evaluations in all three;
* the WLS objective with the reference implementation's sampler (`sampler=reference_compat`), 32;
* stochastic amortization (`signal=kernelshap`: unbiased KernelSHAP from the step's 32 or 16 kernel
  coalitions; `signal=permutation`: 1 or 2 antithetic pairs of orders, 2 (n - 1) evaluations each).

These are `--configs=signals` (the default). `--configs=schedules` trains WLS-32 with other learning
rates, a 30% warmup and 2x, 4x, 8x the epochs; `--configs=heads` with 0 or 2 extra head blocks, a
one-layer head MLP, and an MLP of width 1x instead of 4x the hidden size. `--configs=precomputed` trains
WLS-32 and `precomputed`: the standard KernelSHAP estimate of every training image once, with the
surrogate evaluations WLS-32 spends over `--epochs` (34 per epoch), then 100 epochs of regression on them
at lr 1e-3 (its steps evaluate no surrogate, so compare the seconds too); `--configs=precomputed-schedules`
the same with 30 or 300 epochs, or lr 5e-4 or 2e-3 (and 300 epochs at 2e-3), each reusing the labels
of an earlier run with the same seed, budget and views (copied into its directory; its seconds then
exclude computing them); `--configs=precomputed-views` the best of those (300 epochs at 2e-3) against
labels of 4 fixed views per image (`explainer.target_views=4`, the image and 3 random crops), each
view labelled with the whole budget (4x the evaluations) or a quarter of it (the same), 75 epochs over
the views (the same steps), and the latter for 150 epochs (twice the steps), against 8 views sharing
the budget (an eighth each) for 75 epochs (the same twice the steps).
`precomputed-v4shared-e150-lr2e-3-mini` is `precomputed-v4shared-e150-lr2e-3` with a backbone of the
`mini` shape instead of the surrogate's, from scratch; `...-mix5` the same with the extra views blended
with another image (`explainer.view_mix=0.5`), as `precomputed-v8shared-e75-lr2e-3-mix5` with 8 views;
`precomputed-v4shared-e150-lr4e-3` the same at lr 4e-3. `distill-v16-e38-lr2e-3` and
`distill-v32-e38-lr2e-3` distill the explainers given as `--teachers` (`explainer.teachers`: the labels
are the mean of their outputs on 16 or 32 fixed views per image; their evaluations are counted as the
student's) for about the steps of `precomputed-v4shared-e150-lr2e-3`, or twice them. `...-n629` and
`...-n315` train that configuration on the first half or quarter of the training images
(`dataset.train_examples`) for the same steps: the learning curve. `--extra_images=FOLDER` adds a
folder of more images to every configuration's training set (`explainer.extra_images`);
`precomputed-v4shared-e30-lr2e-3` with the 5,000 digits of `mnist_as_digits.py` has the steps of the
150-epoch run (`-e60`: twice them). The warped training digits of `warped_digits.py` serve the same way
(`-e60` on 4 copies, `-e30` on 10, `-e10` on 30: about the same steps; `-e60` and `-e90` on 10 and
`-e30` and `-e40` on 30: two, three and four times them); on 30, `-e10-lr2e-3-mini` and
`-e10-lr2e-3-head3x8` give `-e10` more capacity (the `mini` backbone from scratch; 3 head blocks with
an MLP of 8x the width), and `-e30-lr4e-3` twice the learning rate; `-e20-lr2e-3-mini` is `mini` for
twice the steps, `-e10-lr2e-3-wide192` a backbone 1.5x wider than `mini` (192, 6 heads, MLP 768);
`-e5-lr2e-3-mini` on 60 copies is `mini` at about the steps of `-e10-lr2e-3-mini` on 30.
The groups hold rows named before `--configs=precomputed-views`; later rows are named one by one, and
those sized for the added images (`SIZED_FOR_EXTRA_IMAGES`) warn without them.
`--diagnose` first prints, for the run's own explainer on the first `--images` test and train images,
its MSE, the uniform efficient attribution's and the median correlation with the exact values of the
predicted class, and adds each configuration's MSE on those train images to its row (`train_mse`).
`--ensemble` also scores the mean of all the runs' outputs (every configuration and seed) as one
explainer: with the same configuration and two seeds, how much of the error is the seed's;
`--ensemble_runs` joins finished runs of other folders (e.g. trained on other `--extra_images`) to it.

Every configuration spends `--epochs` x 32 coalition evaluations per training image (permutation with
n = 16 players: 30 per pair, so 6% fewer), plus v(all) and v(empty) in every step. The schedule is the
digits preset's (AdamW, lr 5e-4, cosine) with warmup 10% of the steps. Reported per configuration:
wall-clock seconds of the stage (compilation and per-epoch validation included), surrogate evaluations
per training image, the validation WLS loss of the best checkpoint (Shapley-kernel coalitions, the same
for every signal), and the mean squared error of the explainer's values (every class) against the exact
Shapley values of the surrogate's game on the first `--images` test images (kept in `{out}` with the
KernelSHAP curve, for the next invocation); with the standard
KernelSHAP's error on the same images at doubling budgets (`--kernelshap_seeds` runs each), the budget
at which KernelSHAP matches each explainer (log-log interpolation). The rows (`{out}/results.json`,
which keeps the rows and ensembles of earlier calls into the same `{out}`) also split
the MSE between the test images whose surrogate's top class is below 0.9 (`mse_unsure`: the error of the
digits explainers concentrates there) and the others (`mse_sure`), as the KernelSHAP curve is split too.
A finished run directory is reused (its seconds are read back), so an interrupted benchmark resumes;
one trained with other settings (another `--epochs` or `--extra_images`) or from another surrogate run
is refused, as is one stopped while training (its seconds would miss the start; one stopped after its
labels starts again with them), and an `{out}` that holds another surrogate run's ground truth (its id
in `{out}/surrogate.txt`). `--configs`, `--seeds`, `--teachers`, `--extra_images` and `--ensemble_runs`
are checked before any work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import explainer as explainer_config  # noqa: E402
from vitshap_jax import data, parallel  # noqa: E402
from vitshap_jax.config import VIT_VARIANTS, validate  # noqa: E402
from vitshap_jax.runs import TrainedRun, load_explainer, read_explainer_config  # noqa: E402
from vitshap_jax.shapley import exact_shapley, kernelshap  # noqa: E402
from vitshap_jax.stages import common  # noqa: E402
from vitshap_jax.stages import explainer as explainer_stage  # noqa: E402


def _views(views: int, epochs: int, shared: bool = True, **overrides) -> tuple:
    """Fixed labels of `views` views per image (`explainer.target_views`), sharing wls-32's surrogate
    evaluations (`shared`) or each view with all of them; `epochs` of regression at lr 2e-3."""
    settings = {"optim.lr": 2e-3, "regression_epochs": epochs, "views": views, "shared_budget": shared}
    return ("precomputed", "shapley", 32, 1.0, settings | overrides)


# With a variant named, the explainer stage keeps this shape instead of taking its surrogate's.
_MINI = {"model.variant": "mini"} | {f"model.{key}": value for key, value in VIT_VARIANTS["mini"].items()}

# name: (signal, sampler, coalitions per image per step, epochs as a multiple of --epochs[, overrides])
CONFIGS = {
    "wls-32": ("wls", "shapley", 32, 1.0),
    "wls-16": ("wls", "shapley", 16, 2.0),
    "wls-64": ("wls", "shapley", 64, 0.5),
    "wls-reference-32": ("wls", "reference_compat", 32, 1.0),
    "kernelshap-32": ("kernelshap", "shapley", 32, 1.0),
    "kernelshap-16": ("kernelshap", "shapley", 16, 2.0),
    "permutation-30": ("permutation", "shapley", 30, 1.0),
    "permutation-60": ("permutation", "shapley", 60, 0.5),
    # Schedules: the learning rate, the warmup (a fraction of the steps) and longer runs (more compute).
    "wls-32-lr2e-4": ("wls", "shapley", 32, 1.0, {"optim.lr": 2e-4}),
    "wls-32-lr1e-3": ("wls", "shapley", 32, 1.0, {"optim.lr": 1e-3}),
    "wls-32-lr2e-3": ("wls", "shapley", 32, 1.0, {"optim.lr": 2e-3}),
    "wls-32-warmup30": ("wls", "shapley", 32, 1.0, {"warmup_fraction": 0.3}),
    "wls-32-x2": ("wls", "shapley", 32, 2.0),
    "wls-32-x4": ("wls", "shapley", 32, 4.0),
    "wls-32-x8": ("wls", "shapley", 32, 8.0),
    # The head: extra transformer blocks, MLP depth and width.
    "wls-32-head0": ("wls", "shapley", 32, 1.0, {"explainer.head_blocks": 0}),
    "wls-32-head2": ("wls", "shapley", 32, 1.0, {"explainer.head_blocks": 2}),
    "wls-32-mlp1": ("wls", "shapley", 32, 1.0, {"explainer.mlp_layers": 1}),
    "wls-32-ratio1": ("wls", "shapley", 32, 1.0, {"explainer.mlp_ratio": 1}),
    # Fixed labels: KernelSHAP once per training image with the surrogate evaluations wls-32 spends over
    # --epochs (34 per epoch), then 100 epochs of regression on them (no surrogate evaluations).
    "precomputed": ("precomputed", "shapley", 32, 1.0, {"optim.lr": 1e-3, "regression_epochs": 100}),
    "precomputed-e30": ("precomputed", "shapley", 32, 1.0, {"optim.lr": 1e-3, "regression_epochs": 30}),
    "precomputed-e300": ("precomputed", "shapley", 32, 1.0, {"optim.lr": 1e-3, "regression_epochs": 300}),
    "precomputed-lr5e-4": ("precomputed", "shapley", 32, 1.0, {"optim.lr": 5e-4, "regression_epochs": 100}),
    "precomputed-lr2e-3": ("precomputed", "shapley", 32, 1.0, {"optim.lr": 2e-3, "regression_epochs": 100}),
    "precomputed-e300-lr2e-3": (
        "precomputed",
        "shapley",
        32,
        1.0,
        {"optim.lr": 2e-3, "regression_epochs": 300},
    ),
    # Fixed labels of K fixed views per image (the image and K - 1 random crops, explainer.target_views):
    # 4 views at the budget above each (4x the label cost), or sharing it (a quarter each); 75 epochs
    # over the 4 x N views are the steps of 300 epochs over the images.
    "precomputed-v4-e75-lr2e-3": _views(4, 75, shared=False),
    "precomputed-v4shared-e75-lr2e-3": _views(4, 75),
    "precomputed-v4shared-e150-lr2e-3": _views(4, 150),
    "precomputed-v8shared-e75-lr2e-3": _views(8, 75),
    # A moving average of the parameters (optim.ema_decay) for validation, the checkpoint and the test.
    "wls-32-ema99": ("wls", "shapley", 32, 1.0, {"optim.ema_decay": 0.99}),
    "precomputed-v4shared-e75-lr2e-3-ema999": _views(4, 75, **{"optim.ema_decay": 0.999}),
    # With the views: a larger head (3 extra blocks, MLP 8x wide), dropout, a higher learning rate.
    "precomputed-v4shared-e75-lr2e-3-head3x8": _views(
        4, 75, **{"explainer.head_blocks": 3, "explainer.mlp_ratio": 8}
    ),
    "precomputed-v4shared-e150-lr4e-3-head3x8": _views(
        4, 150, **{"optim.lr": 4e-3, "explainer.head_blocks": 3, "explainer.mlp_ratio": 8}
    ),
    "precomputed-v4shared-e75-lr2e-3-dropout": _views(4, 75, **{"model.dropout_rate": 0.1}),
    "precomputed-v4shared-e75-lr4e-3": _views(4, 75, **{"optim.lr": 4e-3}),
    "precomputed-v4shared-e150-lr4e-3": _views(4, 150, **{"optim.lr": 4e-3}),
    # A larger backbone than the surrogate's (the `mini` preset: width 128, 6 blocks), from scratch.
    "precomputed-v4shared-e150-lr2e-3-mini": _views(4, 150, **_MINI),
    # Extra views blended with a crop of another image (explainer.view_mix): inputs between classes.
    "precomputed-v4shared-e150-lr2e-3-mix5": _views(4, 150, **{"explainer.view_mix": 0.5}),
    "precomputed-v8shared-e75-lr2e-3-mix5": _views(8, 75, **{"explainer.view_mix": 0.5}),
    # Distillation (explainer.teachers = --teachers): the labels are the mean of finished explainers'
    # outputs on 16 or 32 fixed views per image (no surrogate evaluation), about the steps of
    # precomputed-v4shared-e150-lr2e-3 (16 x 38 epochs = 608 image-epochs), or twice them.
    "distill-v16-e38-lr2e-3": _views(16, 38, teachers=True),
    "distill-v32-e38-lr2e-3": _views(32, 38, teachers=True),
    # Learning curve: the first half or quarter of the training images (dataset.train_examples), with
    # twice or four times the epochs (the same steps) and the same labels per image.
    "precomputed-v4shared-e150-lr2e-3-n629": _views(4, 300, **{"dataset.train_examples": 629}),
    "precomputed-v4shared-e150-lr2e-3-n315": _views(4, 600, **{"dataset.train_examples": 315}),
    # With --extra_images of 5,000 more digits (6,257 images): the steps of the 150-epoch run in 30.
    "precomputed-v4shared-e30-lr2e-3": _views(4, 30),
    "precomputed-v4shared-e60-lr2e-3": _views(4, 60),
    "precomputed-v4shared-e120-lr2e-3": _views(4, 120),
    # Its control: the 1,257 digits alone for those steps (twice the 150-epoch run's).
    "precomputed-v4shared-e300-lr2e-3": _views(4, 300),
    # With --extra_images of warped training digits (warped_digits.py): 30 copies (38,967 images) for
    # about the steps of -e30 on 10 copies (13,827 images) and of -e60 on 4 (6,285).
    "precomputed-v4shared-e10-lr2e-3": _views(4, 10),
    # With 10 warped copies: three times the steps of -e30 (-e60 above: twice them).
    "precomputed-v4shared-e90-lr2e-3": _views(4, 90),
    # With 30 warped copies: four times the steps of -e10 (-e30 above: three times them).
    "precomputed-v4shared-e40-lr2e-3": _views(4, 40),
    # With 30 warped copies, the steps of -e10: capacity now that the training images are many (a
    # larger backbone from scratch; the surrogate's with a larger head).
    "precomputed-v4shared-e10-lr2e-3-mini": _views(4, 10, **_MINI),
    "precomputed-v4shared-e10-lr2e-3-head3x8": _views(
        4, 10, **{"explainer.head_blocks": 3, "explainer.mlp_ratio": 8}
    ),
    # With 30 warped copies: -e30 at twice the learning rate (fitting, not generalizing, limits there).
    "precomputed-v4shared-e30-lr4e-3": _views(4, 30, **{"optim.lr": 4e-3}),
    # With 30 warped copies: the mini backbone for twice the steps, and a wider one (192, 6 heads of 32).
    "precomputed-v4shared-e20-lr2e-3-mini": _views(4, 20, **_MINI),
    "precomputed-v4shared-e10-lr2e-3-wide192": _views(
        4, 10, **(_MINI | {"model.hidden_size": 192, "model.num_heads": 6, "model.mlp_dim": 768})
    ),
    # With 60 warped copies: mini for about the steps of -e10-lr2e-3-mini on 30 (twice the images).
    "precomputed-v4shared-e5-lr2e-3-mini": _views(4, 5, **_MINI),
}
# Their epochs are sized for the thousands of images --extra_images adds (MNIST digits, warped copies);
# on the 1,257 training digits alone they train a few hundred steps (a warning says so).
SIZED_FOR_EXTRA_IMAGES = {
    "precomputed-v4shared-e30-lr2e-3",
    "precomputed-v4shared-e60-lr2e-3",
    "precomputed-v4shared-e120-lr2e-3",
    "precomputed-v4shared-e10-lr2e-3",
    "precomputed-v4shared-e90-lr2e-3",
    "precomputed-v4shared-e40-lr2e-3",
    "precomputed-v4shared-e10-lr2e-3-mini",
    "precomputed-v4shared-e10-lr2e-3-head3x8",
    "precomputed-v4shared-e30-lr4e-3",
    "precomputed-v4shared-e20-lr2e-3-mini",
    "precomputed-v4shared-e10-lr2e-3-wide192",
    "precomputed-v4shared-e5-lr2e-3-mini",
}
GROUPS = {
    "signals": [k for k in CONFIGS if not k.startswith(("wls-32-", "precomputed", "distill"))],
    "precomputed": ["wls-32", "precomputed"],
    "precomputed-schedules": [k for k in CONFIGS if k.startswith("precomputed-") and "-v" not in k],
    # Named, not matched: later precomputed-v* rows are sized for --extra_images (SIZED_FOR_EXTRA_IMAGES).
    "precomputed-views": [
        "precomputed-e300-lr2e-3",
        "precomputed-v4shared-e75-lr2e-3",
        "precomputed-v4-e75-lr2e-3",
        "precomputed-v4shared-e150-lr2e-3",
        "precomputed-v8shared-e75-lr2e-3",
    ],
    "schedules": [
        "wls-32",
        *[k for k in CONFIGS if k.startswith(("wls-32-lr", "wls-32-warmup", "wls-32-x"))],
    ],
    "heads": ["wls-32", *[k for k in CONFIGS if k.startswith(("wls-32-head", "wls-32-mlp", "wls-32-ratio"))]],
}
# From about 4n: below, the sampled A is singular or badly conditioned and the error is not monotone.
KERNELSHAP_BUDGETS = (66, 130, 258, 514, 1026, 2050)


def configure(name, seed, args, surrogate_dir):
    """The explainer stage's config of configuration `name` with `seed` under this call's flags."""
    signal, sampler, coalitions, scale, *rest = CONFIGS[name]
    overrides = dict(rest[0]) if rest else {}
    warmup_fraction = overrides.pop("warmup_fraction", 0.1)
    c = explainer_config.get_config("digits")
    c.unlock()
    c.upstream = surrogate_dir
    c.seed = seed
    c.explainer.update(dict(signal=signal, sampler=sampler, num_coalitions=coalitions))
    c.train.epochs = max(1, round(args.epochs * scale))
    views = overrides.pop("views", 1)
    if overrides.pop("teachers", False):
        if not args.teachers:  # resolve_configs says so before any work; this guards other callers
            raise SystemExit(f"--configs={name} distills finished explainers: give those as --teachers")
        c.explainer.teachers = args.teachers
    if signal == "precomputed":  # wls-32's surrogate evaluations, spent before training
        budget = args.epochs * (coalitions + 2) / (views if overrides.pop("shared_budget", False) else 1)
        c.explainer.target_evals = 2 * round(budget / 2)  # per view
        c.explainer.target_views = views
        c.train.epochs = overrides.pop("regression_epochs")
    for key, value in overrides.items():
        section, field = key.split(".")
        c[section][field] = value
    extra = 0
    if args.extra_images:
        c.explainer.extra_images = args.extra_images
        extra = len(data.ImageFiles(args.extra_images))
    steps = common.total_steps(c, ((c.dataset.train_examples or args.train_images) + extra) * views)
    c.optim.warmup_steps = max(1, int(steps * warmup_fraction))
    c.train.log_every_steps = 1000
    validate(c)
    return c


def train(name, seed, args, surrogate_dir, mesh):
    """Trains configuration `name` with `seed` (or reads it back): (run dir, seconds, config)."""
    c = configure(name, seed, args, surrogate_dir)
    path = os.path.join(args.out, f"{name}-s{seed}")
    timing = os.path.join(path, "benchmark_seconds.json")
    if os.path.exists(timing):  # finished: read back, if it is this configuration
        with open(os.path.join(path, "explainer", "config.json")) as f:
            saved = json.load(f)
        changed = [
            d for d in common.settings_diff(as_paths(saved), as_paths(c.to_dict())) if d.startswith(COMPARED)
        ]
        if saved.get("upstream_run_id") != (upstream := surrogate_run_id(surrogate_dir)):
            changed.append(f"upstream_run_id: {saved.get('upstream_run_id')} -> {upstream}")
        if changed:
            raise SystemExit(
                f"{path} holds a run with other settings ({'; '.join(changed)}: another --epochs or "
                "--extra_images than this call's): give another --out, or move that folder away"
            )
        return path, json.load(open(timing))["seconds"], c
    started = os.path.join(path, "explainer", "checkpoints")
    if os.path.isdir(started) and os.listdir(started):
        raise SystemExit(
            f"{path} holds an interrupted run (its checkpoints): resumed, its seconds would count only the "
            f"rest. Delete {started} (and the run's other files but {explainer_stage.TARGETS_FILE}, "
            "whose labels are then read back) to train it again from the start"
        )
    if c.explainer.signal == "precomputed" and not c.explainer.teachers:
        share_labels(c, args.out, seed, path)
    start = time.perf_counter()
    explainer_stage.run(c, path, mesh)
    seconds = time.perf_counter() - start
    json.dump({"seconds": seconds}, open(timing, "w"))
    return path, seconds, c


def as_paths(config: dict) -> dict:
    """`config` with its folder settings (extra images, teachers) as real paths: one folder, one value."""
    e = config["explainer"]
    folders = {
        k: ",".join(os.path.realpath(p) for p in e[k].split(","))
        for k in ("extra_images", "teachers")
        if e.get(k)
    }
    return config | {"explainer": e | folders}


# The settings this benchmark sets per configuration: a finished run is reused only with the same ones.
COMPARED = ("seed:", "train.epochs:", "optim.", "explainer.", "dataset.train_examples:", "model.hidden_size:")


def share_labels(c, out: str, seed: int, path: str) -> None:
    """Copies the KernelSHAP labels of an earlier precomputed run with the same seed, budget and views
    (the same number, blended alike: identical by construction) into `path`, which the stage then reads
    back instead of computing them again. Labels already in `path` (a start stopped after its labels)
    are kept: the stage reads them back and checks them."""
    if os.path.exists(os.path.join(path, "explainer", explainer_stage.TARGETS_FILE)):
        print(f"labels of an earlier start of {path} reused: the seconds below exclude computing them")
        return
    for name, spec in CONFIGS.items():
        source = os.path.join(out, f"{name}-s{seed}", "explainer", explainer_stage.TARGETS_FILE)
        settings = spec[4] if len(spec) > 4 else {}
        same_views = (settings.get("views", 1), settings.get("explainer.view_mix", 0.0)) == (
            c.explainer.target_views,
            c.explainer.view_mix,
        )
        if spec[0] != "precomputed" or not same_views or not os.path.exists(source):
            continue
        with open(os.path.join(os.path.dirname(source), "config.json")) as f:
            if json.load(f)["explainer"].get("extra_images", "") != c.explainer.get("extra_images", ""):
                continue  # labels of other images
        with np.load(source) as saved:
            if int(saved["evals"]) != c.explainer.target_evals:
                continue
        os.makedirs(os.path.join(path, "explainer"), exist_ok=True)
        shutil.copy(source, os.path.join(path, "explainer", explainer_stage.TARGETS_FILE))
        print(f"labels of {name}-s{seed} reused: the seconds below exclude computing them", flush=True)
        return


def ensemble_runs(paths: str, surrogate: str, own=()) -> list[str]:
    """`--ensemble_runs` as real paths, each a finished explainer run of surrogate run `surrogate`
    (checked before any work: their mean with this call's runs is only meaningful for one game), none
    of them twice nor one of this call's runs `own` (it would weigh double)."""
    runs = [os.path.realpath(p) for p in paths.split(",") if p]
    twice = sorted({p for p in runs if runs.count(p) > 1} | (set(runs) & {os.path.realpath(p) for p in own}))
    if twice:
        raise SystemExit(
            f"--ensemble_runs: {', '.join(twice)} given twice (or also by --configs and --seeds)"
        )
    for path in runs:
        config = os.path.join(path, "explainer", "config.json")
        if not os.path.exists(os.path.join(path, "explainer", "results.json")):
            raise SystemExit(
                f"--ensemble_runs: {path} holds no finished explainer run ({path}/explainer/results.json)"
            )
        with open(config) as f:
            upstream = json.load(f).get("upstream_run_id")
        if upstream != surrogate:
            raise SystemExit(
                f"--ensemble_runs: {path} explains surrogate run {upstream}, not {surrogate} (--workdir's): "
                "give runs trained against --workdir's surrogate"
            )
    return runs


def save_results(out: str, curves: dict, rows: list[dict], ensemble: dict) -> None:
    """`{out}/results.json`: the KernelSHAP curves, and this call's rows and ensemble added to those of
    earlier calls into the same `out` (a row of the same configuration and seed, an ensemble of the same
    runs, replaced), so that a call for one seed keeps the rows of the others. Written whole or not at all."""
    file = os.path.join(out, "results.json")
    saved = json.load(open(file)) if os.path.exists(file) else {}
    keys = {(r["name"], r["seed"]) for r in rows}
    kept = [r for r in saved.get("rows", []) if (r["name"], r["seed"]) not in keys]
    older = [saved["ensemble"]] if saved.get("ensemble") else []  # files of before "ensembles"
    earlier = saved.get("ensembles", []) + older
    ensembles = [e for e in earlier if e.get("runs") != ensemble.get("runs")]
    with open(f"{file}.tmp", "w") as f:
        json.dump(
            curves | {"rows": kept + rows, "ensembles": ensembles + ([ensemble] if ensemble else [])},
            f,
            indent=1,
        )
    os.replace(f"{file}.tmp", file)


def evals_per_image(c, n: int) -> int:
    """Surrogate evaluations per training image over the whole run (v(all) and v(empty) included)."""
    e = c.explainer
    if e.get("teachers"):  # the teachers' evaluations (their labels cost none)
        return sum(evals_per_image(read_explainer_config(t), n) for t in e.teachers.split(","))
    if e.signal == "precomputed":
        return e.target_evals * e.target_views
    per_step = (
        e.num_coalitions if e.signal != "permutation" else 2 * (n - 1) * (e.num_coalitions // (2 * (n - 1)))
    )
    return c.train.epochs * (per_step + 2)


def matching_budget(error, curve) -> str:
    """KernelSHAP evaluations at which its MSE equals `error` (log-log interpolation), or the side of
    the budgets tried it lies on."""
    points = sorted(curve.items())
    for (b0, e0), (b1, e1) in zip(points, points[1:], strict=False):
        if e0 >= error >= e1:
            t = np.log(e0 / error) / np.log(e0 / e1)
            return f"{np.exp(np.log(b0) + t * np.log(b1 / b0)):.0f}"
    return f"<{points[0][0]}" if error > points[0][1] else f">{points[-1][0]}"


def exact_in_groups(game, images, n: int, group: int = 32) -> np.ndarray:
    """`exact_shapley` on `group` images at a time (all 128 at once need 27 GB here)."""
    return np.concatenate(
        [np.asarray(exact_shapley(game, images[i : i + group], n)) for i in range(0, len(images), group)]
    )


def diagnose(run, images, truth, split: str) -> str:
    """The finished run's own explainer on `images` against exact values `truth`: its MSE, the MSE of
    the uniform efficient attribution ((v(all) - v(empty)) / n for every patch) and the median per-image
    correlation with the exact values of the class the surrogate predicts."""
    out = run(images)
    phi, gap = np.asarray(out["phi"]), np.asarray(out["v_all"] - out["v_empty"])
    uniform = np.broadcast_to(gap[:, None, :] / truth.shape[1], truth.shape)
    predicted = np.asarray(out["v_all"]).argmax(-1)[:, None, None]
    a, b = (np.take_along_axis(x, predicted, -1)[..., 0] for x in (phi, truth))
    correlation = np.median([np.corrcoef(u, v)[0, 1] for u, v in zip(a, b, strict=True)])
    return (
        f"the run's explainer on {len(images)} {split} images: MSE {((phi - truth) ** 2).mean():.3e}, "
        f"uniform attribution {((uniform - truth) ** 2).mean():.3e}, median correlation (predicted class) "
        f"{correlation:.2f}"
    )


def surrogate_run_id(surrogate_dir: str) -> str:
    """The surrogate run's id (`run_id` in its config.json): retrained in the same folder, it changes."""
    with open(os.path.join(surrogate_dir, "config.json")) as f:
        return json.load(f)["run_id"]


def keep_one_surrogate(out: str, run_id: str) -> None:
    """`out` keeps the exact values and the KernelSHAP curve of one surrogate run's game (its runs train on
    it): its id recorded in `{out}/surrogate.txt` on first use, and another surrogate refused."""
    record = os.path.join(out, "surrogate.txt")
    if os.path.exists(record):
        with open(record) as f:
            theirs = f.read().strip()
        if theirs != run_id:
            raise SystemExit(
                f"--out={out} holds the ground truth and runs of surrogate run {theirs}, not of --workdir's "
                f"surrogate (run {run_id}, retrained or another one): give another --out"
            )
    else:
        with open(record + ".tmp", "w") as f:
            f.write(run_id + "\n")
        os.replace(record + ".tmp", record)


def needs_teachers(name: str) -> bool:
    """Whether configuration `name` distills finished explainers (`--teachers`)."""
    spec = CONFIGS[name]
    return len(spec) > 4 and bool(spec[4].get("teachers"))


def resolve_configs(configs: str, extra_images: str = "", teachers: str = "") -> list[str]:
    """The configuration names of `--configs` (groups expanded, order kept, each once); unknown names
    and a distill-* configuration without `--teachers` stop the benchmark, and a configuration sized for
    `--extra_images` without them is warned about."""
    names = list(dict.fromkeys(n for key in configs.split(",") for n in GROUPS.get(key, [key])))
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(
            f"unknown --configs {', '.join(unknown)}: choose from {', '.join([*CONFIGS, *GROUPS])}"
        )
    if distill := [n for n in names if needs_teachers(n) and not teachers]:
        raise SystemExit(
            f"--configs {', '.join(distill)} distill finished explainers: give those as --teachers"
        )
    short = [n for n in names if n in SIZED_FOR_EXTRA_IMAGES and not extra_images]
    if short:
        print(
            f"warning: {', '.join(short)} are sized for --extra_images (thousands of added images, "
            "e.g. benchmarks/warped_digits.py's); without them they train few steps",
            file=sys.stderr,
        )
    return names


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/digits", help="a finished pipeline (read only)")
    p.add_argument("--out", default="/tmp/training_signals", help="where the explainers are trained")
    p.add_argument("--epochs", type=int, default=4, help="epochs at 32 coalitions per image")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument(
        "--configs",
        default="signals",
        help=f"comma-separated, of {', '.join(CONFIGS)}, or the groups {', '.join(GROUPS)}",
    )
    p.add_argument("--images", type=int, default=32, help="test images with exact ground truth")
    p.add_argument("--kernelshap_seeds", type=int, default=3)
    p.add_argument("--train_images", type=int, default=1257, help="size of the train split (for warmup)")
    p.add_argument(
        "--ensemble",
        action="store_true",
        help="also the mean of all the runs' outputs (every configuration and seed given) as one explainer",
    )
    p.add_argument(
        "--ensemble_runs",
        default="",
        help="comma-separated finished explainer runs of --workdir's surrogate (e.g. {out}/{name}-s{seed} of "
        "another --out, trained on other --extra_images) joined to the --ensemble mean (implies --ensemble)",
    )
    p.add_argument(
        "--teachers",
        default="",
        help="comma-separated finished explainer runs (of --workdir's surrogate) for the distill-* configs",
    )
    p.add_argument(
        "--extra_images",
        default="",
        help="a folder of more training images for every configuration (explainer.extra_images), e.g. "
        "the MNIST digits of benchmarks/mnist_as_digits.py; --out should then be its own folder",
    )
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="also the run's own explainer on train and test images (exact values of the train ones too)",
    )
    args = p.parse_args()
    names = resolve_configs(args.configs, args.extra_images, args.teachers)  # before any work
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds={args.seeds}: give comma-separated integers, e.g. --seeds=0,1") from None
    if args.extra_images and not os.path.isdir(args.extra_images):
        raise SystemExit(f"--extra_images={args.extra_images}: no such folder; give a folder of image files")
    main_run = load_explainer(args.workdir)
    own = [os.path.join(args.out, f"{name}-s{seed}") for name in names for seed in seeds]
    surrogate = surrogate_run_id(main_run.surrogate_dir)
    joined = ensemble_runs(args.ensemble_runs, surrogate, own)
    args.ensemble = args.ensemble or bool(joined)
    os.makedirs(args.out, exist_ok=True)
    keep_one_surrogate(args.out, surrogate)
    game = main_run.game()
    _, images, _ = main_run.examples("test", args.images, views=False)
    images = jnp.asarray(images)
    n = main_run.num_players
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPUs")
    print(f"surrogate: {main_run.surrogate_dir}; {len(images)} test images, {n} players")

    truth_file = os.path.join(args.out, f"truth-{len(images)}.npy")
    if os.path.exists(truth_file):
        truth = np.load(truth_file)
    else:
        start = time.perf_counter()
        truth = exact_in_groups(game, images, n)
        np.save(truth_file, truth)
        print(f"exact Shapley values: {time.perf_counter() - start:.0f} s")

    if args.diagnose:
        print(diagnose(main_run, images, truth, "test"), flush=True)
        _, train_images, _ = main_run.examples("train", args.images, views=False)
        train_images = jnp.asarray(train_images)
        train_file = os.path.join(args.out, f"truth-train-{len(train_images)}.npy")
        if not os.path.exists(train_file):
            np.save(train_file, exact_in_groups(game, train_images, n))
        train_truth = np.load(train_file)
        print(diagnose(main_run, train_images, train_truth, "train"), flush=True)
    unsure = np.asarray(main_run(images)["v_all"]).max(-1) < 0.9
    print(f"{unsure.sum()} of {len(images)} test images with the surrogate's top class below 0.9 (unsure)")
    # The KernelSHAP curve depends only on the images (their truth) and the seeds: kept next to the truth.
    curve_file = os.path.join(args.out, f"kernelshap-{len(images)}-seeds{args.kernelshap_seeds}.json")
    if os.path.exists(curve_file):
        saved = json.load(open(curve_file))
        curve, curve_unsure = ({int(b): e for b, e in saved[k].items()} for k in ("all", "unsure"))
    else:
        curve, curve_unsure = {}, {}
        for budget in KERNELSHAP_BUDGETS:
            errors = []
            for s in range(args.kernelshap_seeds):
                phi, info = kernelshap(
                    game,
                    images,
                    n,
                    key=jax.random.key(100 + s),
                    threshold=None,
                    max_evals=budget,
                    pairs_per_step=64,
                )
                errors.append(((np.asarray(phi) - truth) ** 2).mean((1, 2)))
            curve[info["evals"]] = float(np.mean(errors))
            curve_unsure[info["evals"]] = float(np.mean(errors, 0)[unsure].mean())
        json.dump({"all": curve, "unsure": curve_unsure}, open(curve_file, "w"))
    for evals in curve:
        print(
            f"KernelSHAP (standard) {evals:>5} evaluations: MSE {curve[evals]:.3e} "
            f"(unsure images {curve_unsure[evals]:.3e})",
            flush=True,
        )

    mesh = parallel.make_mesh()
    rows = []
    outputs, members = [], []  # (test phi, train phi) and the run's folder per run, for --ensemble
    for name in names:
        for seed in seeds:
            path, seconds, c = train(name, seed, args, main_run.surrogate_dir, mesh)
            run = TrainedRun.load(path)
            phi = np.asarray(run(images)["phi"])
            per_image = ((phi - truth) ** 2).mean((1, 2))
            mse = float(per_image.mean())  # every image has n x C values
            # The test images the surrogate is unsure about (top class below 0.9) against the others.
            split_mse = dict(
                mse_unsure=float(per_image[unsure].mean()), mse_sure=float(per_image[~unsure].mean())
            )
            train_mse, train_phi = {}, None
            if args.diagnose:  # on training images too: a generalization gap shows here
                train_phi = np.asarray(run(train_images)["phi"])
                train_mse = {"train_mse": float(((train_phi - train_truth) ** 2).mean())}
            outputs.append((phi, train_phi))
            members.append(os.path.realpath(path))
            val = json.load(open(os.path.join(path, "explainer", "results.json")))["validation"]["loss"]
            row = dict(
                name=name,
                seed=seed,
                signal=c.explainer.signal,
                sampler=c.explainer.sampler,
                coalitions=c.explainer.num_coalitions,
                epochs=c.train.epochs,
                evals=evals_per_image(c, n),
                seconds=seconds,
                val_wls=val,
                mse=mse,
                kernelshap_evals=matching_budget(mse, curve),
                **split_mse,
                **train_mse,
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    ensemble = {}
    mses = [r["mse"] for r in rows]
    for path in joined:  # finished runs of other folders: scored as members, not trained
        run = TrainedRun.load(path)
        phi = np.asarray(run(images)["phi"])
        outputs.append((phi, np.asarray(run(train_images)["phi"]) if args.diagnose else None))
        members.append(path)
        mses.append(float(((phi - truth) ** 2).mean()))
        print(f"{path} (--ensemble_runs): test MSE {mses[-1]:.3e}", flush=True)
    if args.ensemble and len(outputs) > 1:
        # Each member is efficient for the same surrogate, so their mean is too: one explainer that
        # costs len(outputs) forward passes.
        phi = np.mean([o[0] for o in outputs], axis=0)
        ensemble = dict(members=len(outputs), runs=members, mse=float(((phi - truth) ** 2).mean()))
        ensemble["kernelshap_evals"] = matching_budget(ensemble["mse"], curve)
        if args.diagnose:
            train_phi = np.mean([o[1] for o in outputs], axis=0)
            ensemble["train_mse"] = float(((train_phi - train_truth) ** 2).mean())
        print(
            f"the mean of the {len(outputs)} runs' outputs: test MSE {ensemble['mse']:.3e} (the runs' mean "
            f"{np.mean(mses):.3e}), KernelSHAP evaluations to match {ensemble['kernelshap_evals']}"
            + (f", train MSE {ensemble['train_mse']:.3e}" if args.diagnose else ""),
            flush=True,
        )
    save_results(args.out, {"kernelshap": curve, "kernelshap_unsure": curve_unsure}, rows, ensemble)

    print(
        "\n| configuration | signal | sampler | coalitions | epochs | evaluations / image | seconds | "
        "val. WLS loss | MSE vs exact (x1e-3) | mean MSE (x1e-3) | KernelSHAP evals to match |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["name"] for r in rows):
        group = [r for r in rows if r["name"] == name]
        first = group[0]

        def spread(key, fmt, scale=1.0, group=group):
            return " / ".join(format(r[key] * scale, fmt) for r in group)

        print(
            f"| {name} | {first['signal']} | {first['sampler']} | {first['coalitions']} | "
            f"{first['epochs']} | {first['evals']:,} | {spread('seconds', '.0f')} | "
            f"{spread('val_wls', '.4f')} | {spread('mse', '.3f', 1e3)} | "
            f"{np.mean([r['mse'] for r in group]) * 1e3:.3f} | "
            f"{' / '.join(r['kernelshap_evals'] for r in group)} |"
        )


if __name__ == "__main__":
    main()
