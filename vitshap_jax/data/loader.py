"""Input pipeline: a random-access source -> grain -> fixed-shape batches -> global arrays on the mesh.

The global batch at step k is a fixed function of (seed, k): positions k*G .. k*G+G-1 of a stream that
visits the split once per epoch in a fresh permutation (training) or in order (evaluation). Each process
reads only its own rows of every global batch (`parallel.process_batch_slice`), so the data a run sees
does not depend on the number of processes or devices. Augmentation draws from an rng seeded by
(seed, global position), for the same reason.

Every batch is a dict of numpy arrays: `image` float32 `[L, S, S, 3]`, `label` int32 `[L]`, `index` int32
`[L]` (the example's index in its split; use it to seed per-example randomness such as validation masks),
and `valid` bool `[L]` (False on the padding that completes the last evaluation batch); a source whose
examples carry a "target" (`WithTargets`) adds it, float32 `[L, ...]`. L is this process's share of the
global batch.
"""

from __future__ import annotations

import functools
import os
import time
from collections import deque

import grain
import numpy as np

from vitshap_jax import parallel
from vitshap_jax.data import transforms


def batches(
    source,
    transform,
    *,
    global_batch_size: int,
    rows: slice,
    seed: int,
    train: bool,
    num_epochs: int = 1,
) -> grain.MapDataset:
    """This process's batches of `source` as a grain MapDataset (random access by step).

    Args:
      source: random-access examples with "image" (uint8 `[H, W, 3]`) and "label".
      transform: `(image, rng) -> float32 [S, S, 3]`; rng is a numpy Generator.
      global_batch_size: G, the batch over all processes.
      rows: this process's rows of each global batch.
      train: shuffle every epoch and drop the incomplete last batch; otherwise visit the split once in
        order and pad the last batch (flagged `valid=False`).
      num_epochs: passes over the data (training).
    """
    n, g = len(source), global_batch_size
    if n == 0:
        raise ValueError("the split is empty")
    local = rows.stop - rows.start
    if train:
        order = grain.MapDataset.range(n).shuffle(seed=seed).repeat(num_epochs)
        total = n * num_epochs
        steps = total // g
        if steps == 0:
            raise ValueError(f"a global batch of {g} is larger than the {total} training examples")
    else:
        order, total = grain.MapDataset.range(n), n
        steps = -(-n // g)
    load = functools.partial(
        _load,
        source=source,
        order=order,
        transform=transform,
        g=g,
        local=local,
        start=rows.start,
        total=total,
        seed=seed,
    )
    return grain.MapDataset.range(steps * local).map(load).batch(local, drop_remainder=True)


def _load(p, *, source, order, transform, g, local, start, total, seed):
    position = (p // local) * g + start + p % local  # in the global stream
    valid = position < total
    index = int(order[position]) if valid else 0  # padding repeats example 0, flagged invalid
    example = source[index]
    rng = np.random.default_rng([seed, position])
    out = {
        "image": transform(np.asarray(example["image"]), rng),
        "label": np.int32(example["label"]),
        "index": np.int32(index),
        "valid": np.bool_(valid),
    }
    if "target" in example:
        out["target"] = np.asarray(example["target"], np.float32)
    return out


def config_transform(config, train: bool):
    """The train or eval transform that `config.dataset` / `config.model` describe."""
    d = config.dataset
    if train:
        return functools.partial(
            transforms.train_transform,
            size=d.image_size,
            crop_scale_min=d.crop_scale_min,
            hflip=d.hflip,
            norm=transforms.normalization_of(config),
        )
    return lambda image, rng: transforms.eval_transform(
        image, size=d.image_size, resize_size=d.resize_size, norm=transforms.normalization_of(config)
    )


def exit_with_parent(
    worker_index: int = 0, worker_count: int = 0, *, parent: int | None = None, interval: float = 1.0
) -> None:
    """Makes this (worker) process exit when the process that started it is gone.

    A killed trainer (SIGKILL, OOM killer) cannot stop its grain workers; each worker runs this at start
    (`mp_prefetch(worker_init_fn=...)`): a daemon thread that ends the worker once its parent process id
    is no longer `parent` (the orphan is adopted by init or a subreaper). Pass `parent` (the trainer's
    `os.getpid()`, taken before the workers start): a worker that reaches its init only after the
    trainer died then exits at once; without it the parent is read here, and such a late worker, already
    adopted, would watch its adopter and live on.
    """
    import threading

    if parent is None:
        parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(0)

    threading.Thread(target=watch, name="exit_with_parent", daemon=True).start()


class Loader:
    """Iterates local batches with grain (threads, optional worker processes); resumable.

    `get_state()` is a JSON-able dict to store with a checkpoint; `set_state()` continues with the next
    batch after the one that was consumed last when the state was taken.
    """

    def __init__(
        self, dataset: grain.MapDataset, *, workers: int = 0, read_threads: int = 4, prefetch: int = 4
    ):
        self.steps = len(dataset)
        it_ds = dataset.to_iter_dataset(
            grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
        )
        if workers > 0:  # needs parsed absl flags (launch.py does it; tests mark them parsed)
            it_ds = it_ds.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=workers),
                worker_init_fn=functools.partial(exit_with_parent, parent=os.getpid()),
            )
        self._iterator = iter(it_ds)

    def __len__(self):
        return self.steps

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._iterator)

    def get_state(self) -> dict:
        return self._iterator.get_state()

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state)


