"""The training stages (`config.STAGES`), the pipeline that runs them in order, and the study that runs
them for several classifiers and surrogates (`compare`).

Each module's `run(config, workdir, mesh)` trains one stage into `{workdir}/{stage}`; `pipeline` runs
all three, `compare` a grid of them. Modules are imported on demand, so that parsing a config stays fast.
"""

from __future__ import annotations

import importlib

from vitshap_jax.config import STAGES

PIPELINE = "pipeline"
COMPARE = "compare"
JOBS = (PIPELINE, COMPARE)  # configs that hold one config per stage


def get_stage(name: str):
    """`run(config, workdir, mesh)` of a training stage, the pipeline or the study."""
    if name not in (*STAGES, *JOBS):
        raise ValueError(f"unknown stage {name!r}; known stages: {', '.join((*STAGES, *JOBS))}")
    return importlib.import_module(f"vitshap_jax.stages.{name}").run
