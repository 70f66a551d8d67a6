"""Datasets: tfds builders over the users' own downloads, prepared once into ArrayRecord.

    from vitshap_jax.data import prepare
    prepare("imagenette", manual_dir="~/Downloads")        # once; later calls reuse the prepared copy
    prepare("folder", manual_dir="~/my_images")             # your own images (see data/folder.py)
    source = open_split(config, "train")                     # random-access source for grain
    names = dataset_classes(config)                          # class names in label order

`prepare` needs no TensorFlow. The prepared data lives in `data_dir` (default: tfds's, i.e.
$TFDS_DATA_DIR or ~/tensorflow_datasets) under `vitshap_<name>/<version>/`; a folder's under
`vitshap_folder/<its config name>/<version>/`, one per source folder (or CSV) and split fractions.
"""

from __future__ import annotations

import os

import numpy as np
import PIL.Image
from absl import logging

from vitshap_jax.config import SPLITS
from vitshap_jax.data.base import BadImageError, DataNotFoundError, ImageBuilder, is_empty_dir, read_image
from vitshap_jax.data.cifar import Cifar10, Cifar100
from vitshap_jax.data.digits import Digits
from vitshap_jax.data.folder import DEFAULT_FRACTIONS, Folder, is_image, list_files
from vitshap_jax.data.imagenette import Imagenette
from vitshap_jax.data.mura import Mura
from vitshap_jax.data.pet import Pet

BUILDERS: dict[str, type[ImageBuilder]] = {
    "digits": Digits,
    "imagenette": Imagenette,
    "pet": Pet,
    "mura": Mura,
    "cifar10": Cifar10,
    "cifar100": Cifar100,
    "folder": Folder,
}
SKIPPED_FILE = "skipped_images.txt"
CLASS_NAMES_FILE = "class_names.txt"
NAMES_FROM_DATA = ("cifar10", "cifar100", "folder")  # datasets whose class names come with the data

__all__ = [
    "BUILDERS",
    "BadImageError",
    "DataNotFoundError",
    "SPLITS",
    "builder",
    "class_names",
    "dataset_classes",
    "open_split",
    "prepare",
    "read_image",
]


def class_names(name: str) -> list[str]:
    """Readable class names of a dataset whose classes are fixed, in label order (no prepared data
    needed). cifar10, cifar100 and folder take theirs from the data: use `dataset_classes(config)`."""
    from vitshap_jax.data import imagenette, pet

    names = {
        "digits": [str(d) for d in range(10)],
        "imagenette": list(imagenette.CLASSES.values()),
        "pet": list(pet.BREEDS),
        "mura": ["normal (negative)", "abnormal (positive)"],
    }
    if name in NAMES_FROM_DATA:
        raise ValueError(
            f"{name} takes its class names from the data: use dataset_classes(config), which reads them "
            "from the prepared copy (preparing it first if needed)"
        )
    if name not in names:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(BUILDERS)}")
    return names[name]


def dataset_classes(config) -> list[str]:
    """Class names of `config.dataset`, in label order.

    Fixed for digits, imagenette, pet and mura (`class_names`); for cifar10, cifar100 and folder they
    are read from the prepared data, which is prepared first if needed (as `open_split` does).
    """
    if config.dataset.name in NAMES_FROM_DATA:
        return list(_prepared(config).info.features["label"].names)
    return class_names(config.dataset.name)


def builder(
    name: str,
    data_dir: str | None = None,
    on_bad_image: str = "fail",
    manual_dir: str | None = None,
    split_fractions: str = DEFAULT_FRACTIONS,
) -> ImageBuilder:
    """The builder of dataset `name`; folder needs its source `manual_dir` (and `split_fractions`),
    which name its prepared copy. The other datasets ignore both."""
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(BUILDERS)}")
    data_dir = os.path.expanduser(data_dir) if data_dir else None
    if name == "folder":
        return Folder(
            manual_dir=manual_dir,
            split_fractions=split_fractions,
            data_dir=data_dir,
            on_bad_image=on_bad_image,
        )
    return BUILDERS[name](data_dir=data_dir, on_bad_image=on_bad_image)


def prepare(
    name: str,
    manual_dir: str | None = None,
    data_dir: str | None = None,
    on_bad_image: str = "fail",
    split_fractions: str = DEFAULT_FRACTIONS,
) -> ImageBuilder:
    """Prepares dataset `name` from the user's download in `manual_dir` (not needed for digits).

    For folder, `manual_dir` is the image folder or CSV file itself, and `split_fractions`
    ("train,validation,test") shares out the splits it does not give (data/folder.py).
    Reuses an already prepared copy. With `on_bad_image="skip"`, unreadable images are left out and
    listed in `skipped_images.txt` next to the prepared data; with "fail" (default) the first one stops
    the preparation with its path, and nothing half-written is left behind. For the datasets whose
    class names come with the data (`NAMES_FROM_DATA`), `class_names.txt` next to the prepared data
    lists them in label order.
    """
    manual_dir = os.path.expanduser(manual_dir) if manual_dir else None
    b = builder(name, data_dir, on_bad_image, manual_dir, split_fractions)
    if b.is_prepared():
        logging.info("%s: reusing the prepared data in %s", name, b.data_path)
        return b
    import tensorflow_datasets as tfds

    instructions = BUILDERS[name].MANUAL_DOWNLOAD_INSTRUCTIONS
    if name == "folder":
        manual_dir = None  # the source is in the builder's config (and may be a CSV file)
    elif instructions and not (manual_dir and os.path.isdir(manual_dir)):
        raise DataNotFoundError(f"{name}: the download folder {manual_dir!r} does not exist. {instructions}")
    elif instructions and is_empty_dir(manual_dir):
        raise DataNotFoundError(f"{name}: the download folder {manual_dir!r} is empty. {instructions}")
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    if name in NAMES_FROM_DATA:
        with open(os.path.join(b.data_path, CLASS_NAMES_FILE), "w", encoding="utf-8") as f:
            f.write("".join(f"{n}\n" for n in b.info.features["label"].names))
    if b.skipped:
        with open(os.path.join(b.data_path, SKIPPED_FILE), "w") as f:
            f.write("".join(f"{path}\n" for path in b.skipped))
        logging.warning("%s: skipped %d unreadable images (listed in %s)", name, len(b.skipped), SKIPPED_FILE)
    return b


