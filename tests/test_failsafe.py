"""Fail-safe runs: damaged checkpoints fall back, a stage directory has one writer, SIGTERM saves and
stops, and the mistakes a user can make give one line naming the file or field."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitshap_jax import checkpoints, parallel
from vitshap_jax.stages import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _two_checkpoints(path):
    """A stage directory with the latest checkpoints of steps 1 and 2 (a small state)."""
    mesh = parallel.make_mesh()
    rep = parallel.replicated(mesh)
    manager = checkpoints.StageCheckpoints(str(path))
    for step in (1, 2):
        w = jax.random.normal(jax.random.key(step), (128, 128)).at[0, 0].set(step)  # incompressible
        state = jax.device_put({"step": jnp.int32(step), "w": w}, rep)
        manager.save_latest(step, state, {"batch": step}, {"step": step, "complete": False})
    manager.wait()
    manager.close()
    return jax.device_put({"step": jnp.int32(0), "w": jnp.zeros((128, 128))}, rep)


def _largest_file(folder):
    files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate", "zero_fill", "delete"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_older_one(tmp_path, damage, caplog):
    target = _two_checkpoints(tmp_path)
    victim = _largest_file(tmp_path / "checkpoints" / "2" / "state")
    size = os.path.getsize(victim)
    if damage == "truncate":
        os.truncate(victim, size // 2)
    elif damage == "zero_fill":
        with open(victim, "r+b") as f:
            f.write(b"\0" * size)
    else:
        os.remove(victim)
    manager = checkpoints.StageCheckpoints(str(tmp_path))
    with caplog.at_level("WARNING"):
        state, loader, meta = manager.restore_latest(target)
    assert meta["step"] == 1 and loader == {"batch": 1} and float(state["w"][0, 0]) == 1.0
    assert any("skipped the checkpoint of step 2" in r.getMessage() for r in caplog.records)
    # The damaged step is gone, so the resumed run's next save (step 2 again) is written, not skipped.
    manager.save_latest(2, state, {"batch": 2}, {"step": 2, "complete": False})
    manager.wait()
    _, _, meta = manager.restore_latest(target)
    manager.close()
    assert meta["step"] == 2


def test_one_process_writes_whole_arrays_and_restores_them_replicated(tmp_path):
    """On one process StageCheckpoints turns off orbax's replica-parallel writing (a compiled slicing
    program per array shape; benchmarks/checkpoint_save.py): the state still comes back bit for bit,
    replicated over all 8 devices."""
    import orbax.checkpoint as ocp

    target = _two_checkpoints(tmp_path)
    handler = ocp.type_handlers.get_type_handler(jax.Array)
    assert getattr(handler, "_use_replica_parallel", False) is False
    manager = checkpoints.StageCheckpoints(str(tmp_path))
    state, _, meta = manager.restore_latest(target)
    manager.close()
    want = jax.random.normal(jax.random.key(2), (128, 128)).at[0, 0].set(2)
    assert meta["step"] == 2 and int(state["step"]) == 2
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(want))
    assert state["w"].sharding.is_fully_replicated and len(state["w"].sharding.device_set) == 8


def test_no_restorable_checkpoint_is_one_line(tmp_path):
    target = _two_checkpoints(tmp_path)
    for step in ("1", "2"):
        os.remove(_largest_file(tmp_path / "checkpoints" / step / "state"))
    manager = checkpoints.StageCheckpoints(str(tmp_path))
    with pytest.raises(
        checkpoints.CheckpointError, match=r"no checkpoint in .* restores \(step 2: .*; step 1: "
    ):
        manager.restore_latest(target)
    manager.close()


def test_missing_best_and_damaged_config_name_the_file(tmp_path):
    with pytest.raises(
        checkpoints.CheckpointError, match="has no best/ checkpoint: the stage has not finished"
    ):
        checkpoints.load_best_params(str(tmp_path), {"w": jnp.zeros(3)})
    for text, what in (
        ("", "is empty"),
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "is not a JSON object"),
    ):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(checkpoints.CheckpointError, match=f"config.json {what}"):
            checkpoints.read_config(str(tmp_path))


def test_a_stage_directory_has_one_writer(tmp_path):
    """A second process cannot take a stage directory that a running one holds; once it ends, it can."""
    path = str(tmp_path / "classifier")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from vitshap_jax.stages import common; common.lock_stage_dir({path!r}); "
            "print('locked', flush=True); import time; time.sleep(60)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(common.StageError, match=rf"is in use by process {holder.pid} on .*: wait for"):
            common.lock_stage_dir(path)
    finally:
        holder.kill()
        holder.wait()
    common.lock_stage_dir(path)  # the lock ended with its process
    assert path in common._LOCKS


def test_unusable_workdirs_and_upstreams_are_one_line(tmp_path):
    from tests.helpers import load

    (tmp_path / "afile").write_text("x")
    config = load("classifier", "digits")
    with pytest.raises(common.StageError, match="is a file, not a directory"):
        common.stage_dir(str(tmp_path / "afile"), "classifier", config)
    with pytest.raises(
        common.StageError, match=r"cannot write to .*afile/sub/classifier \(Not a directory\)"
    ):
        common.stage_dir(str(tmp_path / "afile" / "sub"), "classifier", config)  # unwritable: one line
    os.makedirs(tmp_path / "explainer")
    (tmp_path / "explainer" / "config.json").write_text(json.dumps({"stage": "explainer"}))
    surrogate = load("surrogate", "digits")
    surrogate.upstream = str(tmp_path / "explainer")
    with pytest.raises(common.StageError, match="holds a explainer run, not a classifier run"):
        common.upstream_params(surrogate, str(tmp_path), "classifier", None)


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes_without_duplicate_metrics(tmp_path):
    work, data_dir = tmp_path / "work", tmp_path / "tfds"
    epochs, steps_per_epoch = 8, 1257 // 64

    def command(log_every):
        return [
            sys.executable,
            "launch.py",
            "--config=configs/classifier.py:digits",
            f"--workdir={work}",
            f"--config.dataset.data_dir={data_dir}",
            f"--config.train.epochs={epochs}",
            f"--config.train.log_every_steps={log_every}",
            "--config.train.checkpoint_every_steps=100000",
            "--config.dataset.read_threads=1",
            "--config.model.depth=1",
        ]

    run = subprocess.Popen(command(1), cwd=ROOT, stderr=subprocess.PIPE, text=True, env=ENV)
    metrics = work / "classifier" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by SIGTERM after step" in stderr and "rerun the same command to resume" in stderr
    stopped = int(stderr.split("stopped by SIGTERM after step ")[1].split()[0])
    assert stopped < epochs * steps_per_epoch
    manager = checkpoints.StageCheckpoints(str(work / "classifier"))
    assert manager.latest_step() == stopped  # saved at the signal, not at a scheduled checkpoint
    manager.close()
    with open(metrics, "a") as f:  # as if steps after the checkpoint had been logged before a kill
        f.write(json.dumps({"step": stopped + 1, "train/loss": 1.0}) + "\n")
    r = subprocess.run(command(50), cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming at step {stopped}" in r.stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "train/loss" in line]
    assert len(steps) == len(set(steps)) and steps == sorted(steps)
    assert np.isfinite(json.loads((work / "classifier" / "results.json").read_text())["test"]["accuracy"])


def test_reruns_with_other_settings_or_a_retrained_upstream_are_refused_or_restarted(tmp_path):
    """One rule everywhere: same settings and same upstream run continue; anything else is refused with
    the differences, or with restart=True moved aside (nothing deleted) and trained afresh; the pipeline
    trains a stage again when its upstream was trained again."""
    from tests.helpers import tiny
    from vitshap_jax.stages import classifier, pipeline, surrogate

    mesh = parallel.make_mesh()
    data_dir = tmp_path / "tfds"

    def digits(stage, **kw):
        c = tiny(stage, "digits", data_dir, batch_size=64, log_every_steps=50)
        c.dataset.image_size, c.dataset.resize_size, c.model.patch_size = 8, 8, 2
        for key, value in kw.items():
            group, field = key.split("__")
            c[group][field] = value
        return c

    work = str(tmp_path / "work")
    classifier.run(digits("classifier"), work, mesh)
    surrogate.run(digits("surrogate"), work, mesh)
    first = checkpoints.read_config(os.path.join(work, "classifier"))["run_id"]
    assert checkpoints.read_config(os.path.join(work, "surrogate"))["upstream_run_id"] == first
    # Other settings: refused with the difference; free fields (logging) are not settings.
    with pytest.raises(common.StageError, match=r"other settings \(optim.lr: 0.001 -> 0.002\)"):
        classifier.run(digits("classifier", optim__lr=2e-3), work, mesh)
    free = digits("classifier", train__log_every_steps=7)
    common.resolve(free)
    common.stage_dir(work, "classifier", free)  # accepted: the run continues under its run_id
    assert checkpoints.read_config(os.path.join(work, "classifier"))["run_id"] == first
    # restart=True moves the old run aside and trains afresh.
    again = digits("classifier", optim__lr=2e-3)
    again.restart = True
    classifier.run(again, work, mesh)
    assert len([d for d in os.listdir(work) if d.startswith("classifier.replaced-")]) == 1
    second = checkpoints.read_config(os.path.join(work, "classifier"))["run_id"]
    assert second != first
    # The surrogate trained from the first classifier is not reused as if it matched the second.
    with pytest.raises(common.StageError, match="trained from another classifier run"):
        surrogate.run(digits("surrogate"), work, mesh)
    # The pipeline trains it again (moving the old one aside) and skips the finished classifier.
    from tests.helpers import load

    config = load("pipeline", "digits")
    for stage in pipeline.ORDER:
        config[stage] = digits(stage, optim__lr=2e-3) if stage == "classifier" else digits(stage)
    pipeline.run(config, work, mesh)
    assert checkpoints.read_config(os.path.join(work, "classifier"))["run_id"] == second
    assert checkpoints.read_config(os.path.join(work, "surrogate"))["upstream_run_id"] == second
    assert len([d for d in os.listdir(work) if d.startswith("surrogate.replaced-")]) == 1


def test_runs_recorded_before_a_field_existed_still_resume():
    """A field missing from an older run's config.json is not a difference, unless its value now differs
    from the one those runs had (its default)."""
    old = {
        "stage": "classifier",
        "optim": {"lr": 1e-3},
        "model": {"depth": 4},
        "train": {"log_every_steps": 5},
    }
    new = {
        "stage": "classifier",
        "optim": {"lr": 1e-3},
        "model": {"depth": 4, "pool": "token"},
        "dataset": {"class_names": ["0", "1"]},
        "train": {"log_every_steps": 50},
        "run_id": "abc",
    }
    assert common.settings_diff(old, new) == []
    new["model"]["from_checkpoint"] = "/weights/vit.npz"  # recorded by newer runs; where, not what
    assert common.settings_diff(old, new) == []
    new["model"]["matmul_precision"] = "bfloat16"  # a free field: another precision resumes the run
    new["model"]["attention_impl"] = "xla"  # and so does another attention core (the same model)
    new["explainer"] = {"extra_images": ""}  # a field with a default, at its default
    assert common.settings_diff(old, new) == []
    new["model"]["pool"] = "avg"
    new["optim"]["lr"] = 2e-3
    new["explainer"]["extra_images"] = "/more"  # other training images: not the recorded run
    assert common.settings_diff(old, new) == [
        "explainer.extra_images: '' -> '/more'",
        "model.pool: 'token' -> 'avg'",
        "optim.lr: 0.001 -> 0.002",
    ]


def test_eval_every_epochs_picks_every_kth_epoch_end_and_the_last():
    """`train.eval_every_epochs=K`: `fit` validates and checkpoints after the steps `_epoch_ends` gives,
    every K-th epoch's and the last's (a stage run with it: test_amortized's precomputed-targets test)."""
    from tests.helpers import load
    from vitshap_jax.config import validate
    from vitshap_jax.train.loop import _epoch_ends

    assert _epoch_ends(1257, 64, 5) == {19: 1, 39: 2, 58: 3, 78: 4, 98: 5}
    assert _epoch_ends(1257, 64, 5, 2) == {39: 2, 78: 4, 98: 5}
    assert _epoch_ends(1257, 64, 3, 7) == {58: 3}
    c = load("classifier", "digits")
    c.train.eval_every_epochs = 0
    with pytest.raises(Exception, match="train.eval_every_epochs=0: must be positive"):
        validate(c)
