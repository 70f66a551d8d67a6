"""The README's install makes the package importable from anywhere, with the notebook API on top."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_package_imports_outside_the_repository(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "import vitshap_jax, vitshap_jax.config, sys\n"
        "assert 'jax' not in sys.modules, 'importing vitshap_jax.config must not import JAX'\n"
        "print(vitshap_jax.__file__)\n"
        "print(vitshap_jax.load_explainer.__module__, vitshap_jax.TrainedRun.__name__)\n"
        "print(vitshap_jax.read_image.__module__, issubclass(vitshap_jax.UserError, Exception))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    path, api, image = out.stdout.splitlines()
    assert os.path.commonpath([path, ROOT]) == ROOT  # this checkout, not a stale copy
    assert api == "vitshap_jax.runs TrainedRun"
    assert image == "vitshap_jax.data.base True"
