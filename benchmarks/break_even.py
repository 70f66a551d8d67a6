"""The break-even of finished explainers against KernelSHAP at a given budget, without the search.

    python benchmarks/break_even.py --evals=540 runs/extra-warp30b/precomputed-v4shared-e40-lr2e-3-s0

`explain_vs_kernelshap.py` finds the KernelSHAP budget that matches an explainer and prints the
break-even; when that budget is already known (e.g. from `training_signals.py`'s "KernelSHAP evals to
match", measured on more images and seeds), this times the standard paired KernelSHAP at `--evals`
evaluations per image (the first `--images` test images in one batch, `--pairs_per_step` pairs a step,
compilation excluded) and each explainer's forward pass, reads the explainers' training cost from their
runs (`training_cost` of explain_vs_kernelshap.py: logged train steps, and the labels of
`signal=precomputed`) and prints the break-even. Several runs (trained against the same surrogate) are
one explainer: the mean of their outputs, whose cost is the sum of theirs (training and forward passes).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from explain_vs_kernelshap import break_even, kernelshap_seconds, timed, training_cost  # noqa: E402

from vitshap_jax.runs import load_explainer  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="finished explainer runs (a pipeline or an explainer run dir)")
    p.add_argument("--evals", type=int, required=True, help="KernelSHAP evaluations per image to time")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--pairs_per_step", type=int, default=64)
    args = p.parse_args()
    loaded = [load_explainer(run) for run in args.runs]
    surrogates = {os.path.abspath(one.surrogate_dir) for one in loaded}
    if len(surrogates) > 1:
        raise SystemExit(f"the runs explain different surrogates ({sorted(surrogates)}): give runs of one")
    game = loaded[0].game()
    _, images, _ = loaded[0].examples("test", args.images, views=False)
    images = jnp.asarray(images)
    b, n = len(images), loaded[0].num_players
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"{len(loaded)} explainer run(s); {b} test images, {n} players")
    explainer_seconds = sum(timed(one, images, repeats=5)[1] for one in loaded) / b
    costs = [training_cost(one) for one in loaded]
    seconds = kernelshap_seconds(game, images, n, args.evals, args.pairs_per_step)
    print(
        f"explainer: {explainer_seconds * 1e3:.3f} ms per image; KernelSHAP (standard) at {args.evals:,} "
        f"evaluations: {seconds * 1e3:.2f} ms per image"
    )
    train_seconds, train_evals = sum(c[0] for c in costs), sum(c[1] for c in costs)
    print(break_even(train_seconds, train_evals, explainer_seconds, seconds, args.evals))


if __name__ == "__main__":
    main()
