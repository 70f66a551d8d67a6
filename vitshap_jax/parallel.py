"""The device mesh and the shardings every stage uses: data parallel over one "data" axis.

Parameters and optimizer state are replicated; batches are split along their first axis over all
devices of all processes. Each process loads only its own slice of a global batch
(`process_batch_slice`) and `global_batch` assembles the slices into one global array. Build the mesh
once (in launch.py) and pass it down.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process), axis "data".

    Uses `Mesh(...)`, whose axes are `Auto`: `jax.make_mesh` would default to Explicit axes, under which
    ordinary data-parallel model code fails to trace (jax 0.10).
    """
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of parameters and optimizer state: a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: its first axis split over the "data" axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    """Raises ValueError unless the global batch splits evenly over devices and processes."""
    devices = mesh.devices.size
    if global_batch_size % devices:
        raise ValueError(
            f"config.train.batch_size={global_batch_size} does not split over {devices} devices: "
            f"use a multiple of {devices}"
        )


def process_batch_slice(global_batch_size: int, mesh: Mesh) -> slice:
    """The rows of a global batch that this process loads (its devices' shards, contiguous)."""
    check_batch_size(global_batch_size, mesh)
    sharding = batch_sharding(mesh)
    index_map = sharding.addressable_devices_indices_map((global_batch_size,))
    starts = sorted(idx[0].start or 0 for idx in index_map.values())
    per_device = global_batch_size // mesh.devices.size
    start, stop = starts[0], starts[-1] + per_device
    if stop - start != per_device * len(starts):
        raise ValueError("this process's devices do not hold a contiguous block of the batch")
    return slice(start, stop)


def global_batch(local_batch, mesh: Mesh):
    """Assembles per-process arrays (a pytree, leading axis = this process's rows) into global arrays
    sharded over "data". On one process this is a plain `device_put` with the batch sharding."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def to_host(tree):
    """Global arrays -> numpy arrays with every row, on every process (allgather across hosts)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
