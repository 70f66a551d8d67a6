"""The training stages (`config.STAGES`) and the pipeline that runs them in order.

Each module's `run(config, workdir, mesh)` trains one stage into `{workdir}/{stage}`; `pipeline` runs
all three. Modules are imported on demand, so that parsing a config stays fast.
"""

from __future__ import annotations

import importlib

from vitshap_jax.config import STAGES

PIPELINE = "pipeline"


def get_stage(name: str):
    """`run(config, workdir, mesh)` of a training stage or the pipeline."""
    if name not in (*STAGES, PIPELINE):
        raise ValueError(f"unknown stage {name!r}; known stages: {', '.join((*STAGES, PIPELINE))}")
    return importlib.import_module(f"vitshap_jax.stages.{name}").run
