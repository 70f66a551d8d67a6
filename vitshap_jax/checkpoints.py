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
from absl import logging

from vitshap_jax.errors import UserError

CONFIG_FILE = "config.json"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or a run's config.json is missing or damaged; the message names it and what to do."""


def _reason(e: Exception) -> str:
    """The first line of an exception, for a one-line message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def abstract(tree):
    """Shape/dtype/sharding of every leaf: the restore target that brings the same layout back."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _whole_arrays_on_one_process() -> None:
    """On one process, orbax writes each array whole from one device instead of slicing it over its
    replicas ("replica-parallel" saving: orbax's default unless JAX_PLATFORMS names a GPU, which it reads
    when imported). Every replica is on this host, so the split buys no write bandwidth, and slicing
    compiles a program per array shape: a ViT-Ti train state on 8 CPU devices saved in 4.98 s first and
    2.64 s after, against 1.00 s and 0.95 s whole (benchmarks/checkpoint_save.py). Several processes
    keep orbax's default: each host writes its share. (The handler's option is private in orbax 0.12;
    where it is absent nothing changes.)"""
    if jax.process_count() > 1:
        return
    handler = ocp.type_handlers.get_type_handler(jax.Array)
    if getattr(handler, "_use_replica_parallel", False):
        # Set on the registered handler itself: registering a changed copy would work too, but orbax logs
        # a warning ("overriding jax.Array") in every run's log for it.
        handler._use_replica_parallel = False


class StageCheckpoints:
    def __init__(self, stage_dir: str, keep: int = 2):
        _whole_arrays_on_one_process()
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

    def _newest_that_restores(self, restore, drop_damaged: bool = False):
        """`restore(step)` of the newest latest-checkpoint that restores; an older one when the newer is
        damaged (a truncated, zero-filled or missing file after a crash or a full disk), each skip logged
        in one line. CheckpointError if none restores."""
        skipped, damaged = [], []
        for step in sorted(self.latest.all_steps(), reverse=True):
            try:
                restored = restore(step)
            except Exception as e:  # orbax and tensorstore raise many kinds for damaged files
                damaged.append(step)
                skipped.append(f"step {step}: {_reason(e)}")
                logging.warning(
                    "skipped the checkpoint of step %d in %s: it does not restore (%s)",
                    step,
                    self.latest.directory,
                    _reason(e),
                )
                continue
            if damaged and drop_damaged:  # or orbax would skip every save up to the damaged step
                for bad in damaged:
                    self.latest.delete(bad)
            return restored
        raise CheckpointError(
            f"no checkpoint in {self.latest.directory} restores ({'; '.join(skipped)}): delete "
            f"{self.dir} to start this stage over"
        )

    def restore_latest(self, target):
        """(state, loader_state, meta) of the newest checkpoint that restores, laid out like `target`."""

        def restore(step):
            r = self.latest.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract(target)),
                    loader=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
            return r.state, r.loader, r.meta

        return self._newest_that_restores(restore, drop_damaged=True)

    def latest_meta(self) -> dict | None:
        """The metadata of the newest checkpoint whose metadata reads, or None without checkpoints."""
        if self.latest.latest_step() is None:
            return None
        return self._newest_that_restores(
            lambda step: self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        )

    def save_best(self, step: int, params, meta: dict) -> None:
        self.best.save(
            step, args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta))
        )

    def delete_from(self, step: int) -> list[int]:
        """Deletes the latest checkpoints of steps >= `step` (saves must be finished: `wait`) and returns
        their steps. The best checkpoint stays: it was finite and validated when it was saved."""
        dropped = [s for s in self.latest.all_steps() if s >= step]
        for s in dropped:
            self.latest.delete(s)
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

    if not os.path.isdir(path):
        raise CheckpointError(
            f"{stage_dir} has no best/ checkpoint: the stage has not finished its first epoch there, or "
            "best/ was removed. Run (or finish) that stage with its launch command"
        )
    with ocp.CheckpointManager(path, item_names=("params", "meta")) as manager:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(
                f"{path} holds no checkpoint: the stage in {stage_dir} has not finished its first epoch, or "
                "its checkpoint was removed. Run (or finish) that stage with its launch command"
            )
        target = jax.tree.map(leaf, target)
        try:
            return manager.restore(
                step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))
            ).params
        except Exception as e:  # a damaged file: name it instead of a long traceback
            raise CheckpointError(
                f"the best checkpoint (step {step}) in {path} does not restore ({_reason(e)}): it is "
                "damaged; rerun that stage in a fresh directory"
            ) from None


def write_config(stage_dir: str, config) -> None:
    """Writes `config.json` (process 0) through a temporary file, so a kill never leaves it half-written."""
    if jax.process_index() == 0:
        os.makedirs(stage_dir, exist_ok=True)
        path = os.path.join(stage_dir, CONFIG_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(config.to_dict(), f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)


def read_config(stage_dir: str) -> dict:
    """The config a stage ran with; CheckpointError naming the file when it is not a JSON object."""
    path = os.path.join(stage_dir, CONFIG_FILE)
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        config, problem = None, f"not valid JSON ({e})" if text.strip() else "empty"
    else:
        problem = "not a JSON object"
    if not isinstance(config, dict) or "stage" not in config:
        raise CheckpointError(
            f"{path} is {problem if config is None else problem + ' with a stage'}: it is damaged or not "
            "written by vitshap_jax. Delete that stage directory to start it over"
        )
    return config
