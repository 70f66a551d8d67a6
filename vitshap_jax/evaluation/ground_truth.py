"""Ground truth for an evaluation: the Shapley values of the surrogate's game for the explained class.

Exact (all 2^n coalitions) when n <= `EXACT_MAX_PLAYERS`, else the standard paired KernelSHAP (or
antithetic permutation sampling) run until its standard error is below `ground_truth_threshold` of the
values' range (configs/evaluate.py; docs/ground_truth.md).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from vitshap_jax.evaluation.methods import pad_rows
from vitshap_jax.shapley.exact import exact_shapley
from vitshap_jax.shapley.game import select_class
from vitshap_jax.shapley.kernelshap import kernelshap
from vitshap_jax.shapley.permutation import permutation_shapley

EXACT_MAX_PLAYERS = 20


def ground_truth(config, game, images, classes, n: int, *, put, key) -> tuple[np.ndarray, dict]:
    """Shapley values of the explained class `[N, n]` and how they were obtained (method, evaluations
    and seconds per image, share of images whose estimate converged)."""
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
        values.append(select_class(np.asarray(phi)[: len(chunk)], classes[s : s + size]))
    info["seconds_per_image"] = (time.perf_counter() - start) / len(images)
    if converged:
        info["converged"] = float(np.mean(converged))
    return np.concatenate(values), info
