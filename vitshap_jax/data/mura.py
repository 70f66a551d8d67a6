"""Stanford MURA v1.1 musculoskeletal radiographs: abnormal (positive) vs normal, one label per study.

Accepted in the manual directory: the folder `MURA-v1.1/` or the archive `MURA-v1.1.zip`. It holds
`train_image_paths.csv`, `train_labeled_studies.csv`, `valid_image_paths.csv`,
`valid_labeled_studies.csv` and the images,
`{train,valid}/XR_<BODYPART>/patientNNNNN/studyK_<positive|negative>/imageM.png`.
Every image takes its study's label from the `*_labeled_studies.csv` files, which must agree with the
study folder's name. Splits: `test` is the official `valid` split; the official `train` split is
divided by patient (one patient in ten, by a fixed hash of the patient id, goes to `validation`), so no
patient is in two splits. Grayscale X-rays are stored as 3 channels (PNG, lossless).
"""

from __future__ import annotations

import csv
import io
import os
import zlib

import tensorflow_datasets as tfds

from vitshap_jax.data.base import DataNotFoundError, Files, ImageBuilder, LocalDatasetInfo, find_download

BODY_PARTS = ("XR_ELBOW", "XR_FINGER", "XR_FOREARM", "XR_HAND", "XR_HUMERUS", "XR_SHOULDER", "XR_WRIST")
ROOT = "MURA-v1.1"
INSTRUCTIONS = (
    "MURA is distributed by the Stanford ML Group under a research-use agreement: accept it at "
    "stanfordmlgroup.github.io/competitions/mura/, download MURA-v1.1.zip, and put the archive, or the "
    "MURA-v1.1/ folder it extracts to, in the manual directory."
)


def is_validation(patient: str) -> bool:
    """One training patient in ten goes to `validation` (a fixed hash of the patient id)."""
    return zlib.crc32(patient.encode()) % 10 == 0


def parse_image_path(path: str) -> dict[str, str]:
    """`MURA-v1.1/train/XR_WRIST/patient00012/study1_positive/image3.png` -> its parts."""
    parts = path.strip().split("/")
    if len(parts) != 6 or parts[0] != ROOT or parts[2] not in BODY_PARTS or not parts[4].startswith("study"):
        raise ValueError(
            f"{path!r} is not {ROOT}/<split>/XR_<BODYPART>/patientNNNNN/studyK_<label>/imageM.png"
        )
    return {"split": parts[1], "body_part": parts[2], "patient": parts[3], "study": "/".join(parts[:5]) + "/"}


class Mura(ImageBuilder):
    name = "vitshap_mura"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "official valid as test; train split 9:1 by patient into train/validation."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

    def _info(self):
        return LocalDatasetInfo(
            builder=self,
            description="MURA: musculoskeletal radiographs labelled normal/abnormal per study",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=["negative", "positive"]),
                    "body_part": tfds.features.ClassLabel(names=BODY_PARTS),
                    "patient": tfds.features.Text(),
                    "study": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        found = find_download(dl_manager.manual_dir, [ROOT, f"{ROOT}.zip"], "mura", INSTRUCTIONS)
        files = Files(os.path.dirname(found) if os.path.isdir(found) else found)
        train, test = self._read_split(files, "train"), self._read_split(files, "valid")
        return {
            "train": self._generate_examples(files, [e for e in train if not is_validation(e["patient"])]),
            "validation": self._generate_examples(files, [e for e in train if is_validation(e["patient"])]),
            "test": self._generate_examples(files, test),
        }

    def _read_csv(self, files: Files, name: str) -> list[list[str]]:
        try:
            text = files.read(f"{ROOT}/{name}").decode()
        except (FileNotFoundError, KeyError):
            raise DataNotFoundError(
                f"mura: {files.where(f'{ROOT}/{name}')} is missing. {INSTRUCTIONS}"
            ) from None
        return [row for row in csv.reader(io.StringIO(text)) if row]

    def _read_split(self, files: Files, split: str) -> list[dict]:
        labels = {}
        for row in self._read_csv(files, f"{split}_labeled_studies.csv"):
            study = row[0] if row[0].endswith("/") else row[0] + "/"
            labels[study] = int(row[1])
        entries = []
        for row in self._read_csv(files, f"{split}_image_paths.csv"):
            entry = parse_image_path(row[0]) | {"path": row[0].strip()}
            study = entry["study"]
            if study not in labels:
                raise ValueError(
                    f"mura: study {study} of {entry['path']} is not in {split}_labeled_studies.csv"
                )
            folder_label = 1 if study.rstrip("/").endswith("_positive") else 0
            if labels[study] != folder_label:
                raise ValueError(
                    f"mura: {split}_labeled_studies.csv labels {study} {labels[study]}, its folder name says "
                    f"{folder_label}: the download is inconsistent"
                )
            entries.append(entry | {"label": labels[study]})
        return entries

    def _generate_examples(self, files: Files, entries: list[dict]):
        for e in entries:
            try:
                data = files.read(e["path"])
            except (FileNotFoundError, KeyError):
                where = files.where(e["path"])
                raise DataNotFoundError(
                    f"mura: {where}, listed in the image-paths CSV, is missing. {INSTRUCTIONS}"
                ) from None
            image = self.decode_image(data, files.where(e["path"]))
            if image is not None:
                yield (
                    e["path"],
                    {
                        "image": image,
                        "label": e["label"],
                        "body_part": e["body_part"],
                        "patient": e["patient"],
                        "study": e["study"],
                    },
                )
