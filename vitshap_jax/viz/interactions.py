"""Pairwise interactions on the image: the strongest pairs as lines between patch centres (red
positive, blue negative; width by size) next to the heatmap of the players' own values."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vitshap_jax.viz.heatmaps import DPI, PANEL_INCHES, overlay  # noqa: E402


def strongest_pairs(pairs, top: int) -> list[tuple[int, int, float]]:
    """The `top` pairs (i < j) of a symmetric `[k, k]` matrix with the largest |value|, largest first."""
    pairs = np.asarray(pairs, np.float64)
    i, j = np.triu_indices(len(pairs), 1)
    order = np.argsort(-np.abs(pairs[i, j]), kind="stable")[:top]
    return [(int(i[o]), int(j[o]), float(pairs[i[o], j[o]])) for o in order]


def save_interactions(
    image, values, pairs, path: str, *, grid: int, players=None, title: str = "", top: int = 10
):
    """Writes a PNG of two panels over `image` (uint8 `[H, W, 3]`, as the model saw it, cut into a
    `grid` x `grid` patch grid): the players' values (`values [k]`, order 1) as a patch heatmap, and the
    `top` strongest pairs (`pairs [k, k]`) as lines between patch centres. `players [k]`: the patch of
    each player (row-major; default: every patch, k = grid^2). Returns the pairs drawn."""
    values = np.asarray(values, np.float64)
    players = np.arange(grid * grid) if players is None else np.asarray(players)
    if len(players) != len(values) or players.max() >= grid * grid:
        raise ValueError(f"{len(values)} values for players {players.tolist()} on a {grid}x{grid} grid")
    h, w = image.shape[:2]
    drawn = strongest_pairs(pairs, top)
    fig, axes = plt.subplots(1, 2, figsize=(2 * PANEL_INCHES, 1.15 * PANEL_INCHES), dpi=DPI)
    cell_h, cell_w = h / grid, w / grid
    heat = np.full(grid * grid, np.nan)
    heat[players] = values
    scale = float(np.nanmax(np.abs(heat))) or 1e-12
    for ax in axes:
        ax.imshow(image.mean(-1), cmap="gray", interpolation="nearest", alpha=0.6)
        ax.set_xticks([])
        ax.set_yticks([])
    overlay(axes[0], heat.reshape(grid, grid), scale, (h, w))
    axes[0].set_title(f"{title}\nplayers (order 1)".strip(), fontsize=7)
    centres = [((p % grid + 0.5) * cell_w - 0.5, (p // grid + 0.5) * cell_h - 0.5) for p in players]
    biggest = max((abs(v) for _, _, v in drawn), default=1.0) or 1.0
    for i, j, v in drawn:
        (x0, y0), (x1, y1) = centres[i], centres[j]
        axes[1].plot(
            [x0, x1], [y0, y1], color="r" if v > 0 else "b", lw=0.5 + 3.5 * abs(v) / biggest, alpha=0.8
        )
    axes[1].scatter([c[0] for c in centres], [c[1] for c in centres], s=6, c="k")
    axes[1].set_xlim(-0.5, w - 0.5)
    axes[1].set_ylim(h - 0.5, -0.5)
    axes[1].set_title(f"strongest {len(drawn)} pairs (red +, blue -)", fontsize=7)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return drawn
