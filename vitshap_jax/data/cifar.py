"""CIFAR-10 and CIFAR-100 (32x32 colour images) from the official "python version" downloads.

Accepted in the manual directory, for CIFAR-10: the archive `cifar-10-python.tar.gz` or the folder it
extracts to, `cifar-10-batches-py/` (`data_batch_1` .. `data_batch_5`, `test_batch`, `batches.meta`);
for CIFAR-100: `cifar-100-python.tar.gz` or `cifar-100-python/` (`train`, `test`, `meta`). The manual
directory may also be the extracted folder itself. Each file is a Python pickle of a dict with bytes
keys; they are read with `load_pickle`, which builds numpy arrays, lists and dicts and nothing else.

Splits: `test` is the official test set. The official training set (50,000 images, in the order of
its files) is divided per class: the k-th image of each class (k = 0, 1, ...) goes to `validation`
when k % 10 == 9, else to `train`. So every class gives a tenth of its images, rounded down, to
validation: 45,000 train and 5,000 validation images (500 per class for CIFAR-10, 50 for CIFAR-100),
fixed by the files alone. Class names come from the meta file; CIFAR-100 also keeps the 20
superclasses (`coarse_label`). Images are stored as PNG (lossless, about 2-3 KB at 32x32).
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
from collections import Counter

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from vitshap_jax.data.base import DataNotFoundError, Files, ImageBuilder, LocalDatasetInfo, find_download

URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
VALIDATION_EVERY = 10  # the k-th image of a class with k % 10 == 9 goes to validation

# What a CIFAR pickle may reference: numpy array and dtype reconstruction (as written by numpy 1 or 2,
# any pickle protocol), Python 2 byte strings (`_codecs.encode`) and plain containers.
ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
} | {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str")}


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle reader that can only build what CIFAR files hold (`ALLOWED`): no other callable, so a
    tampered file cannot run code."""

    def find_class(self, module: str, name: str):
        canonical = "builtins" if module == "__builtin__" else module  # Python 2's name
        canonical = canonical.replace("numpy._core", "numpy.core", 1)
        if (canonical, name) not in ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR file holds only numpy arrays, lists and dicts"
            )
        if canonical.startswith("numpy.core."):  # numpy 2 moved numpy.core to numpy._core
            sub = canonical.removeprefix("numpy.core.")
            try:
                return getattr(importlib.import_module(f"numpy._core.{sub}"), name)
            except ImportError:
                return getattr(importlib.import_module(f"numpy.core.{sub}"), name)
        return getattr(importlib.import_module(canonical), name)


def load_pickle(data: bytes, where: str) -> dict:
    """A CIFAR pickle (bytes keys, as written by Python 2) -> its dict; ValueError naming `where`."""
    try:
        value = RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # a truncated or foreign file fails in many ways
        raise ValueError(f"{where}: not a CIFAR python-version file ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: not a CIFAR python-version file (holds a {type(value).__name__})")
    return value


def validation_mask(labels: np.ndarray) -> np.ndarray:
    """`labels: [N]` of the official training set, in file order -> bool `[N]`, True for validation."""
    seen = Counter()
    mask = np.zeros(len(labels), bool)
    for i, label in enumerate(labels.tolist()):
        mask[i] = seen[label] % VALIDATION_EVERY == VALIDATION_EVERY - 1
        seen[label] += 1
    return mask


