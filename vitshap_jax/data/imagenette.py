"""fast.ai Imagenette (10 ImageNet classes) from the user's `imagenette2` download.

Accepted in the manual directory: the archive `imagenette2.tgz` (or `imagenette2-320.tgz`,
`imagenette2-160.tgz`) or the extracted folder of the same name, which holds `train/` and `val/`, each
with one folder per WordNet id. Splits (as the reference implementation): `train` is the official train
split; the official `val` split is halved into `validation` and `test` by a hash of the file name, so the
halves are fixed whatever the order of files.
"""

from __future__ import annotations

import zlib

import tensorflow_datasets as tfds

from vitshap_jax.data.base import Files, ImageBuilder, LocalDatasetInfo, find_download

# WordNet ids of the 10 classes, in label order, with readable names.
CLASSES = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888605": "parachute",
}
VARIANTS = ("imagenette2", "imagenette2-320", "imagenette2-160")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
INSTRUCTIONS = (
    "Download imagenette2.tgz (or the 320/160 px variant) from github.com/fastai/imagenette and put the "
    "archive, or the folder it extracts to, in the manual directory."
)


def val_half(filename: str) -> str:
    """`validation` or `test` for a file of the official val split (a fixed hash of its name)."""
    return "validation" if zlib.crc32(filename.encode()) % 2 == 0 else "test"


class Imagenette(ImageBuilder):
    name = "vitshap_imagenette"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "imagenette2 train; official val halved into validation/test."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

    def _info(self):
        return LocalDatasetInfo(
            builder=self,
            description="Imagenette: 10 easily classified ImageNet classes (fast.ai)",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=list(CLASSES)),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        candidates = [f"{v}{ext}" for v in VARIANTS for ext in ("", ".tgz", ".tar.gz")]
        files = Files(find_download(dl_manager.manual_dir, candidates, "imagenette", INSTRUCTIONS))
        return {split: self._generate_examples(files, split) for split in ("train", "validation", "test")}

    def _generate_examples(self, files: Files, split: str):
        def wanted(path):
            parts = path.split("/")
            if len(parts) < 3 or not path.lower().endswith(IMAGE_SUFFIXES) or parts[-2] not in CLASSES:
                return False
            official = parts[-3]
            if split == "train":
                return official == "train"
            return official == "val" and val_half(parts[-1]) == split

        count = 0
        for path, data in files.walk(wanted):
            image = self.decode_image(data, files.where(path))
            if image is not None:
                count += 1
                name = "/".join(path.split("/")[-3:])  # <official split>/<WordNet id>/<file>, archive or not
                yield name, {"image": image, "label": path.split("/")[-2], "file_name": name}
        if count == 0:
            raise ValueError(
                f"imagenette: no images for the {split} split in {files.path}; expected "
                f"{'train' if split == 'train' else 'val'}/<WordNet id>/*.JPEG inside it. {INSTRUCTIONS}"
            )
