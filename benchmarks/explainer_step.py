"""Explainer train-step throughput: plain masked surrogate passes vs coalition pairs in n + 2 tokens.

    python benchmarks/explainer_step.py --models=tiny,small --batch=2 --steps=3

For each ViT variant at 224 px (patch 16, 196 players): the explainer stage's real jitted train step
(`vitshap_jax.stages.explainer.train_step`, 32 paired coalitions per image, surrogate v(all)/v(empty),
explainer forward and backward, AdamW update) with `packed=False` (every coalition a masked pass of
n + 1 tokens) and `packed=True` (each coalition with its complement in one pass of n + 2 tokens).
Parameters are random (the speed does not depend on them). Prints images/s of both and their ratio,
measured side by side in one run; with --flops, also the achieved FLOP/s (XLA's cost analysis of the
compiled step) against a measured bfloat16 matmul peak; with --memory, XLA's memory analysis of each
compiled step (its peak estimate and temporaries; `--steps=0` compiles without running, so sizes that
would not fit can be read too); --remat turns on `config.model.remat` (the explainer's blocks).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import explainer as explainer_config  # noqa: E402
from vitshap_jax import parallel  # noqa: E402
from vitshap_jax.models import build_explainer, build_model  # noqa: E402
from vitshap_jax.stages import common  # noqa: E402
from vitshap_jax.stages import explainer as stage  # noqa: E402


def matmul_peak(dtype, size: int = 4096, reps: int = 10) -> float:
    """Measured FLOP/s of a square matmul in `dtype` on the default device."""
    a = jnp.ones((size, size), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2 * size**3 * reps / (time.perf_counter() - start)


def step_setup(
    variant: str,
    batch: int,
    coalitions: int,
    dtype: str,
    packed: bool,
    mesh,
    size: int,
    remat: bool = False,
    matmul_precision: str = "float32",
):
    config = explainer_config.get_config(f"imagenette,model={variant}")
    config.model.dtype = dtype
    config.model.remat = remat
    config.model.matmul_precision = matmul_precision
    config.explainer.num_coalitions = coalitions
    surrogate = build_model(config)
    explainer = build_explainer(config)
    images = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
    s_params = surrogate.init(jax.random.key(0), images[:1])["params"]
    params = explainer.init(jax.random.key(1), images[:1])["params"]
    tx = common.make_optimizer(config, 1000)
    state = common.create_state(params, tx, mesh)
    fn = functools.partial(
        stage.train_step,
        explainer=explainer,
        surrogate=surrogate,
        tx=tx,
        target="multiclass",
        seed=0,
        num_coalitions=coalitions,
        paired=True,
        packed=packed,
    )
    step = common.jit_train_step(fn, mesh, num_frozen=1)
    labels = np.zeros(batch, np.int32)
    data = parallel.global_batch({"image": images, "label": labels}, mesh)
    s_params = jax.device_put(s_params, parallel.replicated(mesh))
    return step, state, data, s_params


def memory_report(compiled) -> str:
    """XLA's memory analysis of a compiled step: its peak estimate (arguments + outputs - donated
    aliases + temporaries) and the temporaries alone, in GiB."""
    m = compiled.memory_analysis()
    gib = 2**30
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return f"memory {peak / gib:.2f} GiB (temporaries {m.temp_size_in_bytes / gib:.2f} GiB)"


def measure(
    variant,
    batch,
    coalitions,
    dtype,
    packed,
    steps,
    mesh,
    flops: bool,
    size: int,
    remat=False,
    memory=False,
    matmul_precision="float32",
):
    """(images/s, seconds per step, FLOPs per step or None, memory report or None); `steps=0` only
    compiles (for --memory)."""
    step, state, data, s_params = step_setup(
        variant, batch, coalitions, dtype, packed, mesh, size, remat, matmul_precision
    )
    step = step.lower(state, data, s_params).compile()  # compiled once: analysed, then timed
    cost = report = None
    if flops:
        analysis = step.cost_analysis()
        cost = (analysis[0] if isinstance(analysis, list) else analysis).get("flops")
    if memory:
        report = memory_report(step)
    if steps == 0:
        return float("nan"), float("nan"), cost, report
    state, m = step(state, data, s_params)  # warm-up step
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, m = step(state, data, s_params)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    return batch / seconds, seconds, cost, report


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,small")
    p.add_argument("--batch", type=int, default=2, help="global batch (a multiple of the device count)")
    p.add_argument("--coalitions", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting (median reported)")
    p.add_argument("--image_size", type=int, default=224, help="pixels (patches of 16)")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto, float32 or bfloat16")
    p.add_argument("--flops", action="store_true", help="report FLOP/s vs a measured bf16 matmul peak")
    p.add_argument("--peak_size", type=int, default=4096, help="side of the square matmul measuring the peak")
    p.add_argument("--memory", action="store_true", help="report XLA's memory analysis of each compiled step")
    p.add_argument("--remat", action="store_true", help="config.model.remat=True (the explainer's blocks)")
    p.add_argument(
        "--matmul_precision",
        default="float32",
        help="config.model.matmul_precision, or several (float32,bfloat16): each measured, ratios printed",
    )
    args = p.parse_args()
    precisions = args.matmul_precision.split(",")
    mesh = parallel.make_mesh()
    kind, count = jax.devices()[0].device_kind, len(jax.devices())
    print(f"device: {kind} x {count} ({jax.default_backend()}), jax {jax.__version__}")
    peak = matmul_peak(jnp.bfloat16, args.peak_size) if args.flops else None
    if peak:
        print(f"measured bfloat16 matmul peak ({args.peak_size}^2): {peak / 1e12:.3f} TFLOP/s")
    for variant in args.models.split(","):
        rows = {}
        for precision, packed in ((pr, pa) for pr in precisions for pa in (False, True)):
            rows[precision, packed] = measure(
                variant,
                args.batch,
                args.coalitions,
                args.dtype,
                packed,
                args.steps,
                mesh,
                args.flops,
                args.image_size,
                args.remat,
                args.memory,
                precision,
            )
            ips, sec, cost, report = rows[precision, packed]
            path = "pairs in n+2 tokens" if packed else "plain masked passes"
            line = f"ViT-{variant} {args.image_size}px {path}{' (remat)' if args.remat else ''}"
            line += f", {precision} matmuls: " if len(precisions) > 1 else ": "
            if args.steps:
                line += f"{ips:.2f} images/s ({sec:.2f} s/step, "
            line += f"batch {args.batch}, {args.coalitions} coalitions{')' if args.steps else ''}"
            if cost and peak and args.steps:
                line += f"; {cost / sec / 1e12:.3f} TFLOP/s = {cost / sec / peak:.0%} of the bf16 peak"
            if report:
                line += f"; {report}"
            print(line, flush=True)
        if args.steps:
            for precision in precisions:
                speedup = rows[precision, True][0] / rows[precision, False][0]
                print(
                    f"ViT-{variant}: speedup of the visible-token path {speedup:.2f}x ({precision} matmuls)"
                )
            for precision in precisions[1:]:
                for packed in (False, True):
                    ratio = rows[precision, packed][0] / rows[precisions[0], packed][0]
                    path = "pairs in n+2 tokens" if packed else "plain masked passes"
                    print(f"ViT-{variant} {path}: {precision} / {precisions[0]} matmuls {ratio:.2f}x")


if __name__ == "__main__":
    main()
