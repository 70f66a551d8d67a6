"""Two local CPU processes train together through jax.distributed (launch.py --distributed) and end
with the parameters a single process with the same number of devices reaches."""

import os
import socket
import subprocess
import sys

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
        "--config.train.log_every_steps=1000",
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


def test_two_processes_train_together_like_one(tmp_path):
    data_dir = str(tmp_path / "tfds")
    data.prepare("digits", data_dir=data_dir)  # before the processes start: they must not race to prepare
    port = _free_port()
    # Each process logs to its own file: with pipes, a process whose pipe nobody drains blocks on a full
    # buffer, stops joining the collectives, and its peer waits forever.
    logs = [open(tmp_path / f"process{i}.log", "w") for i in range(2)]  # noqa: SIM115 -- closed below
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
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:  # a process left waiting for its peer must not outlive the test
        for p, log in zip(procs, logs, strict=True):
            p.kill()
            log.close()
    outputs = [(tmp_path / f"process{i}.log").read_text() for i in range(2)]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "process 1/2, 2 devices" in outputs[1]
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
