"""Test setup: 8 fake CPU devices so that sharded code paths run for real (set before JAX starts)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for this test session, its xdist workers and the subprocesses the
# tests start (they inherit the environment): many tests compile the same tiny models again. A fresh
# directory per session, so no result depends on an earlier session's cache.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vitshap_jax_test_xla_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


import pytest  # noqa: E402

# Under pytest-xdist (`-n 2 --dist loadfile`, pyproject.toml) the two workers take whole test files in
# collection order: the longest go first, so that none is left running alone at the end.
SLOW_FIRST = (
    "test_learning.py",
    "test_compare.py",
    "test_stages.py",
    "test_evaluate.py",
    "test_failsafe.py",
    "test_interactions.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: order kept within


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A finished tiny pipeline (classifier, surrogate, explainer) on a mini imagenette: its workdir."""
    from tests.helpers import _imagenette_tree, load, tiny
    from vitshap_jax import data, parallel
    from vitshap_jax.stages import pipeline

    root = tmp_path_factory.mktemp("run")
    _imagenette_tree(root / "manual")
    data.prepare("imagenette", str(root / "manual"), str(root / "prepared"))
    config = load("pipeline", "imagenette")
    for stage in pipeline.ORDER:
        config[stage] = tiny(stage, "imagenette", root / "prepared")
    pipeline.run(config, str(root / "work"), parallel.make_mesh())
    return root / "work"