def open_split(config, split: str):
    """The random-access source of `split` for a stage config, after checking it fits the config.

    Prepares the dataset first if needed and possible (digits always; the others when
    `config.dataset.manual_dir` is set). A folder's prepared copy is found from `manual_dir` and
    `config.dataset.split_fractions` (default "0.8,0.1,0.1" when the config has no such field).
    The training split is cut to its first `config.dataset.train_examples` examples where that is set.
    Raises DataNotFoundError with the command that prepares it, or ValueError when the data's class
    count differs from `config.dataset.num_classes` (or the split has fewer examples than asked for).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    d = config.dataset
    b = _prepared(config)
    classes = b.info.features["label"].num_classes
    if classes != d.num_classes:
        raise ValueError(
            f"config.dataset.num_classes={d.num_classes} but the prepared {d.name} data in {b.data_path} has "
            f"{classes} classes: fix the config (the model's head must match the data)"
        )
    source = b.as_data_source(split=split)
    examples = d.get("train_examples", 0)
    if split == "train" and examples:
        if examples > len(source):
            raise ValueError(
                f"config.dataset.train_examples={examples} but the prepared {d.name} training split in "
                f"{b.data_path} has {len(source)} examples: lower it (0: all of them)"
            )
        return FirstExamples(source, examples)
    return source


class FirstExamples:
    """The first `count` examples of a random-access `source` (`config.dataset.train_examples`)."""

    def __init__(self, source, count: int):
        self.source, self.count = source, count

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        if not 0 <= int(i) < self.count:
            raise IndexError(f"example {i} of {self.count}")
        return self.source[int(i)]


class ImageFiles:
    """Every image file under `folder` (recursively, sorted by path; any extension Pillow decodes,
    hidden files and macOS sidecars skipped) as a random-access source of unlabeled examples: `image`
    uint8 RGB `[H, W, 3]` (decoded as the datasets decode, `base.read_image`) and `label` -1
    (`config.explainer.extra_images`: images the explainer learns from, which need no class). Every file
    is opened once here (its header only), so a file Pillow cannot read is an error before any training,
    naming it and `field`; one whose pixels then fail to decode (truncated) is an error naming it when
    read."""

    def __init__(self, folder: str, field: str = "config.explainer.extra_images"):
        folder = os.path.abspath(os.path.expanduser(folder))
        if not os.path.isdir(folder):
            raise DataNotFoundError(f"{field}={folder!r}: no such folder; give a folder of image files")
        self.paths = [os.path.join(folder, rel) for rel in sorted(list_files(folder)) if is_image(rel)]
        if not self.paths:
            raise DataNotFoundError(f"{field}={folder!r}: the folder holds no image files")
        for path in self.paths:
            try:
                with PIL.Image.open(path) as image:
                    image.size  # noqa: B018  (the header is read)
            except (OSError, ValueError, SyntaxError) as error:
                raise BadImageError(
                    f"{field}: {path} is not an image Pillow can read ({error}): remove it from {folder}"
                ) from error

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[int(i)]
        try:
            image = read_image(path)
        except (OSError, ValueError, SyntaxError) as error:  # a header that reads, pixels that do not
            raise BadImageError(f"{path} cannot be decoded ({error}): remove it and rerun") from error
        return {"image": image, "label": np.int64(-1)}


class Concatenated:
    """Random-access sources one after the other: example i of the second is example len(first) + i."""

    def __init__(self, *sources):
        self.sources = sources
        self.starts = np.cumsum([0, *(len(s) for s in sources)])

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, i):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.sources[k][i - int(self.starts[k])]


def _prepared(config) -> ImageBuilder:
    """The builder of `config.dataset`, prepared (now if needed and possible)."""
    d = config.dataset
    fractions = d.get("split_fractions") or DEFAULT_FRACTIONS  # configs without the field: the default
    b = builder(d.name, d.data_dir, d.on_bad_image, d.manual_dir, fractions)
    if not b.is_prepared():
        if d.name != "digits" and not d.manual_dir:
            data_dir = f", data_dir={d.data_dir!r}" if d.data_dir else ""
            call = f"prepare('{d.name}', manual_dir='DOWNLOAD_DIR'{data_dir})"
            how = BUILDERS[d.name].MANUAL_DOWNLOAD_INSTRUCTIONS
            raise DataNotFoundError(
                f"{d.name} is not prepared in {b.data_dir}. Prepare it once from your download with\n"
                f'  python -c "from vitshap_jax.data import prepare; {call}"\n'
                f"or pass --config.dataset.manual_dir=DOWNLOAD_DIR. {how}"
            )
        b = prepare(d.name, d.manual_dir, d.data_dir, d.on_bad_image, fractions)
    return b
