"""The commands that read a finished run (`config.COMMANDS`): explain, evaluate, roar.

Each module's `run(config, workdir, mesh)` reads the run through `runs.TrainedRun` and writes its
outputs under the workdir; none trains a pipeline stage. Imported on demand by `get`.
"""

from __future__ import annotations

import importlib

from vitshap_jax.config import COMMANDS


def get(name: str):
    """`run(config, workdir, mesh)` of a command."""
    if name not in COMMANDS:
        raise ValueError(f"unknown command {name!r}; known commands: {', '.join(COMMANDS)}")
    return importlib.import_module(f"vitshap_jax.commands.{name}").run
