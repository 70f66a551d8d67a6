"""Stage registry: `get_stage(name)` returns `run(config, workdir, mesh)` for launch.py.

Stage modules are imported on demand, so that parsing a config stays fast.
"""

from __future__ import annotations

import importlib

MODULES = {
    "classifier": "vitshap_jax.stages.classifier",
    "surrogate": "vitshap_jax.stages.surrogate",
    "explainer": "vitshap_jax.stages.explainer",
    "pipeline": "vitshap_jax.stages.pipeline",
    "explain": "vitshap_jax.stages.explain",
    "evaluate": "vitshap_jax.stages.evaluate",
    "roar": "vitshap_jax.stages.roar",
}


def get_stage(name: str):
    if name not in MODULES:
        raise ValueError(f"unknown stage {name!r}; known stages: {', '.join(MODULES)}")
    return importlib.import_module(MODULES[name]).run
