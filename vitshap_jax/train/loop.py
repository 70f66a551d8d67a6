"""`fit`: the training loop every stage shares.

It resumes from the latest checkpoint (train state + input-pipeline state) if one exists, runs the
jitted train step over the epochs, evaluates on the validation split after each epoch (or every
`config.train.eval_every_epochs`-th and the last), keeps the
best parameters by the stage's metric, and writes metrics as JSON lines (`metrics.jsonl`) and
TensorBoard events (`tensorboard/`). On an interactive terminal a progress bar shows the running loss
and throughput; otherwise plain log lines every `config.train.log_every_steps`.

A non-finite loss stops the run with NonFiniteLossError, and no checkpoint is kept that is not good: a
state is saved only when every array in it is finite (checked on the device) and the losses up to it
were finite; when the loss at step j turns out non-finite, the checkpoints of steps j - 1 and later
(whose parameters produced it) are deleted, so what is kept is a state that gave a finite loss.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vitshap_jax import checkpoints as ckpt_lib
from vitshap_jax.data.loader import DeviceIterator, make_loader
from vitshap_jax.errors import UserError


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became NaN or infinite."""


class Interrupted(RuntimeError):
    """The run stopped on SIGTERM (preemption) or SIGINT (Ctrl-C) after saving its checkpoint.
    `exit_status` is 128 + the signal number, as a shell reports a run killed by it."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


class _StopSignals:
    """Turns SIGTERM and SIGINT into a flag the loop reads between steps (main thread only); a second
    signal of the same kind falls back to its default action, so a stuck run can still be killed."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum
        signal.signal(signum, signal.SIG_DFL)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class Task:
    """What a stage hands to `fit`.

    state: the initial train state, a pytree with an int "step" leaf, replicated on the mesh.
    train_step: `(state, batch) -> (state, {"loss": scalar, ...})`, jitted, state donated.
    evaluate: `(state, split) -> {name: float}` over a whole split.
    select: the validation metric that picks the best checkpoint, and "min" or "max".
    export: `state -> params` saved as the stage's best checkpoint.
    augment: whether the training images are augmented (False: as evaluation reads them, e.g. when the
      batches carry something computed per image, `data.loader.WithTargets`).
    """

    state: Any
    train_step: Callable
    evaluate: Callable[[Any, str], dict]
    select: tuple[str, str]
    export: Callable[[Any], Any]
    augment: bool = True


