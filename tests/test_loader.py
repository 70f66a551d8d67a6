"""The grain pipeline over prepared digits: shapes, determinism, resume, sharding, transforms."""

import itertools

import jax
import numpy as np
import pytest

from tests.helpers import load
from vitshap_jax import data, parallel
from vitshap_jax.config import ConfigError, validate
from vitshap_jax.data import loader, transforms


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    c = load("classifier", "digits")
    c.dataset.data_dir = str(tmp_path_factory.mktemp("tfds"))
    c.train.batch_size = 64
    return c


@pytest.fixture(scope="module")
def train_source(config):
    return data.open_split(config, "train")


def _dataset(config, source, rows=None, seed=0, train=True, epochs=2, g=64):
    return loader.batches(
        source,
        loader.config_transform(config, train),
        global_batch_size=g,
        rows=rows or slice(0, g),
        seed=seed,
        train=train,
        num_epochs=epochs,
    )


def _take(loader, k):
    return [b for b in itertools.islice(loader, k)]


def test_batches_have_fixed_shapes_and_dtypes(config, train_source):
    ds = _dataset(config, train_source)
    assert len(ds) == 2 * 1257 // 64
    b = ds[0]
    assert b["image"].shape == (64, 8, 8, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["index"].dtype == np.int32 and b["valid"].all()
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0  # inception normalization
    np.testing.assert_array_equal(b["label"], [train_source[int(i)]["label"] for i in b["index"]])


def test_order_is_deterministic_per_seed_and_reshuffled_every_epoch(config, train_source):
    a = [b["index"] for b in _dataset(config, train_source, seed=3)]
    b = [b["index"] for b in _dataset(config, train_source, seed=3)]
    c = [b["index"] for b in _dataset(config, train_source, seed=4)]
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))
    stream = np.concatenate(a)
    first, second = stream[:1257], stream[1257:]
    assert sorted(first) == list(range(1257))  # each epoch is a permutation of the split
    assert not np.array_equal(first[: len(second)], second)


def test_two_processes_read_disjoint_rows_that_make_the_global_batch(config, train_source):
    whole = _dataset(config, train_source, rows=slice(0, 64))
    p0 = _dataset(config, train_source, rows=slice(0, 32))
    p1 = _dataset(config, train_source, rows=slice(32, 64))
    assert len(p0) == len(p1) == len(whole)
    for step in (0, 7, len(whole) - 1):
        i0, i1 = p0[step]["index"], p1[step]["index"]
        assert not set(i0) & set(i1)
        np.testing.assert_array_equal(np.concatenate([i0, i1]), whole[step]["index"])
        np.testing.assert_array_equal(
            np.concatenate([p0[step]["image"], p1[step]["image"]]), whole[step]["image"]
        )


