"""Runs one stage (classifier, surrogate, explainer, pipeline) or command (explain, evaluate, roar).

    python launch.py --config=configs/<stage>.py:<dataset>[,k=v] --workdir=DIR [--config.a.b=value ...]

Parses the config (configs/*.py), checks it, optionally joins a multi-host run, builds the device mesh
and hands over to the stage's `run(config, workdir, mesh)`. Bad flags give a one-line error, exit 2.
"""

import importlib.util
import json
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Stage config: configs/<stage>.py:<dataset>[,key=value,...].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; a stage writes {workdir}/{stage}/.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Check the config, build the mesh, print the resolved config as JSON and exit."
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host; cluster env auto-detected)."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (--distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (--distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (--distributed).")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300, "Seconds to wait for all processes to join (--distributed)."
)


class _QuietLibraries:
    """Drops the INFO chatter of orbax, grain and tfds (warnings and errors still show)."""

    NOISY = ("/orbax/", "/grain/", "/tensorflow_datasets/", "/jax/_src/")

    def filter(self, record) -> bool:
        return record.levelno > 20 or not any(part in record.pathname for part in self.NOISY)


def _fail(message: str):
    print(f"launch.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def _load_config_module(spec: str):
    """Loads `path[:arg]` the way config_flags does, to explain a failed override."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_vitshap_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _unknown_key(argv) -> str | None:
    """Names the first `--config.a.b` override that the config lacks."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return None
    config = _load_config_module(spec)
    for arg in argv:
        match = re.match(r"--config\.([\w.]+)", arg)
        if not match:
            continue
        node, parts = config, match.group(1).split(".")
        for i, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                where = "config" + "".join(f".{p}" for p in parts[:i])
                known = ", ".join(node.keys()) if hasattr(node, "keys") else "(not a group)"
                return f"--config.{match.group(1)}: {where} has no field {part!r}; its fields: {known}"
            node = node[part]
    return None


def parse_flags(argv):
    """absl flag parsing with one-line errors for unknown config keys and bad config arguments."""
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.stage  # noqa: B018 -- the config file's load error surfaces on first use
        return rest
    except (AttributeError, KeyError) as e:  # an override names a field the config lacks
        _fail(_unknown_key(argv) or f"unknown config field {e}")
    except OSError as e:  # the config file itself; its last line holds the reason
        spec = next((a for a in argv if a.startswith("--config=")), "--config")
        reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
        _fail(f"{spec}: cannot load the config file: {reason}")
    except flags.Error as e:
        text = str(e)
        if "Traceback" in text:  # get_config raised: keep the flag and the exception's last line
            last = [line for line in text.splitlines() if line.strip()][-1]
            _fail(f"{text.splitlines()[0].rstrip(':')}: {last}")
        _fail(text.splitlines()[0])


def _wait_for_coordinator(address: str, timeout: int) -> None:
    """Waits until `host:port` accepts connections, logging every 10 s; a one-line error after `timeout`."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        _fail(f"--coordinator_address={address}: expected host:port of process 0")
    start = last_report = time.monotonic()
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as e:
            reason = e.strerror or type(e).__name__
        now = time.monotonic()
        if now - start >= timeout:
            print(
                f"launch.py: error: the coordinator {address} did not answer within {timeout} s ({reason}): "
                "start process 0 first, and check --coordinator_address (host:port of process 0) and the "
                "network between the hosts",
                file=sys.stderr,
            )
            sys.exit(1)
        if now - last_report >= 10:
            logging.info("still waiting for the coordinator %s (%d s of %d)", address, now - start, timeout)
            last_report = now
        time.sleep(min(1.0, max(0.0, timeout - (now - start))))


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    import jax

    from vitshap_jax import commands, parallel, stages
    from vitshap_jax.config import COMMANDS, STAGES, ConfigError, validate
    from vitshap_jax.errors import UserError
    from vitshap_jax.stages import common as stage_common

    config = _CONFIG.value
    try:
        validate(config)
        # A shape flag the stage would replace (by its upstream run's or its checkpoint's value) is refused.
        flagged = config_flags.get_override_values(flags.FLAGS["config"])
        stage_common.refuse_dropped_flags(config, flagged, _WORKDIR.value)
    except (ConfigError, UserError) as e:
        _fail(str(e))
    if _DISTRIBUTED.value:
        where = _COORDINATOR.value or "the coordinator the cluster environment names"
        logging.info(
            "joining the multi-host run at %s (waiting up to %d s)", where, _DISTRIBUTED_TIMEOUT.value
        )
        if _COORDINATOR.value and _PROCESS_ID.value not in (None, 0):
            # JAX aborts the whole process (a C++ fatal error) when the coordinator never answers, so a
            # process that joins first waits for the coordinator's port itself, with progress.
            _wait_for_coordinator(_COORDINATOR.value, _DISTRIBUTED_TIMEOUT.value)
        try:
            jax.distributed.initialize(
                coordinator_address=_COORDINATOR.value,
                num_processes=_NUM_PROCESSES.value,
                process_id=_PROCESS_ID.value,
                initialization_timeout=_DISTRIBUTED_TIMEOUT.value,
            )
        except Exception as e:  # JAX raises several kinds (ValueError, RuntimeError, XlaRuntimeError)
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            print(
                f"launch.py: error: could not join the multi-host run at {where} within "
                f"{_DISTRIBUTED_TIMEOUT.value} s ({reason}). Check that process 0 runs, that "
                "--coordinator_address is host:port of process 0 and reachable from here, and that "
                "--num_processes and --process_id are right",
                file=sys.stderr,
            )
            sys.exit(1)
        import orbax.checkpoint  # noqa: F401 -- defines the flag below

        # Orbax's default barriers are collectives (a psum over all devices), some issued from its
        # background save threads; racing the train step's collectives, they can deadlock the
        # processes. The coordination service's barriers need no collectives.
        flags.FLAGS.experimental_orbax_use_distributed_barrier = True
    mesh = parallel.make_mesh()
    if config.stage in stages.JOBS:
        sub_configs = [config[s] for s in STAGES]
    else:  # the commands use the settings of the run they read
        sub_configs = [] if config.stage in COMMANDS else [config]
    try:
        for c in sub_configs:
            parallel.check_batch_size(c.train.batch_size, mesh)
    except ValueError as e:
        _fail(str(e))
    logging.info(
        "process %d/%d, %d devices (%s)",
        jax.process_index(),
        jax.process_count(),
        mesh.devices.size,
        jax.devices()[0].platform,
    )
    if _DRY_RUN.value:
        print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        return
    from vitshap_jax.train.loop import Interrupted

    run = commands.get(config.stage) if config.stage in COMMANDS else stages.get_stage(config.stage)
    try:
        run(config, _WORKDIR.value, mesh)
    except Interrupted as e:  # SIGTERM (preemption) or Ctrl-C: the checkpoint is saved, resume by rerunning
        print(f"launch.py: {e}", file=sys.stderr)
        sys.exit(e.exit_status)
    except UserError as e:  # a mistake the user can fix: the message says what to do
        print(f"launch.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)
