"""The evaluation's figures: surrogate curves, insertion/deletion curves and per-image heatmaps."""

from __future__ import annotations

import os

import numpy as np

from vitshap_jax.evaluation.methods import in_game_units
from vitshap_jax.viz.curves import save_insertion_deletion, save_kl_curves
from vitshap_jax.viz.heatmaps import save_explanation

HEATMAP_COLUMNS = 6  # panels per row of the method comparison figures
# Methods drawn in the insertion/deletion figure (besides the largest KernelSHAP budget).
CURVE_METHODS = ("explainer", "leave_one_out", "integrated_gradients", "attention_rollout", "random")


def _budget(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


def save_evaluation_pictures(results, out_dir, views, truth, scores, classes, class_names, num_heatmaps: int):
    """`kl_curves.png`, `accuracy_curves.png`, `insertion_deletion.png`, and for the first `num_heatmaps`
    images `heatmaps/{i}_methods.png` (every method, each scaled to its maximum) and
    `heatmaps/{i}_shapley.png` (the methods in the game's units, on one scale)."""
    curves = results["surrogate_curves"]
    save_kl_curves(curves["fractions"], curves["kl"], os.path.join(out_dir, "kl_curves.png"))
    save_kl_curves(
        curves["fractions"],
        curves["accuracy"],
        os.path.join(out_dir, "accuracy_curves.png"),
        ylabel="accuracy",
    )
    largest_kernelshap = max(
        (k for k in results["methods"] if k.startswith("kernelshap_")), key=_budget, default=None
    )
    drawn = {
        name: {
            "insertion": np.asarray([m["insertion_curve"]]),
            "deletion": np.asarray([m["deletion_curve"]]),
            "insertion_auc": np.asarray([m["insertion_auc"]]),
            "deletion_auc": np.asarray([m["deletion_auc"]]),
        }
        for name, m in results["methods"].items()
        if name in CURVE_METHODS or name == largest_kernelshap
    }
    if drawn:
        save_insertion_deletion(drawn, os.path.join(out_dir, "insertion_deletion.png"))
    os.makedirs(os.path.join(out_dir, "heatmaps"), exist_ok=True)
    names = class_names
    for i in range(min(num_heatmaps, len(views))):
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
        same_units = {"ground truth": truth[i]} | {k: s[i] for k, s in scores.items() if in_game_units(k)}
        save_explanation(
            views[i],
            np.stack(list(same_units.values()), axis=1),
            names,
            os.path.join(out_dir, "heatmaps", f"{i:03d}_shapley.png"),
            titles=[f"{t} ({label})" for t in same_units],
        )
