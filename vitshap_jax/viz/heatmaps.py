"""Heatmap overlays of patch values: the image, then one map per class on a symmetric red/blue scale
(red positive, blue negative, the same scale for every class of a figure) with the patch grid."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PANEL_INCHES, DPI = 2.4, 100


def figure_size(num_classes: int, columns: int | None = None) -> tuple[int, int]:
    """Pixel size (width, height) of a figure with the image and `num_classes` maps, `columns` panels
    per row (None: one row)."""
    panels = 1 + num_classes
    cols = min(columns or panels, panels)
    rows = -(-panels // cols)
    return round(PANEL_INCHES * cols * DPI), round(PANEL_INCHES * 1.15 * rows * DPI)


def overlay(ax, values, scale: float, size: tuple[int, int]):
    """Draws patch values `[grid, grid]` (NaN: not drawn) over an image of `size` (h, w) on `ax`, red
    positive and blue negative on the symmetric scale [-scale, scale]; returns the image artist."""
    h, w = size
    return ax.imshow(
        np.ma.masked_invalid(values),
        cmap="bwr",
        vmin=-scale,
        vmax=scale,
        alpha=0.75,
        extent=(-0.5, w - 0.5, h - 0.5, -0.5),
        interpolation="nearest",
    )


def save_explanation(
    image, phi, class_names, path: str, *, titles=None, columns: int | None = None
) -> tuple[float, float]:
    """Writes a PNG: `image` (uint8 `[H, W, 3]`, as the model saw it) and one overlay per column of
    `phi [n_patches, C]` (patches row-major on a square grid), `columns` panels per row (None: one row).
    Returns the color limits used (symmetric)."""
    phi = np.asarray(phi, np.float64)
    n, c = phi.shape
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ValueError(f"{n} patches do not form a square grid")
    h, w = image.shape[:2]
    scale = float(np.abs(phi).max()) or 1e-12
    width, height = figure_size(c, columns)
    cols = min(columns or 1 + c, 1 + c)
    rows = -(-(1 + c) // cols)
    fig, grid_axes = plt.subplots(rows, cols, figsize=(width / DPI, height / DPI), dpi=DPI, squeeze=False)
    axes = grid_axes.ravel()
    for ax in axes[1 + c :]:
        ax.axis("off")  # unused panels of the last row
    axes = axes[: 1 + c]
    axes[0].imshow(image, interpolation="nearest")
    axes[0].set_title("image", fontsize=8)
    limits = None
    for j in range(c):
        ax = axes[1 + j]
        ax.imshow(image.mean(-1), cmap="gray", interpolation="nearest", alpha=0.5)
        im = overlay(ax, phi[:, j].reshape(grid, grid), scale, (h, w))
        for k in range(1, grid):  # the patch grid
            ax.axhline(k * h / grid - 0.5, color="k", lw=0.3, alpha=0.4)
            ax.axvline(k * w / grid - 0.5, color="k", lw=0.3, alpha=0.4)
        title = titles[j] if titles else class_names[j]
        ax.set_title(f"{title}\nsum {phi[:, j].sum():+.3f}", fontsize=7)
        limits = im.get_clim()
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[1:].tolist(), fraction=0.025, pad=0.02)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return limits


def save_grid(images, phi, class_names, path: str) -> None:
    """Writes a PNG grid: a row per image (uint8 `images [N, H, W, 3]`), its image and then its values
    `phi [N, n_patches, C]` for every class, on one symmetric color scale for the whole grid (rows and
    columns compare)."""
    phi = np.asarray(phi, np.float64)
    count, n, c = phi.shape
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ValueError(f"{n} patches do not form a square grid")
    h, w = images.shape[1:3]
    scale = float(np.abs(phi).max()) or 1e-12
    size = PANEL_INCHES * 0.6
    fig, axes = plt.subplots(count, 1 + c, figsize=(size * (1 + c), size * count), dpi=DPI, squeeze=False)
    for i in range(count):
        axes[i, 0].imshow(images[i], interpolation="nearest")
        for j in range(c):
            axes[i, 1 + j].imshow(images[i].mean(-1), cmap="gray", interpolation="nearest", alpha=0.5)
            im = overlay(axes[i, 1 + j], phi[i, :, j].reshape(grid, grid), scale, (h, w))
            if i == 0:
                axes[0, 1 + j].set_title(str(class_names[j]), fontsize=7)
    axes[0, 0].set_title("image", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