def make_loader(
    config, source, split_is_train: bool, mesh, *, num_epochs: int = 1, augment: bool = True
) -> Loader:
    """The Loader of a stage config over `source`, with this process's rows of `mesh`. A train split is
    shuffled every epoch and, unless `augment=False`, augmented (else read as evaluation reads it)."""
    g = config.train.batch_size
    dataset = batches(
        source,
        config_transform(config, split_is_train and augment),
        global_batch_size=g,
        rows=parallel.process_batch_slice(g, mesh),
        seed=config.seed,
        train=split_is_train,
        num_epochs=num_epochs,
    )
    d = config.dataset
    return Loader(dataset, workers=d.workers, read_threads=d.read_threads, prefetch=d.prefetch)


class DeviceIterator:
    """Global arrays sharded over the mesh's "data" axis, `size` batches ahead of the consumer.

    `get_state()` is the loader state after the last batch *handed out*, not after the ones prefetched,
    so a checkpoint taken between steps resumes exactly at the next step.
    """

    def __init__(self, loader: Loader, mesh, size: int = 2):
        self.loader, self.mesh, self.size = loader, mesh, size
        self._queue: deque = deque()
        self._state = loader.get_state()

    def __iter__(self):
        return self

    def _fill(self):
        while len(self._queue) < self.size:
            try:
                batch = next(self.loader)
            except StopIteration:
                return
            self._queue.append((parallel.global_batch(batch, self.mesh), self.loader.get_state()))

    def __next__(self):
        self._fill()
        if not self._queue:
            raise StopIteration
        batch, self._state = self._queue.popleft()
        return batch

    def get_state(self) -> dict:
        return self._state


class FixedViews:
    """`views` fixed views of every example of `source`, as one random-access source of `views x N`
    examples: example `k * N + i` is view k of example i (its label too). View 0 is the image itself;
    view k > 0 is a random-resized-crop (area fraction in [crop_scale_min, 1], and a horizontal flip with
    probability 1/2 where `hflip`) scaled back to the image's own size, drawn once from
    (seed, i, k), so every read of it gives the same pixels. A loader reads them as evaluation reads
    any image (`augment=False`): the training set of an explainer regressed on labels computed once per
    view (`explainer.target_views`), augmented without losing the labels.

    With `mix` > 0 (`explainer.view_mix`) view k > 0 is also blended with such a crop of another example
    j (drawn from the same seed), `(1 - w) * own + w * other` with w uniform in [0, mix): inputs between
    two classes (on digits they did not make the explainer more accurate: docs/explainer_training.md).
    The view keeps example i's label (the regression target is the view's own KernelSHAP label)."""

    def __init__(
        self, source, views: int, *, seed: int, crop_scale_min: float, hflip: bool, mix: float = 0.0
    ):
        if views < 1:
            raise ValueError(f"views={views}: must be at least 1")
        if not 0.0 <= mix < 1.0 or (mix > 0 and len(source) < 2):
            raise ValueError(f"mix={mix}: must be in [0, 1), and needs two examples or more")
        self.source, self.views, self.seed = source, views, seed
        self.crop_scale_min, self.hflip, self.mix = crop_scale_min, hflip, mix

    def __len__(self):
        return self.views * len(self.source)

    def __getitem__(self, j):
        k, i = divmod(int(j), len(self.source))
        if not 0 <= k < self.views:
            raise IndexError(f"view example {j} of {len(self)}")
        example = self.source[i]
        image = np.asarray(example["image"])
        if k > 0:  # the train transform's crop and flip, at the image's own size
            rng = np.random.default_rng([self.seed, i, k])
            height, width = image.shape[:2]
            crop = dict(crop_scale_min=self.crop_scale_min, hflip=self.hflip)
            image = transforms.random_crop(image, rng, width, height, **crop)
            if self.mix > 0:
                j = (i + 1 + int(rng.integers(len(self.source) - 1))) % len(self.source)  # not i
                other = np.asarray(self.source[j]["image"])
                other = transforms.random_crop(other, rng, width, height, **crop)
                w = rng.uniform(0.0, self.mix)
                blend = (1.0 - w) * image.astype(np.float32) + w * other.astype(np.float32)
                image = np.clip(np.rint(blend), 0, 255).astype(image.dtype)
        return {"image": image, "label": example["label"]}


class WithTargets:
    """`source` with `targets[i]` as example i's "target": per-example values computed once (the
    explainer's fixed labels) that then travel with the batches, sharded over the devices like the
    images, instead of living on every device whole."""

    def __init__(self, source, targets: np.ndarray):
        if len(targets) != len(source):
            raise ValueError(f"{len(targets)} targets for {len(source)} examples")
        self.source, self.targets = source, targets

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return {**self.source[i], "target": self.targets[int(i)]}


def per_example(eval_step, params: tuple, config, source, mesh) -> dict[str, np.ndarray]:
    """Runs `eval_step(*params, batch)` over a whole split; per-example numpy arrays, padding removed."""
    loader = make_loader(config, source, False, mesh)
    outputs = []
    for batch in DeviceIterator(loader, mesh):
        out = eval_step(*params, batch)
        outputs.append(parallel.to_host({**out, "valid": batch["valid"], "label": batch["label"]}))
    joined = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
    valid = joined.pop("valid")
    return {k: v[valid] for k, v in joined.items()}
