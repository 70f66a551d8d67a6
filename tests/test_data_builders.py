"""Dataset builders on miniature copies of each official layout (written here; no download, no TF)."""

import os
import tarfile
import zipfile

import numpy as np
import pytest
from sklearn.datasets import load_digits

from tests.helpers import _image_bytes, _imagenette_tree, _mura_tree, write_files
from vitshap_jax import data
from vitshap_jax.data import imagenette, mura, pet
from vitshap_jax.data.base import BadImageError, DataNotFoundError


def _tar(path, root, members):
    with tarfile.open(path, "w:gz") as tf:
        for m in members:
            tf.add(os.path.join(root, m), arcname=m)


def _records(builder, split):
    source = builder.as_data_source(split=split)
    return [source[i] for i in range(len(source))]


def test_digits_fixed_split_and_labels(tmp_path):
    b = data.prepare("digits", data_dir=str(tmp_path))
    sizes = {s: b.info.splits[s].num_examples for s in data.SPLITS}
    assert sizes == {"train": 1257, "validation": 270, "test": 270}
    digits = load_digits()
    wanted = {int(i) for i in data.digits.split_indices()["test"]}
    for record in _records(b, "test")[:40]:
        image = record["image"]
        assert image.shape == (8, 8, 3) and image.dtype == np.uint8
        matches = [i for i in wanted if np.array_equal(np.round(digits.images[i] * 255 / 16), image[..., 0])]
        assert matches and all(digits.target[i] == record["label"] for i in matches)


def test_a_prepared_dataset_is_reused(tmp_path, monkeypatch):
    b = data.prepare("digits", data_dir=str(tmp_path))
    stamp = os.path.getmtime(os.path.join(b.data_path, "dataset_info.json"))

    def no_rebuild(self, dl_manager):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(data.digits.Digits, "_split_generators", no_rebuild)
    again = data.prepare("digits", data_dir=str(tmp_path))
    assert os.path.getmtime(os.path.join(again.data_path, "dataset_info.json")) == stamp


# ---- imagenette


@pytest.mark.parametrize("archive", [False, True])
def test_imagenette_splits_and_labels(tmp_path, archive):
    manual = tmp_path / "manual"
    files = _imagenette_tree(manual)
    if archive:  # the .tgz as downloaded, folder removed
        _tar(tmp_path / "imagenette2.tgz", manual, ["imagenette2"])
        manual = tmp_path
        import shutil

        shutil.rmtree(tmp_path / "manual")
    b = data.prepare("imagenette", str(manual), str(tmp_path / "prepared"))
    names = b.info.features["label"].names
    assert names == list(imagenette.CLASSES) and b.info.features["label"].num_classes == 10
    records = {s: _records(b, s) for s in data.SPLITS}
    assert len(records["train"]) == 9
    val_files = sorted(k.removeprefix("imagenette2/") for k in files if "/val/" in k)
    got_val = sorted(r["file_name"].decode() for s in ("validation", "test") for r in records[s])
    assert got_val == val_files  # the official val split, halved: nothing lost, nothing twice
    for split in data.SPLITS:
        for r in records[split]:
            path = r["file_name"].decode()
            assert names[r["label"]] == path.split("/")[-2]
            assert r["image"].shape == (10, 12, 3)
            if split != "train":
                assert imagenette.val_half(path.split("/")[-1]) == split


def test_imagenette_bad_image_fails_or_is_skipped_and_counted(tmp_path):
    manual = tmp_path / "manual"
    _imagenette_tree(manual, corrupt=True)
    prepared = str(tmp_path / "prepared")
    with pytest.raises(BadImageError, match=r"broken\.JPEG: cannot read the image.*on_bad_image='skip'"):
        data.prepare("imagenette", str(manual), prepared)
    b = data.prepare(
        "imagenette", str(manual), prepared, on_bad_image="skip"
    )  # nothing half-written in the way
    assert b.info.splits["train"].num_examples == 9
    with open(os.path.join(b.data_path, data.SKIPPED_FILE)) as f:
        assert [line.split("/")[-1] for line in f.read().splitlines()] == ["broken.JPEG"]


APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "  # a `._*` sidecar's header, not an image


