"""Two local CPU processes train together through jax.distributed (launch.py --distributed), are
preempted (SIGTERM to one of them: both save and stop at the same step), resume, and end with the
parameters a single process with the same number of devices reaches without a stop."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tests.helpers import assert_same_params, load
from vitshap_jax import checkpoints, data
from vitshap_jax.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(hidden_size=32, depth=1, num_heads=2, mlp_dim=64)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _command(workdir, data_dir, *extra):
    overrides = [f"--config.model.{k}={v}" for k, v in SHAPE.items()]
    return [
        sys.executable,
        "launch.py",
        "--config=configs/classifier.py:digits",
        f"--workdir={workdir}",
        f"--config.dataset.data_dir={data_dir}",
        "--config.dataset.read_threads=1",
        "--config.train.epochs=1",
        "--config.train.batch_size=16",
        "--config.train.log_every_steps=5",  # where the processes agree to stop after a SIGTERM
        "--config.optim.lr=1e-3",
        "--config.optim.warmup_steps=10",
        *overrides,
        *extra,
    ]


def _env(devices):
    return dict(
        os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu"
    )


def _best_params(stage_dir):
    c = load("classifier", "digits")
    c.model.update(SHAPE)
    shapes = jax.eval_shape(lambda: build_model(c).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"])
    params = checkpoints.load_best_params(stage_dir, shapes)
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _start_pair(tmp_path, data_dir, attempt):
    """The two processes of one multi-host run (`{tmp_path}/multi`), each logging to its own file: with
    pipes, a process whose pipe nobody drains blocks on a full buffer, stops joining the collectives, and
    its peer waits forever."""
    port = _free_port()
    logs = [open(tmp_path / f"process{i}-{attempt}.log", "w") for i in range(2)]  # noqa: SIM115 -- closed by _finish
    procs = [
        subprocess.Popen(
            _command(
                tmp_path / "multi",
                data_dir,
                "--distributed",
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=ROOT,
            env=_env(1),
            stdout=logs[i],
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    return procs, logs


def _finish(procs, logs, tmp_path, attempt) -> list[str]:
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:  # a process left waiting for its peer must not outlive the test
        for p, log in zip(procs, logs, strict=True):
            p.kill()
            log.close()
    return [(tmp_path / f"process{i}-{attempt}.log").read_text() for i in range(2)]


def test_two_processes_train_together_like_one(tmp_path):
    data_dir = str(tmp_path / "tfds")
    data.prepare("digits", data_dir=data_dir)  # before the processes start: they must not race to prepare
    # Preemption: SIGTERM to process 1 once its loop has started (its handler is installed, the first
    # step compiles); the processes agree at the next logged step to stop, both save and exit 143.
    procs, logs = _start_pair(tmp_path, data_dir, "first")
    deadline = time.monotonic() + 240
    while "training steps 1 to" not in (tmp_path / "process1-first.log").read_text():
        assert time.monotonic() < deadline and procs[1].poll() is None, (
            tmp_path / "process1-first.log"
        ).read_text()[-3000:]
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outputs = _finish(procs, logs, tmp_path, "first")
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 128 + signal.SIGTERM, out[-3000:]
    stopped = [re.search(r"stopped by SIGTERM after step (\d+) of (\d+);", out) for out in outputs]
    assert all(stopped), outputs[0][-3000:]
    step, total = stopped[0].groups()
    assert stopped[1].groups() == (step, total) and int(step) < int(total)  # the same step, before the end
    assert "process 1/2, 2 devices" in outputs[1]
    # Rerun unchanged: both resume from that step and finish.
    procs, logs = _start_pair(tmp_path, data_dir, "again")
    outputs = _finish(procs, logs, tmp_path, "again")
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert f"resuming at step {step} of {total}" in outputs[0]
    single = subprocess.run(
        _command(tmp_path / "single", data_dir),
        cwd=ROOT,
        env=_env(2),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    multi, one = (
        _best_params(tmp_path / "multi" / "classifier"),
        _best_params(tmp_path / "single" / "classifier"),
    )
    assert_same_params(multi, one)