class _Metrics:
    """JSON lines and TensorBoard on process 0. Resuming after step `resume_step` first drops what was
    written for later steps (they run again), so no step appears twice."""

    def __init__(self, stage_dir: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        path = os.path.join(stage_dir, "metrics.jsonl")
        if os.path.exists(path):  # keep what the steps up to the restored one wrote (none: from scratch)

            def kept_line(line: str) -> bool:
                try:
                    return json.loads(line).get("step", 0) <= resume_step
                except ValueError:  # a line cut short by a kill
                    return False

            with open(path) as f:
                kept = [line for line in f if line.strip() and kept_line(line)]
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)
        self.jsonl = open(path, "a")  # noqa: SIM115 -- closed in close()
        from tensorboardX import SummaryWriter

        purge = {"purge_step": resume_step + 1}
        self.tb = SummaryWriter(os.path.join(stage_dir, "tensorboard"), **purge)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for name, value in metrics.items():
            if isinstance(value, int | float):
                self.tb.add_scalar(name, value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def _epoch_ends(num_examples: int, batch_size: int, epochs: int, every: int = 1) -> dict[int, int]:
    """Step (1-based count) after which an epoch is over -> epoch number (1-based), for every `every`-th
    epoch and the last (the epochs that are validated and checkpointed)."""
    kept = [e for e in range(1, epochs + 1) if e % every == 0 or e == epochs]
    return {max(1, (e * num_examples) // batch_size): e for e in kept}


def _better(value: float, best: float | None, mode: str) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value < best if mode == "min" else value > best


@jax.jit
def _finite(tree) -> jax.Array:
    """Whether every floating-point array of `tree` is finite (one scalar, reduced on the device)."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def fit(task: Task, config, stage_dir: str, mesh, train_source, *, stop_after: int | None = None) -> dict:
    """Trains until `config.train.epochs` are done; returns the best validation metrics.

    `stop_after` ends the run after that many steps without a final checkpoint, as if the process
    had been killed there (used by the resume tests).
    """
    epochs = config.train.epochs
    loader = make_loader(config, train_source, True, mesh, num_epochs=epochs, augment=task.augment)
    total = len(loader)
    every = config.train.get("eval_every_epochs", 1)
    ends = _epoch_ends(len(train_source), config.train.batch_size, config.train.epochs, every)
    metric, mode = task.select
    checkpoints = ckpt_lib.StageCheckpoints(stage_dir)
    state, best, best_metrics = task.state, None, {}
    if checkpoints.latest_step() is not None:
        state, loader_state, meta = checkpoints.restore_latest(state)
        loader.set_state(loader_state)
        best, best_metrics = meta["best"], meta["best_metrics"]
        logging.info("%s: resuming at step %d of %d", stage_dir, meta["step"], total)
    start = int(jax.device_get(state["step"]))
    if start >= total:
        checkpoints.close()
        return best_metrics
    batches = DeviceIterator(loader, mesh)
    writer = _Metrics(stage_dir, start)
    signals = _StopSignals()
    logging.info(
        "%s: training steps %d to %d (SIGTERM or Ctrl-C saves and stops)", stage_dir, start + 1, total
    )
    bar = None
    if sys.stderr.isatty() and jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc=os.path.basename(stage_dir), unit="step")
    pending, last_checked, t0 = [], start, time.perf_counter()

    def stop(what: str, first_bad: int):
        """Deletes the checkpoints of steps >= `first_bad` (their state is not good) and raises."""
        checkpoints.wait()
        dropped = checkpoints.delete_from(first_bad)
        kept = checkpoints.latest_step()
        where = (
            f"the last good checkpoint (step {kept}) is kept in {checkpoints.latest.directory}"
            if kept is not None
            else "no good checkpoint was saved, so a rerun starts from scratch"
        )
        note = (
            f" (deleted the checkpoints of steps {', '.join(map(str, dropped))}: they led there)"
            if dropped
            else ""
        )
        raise NonFiniteLossError(
            f"{stage_dir}: {what}; {where}{note}. "
            "Rerun unchanged to resume from it, or lower config.optim.lr (or raise "
            "config.optim.warmup_steps) with --config.restart=True to start over (the run is moved aside)."
        )

    def check_state(step: int):
        """A state is saved only if every array in it is finite."""
        if not bool(jax.device_get(_finite(state))):
            stop(f"the parameters after step {step} are not finite (the loss before it was)", step)

    def check(step: int) -> dict:
        """Host sync: fails on a non-finite loss since the last check; returns the mean metrics."""
        nonlocal pending, last_checked, t0
        if not pending:
            return {}
        values = jax.device_get(pending)
        means = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
        bad = [last_checked + 1 + i for i, v in enumerate(values) if not np.isfinite(v["loss"])]
        if bad:
            stop(
                f"the training loss became {values[bad[0] - last_checked - 1]['loss']} at step {bad[0]}",
                bad[0] - 1,
            )
        elapsed = time.perf_counter() - t0
        means["examples_per_sec"] = len(values) * config.train.batch_size / max(elapsed, 1e-9)
        pending, last_checked, t0 = [], step, time.perf_counter()
        return means

    try:
        for step in range(start + 1, total + 1):
            state, step_metrics = task.train_step(state, next(batches))
            pending.append(step_metrics)
            if bar is not None:
                bar.update(1)
            epoch = ends.get(step)
            save = epoch is not None or step % config.train.checkpoint_every_steps == 0 or step == total
            if step % config.train.log_every_steps == 0 or save:
                train_metrics = check(step)
                writer.write(step, {f"train/{k}": v for k, v in train_metrics.items()})
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{train_metrics['loss']:.4g}", ex_s=f"{train_metrics['examples_per_sec']:.0f}"
                    )
                else:
                    logging.info("step %d/%d %s", step, total, json.dumps(train_metrics))
            if epoch is not None:
                val = task.evaluate(state, "validation")
                writer.write(step, {f"val/{k}": v for k, v in val.items()} | {"epoch": epoch})
                logging.info("epoch %d/%d validation %s", epoch, config.train.epochs, json.dumps(val))
                for name in ("loss", "kl"):
                    if name in val and not math.isfinite(val[name]):
                        stop(f"the validation {name} became {val[name]} after step {step}", step)
                if _better(val[metric], best, mode):
                    check_state(step)
                    best, best_metrics = val[metric], val
                    checkpoints.save_best(step, task.export(state), {"step": step, "epoch": epoch, **val})
                t0 = time.perf_counter()  # throughput counts training steps only
            stopping = signals.received is not None
            if jax.process_count() > 1 and (step % config.train.log_every_steps == 0 or save):
                from jax.experimental import multihost_utils  # every process stops at the same step

                stopping = bool(multihost_utils.process_allgather(np.int32(stopping)).any())
            elif jax.process_count() > 1:
                stopping = False
            if save or stopping:
                if not save:
                    check(step)
                check_state(step)
                meta = {"step": step, "total_steps": total, "complete": step == total}
                checkpoints.save_latest(
                    step, state, batches.get_state(), meta | {"best": best, "best_metrics": best_metrics}
                )
            if stopping:
                checkpoints.wait()
                name = signal.Signals(signals.received or signal.SIGTERM).name
                raise Interrupted(
                    f"stopped by {name} after step {step} of {total}; its checkpoint is saved in "
                    f"{checkpoints.latest.directory}: rerun the same command to resume",
                    128 + int(signals.received or signal.SIGTERM),
                )
            if stop_after is not None and step >= stop_after:
                break
    finally:
        signals.restore()
        checkpoints.wait()
        checkpoints.close()
        writer.close()
        if bar is not None:
            bar.close()
    return best_metrics


def is_complete(stage_dir: str) -> bool:
    """Whether the stage in `stage_dir` finished all its steps."""
    if not os.path.isdir(os.path.join(stage_dir, "checkpoints")):
        return False
    checkpoints = ckpt_lib.StageCheckpoints(stage_dir)
    try:
        meta = checkpoints.latest_meta()
    finally:
        checkpoints.close()
    return bool(meta and meta.get("complete"))
