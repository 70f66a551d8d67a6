"""Seconds to explain one image: the explainer's forward pass vs KernelSHAP run to the same error.

    python benchmarks/explain_vs_kernelshap.py --workdir=runs/digits --images=16

For a finished pipeline: the first `--images` test images, every class. Ground truth: exact Shapley
values of the surrogate's game when n <= 20 players, else the standard KernelSHAP with a large budget
(`--truth_evals`, its own random key; its mean standard error is printed). The explainer's error is the
mean squared error to ground truth (over images, patches and classes). KernelSHAP (`--estimator`:
the standard paired estimator by default, or the unbiased variant; the same surrogate game, pairs of
coalitions in n + 2 tokens) then runs with doubling budgets until its error is at most the explainer's,
and bisection finds the smallest budget (to one step of `--pairs_per_step` pairs) that reaches it. That
budget is then timed again with the search's step and with steps of up to `--timing_pairs` pairs (the
faster counts); the seconds per image of both (compilation excluded, all images in one batch) and their
ratio are printed, measured side by side in one run. With `--seeds`, each budget's error is the mean
over that many KernelSHAP runs (keys 1..seeds), and per image the smallest budget tried whose error is at
most the explainer's on that image is reported (median and range). The same keys are used at every
budget (for the unbiased variant a smaller budget's coalitions are a prefix of a larger one's; the
standard one enumerates more coalition sizes as the budget grows, and below about 5n evaluations its
error is not monotone in the budget: see docs/ground_truth.md).

Last, the explainer's training cost read from its run (train-step minutes from `metrics.jsonl`,
surrogate evaluations) and the break-even: the number of explained images after which training and
running the explainer costs less than KernelSHAP at the explainer's error, by wall-clock and by
surrogate evaluations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vitshap_jax.runs import load_explainer  # noqa: E402
from vitshap_jax.shapley import exact_shapley, kernelshap  # noqa: E402
from vitshap_jax.stages.explainer import TARGETS_FILE  # noqa: E402


def timed(fn, *args, repeats: int = 1):
    out = jax.block_until_ready(fn(*args))  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        out = jax.block_until_ready(fn(*args))
    return out, (time.perf_counter() - start) / repeats


def kernelshap_seconds(game, images, n: int, evals: int, step_pairs: int, estimator: str = "standard"):
    """Seconds per image of KernelSHAP at `evals` evaluations, all `images` in one batch, steps of
    `step_pairs` pairs (key 1; compilation excluded, the mean of 3 runs)."""

    def once():
        return kernelshap(
            game,
            images,
            n,
            key=jax.random.key(1),
            threshold=None,
            max_evals=evals,
            pairs_per_step=step_pairs,
            estimator=estimator,
        )[0]

    return timed(once, repeats=3)[1] / len(images)


def training_cost(loaded) -> tuple[float, int]:
    """(seconds, surrogate evaluations) of the explainer's training: the sum of its logged training
    intervals (metrics.jsonl: steps x batch / examples_per_sec; validation and checkpointing excluded,
    the first interval's compilation included) and the images seen times `num_coalitions` plus v(all)
    and v(empty) (the permutation signal spends up to `num_coalitions`: an upper bound there). With
    `signal=precomputed`, plus the seconds its labels took and their evaluations (training images x
    `target_evals`), read from its targets.npz."""
    config = loaded.config
    seconds, last, resumed = 0.0, 0, False
    with open(os.path.join(loaded.explainer_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "train/examples_per_sec" in record:
                # After a resume the log restarts below the last step: count that interval as one
                # logging period (the repeated steps were spent too).
                steps = record["step"] - last if record["step"] > last else config.train.log_every_steps
                if record["step"] <= last and not resumed:
                    resumed = True
                    print(f"note: the explainer was resumed at step <= {record['step']}; time is approximate")
                seconds += steps * config.train.batch_size / record["train/examples_per_sec"]
                last = max(last, record["step"])
    e = config.explainer
    if e.get("signal") == "precomputed":  # the labels' evaluations and time; its steps evaluate nothing
        with np.load(os.path.join(loaded.explainer_dir, TARGETS_FILE)) as saved:
            return seconds + float(saved["seconds"]), len(saved["targets"]) * int(saved["evals"])
    return seconds, last * config.train.batch_size * (e.num_coalitions + 2)


def break_even(
    train_seconds, train_evals, explainer_seconds, kernelshap_seconds, kernelshap_evals, *, bound=False
) -> str:
    """Images after which training the explainer and explaining beats running KernelSHAP per image
    (`bound`: KernelSHAP did not reach the explainer's error at that budget, so at most that many)."""
    by_time = train_seconds / max(kernelshap_seconds - explainer_seconds, 1e-12)
    by_evals = train_evals / max(kernelshap_evals - 2, 1)  # the explainer needs v(all) and v(empty)
    return (
        f"training the explainer: {train_seconds / 60:.1f} min (logged train steps, plus the labels of "
        f"signal=precomputed), {train_evals:,} surrogate "
        f"evaluations; break-even after {'at most ' if bound else ''}{by_time:,.0f} explained images by "
        f"wall-clock, {'at most ' if bound else ''}{by_evals:,.0f} by surrogate evaluations"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a finished pipeline")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--truth_evals", type=int, default=1 << 18, help="KernelSHAP ground truth budget (n > 20)")
    p.add_argument("--max_budget", type=int, default=1 << 17, help="largest KernelSHAP budget tried")
    p.add_argument("--pairs_per_step", type=int, default=64)
    p.add_argument("--seeds", type=int, default=1, help="KernelSHAP runs per budget (errors averaged)")
    p.add_argument("--estimator", default="standard", choices=["standard", "unbiased"])
    p.add_argument("--timing_pairs", type=int, default=1024, help="pairs per step when timing the result")
    p.add_argument(
        "--truth_file",
        default="",
        help="an .npz to keep the ground truth in: read when it holds this run's surrogate, images and "
        "budget (e.g. while the explainer is retrained), else computed and written",
    )
    args = p.parse_args()
    if args.truth_file:  # np.savez adds the suffix: without it the cache would be written, never read
        if not args.truth_file.endswith(".npz"):
            args.truth_file += ".npz"
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.truth_file))):
            raise SystemExit(f"--truth_file={args.truth_file}: its folder does not exist; create it first")
    loaded = load_explainer(args.workdir)
    game = loaded.game()
    _, images, _ = loaded.examples("test", args.images, views=False)
    images = jnp.asarray(images)
    b, n = len(images), loaded.num_players
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"run: {args.workdir}; {b} test images, {n} players, {len(loaded.class_names)} classes")

    start = time.perf_counter()
    stamp = np.asarray(
        [os.path.abspath(loaded.surrogate_dir), str(b), str(n), str(args.truth_evals), str(jnp.sum(images))]
    )
    cached = np.load(args.truth_file) if args.truth_file and os.path.exists(args.truth_file) else None
    if cached is not None and np.array_equal(cached["stamp"], stamp):
        truth, how = cached["truth"], f"{cached['how']} (read from {args.truth_file})"
    elif n <= 20:
        truth, how = exact_shapley(game, images, n), f"exact ({2**n:,} evaluations per image)"
    else:
        truth, info = kernelshap(
            game,
            images,
            n,
            key=jax.random.key(123),
            threshold=None,
            max_evals=args.truth_evals,
            pairs_per_step=256,
        )
        std = float(np.asarray(info["std_error"]).mean())
        how = f"standard KernelSHAP with {info['evals']:,} evaluations per image, mean std error {std:.2e}"
    truth = np.asarray(truth)
    if args.truth_file and (cached is None or not np.array_equal(cached["stamp"], stamp)):
        np.savez(args.truth_file, truth=truth, how=how, stamp=stamp)
    print(f"ground truth: {how}, {time.perf_counter() - start:.1f} s for all images")

    out, explainer_seconds = timed(loaded, images, repeats=5)
    explainer_seconds /= b
    per_image_error = ((np.asarray(out["phi"]) - truth) ** 2).mean((1, 2))  # [B]
    explainer_error = float(per_image_error.mean())
    print(f"explainer: MSE {explainer_error:.3e}, {explainer_seconds * 1e3:.3f} ms per image")
    tried = {}  # evaluations -> per-image MSE [B] (mean over seeds)

    pairs = args.pairs_per_step

    def run(steps):  # KernelSHAP with `steps` steps of `pairs` pairs: (evaluations, MSE, s per image)
        errors, start = [], time.perf_counter()
        for seed in range(args.seeds):
            phi, info = kernelshap(
                game,
                images,
                n,
                key=jax.random.key(1 + seed),
                threshold=None,
                max_evals=2 * pairs * steps + 2,
                pairs_per_step=pairs,
                estimator=args.estimator,
            )
            phi = np.asarray(jax.block_until_ready(phi))
            errors.append(((phi - truth) ** 2).mean((1, 2)))
        seconds = (time.perf_counter() - start) / b / args.seeds
        tried[info["evals"]] = np.mean(errors, axis=0)
        error = float(tried[info["evals"]].mean())
        print(
            f"KernelSHAP ({args.estimator}) {info['evals']:>8,} evaluations: MSE {error:.3e}, "
            f"{seconds:.4f} s per image",
            flush=True,
        )
        return info["evals"], error, seconds

    # Warm-up: compiles KernelSHAP's step for this batch shape once (every budget reuses it).
    kernelshap(
        game,
        images,
        n,
        key=jax.random.key(0),
        threshold=None,
        max_evals=2 * pairs + 2,
        pairs_per_step=pairs,
        estimator=args.estimator,
    )
    # Doubling budgets until the error is at most the explainer's, then bisection between the last two.
    lo, hi = 0, 1
    found = run(hi)
    while found[1] > explainer_error:
        if 2 * pairs * 2 * hi + 2 > args.max_budget:
            print(
                f"KernelSHAP did not reach the explainer's error within {found[0]:,} evaluations: the "
                f"explainer is more than {found[2] / explainer_seconds:,.0f}x faster"
            )
            print(break_even(*training_cost(loaded), explainer_seconds, found[2], found[0], bound=True))
            return
        lo, hi = hi, 2 * hi
        found = run(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        result = run(mid)
        if result[1] <= explainer_error:
            hi, found = mid, result
        else:
            lo = mid
    evals, _, _ = found
    # Timed again at that budget, compilation excluded, with the search's step and with steps of up to
    # --timing_pairs pairs; the faster counts (small steps pay per-step overhead, large ones memory).
    seconds = min(
        kernelshap_seconds(game, images, n, evals, step_pairs, args.estimator)
        for step_pairs in sorted({pairs, min(args.timing_pairs, (evals - 2) // 2)})
    )
    # Per image: the smallest budget tried whose error (mean over seeds) is at most the explainer's.
    per_image = np.full(b, np.nan)
    for budget in sorted(tried, reverse=True):
        per_image[tried[budget] <= per_image_error] = budget
    reached = per_image[np.isfinite(per_image)]
    print(
        f"per image ({args.seeds} seed(s)): KernelSHAP needs a median of {np.median(reached):,.0f} "
        "evaluations "
        f"(range {reached.min():,.0f}-{reached.max():,.0f}) to match the explainer on {len(reached)} of {b} "
        "images within the budgets tried"
        if len(reached)
        else "per image: no tried budget matched the explainer on any image"
    )
    print(
        f"KernelSHAP reaches the explainer's error with {evals:,} evaluations per image (smallest budget, to "
        f"{2 * pairs} evaluations): {seconds:.4f} s vs {explainer_seconds * 1e3:.3f} ms per image, "
        f"the explainer is {seconds / explainer_seconds:,.0f}x faster"
    )
    print(break_even(*training_cost(loaded), explainer_seconds, seconds, evals))


if __name__ == "__main__":
    main()
