"""Line plots: surrogate quality against the held-out fraction, and insertion/deletion curves."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SIZE_INCHES, DPI = (4.8, 3.2), 100


def curve_size() -> tuple[int, int]:
    """Pixel size (width, height) of every figure of this module."""
    return round(SIZE_INCHES[0] * DPI), round(SIZE_INCHES[1] * DPI)


def save_kl_curves(
    fractions, kl_by_strategy: dict, path: str, *, ylabel: str = "KL(classifier || surrogate)"
) -> None:
    """One line per masking strategy: `kl_by_strategy[name]` against the held-out `fractions`.

    Works for accuracy too (pass `ylabel`); the values are e.g. a surrogate run's `kl_heldout_*`."""
    fig, ax = plt.subplots(figsize=SIZE_INCHES, dpi=DPI)
    for name, values in kl_by_strategy.items():
        ax.plot(fractions, values, marker="o", label=name)
    ax.set_xlabel("fraction of patches held out")
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def save_insertion_deletion(curves: dict, path: str) -> None:
    """Mean insertion and deletion curves (`curves` from `evaluation.metrics.insertion_deletion`,
    or several methods as {method: that dict}) against the number of patches added/removed."""
    methods = curves if "insertion" not in curves else {"": curves}
    fig, axes = plt.subplots(1, 2, figsize=SIZE_INCHES, dpi=DPI, sharey=True)
    for ax, kind in zip(axes, ("insertion", "deletion"), strict=True):
        for name, c in methods.items():
            mean = np.asarray(c[kind]).mean(0)
            auc = float(np.asarray(c[f"{kind}_auc"]).mean())
            ax.plot(np.arange(len(mean)), mean, label=f"{name} AUC {auc:.3f}".strip())
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("patches")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("probability of the explained class")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
