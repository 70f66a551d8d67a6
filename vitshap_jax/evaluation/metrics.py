"""How good is an explanation? Accuracy against ground truth and insertion/deletion curves.

All functions take per-image, per-class values `phi [B, n, C]` (players = patches).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vitshap_jax.shapley.game import as_game, select_class, value_pairs


def _ranks(x, axis):
    return np.argsort(np.argsort(x, axis=axis), axis=axis).astype(np.float64)


def _pearson(a, b, axis):
    a = a - a.mean(axis, keepdims=True)
    b = b - b.mean(axis, keepdims=True)
    denom = np.sqrt((a * a).sum(axis) * (b * b).sum(axis))
    return np.where(denom > 0, (a * b).sum(axis) / np.where(denom > 0, denom, 1), np.nan)


def estimate_errors(phi, truth, k: int = 5) -> dict[str, np.ndarray]:
    """Per image and class `[B, C]`: squared error (mean over players), L2 distance, Pearson and
    Spearman correlation, top-k overlap (share of the k largest true values among the k largest
    estimates) and top-k sign agreement (share of the k largest |true| values with the right sign)."""
    phi, truth = np.asarray(phi, np.float64), np.asarray(truth, np.float64)
    k = min(k, phi.shape[1])
    top_est = np.argsort(-phi, axis=1)[:, :k]
    top_true = np.argsort(-truth, axis=1)[:, :k]
    b, _, c = phi.shape
    overlap = np.zeros((b, c))
    for i in range(b):
        for j in range(c):
            overlap[i, j] = len(set(top_est[i, :, j]) & set(top_true[i, :, j])) / k
    big = np.argsort(-np.abs(truth), axis=1)[:, :k]
    signs = np.take_along_axis(np.sign(phi), big, 1) == np.take_along_axis(np.sign(truth), big, 1)
    return {
        "mse": ((phi - truth) ** 2).mean(1),
        "l2": np.sqrt(((phi - truth) ** 2).sum(1)),
        "pearson": _pearson(phi, truth, 1),
        "spearman": _pearson(_ranks(phi, 1), _ranks(truth, 1), 1),
        f"top{k}_overlap": overlap,
        f"top{k}_sign": signs.mean(1),
    }


def importance_order(phi_c, key):
    """Players by descending value, ties broken at random: `[B, n]` indices. `phi_c [B, n]`."""
    noise = jax.random.uniform(key, phi_c.shape)
    return jnp.lexsort((noise, -phi_c), axis=-1)


@jax.jit
def _pairs(game, images, masks):
    return value_pairs(game, images, masks)


def insertion_deletion(value_fn, images, phi, classes, *, key):
    """Insertion and deletion curves of the explained class, and their areas.

    Patches are added to an empty image (insertion) or removed from the full image (deletion) from most to
    least important by `phi`; the curve is v(S)[class] after each of 0..n steps (n + 1 points) and its area
    is the mean of the curve (higher insertion and lower deletion areas are better).

    Args:
      value_fn: `(images, masks [B, M, n]) -> [B, M, C]`, e.g. the attention-masked surrogate's game.
      phi: `[B, n, C]`; classes: `[B]` int, the class explained for each image.

    Returns:
      {"insertion": `[B, n + 1]`, "deletion": `[B, n + 1]`, "insertion_auc": `[B]`, "deletion_auc": `[B]`}.
    """
    phi, classes = jnp.asarray(phi), jnp.asarray(classes)
    b, n, _ = phi.shape
    phi_c = select_class(phi, classes)
    order = importance_order(phi_c, key)
    rank = jnp.argsort(order, axis=-1)  # rank[b, i]: position of player i in the order
    steps = jnp.arange(n + 1)[None, :, None]
    inserted = rank[:, None, :] < steps  # [B, n + 1, n]
    curves = {}
    both = _pairs(as_game(value_fn), images, inserted)  # deletion removes what insertion added
    for name, values in zip(("insertion", "deletion"), both, strict=True):
        curves[name] = select_class(values, classes)
    out = {k: np.asarray(v) for k, v in curves.items()}
    out["insertion_auc"] = out["insertion"].mean(1)
    out["deletion_auc"] = out["deletion"].mean(1)
    return out


def mean_sem(x) -> tuple[float, float]:
    """Mean and standard error of the finite entries of `x` (nan, nan when there are none)."""
    x = np.asarray(x, np.float64).ravel()
    x = x[np.isfinite(x)]
    if not len(x):
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def method_summary(
    scores, truth, value_fn, images, classes, *, num_outputs: int, top_k: int, key, units: bool
):
    """One method's row of an evaluation: each `estimate_errors` metric and the insertion/deletion AUC
    as mean and standard error over the images (`{metric}`, `{metric}_sem`), and the mean curves.

    `scores`, `truth`: `[N, n]` of the explained class `classes [N]`; `units`: whether the scores are in
    the game's units (else squared and L2 errors are None: they would mean nothing)."""
    errors = estimate_errors(scores[..., None], truth[..., None], k=top_k)
    full = np.zeros((*scores.shape, num_outputs), np.float32)
    full[np.arange(len(scores)), :, classes] = scores
    curves = insertion_deletion(value_fn, jnp.asarray(images), full, jnp.asarray(classes), key=key)
    row = {}
    for metric, values in errors.items():
        name = "overlap" if metric.endswith("_overlap") else "sign" if metric.endswith("_sign") else metric
        row[name], row[f"{name}_sem"] = mean_sem(values)
    if not units:
        for name in ("mse", "mse_sem", "l2", "l2_sem"):
            row[name] = None
    for kind in ("insertion_auc", "deletion_auc"):
        row[kind], row[f"{kind}_sem"] = mean_sem(curves[kind])
    row["insertion_curve"] = curves["insertion"].mean(0).tolist()
    row["deletion_curve"] = curves["deletion"].mean(0).tolist()
    return row
