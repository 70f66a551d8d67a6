"""CIFAR-10/100 builders on miniature downloads in the official pickle format (written here)."""

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
from ml_collections import config_dict

from tests.helpers import write_files
from vitshap_jax import data
from vitshap_jax.data import cifar
from vitshap_jax.data.base import DataNotFoundError

PER_BATCH, TEST = 20, 10
C10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _pixels(n: int) -> np.ndarray:
    """Image n as a CIFAR row: uint8 [3072], the R, G and B planes of 32x32 in turn. Decoded, pixel
    (y, x) must be (n, y, 100 + x): that pins the channel order and the row/column layout."""
    y, x = np.mgrid[:32, :32]
    return np.stack([np.full((32, 32), n), y, 100 + x]).astype(np.uint8).reshape(-1)


def _dump(value, protocol: int) -> bytes:
    raw = pickle.dumps(value, protocol=protocol)
    if protocol == 2:  # as numpy 1 (and the official files) name it
        raw = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    return raw


def _batch(first: int, count: int, labels: dict, protocol: int) -> bytes:
    ns = range(first, first + count)
    batch = {b"batch_label": b"batch", b"data": np.stack([_pixels(n) for n in ns])}
    batch |= {key.encode(): [rule(n) for n in ns] for key, rule in labels.items()}
    batch[b"filenames"] = [f"img_{n}.png".encode() for n in ns]
    return _dump(batch, protocol)


def _cifar10(protocol=2) -> dict[str, bytes]:
    """Train images 0..99 in five batches and test images 200..209; label n % 4 (25 per class)."""
    rule = {"labels": lambda n: n % 4}
    files = {f"data_batch_{i + 1}": _batch(i * PER_BATCH, PER_BATCH, rule, protocol) for i in range(5)}
    files["test_batch"] = _batch(200, TEST, rule, protocol)
    files["batches.meta"] = _dump(
        {b"label_names": [n.encode() for n in C10_NAMES], b"num_vis": 3072}, protocol
    )
    return {f"cifar-10-batches-py/{k}": v for k, v in files.items()}


def _cifar100(protocol=5) -> dict[str, bytes]:
    """Train images 0..99 in one file and test images 200..209; fine label n % 5, coarse 4 * (n % 5)."""
    rule = {"fine_labels": lambda n: n % 5, "coarse_labels": lambda n: 4 * (n % 5)}
    meta = {
        b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
    }
    files = {
        "train": _batch(0, 5 * PER_BATCH, rule, protocol),
        "test": _batch(200, TEST, rule, protocol),
        "meta": _dump(meta, protocol),
    }
    return {f"cifar-100-python/{k}": v for k, v in files.items()}


def _write(root, files: dict, archive: str | None = None):
    if archive:
        with tarfile.open(os.path.join(root, archive), "w:gz") as tf:
            for rel, content in files.items():
                info = tarfile.TarInfo(rel)
                info.size = len(content)
                tf.addfile(info, io.BytesIO(content))
        return
    write_files(root, files)


def _records(b, split):
    source = b.as_data_source(split=split)
    return [source[i] for i in range(len(source))]


def _number(record) -> int:
    image = record["image"]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    n = int(image[0, 0, 0])
    y, x = np.mgrid[:32, :32]
    np.testing.assert_array_equal(image[..., 0], n)
    np.testing.assert_array_equal(image[..., 1], y)
    np.testing.assert_array_equal(image[..., 2], 100 + x)
    return n


@pytest.mark.parametrize("form", ["archive", "folder"])
def test_cifar10_pixels_labels_names_and_split(tmp_path, form):
    _write(tmp_path, _cifar10(), "cifar-10-python.tar.gz" if form == "archive" else None)
    b = data.prepare("cifar10", str(tmp_path), str(tmp_path / "prepared"))
    assert b.info.features["label"].names == C10_NAMES
    with open(os.path.join(b.data_path, data.CLASS_NAMES_FILE)) as f:
        assert f.read().splitlines() == C10_NAMES
    numbers = {}
    for split in data.SPLITS:
        records = _records(b, split)
        numbers[split] = sorted(_number(r) for r in records)
        assert all(r["label"] == _number(r) % 4 for r in records)
    # 25 training images per class; the 10th and 20th of each (k = 9, 19) go to validation.
    assert numbers["validation"] == [36, 37, 38, 39, 76, 77, 78, 79]
    assert numbers["train"] == sorted(set(range(100)) - set(numbers["validation"]))
    assert numbers["test"] == list(range(200, 210))
    config = config_dict.ConfigDict(
        {
            "dataset": dict(
                name="cifar10", manual_dir=None, data_dir=str(tmp_path / "prepared"), on_bad_image="fail"
            )
        }
    )
    assert data.dataset_classes(config) == C10_NAMES


