"""Stage registry: `get_stage(name)` returns `run(config, workdir, mesh)` for launch.py.

Each stage module (classifier, surrogate, explainer) registers its `run` here when it lands.
"""

from __future__ import annotations

from vitshap_jax.config import STAGES as KNOWN_STAGES

STAGES: dict = {}


class StageNotAvailableError(RuntimeError):
    """The stage is known but this version does not implement it yet."""


def get_stage(name: str):
    if name in STAGES:
        return STAGES[name]
    if name in KNOWN_STAGES:
        raise StageNotAvailableError(
            f"the {name} stage is not implemented in this version of vitshap_jax yet (see README, "
            "'Status'): the config parsed and validated, nothing was run or written"
        )
    raise ValueError(f"unknown stage {name!r}; known stages: {', '.join(KNOWN_STAGES)}")
