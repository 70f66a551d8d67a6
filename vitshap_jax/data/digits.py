"""scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): the embedded default dataset.

Prepared from `sklearn.datasets.load_digits()` (no download). The split is fixed: a permutation with
seed 0 gives 270 test, 270 validation and 1,257 training images. Pixels 0..16 are scaled to 0..255
and replicated to 3 channels.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from vitshap_jax.data.base import ImageBuilder, LocalDatasetInfo

SPLIT_SIZES = {"test": 270, "validation": 270}  # the rest is "train"


def split_indices() -> dict[str, np.ndarray]:
    """Indices into `load_digits()` for each split (fixed, independent of library versions)."""
    order = np.random.RandomState(0).permutation(1797)
    test, val = SPLIT_SIZES["test"], SPLIT_SIZES["validation"]
    return {"test": order[:test], "validation": order[test : test + val], "train": order[test + val :]}


class Digits(ImageBuilder):
    name = "vitshap_digits"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "sklearn digits, fixed 1257/270/270 split."}

    def _info(self):
        return LocalDatasetInfo(
            builder=self,
            description="scikit-learn's 8x8 handwritten digits",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        from sklearn.datasets import load_digits

        digits = load_digits()
        if digits.images.shape != (1797, 8, 8):
            raise ValueError(f"scikit-learn's digits have shape {digits.images.shape}, expected (1797, 8, 8)")
        return {
            split: self._generate_examples(digits.images, digits.target, idx)
            for split, idx in split_indices().items()
        }

    def _generate_examples(self, images, targets, indices):
        for i in indices:
            pixels = np.round(images[i] * (255 / 16)).astype(np.uint8)
            yield (
                int(i),
                {
                    "image": PIL.Image.fromarray(np.repeat(pixels[..., None], 3, axis=-1)),
                    "label": int(targets[i]),
                },
            )
