"""More digits from the training split itself: random elastic and affine warps, as 8x8 PNG files.

    python benchmarks/warped_digits.py --out=runs/warp8 --copies=4 [--workdir=runs/digits]

Makes `--copies` warped versions of every one of the digits dataset's 1,257 *training* images (never a
validation or test image: `vitshap_jax.data.digits.split_indices`), for `explainer.extra_images`
(docs/explainer_training.md). The explainer's labels come from the surrogate, so a warped digit needs no
class; what matters is that it looks like a digit of this dataset. The learning curve there says the
digits explainer is bound by its number of training images; warps are the classic way to get more
handwritten digits from few (Simard et al., ICDAR 2003). Each digit (0..16 per pixel) is upsampled to
32 x 32 (cubic splines), moved by a random affine map about its centre (rotation, scale, shear, shift:
`--rotate`, `--scale`, `--shear`, `--shift`) and an elastic displacement field (uniform noise smoothed
by a Gaussian of `--sigma` pixels, times `--alpha`), sampled bilinearly, made a bitmap again at half
the range (`--threshold`) and its "on" pixels counted in 4 x 4 blocks (0..16): the way the UCI optdigits
32 x 32 bitmaps became scikit-learn's 8 x 8 digits. Written like `mnist_as_digits.py`
(`{out}/{class}/{index}.png`); with --workdir, prints how well that run's classifier recognizes them
(its own training images, warped: near 1 means they still look like digits to it).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mnist_as_digits import rate, write_digits  # noqa: E402

SIZE = 32  # the bitmaps' resolution; 4 x 4 blocks of it are one pixel of an 8 x 8 digit


def warp(
    digit: np.ndarray,
    rng: np.random.Generator,
    rotate=12.0,
    scale=0.12,
    shear=0.25,
    shift=2.0,
    alpha=30.0,
    sigma=4.0,
    threshold=8.0,
) -> np.ndarray:
    """One random warp of an 8 x 8 digit (0..16) -> an 8 x 8 digit of ints 0..16.

    rotate: degrees (uniform in +-); scale: relative, per axis; shear: uniform in +-; shift: pixels of
    the 32 x 32 image; alpha, sigma: the elastic field's strength and smoothness in those pixels;
    threshold: where the warped 32 x 32 image (0..16) becomes a bitmap. With no warp (all of them 0)
    a digit comes back within about 0.6 of 16 per pixel on average (the bitmap's rounding)."""
    big = ndimage.zoom(
        digit.astype(np.float64), SIZE // digit.shape[0], order=3, grid_mode=True, mode="nearest"
    )
    theta = np.deg2rad(rng.uniform(-rotate, rotate))
    s = 1.0 + rng.uniform(-scale, scale, size=2)
    k = rng.uniform(-shear, shear)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    # output coordinate -> input coordinate: the inverse of rotate(shear(scale(x)))
    forward = rotation @ np.array([[1.0, k], [0.0, 1.0]]) @ np.diag(s)
    inverse = np.linalg.inv(forward)
    centre = (SIZE - 1) / 2
    ys, xs = np.meshgrid(np.arange(SIZE, dtype=np.float64), np.arange(SIZE, dtype=np.float64), indexing="ij")
    offset = rng.uniform(-shift, shift, size=2)
    out = np.stack([ys - centre - offset[0], xs - centre - offset[1]])
    coords = np.einsum("ij,jhw->ihw", inverse, out) + centre
    if alpha:
        for axis in range(2):
            field = ndimage.gaussian_filter(rng.uniform(-1, 1, size=(SIZE, SIZE)), sigma, mode="constant")
            coords[axis] += alpha * field
    moved = ndimage.map_coordinates(big, coords, order=1, mode="constant", cval=0.0)
    bitmap = moved > threshold
    return bitmap.reshape(8, SIZE // 8, 8, SIZE // 8).sum((1, 3))


# The warp's knobs and their defaults, one --flag each.
KNOBS = {
    name: p.default for name, p in inspect.signature(warp).parameters.items() if p.default is not p.empty
}


def training_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images [1257, 8, 8] 0..16, labels) of the digits dataset's training split only."""
    from sklearn.datasets import load_digits

    from vitshap_jax.data.digits import split_indices

    digits = load_digits()
    train = split_indices()["train"]
    return digits.images[train], digits.target[train]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write the PNG files into")
    p.add_argument("--copies", type=int, default=4, help="warped versions of every training digit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="", help="a finished digits run whose classifier rates them")
    for name, default in KNOBS.items():
        p.add_argument(f"--{name}", type=float, default=default)
    args = p.parse_args()
    if args.copies < 1:
        p.error(f"--copies={args.copies}: at least one warped version per training digit")
    if os.path.exists(args.out) and os.listdir(args.out):
        p.error(f"--out={args.out} is not empty: give a new folder (nothing there is overwritten)")
    images, labels = training_digits()
    rng = np.random.default_rng(args.seed)
    knobs = {k: getattr(args, k) for k in KNOBS}
    warped = np.stack([warp(x, rng, **knobs) for _ in range(args.copies) for x in images])
    labels = np.tile(labels, args.copies)
    write_digits(args.out, warped, labels)
    change = np.abs(warped - np.tile(images, (args.copies, 1, 1))).mean()
    print(f"mean absolute change per pixel: {change:.2f} of 16")
    if args.workdir:
        rate(args.workdir, warped, labels)


if __name__ == "__main__":
    main()