@pytest.mark.parametrize("archive", [None, "tgz"])
def test_hidden_files_and_mac_sidecars_are_not_images(tmp_path, archive):
    """As a copy from a Mac leaves them: `._*` AppleDouble sidecars next to every image, `.DS_Store`
    files and a hidden folder."""
    manual = tmp_path / "manual"
    files = _imagenette_tree(manual)
    junk = {"imagenette2/.DS_Store": b"\x00\x00\x00\x01Bud1", "imagenette2/.cache/x.JPEG": b"junk"}
    for rel in list(files):
        if rel.endswith(".JPEG"):
            folder, name = rel.rsplit("/", 1)
            junk[f"{folder}/._{name}"] = APPLEDOUBLE
            junk[f"{folder}/.DS_Store"] = b"\x00\x00\x00\x01Bud1"
    write_files(manual, junk)
    if archive == "tgz":
        _tar(tmp_path / "imagenette2.tgz", manual, ["imagenette2"])
        manual = tmp_path
        import shutil

        shutil.rmtree(tmp_path / "manual")
    # Strict policy: a sidecar decoded as an image would stop the preparation.
    b = data.prepare("imagenette", str(manual), str(tmp_path / "prepared"))
    assert {s: b.info.splits[s].num_examples for s in ("train",)} == {"train": 9}
    assert b.info.splits["validation"].num_examples + b.info.splits["test"].num_examples == 12
    assert not b.skipped


def test_a_zip_made_on_a_mac_lists_no_sidecars(tmp_path):
    from vitshap_jax.data.base import Files

    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        for rel in ("MURA-v1.1/train/x/image1.png", "MURA-v1.1/.DS_Store"):
            zf.writestr(rel, b"data")
            zf.writestr(f"__MACOSX/{os.path.dirname(rel)}/._{os.path.basename(rel)}", APPLEDOUBLE)
    assert [p for p, _ in Files(str(tmp_path / "a.zip")).walk(lambda p: True)] == [
        "MURA-v1.1/train/x/image1.png"
    ]


def test_an_empty_download_folder_is_reported_like_a_missing_one(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "mac").mkdir()
    (tmp_path / "mac" / ".DS_Store").write_bytes(b"\x00")
    for name in ("imagenette", "pet", "mura"):
        for folder in ("empty", "mac"):
            with pytest.raises(
                DataNotFoundError, match=rf"{name}: the download folder '.*{folder}' is empty\. "
            ):
                data.prepare(name, str(tmp_path / folder), str(tmp_path / "p"))
    # An extracted folder with nothing in it counts as not there.
    (tmp_path / "sub" / "imagenette2").mkdir(parents=True)
    (tmp_path / "sub" / "imagenette2" / "._train").write_bytes(APPLEDOUBLE)
    with pytest.raises(DataNotFoundError, match=r"imagenette: expected .*imagenette2\.tgz"):
        data.prepare("imagenette", str(tmp_path / "sub"), str(tmp_path / "p"))


def test_missing_download_says_what_goes_where(tmp_path):
    (tmp_path / "unrelated.txt").write_text("not the download")
    with pytest.raises(
        DataNotFoundError, match=r"imagenette: expected .*imagenette2\.tgz.*fastai/imagenette"
    ):
        data.prepare("imagenette", str(tmp_path), str(tmp_path / "p"))
    with pytest.raises(DataNotFoundError, match=r"mura: expected .*MURA-v1\.1.*stanfordmlgroup.github.io"):
        data.prepare("mura", str(tmp_path), str(tmp_path / "p"))
    with pytest.raises(DataNotFoundError, match=r"pet: expected .*images\.tar\.gz.*robots\.ox\.ac\.uk"):
        data.prepare("pet", str(tmp_path), str(tmp_path / "p"))
    with pytest.raises(
        DataNotFoundError, match=r"pet: the download folder '/nonexistent' does not exist.*robots"
    ):
        data.prepare("pet", "/nonexistent", str(tmp_path / "p"))
    with pytest.raises(
        DataNotFoundError, match=r"mura: the download folder None does not exist.*stanfordmlgroup"
    ):
        data.prepare("mura", None, str(tmp_path / "p"))


# ---- Oxford-IIIT Pet

PET_BREEDS = [(1, "Abyssinian", 1), (2, "american_bulldog", 2), (8, "Bombay", 1)]


def _pet_tree(root, per_breed=12, test_per_breed=3):
    files, trainval, test = {}, [], []
    for class_id, breed, species in PET_BREEDS:
        for i in range(1, per_breed + test_per_breed + 1):
            files[f"images/{breed}_{i}.jpg"] = _image_bytes(seed=class_id * 100 + i)
            (trainval if i <= per_breed else test).append(f"{breed}_{i} {class_id} {species} 1")
    files["images/Abyssinian_1.mat"] = b"matlab"  # the official archive has a few .mat files
    files["annotations/trainval.txt"] = "\n".join(trainval) + "\n"
    files["annotations/test.txt"] = "\n".join(test) + "\n"
    files["annotations/list.txt"] = "#Image CLASS-ID SPECIES BREED ID\n"
    write_files(root, files)
    return trainval, test


