"""A stage's first checkpoint save: orbax's replica-parallel writing against whole arrays, on one process.

    python benchmarks/checkpoint_save.py --devices=8 --model=tiny

The parameters and AdamW state of a ViT (`--model`, at 224 px), replicated over `--devices` devices of
this process (CPU devices are faked with XLA_FLAGS, set here before JAX starts), saved the way a stage
saves them (`checkpoints.StageCheckpoints.save_latest`), each form in a fresh process: orbax's default,
which slices every array over its replicas and compiles a slicing program per array shape (its first
save in a process pays those compiles), and whole arrays from one device, what `StageCheckpoints` sets
on one process (`checkpoints._whole_arrays_on_one_process`). Prints the first and second save's seconds
of each form and the ratio, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one(form: str, model: str) -> dict:
    """In this (fresh) process: the seconds of two saves of a stage's train state, in `form`, the number
    of arrays, and whether orbax's array handler sliced them over replicas (as registered after)."""
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from configs import classifier as configs
    from vitshap_jax import checkpoints, parallel
    from vitshap_jax.config import apply_variant
    from vitshap_jax.models import abstract_params, build_model
    from vitshap_jax.stages import common

    if form == "whole":  # the stage's setting, applied before any save
        checkpoints._whole_arrays_on_one_process()
    else:  # orbax's default: StageCheckpoints must not change it
        checkpoints._whole_arrays_on_one_process = lambda: None
    config = configs.get_config("imagenette")
    apply_variant(config, model)
    mesh = parallel.make_mesh()
    shapes = abstract_params(build_model(config), 224)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    tx = common.make_optimizer(config, 100)
    state = common.create_state(params, tx, mesh)
    seconds = []
    with tempfile.TemporaryDirectory() as d:
        manager = checkpoints.StageCheckpoints(d)
        for step in (1, 2):
            start = time.perf_counter()
            manager.save_latest(step, state, {}, {"step": step})
            manager.wait()
            seconds.append(time.perf_counter() - start)
        manager.close()
    split = getattr(ocp.type_handlers.get_type_handler(jax.Array), "_use_replica_parallel", None)
    return {"seconds": seconds, "arrays": len(jax.tree.leaves(state)), "replica_parallel": split}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="a ViT variant (configs/common.py)")
    parser.add_argument("--devices", type=int, default=8, help="CPU devices of the one process")
    parser.add_argument("--form", default="", help=argparse.SUPPRESS)  # the child process's form
    args = parser.parse_args()
    if args.form:
        print(json.dumps(one(args.form, args.model)))
        return
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # no compiled slices from an earlier process
    times = {}
    for form in ("replica-parallel", "whole"):
        out = subprocess.run(
            [sys.executable, __file__, f"--model={args.model}", f"--form={form}"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode:
            sys.exit(f"the {form} process failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        times[form] = result["seconds"]
        print(
            f"{form} (orbax replica-parallel: {result['replica_parallel']}), {result['arrays']} arrays: "
            f"first save {times[form][0]:.2f} s, second {times[form][1]:.2f} s"
        )
    ratio = times["replica-parallel"][0] / times["whole"][0]
    print(f"ViT-{args.model}, {args.devices} devices: first save, replica-parallel / whole = {ratio:.1f}x")


if __name__ == "__main__":
    main()