def test_eval_covers_every_example_once_with_padding_flagged(config):
    source = data.open_split(config, "test")
    ds = _dataset(config, source, train=False)
    assert len(ds) == -(-270 // 64)
    batches = list(ds)
    valid = np.concatenate([b["valid"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    assert valid.sum() == 270 and not valid[270:].any()
    assert sorted(index[valid]) == list(range(270))


@pytest.mark.parametrize("consumed", [1, 5])
def test_resume_from_state_continues_with_the_same_batches(config, train_source, consumed):
    mesh = parallel.make_mesh()
    full = loader.DeviceIterator(loader.make_loader(config, train_source, True, mesh, num_epochs=2), mesh)
    reference = [np.asarray(b["index"]) for b in itertools.islice(full, consumed + 3)]

    first = loader.DeviceIterator(loader.make_loader(config, train_source, True, mesh, num_epochs=2), mesh)
    _take(first, consumed)  # the device iterator has prefetched further than this
    state = first.get_state()
    resumed_loader = loader.make_loader(config, train_source, True, mesh, num_epochs=2)
    resumed_loader.set_state(state)
    resumed = loader.DeviceIterator(resumed_loader, mesh)
    got = [np.asarray(b["index"]) for b in itertools.islice(resumed, 3)]
    assert len(got) == 3  # an empty or short resumed iterator fails here
    for expected, batch in zip(reference[consumed:], got, strict=True):
        np.testing.assert_array_equal(batch, expected)


def test_device_batches_are_global_arrays_sharded_over_data(config, train_source):
    mesh = parallel.make_mesh()
    it = loader.DeviceIterator(loader.make_loader(config, train_source, True, mesh), mesh)
    batch = next(it)
    assert isinstance(batch["image"], jax.Array) and batch["image"].shape == (64, 8, 8, 3)
    assert batch["image"].sharding == parallel.batch_sharding(mesh)
    assert {s.data.shape for s in batch["image"].addressable_shards} == {(8, 8, 8, 3)}


def test_worker_processes_give_the_same_batches(config, train_source):
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    ds = _dataset(config, train_source, epochs=1)
    plain = list(loader.Loader(ds, workers=0))
    workers = list(loader.Loader(ds, workers=2))
    assert len(plain) == len(workers) > 1
    for key in ("index", "image", "label"):  # the decoded, augmented images too, not only which ones
        np.testing.assert_array_equal(
            np.concatenate([b[key] for b in plain]), np.concatenate([b[key] for b in workers]), err_msg=key
        )


def test_class_count_mismatch_is_an_error_before_training(config):
    c = load("classifier", "digits")
    c.dataset.data_dir = config.dataset.data_dir
    c.dataset.num_classes = 9
    with pytest.raises(ValueError, match=r"num_classes=9 but the prepared digits data .* has 10 classes"):
        data.open_split(c, "train")


def test_unprepared_dataset_says_how_to_prepare_it(config, tmp_path):
    c = load("classifier", "pet")
    c.dataset.data_dir = str(tmp_path)
    with pytest.raises(
        data.DataNotFoundError, match=r"(?s)pet is not prepared .* python -c .*prepare\('pet'"
    ):
        data.open_split(c, "train")


# ---- transforms


def test_eval_transform_resizes_the_shorter_side_and_center_crops():
    image = np.zeros((300, 400, 3), np.uint8)
    image[:, 150:250] = 255  # a vertical band around the center column
    out = transforms.eval_transform(image, size=224, resize_size=256, norm="inception")
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    # 300x400 -> 256x341; the band (x 150..250 -> 96..213) lies at 96-58..213-58 of the crop.
    assert out[:, 112, 0].min() == 1.0 and out[:, 10, 0].max() == -1.0


def test_train_transform_is_deterministic_per_rng_and_stays_in_range():
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    kw = dict(size=32, crop_scale_min=0.5, hflip=True, norm="imagenet")
    a = transforms.train_transform(image, np.random.default_rng(1), **kw)
    b = transforms.train_transform(image, np.random.default_rng(1), **kw)
    c = transforms.train_transform(image, np.random.default_rng(2), **kw)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (32, 32, 3) and not np.array_equal(a, c)
    for seed in range(50):
        top, left, h, w = transforms.random_resized_crop_box(50, 70, np.random.default_rng(seed), (0.5, 1.0))
        assert 0 <= top and top + h <= 50 and 0 <= left and left + w <= 70
        assert 0.5 * 3500 * 0.9 <= h * w <= 3500


def test_train_transform_without_crop_or_flip_only_normalizes():
    image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    out = transforms.train_transform(
        image, np.random.default_rng(0), size=8, crop_scale_min=1.0, hflip=False, norm="inception"
    )
    np.testing.assert_allclose(out, image / 127.5 - 1, atol=1e-6)


@pytest.mark.parametrize("late", [False, True], ids=["init-first", "init-after-death"])
def test_a_worker_exits_when_its_parent_is_killed(late):
    """`exit_with_parent` (the grain workers' init): SIGKILL the parent, the child ends by itself, also
    when the child reaches its init only after the parent is gone (already adopted by init: the race
    that failed CI when the parent's pid was read in the child)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import os, sys, time\n"
        "from vitshap_jax.data.loader import exit_with_parent\n"
        "parent = os.getpid()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        f"    while {late} and os.getppid() == parent:\n"
        "        time.sleep(0.01)\n"
        "    exit_with_parent(parent=parent, interval=0.05)\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print(pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child, 0)  # still there (or a zombie of init, reaped soon)
            with open(f"/proc/{child}/stat") as f:
                if f.read().split(")")[1].split()[0] == "Z":
                    break
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the child outlived its killed parent by 10 s")


def test_a_train_loader_without_augmentation_reads_images_as_evaluation_does(config, train_source):
    """`make_loader(..., augment=False)` (the explainer with precomputed labels): still shuffled, but
    each image is the evaluation view of its `index`; with augmentation (the default) it is not."""
    mesh = parallel.make_mesh()
    evaluate = loader.config_transform(config, False)
    for augment in (False, True):
        batch = next(iter(loader.make_loader(config, train_source, True, mesh, augment=augment)))
        index = np.asarray(batch["index"])
        assert not np.array_equal(index, np.arange(len(index)))  # shuffled either way
        views = np.stack([evaluate(np.asarray(train_source[int(i)]["image"]), None) for i in index])
        assert np.allclose(np.asarray(batch["image"]), views, atol=1e-6) is (not augment)


def test_targets_travel_with_their_examples_sharded_over_the_devices(config, train_source):
    """`WithTargets`: each batch carries `targets[index]` as float32 "target", shuffled with its images
    and split over the mesh's devices like them (8 devices: each holds 8 rows, none the whole table)."""
    n = len(train_source)
    targets = np.random.default_rng(0).standard_normal((n, 4, 3)).astype(np.float32)
    source = loader.WithTargets(train_source, targets)
    assert len(source) == n and source[5]["label"] == train_source[5]["label"]
    np.testing.assert_array_equal(source[5]["image"], train_source[5]["image"])
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 8
    batches = loader.DeviceIterator(loader.make_loader(config, source, True, mesh, augment=False), mesh)
    for batch in itertools.islice(batches, 3):
        assert batch["target"].dtype == np.float32 and batch["target"].shape == (64, 4, 3)
        assert [s.data.shape for s in batch["target"].addressable_shards] == [(8, 4, 3)] * 8
        np.testing.assert_array_equal(np.asarray(batch["target"]), targets[np.asarray(batch["index"])])
    assert "target" not in _dataset(config, train_source)[0]  # only a source with targets gives them
    with pytest.raises(ValueError, match="3 targets for 1257 examples"):
        loader.WithTargets(train_source, targets[:3])


def test_fixed_views_are_the_image_then_crops_drawn_once(train_source):
    """`FixedViews` (labels of augmented views, `explainer.target_views`): K x N examples, view 0 the
    image itself, views k > 0 crops of it at its own size, the same pixels at every read and in another
    process's copy (drawn from (seed, i, k)), other crops under another seed; labels are the image's."""
    n = len(train_source)
    views = loader.FixedViews(train_source, 3, seed=0, crop_scale_min=0.5, hflip=True)
    again = loader.FixedViews(train_source, 3, seed=0, crop_scale_min=0.5, hflip=True)
    other = loader.FixedViews(train_source, 3, seed=1, crop_scale_min=0.5, hflip=True)
    assert len(views) == 3 * n
    cropped, per_view, per_seed = [], [], []  # a crop may by chance be (nearly) the whole image
    for i in (0, 5, n - 1):
        image = np.asarray(train_source[i]["image"])
        np.testing.assert_array_equal(views[i]["image"], image)
        for k in (1, 2):
            view = views[k * n + i]
            assert view["image"].shape == image.shape and view["image"].dtype == np.uint8
            assert view["label"] == train_source[i]["label"]
            np.testing.assert_array_equal(view["image"], again[k * n + i]["image"])
            cropped.append(not np.array_equal(view["image"], image))
            per_seed.append(not np.array_equal(view["image"], other[k * n + i]["image"]))
        per_view.append(not np.array_equal(views[n + i]["image"], views[2 * n + i]["image"]))
    assert sum(cropped) >= 5 and sum(per_seed) >= 5 and sum(per_view) >= 2
    with pytest.raises(IndexError):
        views[3 * n]


def test_mixed_views_blend_a_crop_with_another_image_drawn_once(train_source):
    """`FixedViews(mix=m)` (`explainer.view_mix`): view 0 stays the image, views k > 0 are
    `(1 - w) * own crop + w * a crop of another example`, w uniform in [0, m), the same at every read;
    `mix=0` gives exactly the plain crops (the labels of runs without it stay valid)."""
    n = len(train_source)
    plain = loader.FixedViews(train_source, 3, seed=0, crop_scale_min=0.5, hflip=True)
    zero = loader.FixedViews(train_source, 3, seed=0, crop_scale_min=0.5, hflip=True, mix=0.0)
    mixed = loader.FixedViews(train_source, 3, seed=0, crop_scale_min=0.5, hflip=True, mix=0.5)
    for j in (0, 5, n + 5, 2 * n - 1):
        np.testing.assert_array_equal(zero[j]["image"], plain[j]["image"])
    np.testing.assert_array_equal(mixed[5]["image"], plain[5]["image"])  # view 0: the image itself
    assert not np.array_equal(mixed[n + 5]["image"], plain[n + 5]["image"])
    again = loader.FixedViews(train_source, 3, seed=0, crop_scale_min=0.5, hflip=True, mix=0.5)
    np.testing.assert_array_equal(mixed[n + 5]["image"], again[n + 5]["image"])  # another process's copy
    assert mixed[n + 5]["label"] == train_source[5]["label"]

    # Constant images (crops of them are the same constant): image 0 black, the others 200. A view of
    # image 0 is then w * 200 everywhere, with w in [0, 0.5) and its mean near 0.25: another image's.
    black = {"image": np.zeros((8, 8, 3), np.uint8), "label": 0}
    grey = {"image": np.full((8, 8, 3), 200, np.uint8), "label": 1}
    source = [black] + [grey] * 9
    views = loader.FixedViews(source, 400, seed=0, crop_scale_min=0.5, hflip=True, mix=0.5)
    values = []
    for k in range(1, 400):
        image = views[k * len(source)]["image"]
        assert (image == image.flat[0]).all() and views[k * len(source)]["label"] == 0
        values.append(image.flat[0] / 200)
    assert 0 <= min(values) and max(values) < 0.5 + 1e-2 and abs(np.mean(values) - 0.25) < 0.03
    with pytest.raises(ValueError, match="mix=1.0"):
        loader.FixedViews(source, 2, seed=0, crop_scale_min=0.5, hflip=True, mix=1.0)


def test_train_examples_cuts_the_training_split_to_its_first_examples(config, train_source):
    """`dataset.train_examples=N` (learning curves): the training split's first N examples, the same ones
    as the whole split's; the other splits whole; more than the split has, or a negative N, is refused."""
    c = config.copy_and_resolve_references()
    c.dataset.train_examples = 100
    first = data.open_split(c, "train")
    assert len(first) == 100
    for i in (0, 57, 99):
        np.testing.assert_array_equal(first[i]["image"], train_source[i]["image"])
        assert first[i]["label"] == train_source[i]["label"]
    with pytest.raises(IndexError):
        first[100]
    assert len(data.open_split(c, "test")) == len(data.open_split(config, "test"))
    c.dataset.train_examples = len(train_source) + 1
    with pytest.raises(
        ValueError, match=f"train_examples={len(train_source) + 1} but .* has {len(train_source)}"
    ):
        data.open_split(c, "train")
    c.dataset.train_examples = -1
    with pytest.raises(ConfigError, match="config.dataset.train_examples=-1: must be >= 0"):
        validate(c)
