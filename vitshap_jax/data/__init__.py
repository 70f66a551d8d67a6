"""Datasets: tfds builders over the users' own downloads, prepared once into ArrayRecord.

    from vitshap_jax.data import prepare
    prepare("imagenette", manual_dir="~/Downloads")        # once; later calls reuse the prepared copy
    source = open_split(config, "train")                     # random-access source for grain

`prepare` needs no TensorFlow. The prepared data lives in `data_dir` (default: tfds's, i.e.
$TFDS_DATA_DIR or ~/tensorflow_datasets) under `vitshap_<name>/<version>/`.
"""

from __future__ import annotations

import os

from absl import logging

from vitshap_jax.data.base import BadImageError, DataNotFoundError, ImageBuilder, is_empty_dir
from vitshap_jax.data.digits import Digits
from vitshap_jax.data.imagenette import Imagenette
from vitshap_jax.data.mura import Mura
from vitshap_jax.data.pet import Pet

BUILDERS: dict[str, type[ImageBuilder]] = {
    "digits": Digits,
    "imagenette": Imagenette,
    "pet": Pet,
    "mura": Mura,
}
SPLITS = ("train", "validation", "test")
SKIPPED_FILE = "skipped_images.txt"

__all__ = [
    "BUILDERS",
    "BadImageError",
    "DataNotFoundError",
    "SPLITS",
    "builder",
    "class_names",
    "open_split",
    "prepare",
]


def class_names(name: str) -> list[str]:
    """Readable class names of a dataset, in label order (no prepared data needed)."""
    from vitshap_jax.data import imagenette, pet

    names = {
        "digits": [str(d) for d in range(10)],
        "imagenette": list(imagenette.CLASSES.values()),
        "pet": list(pet.BREEDS),
        "mura": ["normal (negative)", "abnormal (positive)"],
    }
    if name not in names:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(BUILDERS)}")
    return names[name]


def builder(name: str, data_dir: str | None = None, on_bad_image: str = "fail") -> ImageBuilder:
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(BUILDERS)}")
    data_dir = os.path.expanduser(data_dir) if data_dir else None
    return BUILDERS[name](data_dir=data_dir, on_bad_image=on_bad_image)


def prepare(
    name: str, manual_dir: str | None = None, data_dir: str | None = None, on_bad_image: str = "fail"
) -> ImageBuilder:
    """Prepares dataset `name` from the user's download in `manual_dir` (not needed for digits).

    Reuses an already prepared copy. With `on_bad_image="skip"`, unreadable images are left out and
    listed in `skipped_images.txt` next to the prepared data; with "fail" (default) the first one stops
    the preparation with its path, and nothing half-written is left behind.
    """
    b = builder(name, data_dir, on_bad_image)
    if b.is_prepared():
        logging.info("%s: reusing the prepared data in %s", name, b.data_path)
        return b
    import tensorflow_datasets as tfds

    manual_dir = os.path.expanduser(manual_dir) if manual_dir else None
    instructions = BUILDERS[name].MANUAL_DOWNLOAD_INSTRUCTIONS
    if instructions and not (manual_dir and os.path.isdir(manual_dir)):
        raise DataNotFoundError(f"{name}: the download folder {manual_dir!r} does not exist. {instructions}")
    if instructions and is_empty_dir(manual_dir):
        raise DataNotFoundError(f"{name}: the download folder {manual_dir!r} is empty. {instructions}")
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    if b.skipped:
        with open(os.path.join(b.data_path, SKIPPED_FILE), "w") as f:
            f.write("".join(f"{path}\n" for path in b.skipped))
        logging.warning("%s: skipped %d unreadable images (listed in %s)", name, len(b.skipped), SKIPPED_FILE)
    return b


def open_split(config, split: str):
    """The random-access source of `split` for a stage config, after checking it fits the config.

    Prepares the dataset first if needed and possible (digits always; the others when
    `config.dataset.manual_dir` is set). Raises DataNotFoundError with the command that prepares it, or
    ValueError when the data's class count differs from `config.dataset.num_classes`.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    d = config.dataset
    b = builder(d.name, d.data_dir, d.on_bad_image)
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
        b = prepare(d.name, d.manual_dir, d.data_dir, d.on_bad_image)
    classes = b.info.features["label"].num_classes
    if classes != d.num_classes:
        raise ValueError(
            f"config.dataset.num_classes={d.num_classes} but the prepared {d.name} data in {b.data_path} has "
            f"{classes} classes: fix the config (the model's head must match the data)"
        )
    return b.as_data_source(split=split)