def test_cifar100_fine_and_coarse_labels_from_the_extracted_folder_itself(tmp_path):
    _write(tmp_path, _cifar100())
    b = data.prepare("cifar100", str(tmp_path / "cifar-100-python"), str(tmp_path / "prepared"))
    assert b.info.features["label"].names == [f"fine{i}" for i in range(100)]
    assert b.info.features["coarse_label"].names == [f"coarse{i}" for i in range(20)]
    numbers = {}
    for split in data.SPLITS:
        records = _records(b, split)
        numbers[split] = sorted(_number(r) for r in records)
        assert all((r["label"], r["coarse_label"]) == (_number(r) % 5, 4 * (_number(r) % 5)) for r in records)
    assert numbers["validation"] == [45, 46, 47, 48, 49, 95, 96, 97, 98, 99]  # 20 per class: k = 9, 19
    assert len(numbers["train"]) == 90 and numbers["test"] == list(range(200, 210))


def test_validation_takes_every_tenth_image_of_each_class():
    labels = np.array([0, 1] * 15 + [2] * 9)  # 15, 15 and 9 images
    mask = cifar.validation_mask(labels)
    assert np.flatnonzero(mask).tolist() == [18, 19]  # the 10th 0 and the 10th 1; class 2 gives none
    official = np.repeat(np.arange(10), 5000)[np.random.default_rng(0).permutation(50000)]
    mask = cifar.validation_mask(official)
    assert mask.sum() == 5000 and np.bincount(official[mask]).tolist() == [500] * 10


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with pytest.raises(ValueError, match=r"evil: not a CIFAR .*refusing to load (posix|os|nt)\.system"):
        cifar.load_pickle(pickle.dumps({b"data": Exploit()}), "evil")
    assert not marker.exists()
    # The same file as a member of a download: the error names it.
    files = _cifar10()
    files["cifar-10-batches-py/data_batch_3"] = pickle.dumps({b"data": Exploit()}, protocol=2)
    _write(tmp_path, files)
    with pytest.raises(ValueError, match=r"cifar-10-batches-py/data_batch_3: not a CIFAR .*refusing"):
        data.prepare("cifar10", str(tmp_path), str(tmp_path / "prepared"))
    assert not marker.exists()
    for allowed in (2, 5):  # what numpy writes, old and new: arrays, dtypes, bytes, lists
        value = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"labels": [1, 2]}
        loaded = cifar.load_pickle(_dump(value, allowed), "ok")
        np.testing.assert_array_equal(loaded[b"data"], value[b"data"])


def test_missing_or_incomplete_download_says_what_to_get(tmp_path):
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(
        DataNotFoundError,
        match=r"cifar10: expected .*cifar-10-batches-py or .*cifar-10-python\.tar\.gz\. .*toronto\.edu/~kriz",
    ):
        data.prepare("cifar10", str(tmp_path), str(tmp_path / "p"))
    with pytest.raises(
        DataNotFoundError, match=r"cifar100: expected .*cifar-100-python\.tar\.gz.*kriz/cifar"
    ):
        data.prepare("cifar100", str(tmp_path), str(tmp_path / "p"))
    files = _cifar10()
    del files["cifar-10-batches-py/data_batch_4"]
    _write(tmp_path, files)
    with pytest.raises(
        DataNotFoundError, match=r"lacks cifar-10-batches-py/data_batch_4; it is not a complete"
    ):
        data.prepare("cifar10", str(tmp_path), str(tmp_path / "p"))
    with pytest.raises(ValueError, match=r"cifar10 takes its class names from the data: use dataset_classes"):
        data.class_names("cifar10")