def test_pet_official_split_from_archives(tmp_path):
    src = tmp_path / "src"
    trainval, test = _pet_tree(src)
    _tar(tmp_path / "images.tar.gz", src, ["images"])
    _tar(tmp_path / "annotations.tar.gz", src, ["annotations"])
    b = data.prepare("pet", str(tmp_path), str(tmp_path / "prepared"))
    assert b.info.features["label"].num_classes == 37
    records = {s: _records(b, s) for s in data.SPLITS}
    assert len(records["test"]) == len(test)
    assert len(records["train"]) + len(records["validation"]) == len(trainval)
    assert records["validation"], "the miniature should put some trainval images in validation"
    breeds = dict((b_, (c - 1, s - 1)) for c, b_, s in PET_BREEDS)
    for split, rs in records.items():
        for r in rs:
            stem = os.path.basename(r["file_name"].decode())[:-4]
            assert (r["label"], r["species"]) == breeds[stem.rsplit("_", 1)[0]]
            assert pet.is_validation(stem) == (split == "validation") or split == "test"


def test_pet_annotation_naming_the_wrong_breed_is_an_error(tmp_path):
    _pet_tree(tmp_path)
    write_files(tmp_path, {"annotations/test.txt": "Bombay_13 2 1 1\n"})
    with pytest.raises(ValueError, match=r"test\.txt, line 1: class id 2 does not name 'Bombay'"):
        data.prepare("pet", str(tmp_path), str(tmp_path / "prepared"))


# ---- MURA


@pytest.mark.parametrize("archive", [False, True])
def test_mura_labels_follow_the_study_and_patients_stay_in_one_split(tmp_path, archive):
    manual = tmp_path / "manual"
    rows = _mura_tree(manual)
    if archive:
        with zipfile.ZipFile(tmp_path / "MURA-v1.1.zip", "w") as zf:
            for dirpath, _, names in os.walk(manual):
                for name in names:
                    full = os.path.join(dirpath, name)
                    zf.write(full, os.path.relpath(full, manual))
        manual = tmp_path
    b = data.prepare("mura", str(manual), str(tmp_path / "prepared"))
    assert b.info.features["label"].names == ["negative", "positive"]
    records = {s: _records(b, s) for s in data.SPLITS}
    assert len(records["train"]) + len(records["validation"]) == len(rows["train"][0])
    assert len(records["test"]) == len(rows["valid"][0])
    assert records["validation"] and records["train"]
    patients = {s: {r["patient"] for r in rs} for s, rs in records.items()}
    assert not patients["train"] & patients["validation"]
    assert not (patients["train"] | patients["validation"]) & patients["test"]
    for rs in records.values():
        for r in rs:
            study = r["study"].decode()
            assert r["label"] == (1 if study.rstrip("/").endswith("positive") else 0)
            assert mura.BODY_PARTS[r["body_part"]] == study.split("/")[2]
            assert r["image"].shape == (10, 12, 3)  # grayscale X-ray, 3 channels
            assert np.array_equal(r["image"][..., 0], r["image"][..., 2])


def test_mura_inconsistent_or_missing_csv_is_an_error(tmp_path):
    rows = _mura_tree(tmp_path, patients=3)
    study, label = rows["train"][1][0].rsplit(",", 1)
    flipped = [f"{study},{1 - int(label)}"] + rows["train"][1][1:]
    write_files(tmp_path, {"MURA-v1.1/train_labeled_studies.csv": "\n".join(flipped) + "\n"})
    with pytest.raises(ValueError, match="labels .*study1_negative.* 1, its folder name says 0"):
        data.prepare("mura", str(tmp_path), str(tmp_path / "prepared"))
    write_files(tmp_path, {"MURA-v1.1/train_labeled_studies.csv": "\n".join(rows["train"][1]) + "\n"})
    os.remove(tmp_path / "MURA-v1.1" / "valid_image_paths.csv")
    with pytest.raises(DataNotFoundError, match=r"valid_image_paths\.csv is missing"):
        data.prepare("mura", str(tmp_path), str(tmp_path / "prepared"))


@pytest.mark.parametrize("name", sorted(data.BUILDERS))
def test_a_builder_of_an_unprepared_folder_leaves_no_temporary_folder(tmp_path, monkeypatch, name):
    # tfds's own DatasetInfo makes an empty /tmp/tmp*tfds folder per builder of an unprepared folder
    # (its GCS lookup, off here); ours skips that lookup.
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    source = tmp_path / "source"
    source.mkdir()
    builder = data.builder(name, str(tmp_path / "prepared"), manual_dir=str(source))
    assert builder.info.name and not builder.is_prepared()
    assert os.listdir(scratch) == []
