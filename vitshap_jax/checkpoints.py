"""Orbax checkpoints of one stage directory `{workdir}/{stage}/`.

* `checkpoints/`: the latest train states (the last two), each with the input pipeline's state and
  JSON metadata (step, epoch, best metric so far, whether the run is complete). A run resumes from here.
* `best/`: the parameters with the best validation metric. The next stage loads these.
* `config.json`: the config the stage ran with; the next stage checks its upstream against it.

Orbax writes each checkpoint to a temporary folder and renames it when complete, so a run killed while
saving leaves the previous checkpoints intact.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"


def abstract(tree):
    """Shape/dtype/sharding of every leaf: the restore target that brings the same layout back."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class StageCheckpoints:
    def __init__(self, stage_dir: str, keep: int = 2):
        self.dir = os.path.abspath(stage_dir)
        self.latest = ocp.CheckpointManager(
            os.path.join(self.dir, "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "loader", "meta"),
        )
        self.best = ocp.CheckpointManager(
            os.path.join(self.dir, "best"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                create=True,
                # Both managers may save the same step; across processes their barriers need distinct names.
                multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix="best"),
            ),
            item_names=("params", "meta"),
        )

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def save_latest(self, step: int, state, loader_state: dict, meta: dict) -> None:
        self.latest.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                loader=ocp.args.JsonSave(loader_state),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def restore_latest(self, target):
        """(state, loader_state, meta) of the latest checkpoint, laid out like `target`."""
        r = self.latest.restore(
            self.latest.latest_step(),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract(target)),
                loader=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return r.state, r.loader, r.meta

    def latest_meta(self) -> dict | None:
        step = self.latest.latest_step()
        if step is None:
            return None
        return self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def save_best(self, step: int, params, meta: dict) -> None:
        self.best.save(
            step, args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta))
        )

    def delete_from(self, step: int) -> list[int]:
        """Deletes the latest and best checkpoints of steps >= `step` (saves must be finished: `wait`);
        returns the deleted steps of the latest checkpoints."""
        dropped = [s for s in self.latest.all_steps() if s >= step]
        for s in dropped:
            self.latest.delete(s)
        for s in self.best.all_steps():
            if s >= step:
                self.best.delete(s)
        return sorted(dropped)

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def load_best_params(stage_dir: str, target):
    """The best parameters of a finished stage, laid out like `target` (arrays or ShapeDtypeStructs).

    Leaves without a sharding go to one local device, so a checkpoint written on any topology (other
    device counts, several hosts) restores anywhere.
    """
    path = os.path.join(os.path.abspath(stage_dir), "best")
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            return abstract(x)
        return x if x.sharding is not None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local)

    with ocp.CheckpointManager(path, item_names=("params", "meta")) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(
                f"{path} holds no checkpoint: the stage in {stage_dir} has not saved one yet"
            )
        target = jax.tree.map(leaf, target)
        return manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params


def write_config(stage_dir: str, config) -> None:
    if jax.process_index() == 0:
        os.makedirs(stage_dir, exist_ok=True)
        with open(os.path.join(stage_dir, CONFIG_FILE), "w") as f:
            json.dump(config.to_dict(), f, indent=2, sort_keys=True)


def read_config(stage_dir: str) -> dict:
    with open(os.path.join(stage_dir, CONFIG_FILE)) as f:
        return json.load(f)