class CifarBuilder(ImageBuilder, skip_registration=True):
    """What CIFAR-10 and CIFAR-100 share (not a dataset itself); the subclasses name their files and keys."""

    SUMMARY: str
    ROOT: str  # the folder the archive extracts to
    ARCHIVE: str
    TRAIN: tuple[str, ...]  # training members, in order
    TEST: str
    META: str
    LABELS: tuple[str, ...]  # label keys in each member (fine first), with their names' keys in META:
    NAMES: tuple[str, ...]

    def _info(self):
        # Label names are set from the meta file when the data is prepared.
        features = {"image": tfds.features.Image(shape=(32, 32, 3), encoding_format="png")}
        features |= {feature: tfds.features.ClassLabel() for feature in self._label_features()}
        return LocalDatasetInfo(
            builder=self,
            description=self.SUMMARY,
            features=tfds.features.FeaturesDict(features),
            supervised_keys=("image", "label"),
        )

    def _label_features(self) -> list[str]:
        return ["label", "coarse_label"][: len(self.LABELS)]

    def _split_generators(self, dl_manager):
        members = self._read(dl_manager.manual_dir)
        meta, where = members[self.META]
        sizes = []
        for feature, key in zip(self._label_features(), self.NAMES, strict=True):
            names = meta.get(key.encode())
            if not isinstance(names, list) or not names:
                raise ValueError(f"{where}: no list b'{key}' of class names; not a CIFAR meta file")
            self.info.features[feature].names = [
                n.decode() if isinstance(n, bytes) else str(n) for n in names
            ]
            sizes.append(len(names))
        train = [self._batch(*members[m], sizes) for m in self.TRAIN]
        images = np.concatenate([b[0] for b in train])
        labels = np.concatenate([b[1] for b in train])
        keys = np.array(
            [f"{m}_{i}" for m, b in zip(self.TRAIN, train, strict=True) for i in range(len(b[0]))]
        )
        val = validation_mask(labels[:, 0])
        test_images, test_labels = self._batch(*members[self.TEST], sizes)
        return {
            "train": self._generate_examples(images[~val], labels[~val], keys[~val]),
            "validation": self._generate_examples(images[val], labels[val], keys[val]),
            "test": self._generate_examples(
                test_images, test_labels, [f"{self.TEST}_{i}" for i in range(len(test_images))]
            ),
        }

    def _read(self, manual_dir) -> dict[str, tuple[dict, str]]:
        """member name -> (its dict, where it is), from the archive or the folder."""
        manual_dir = os.fspath(manual_dir) if manual_dir else ""
        dataset, how = self.name.removeprefix("vitshap_"), self.MANUAL_DOWNLOAD_INSTRUCTIONS
        if os.path.isfile(os.path.join(manual_dir, self.META)):  # manual_dir is the extracted folder
            files, prefix = Files(manual_dir), ""
        else:
            found = find_download(manual_dir, [self.ROOT, self.ARCHIVE], dataset, how)
            files, prefix = Files(os.path.dirname(found) if os.path.isdir(found) else found), f"{self.ROOT}/"
        wanted = {prefix + m: m for m in (*self.TRAIN, self.TEST, self.META)}
        members = {}
        for rel, data in files.walk(wanted.__contains__):
            members[wanted[rel]] = (load_pickle(data, files.where(rel)), files.where(rel))
        missing = [rel for rel, m in wanted.items() if m not in members]
        if missing:
            raise DataNotFoundError(
                f"{dataset}: {files.path} lacks {', '.join(missing)}; it is not a complete download. {how}"
            )
        return members

    def _batch(self, batch: dict, where: str, sizes: list[int]):
        """A member's dict -> (uint8 images `[N, 32, 32, 3]`, int64 labels `[N, len(LABELS)]`)."""
        data = np.asarray(batch.get(b"data"))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{where}: expected b'data' of uint8 [N, 3072], found {data.dtype} {data.shape}")
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # each row: the R, G, B planes, 32x32
        columns = []
        for key, size in zip(self.LABELS, sizes, strict=True):
            values = np.asarray(batch.get(key.encode(), []), np.int64)
            if values.shape != (len(images),) or values.min(initial=0) < 0 or values.max(initial=0) >= size:
                raise ValueError(f"{where}: b'{key}' must hold {len(images)} labels in 0..{size - 1}")
            columns.append(values)
        return images, np.stack(columns, axis=1)

    def _generate_examples(self, images, labels, keys):
        for i, key in enumerate(keys):
            example = {"image": PIL.Image.fromarray(images[i])}
            example |= {f: int(v) for f, v in zip(self._label_features(), labels[i], strict=True)}
            yield str(key), example


class Cifar10(CifarBuilder):
    name = "vitshap_cifar10"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "official test; train split per class, every 10th image to validation."}
    SUMMARY = "CIFAR-10: 60,000 32x32 colour images in 10 classes"
    ROOT, ARCHIVE = "cifar-10-batches-py", "cifar-10-python.tar.gz"
    TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
    TEST, META = "test_batch", "batches.meta"
    LABELS, NAMES = ("labels",), ("label_names",)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download cifar-10-python.tar.gz (the python version) from {URL} and put the archive, or the "
        "folder cifar-10-batches-py/ it extracts to, in the manual directory."
    )


class Cifar100(CifarBuilder):
    name = "vitshap_cifar100"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "official test; train split per class, every 10th image to validation."}
    SUMMARY = "CIFAR-100: 60,000 32x32 colour images in 100 classes (and 20 superclasses, coarse_label)"
    ROOT, ARCHIVE = "cifar-100-python", "cifar-100-python.tar.gz"
    TRAIN = ("train",)
    TEST, META = "test", "meta"
    LABELS, NAMES = ("fine_labels", "coarse_labels"), ("fine_label_names", "coarse_label_names")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download cifar-100-python.tar.gz (the python version) from {URL} and put the archive, or the "
        "folder cifar-100-python/ it extracts to, in the manual directory."
    )
