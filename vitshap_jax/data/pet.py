"""Oxford-IIIT Pet (37 breeds) from the user's `images.tar.gz` and `annotations.tar.gz`.

Accepted in the manual directory: the two archives, or the folders `images/` and `annotations/` they
extract to. Splits: `test` is the official `annotations/test.txt`; the official `trainval.txt` is split
into `train` and `validation` (one image in ten, by a fixed hash of its name).
"""

from __future__ import annotations

import os
import zlib

import tensorflow_datasets as tfds

from vitshap_jax.data.base import DataNotFoundError, Files, ImageBuilder, LocalDatasetInfo, find_download

# The 37 breeds in the order of their official class ids (1..37).
BREEDS = (
    "Abyssinian american_bulldog american_pit_bull_terrier basset_hound beagle Bengal Birman Bombay boxer "
    "British_Shorthair chihuahua Egyptian_Mau english_cocker_spaniel english_setter german_shorthaired "
    "great_pyrenees havanese japanese_chin keeshond leonberger Maine_Coon miniature_pinscher newfoundland "
    "Persian pomeranian pug Ragdoll Russian_Blue saint_bernard samoyed scottish_terrier shiba_inu Siamese "
    "Sphynx staffordshire_bull_terrier wheaten_terrier yorkshire_terrier"
).split()
INSTRUCTIONS = (
    "Download images.tar.gz and annotations.tar.gz from www.robots.ox.ac.uk/~vgg/data/pets/ and put both "
    "archives, or the folders images/ and annotations/ they extract to, in the manual directory."
)


def is_validation(name: str) -> bool:
    """One trainval image in ten goes to `validation` (a fixed hash of its name)."""
    return zlib.crc32(name.encode()) % 10 == 0


def read_split_file(files: Files, filename: str) -> dict[str, tuple[int, int]]:
    """`trainval.txt` / `test.txt`: image name -> (label 0..36, species 0 cat / 1 dog)."""
    found = [(p, d) for p, d in files.walk(lambda p: os.path.basename(p) == filename)]
    if not found:
        raise DataNotFoundError(f"pet: {filename} is not in {files.path}. {INSTRUCTIONS}")
    path, data = found[0]
    entries = {}
    for number, line in enumerate(data.decode().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split()
        try:
            name, class_id, species = fields[0], int(fields[1]), int(fields[2])
        except (IndexError, ValueError):
            where = f"{files.where(path)}, line {number}"
            raise ValueError(f"{where}: expected 'name class_id species breed_id'") from None
        breed = name.rsplit("_", 1)[0]
        if not 1 <= class_id <= len(BREEDS) or BREEDS[class_id - 1] != breed:
            raise ValueError(
                f"{files.where(path)}, line {number}: class id {class_id} does not name {breed!r}"
            )
        entries[name] = (class_id - 1, species - 1)
    return entries


class Pet(ImageBuilder):
    name = "vitshap_pet"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "official trainval/test; validation = 1 in 10 of trainval by name hash."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

    def _info(self):
        return LocalDatasetInfo(
            builder=self,
            description="The Oxford-IIIT Pet dataset: 37 cat and dog breeds",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=BREEDS),
                    "species": tfds.features.ClassLabel(names=["cat", "dog"]),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        manual = dl_manager.manual_dir
        images = Files(find_download(manual, ["images", "images.tar.gz"], "pet", INSTRUCTIONS))
        notes = Files(find_download(manual, ["annotations", "annotations.tar.gz"], "pet", INSTRUCTIONS))
        trainval, test = read_split_file(notes, "trainval.txt"), read_split_file(notes, "test.txt")
        train = {k: v for k, v in trainval.items() if not is_validation(k)}
        validation = {k: v for k, v in trainval.items() if is_validation(k)}
        return {
            "train": self._generate_examples(images, train),
            "validation": self._generate_examples(images, validation),
            "test": self._generate_examples(images, test),
        }

    def _generate_examples(self, images: Files, entries: dict[str, tuple[int, int]]):
        def wanted(path):
            stem, ext = os.path.splitext(os.path.basename(path))
            return ext.lower() == ".jpg" and stem in entries

        seen = set()
        for path, data in images.walk(wanted):
            stem = os.path.splitext(os.path.basename(path))[0]
            seen.add(stem)
            image = self.decode_image(data, images.where(path))
            if image is not None:
                label, species = entries[stem]
                yield stem, {"image": image, "label": label, "species": species, "file_name": path}
        missing = sorted(set(entries) - seen)
        if missing:
            raise FileNotFoundError(
                f"pet: {len(missing)} images listed in the annotations are not in {images.path}, e.g. "
                f"{', '.join(m + '.jpg' for m in missing[:5])}. {INSTRUCTIONS}"
            )
