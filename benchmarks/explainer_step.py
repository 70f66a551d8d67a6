"""Explainer train-step throughput: plain masked surrogate passes vs coalition pairs in n + 2 tokens.

    python benchmarks/explainer_step.py --models=tiny,small --batch=2 --steps=3

For each ViT variant at 224 px (patch 16, 196 players): the explainer stage's real jitted train step
(`vitshap_jax.stages.explainer.train_step`, 32 paired coalitions per image, surrogate v(all)/v(empty),
explainer forward and backward, AdamW update) with `packed=False` (every coalition a masked pass of
n + 1 tokens) and `packed=True` (each coalition with its complement in one pass of n + 2 tokens).
Parameters are random (the speed does not depend on them). Prints images/s of both and their ratio,
measured side by side in one run; with --flops, also the achieved FLOP/s (the step's matmul FLOPs,
`matmul_flops`) against a measured bfloat16 matmul peak; with --memory, XLA's memory analysis of each
compiled step (its peak estimate and temporaries; `--steps=0` compiles without running, so sizes that
would not fit can be read too); --remat turns on `config.model.remat` (the explainer's blocks);
--attention_impl=matmul,cudnn measures each attention core (`config.model.attention_impl`, here the
surrogate's and the explainer's) and prints the ratios to the first.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import explainer as explainer_config  # noqa: E402
from vitshap_jax import parallel  # noqa: E402
from vitshap_jax.config import ATTENTION_IMPLS, EXPLAINER_SAMPLERS, EXPLAINER_SIGNALS, MATMUL_PRECISIONS  # noqa: E402
from vitshap_jax.models import build_explainer, build_model  # noqa: E402
from vitshap_jax.stages import common  # noqa: E402
from vitshap_jax.stages import explainer as stage  # noqa: E402


def matmul_peak(dtype, size: int = 4096, reps: int = 10) -> float:
    """Measured FLOP/s of a square matmul in `dtype` on the default device, on random data (constant
    operands run faster on a GPU: 860 TFLOP/s with ones on the H200, where random data gives 769-798
    through PyTorch)."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
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
    signal: str = "wls",
    sampler: str = "shapley",
    warmup_steps: int | None = None,
    attention_impl: str = "matmul",
):
    config = explainer_config.get_config(f"imagenette,model={variant}")
    if warmup_steps is not None:
        config.optim.warmup_steps = warmup_steps
    config.model.dtype = dtype
    config.model.remat = remat
    config.model.matmul_precision = matmul_precision
    config.model.attention_impl = attention_impl
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
        signal=signal,
        sampler=sampler,
    )
    step = common.jit_train_step(fn, mesh, num_frozen=1)
    labels = np.zeros(batch, np.int32)
    data = parallel.global_batch({"image": images, "label": labels}, mesh)
    s_params = jax.device_put(s_params, parallel.replicated(mesh))
    return step, state, data, s_params


def _subjaxprs(params):
    """The jaxprs inside an equation's parameters (jit bodies, custom-derivative rules, loop bodies,
    cond branches), as lists: a tuple of branches is one list, counted by its costliest member."""
    for value in params.values():
        group = value if isinstance(value, (tuple, list)) else (value,)
        found = [getattr(v, "jaxpr", v) for v in group]
        found = [j for j in found if hasattr(j, "eqns")]
        if found:
            yield found


def matmul_flops(jaxpr) -> float:
    """FLOPs of the matrix products (dot_general, convolutions) in a jaxpr, 2 per multiply-add, nested
    jaxprs included (scan bodies times their length; a while loop's body once; a cond's costliest
    branch). The convention of model-FLOP utilisation, the same on every backend: XLA's cost analysis
    of a GPU program does not see the matmuls it hands to cuBLAS."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out = eqn.outvars[0].aval.shape
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape  # per output element: the kernel of one output feature
            features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * math.prod(out) * math.prod(rhs) / features
        times = eqn.params.get("length", 1) if name == "scan" else 1
        for group in _subjaxprs(eqn.params):
            total += times * max(matmul_flops(j) for j in group)
    return total


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
    signal="wls",
    sampler="shapley",
    losses=None,
    warmup_steps=None,
    attention_impl="matmul",
):
    """(images/s, seconds per step, FLOPs per step or None, memory report or None); `steps=0` only
    compiles (for --memory). A list `losses` receives the training loss after each step run."""
    step, state, data, s_params = step_setup(
        variant,
        batch,
        coalitions,
        dtype,
        packed,
        mesh,
        size,
        remat,
        matmul_precision,
        signal,
        sampler,
        warmup_steps,
        attention_impl,
    )
    traced = step.trace(state, data, s_params)  # traced once: its jaxpr counted, then compiled and timed
    start = time.perf_counter()
    step = traced.lower().compile()
    compile_seconds = time.perf_counter() - start
    cost = report = None
    if flops:
        cost = matmul_flops(traced.jaxpr)
    if memory:
        report = memory_report(step) + f", compiled in {compile_seconds:.0f} s"
    if steps == 0:
        return float("nan"), float("nan"), cost, report
    state, m = step(state, data, s_params)  # warm-up step
    jax.block_until_ready(m)
    losses = [] if losses is None else losses
    losses.append(float(m["loss"]))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, m = step(state, data, s_params)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - start)
        losses.append(float(m["loss"]))
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
    p.add_argument(
        "--signals",
        default="",
        help="instead of plain vs packed: the packed step under each training signal, e.g. "
        "wls,wls:reference_compat,kernelshap,permutation (signal[:sampler]); images/s and the loss "
        "on one fixed random batch after the warm-up step and after --steps more",
    )
    p.add_argument("--paths", default="plain,packed", help="plain, packed or both (ratios need both)")
    p.add_argument(
        "--attention_impl",
        default="matmul",
        help="config.model.attention_impl (matmul, xla, cudnn), or several: each measured, ratios to the "
        "first printed (cudnn: an NVIDIA GPU and --dtype=bfloat16)",
    )
    args = p.parse_args()
    precisions, impls, paths = check_args(p, args)  # before the first (long) compile
    if args.signals:
        return signals_report(args)
    packings = [path == "packed" for path in paths]
    mesh = parallel.make_mesh()
    kind, count = jax.devices()[0].device_kind, len(jax.devices())
    print(f"device: {kind} x {count} ({jax.default_backend()}), jax {jax.__version__}")
    peak = matmul_peak(jnp.bfloat16, args.peak_size) if args.flops else None
    if peak:
        print(f"measured bfloat16 matmul peak ({args.peak_size}^2): {peak / 1e12:.3f} TFLOP/s")
    for variant in args.models.split(","):
        rows = {}
        for precision, impl, packed in ((pr, im, pa) for pr in precisions for im in impls for pa in packings):
            rows[precision, impl, packed] = measure(
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
                attention_impl=impl,
            )
            ips, sec, cost, report = rows[precision, impl, packed]
            path = "pairs in n+2 tokens" if packed else "plain masked passes"
            line = f"ViT-{variant} {args.image_size}px {path}{' (remat)' if args.remat else ''}"
            line += f", {precision} matmuls" if len(precisions) > 1 else ""
            line += f", {impl} attention: " if len(impls) > 1 else ": "
            if args.steps:
                line += f"{ips:.2f} images/s ({sec:.2f} s/step, "
            line += f"batch {args.batch}, {args.coalitions} coalitions{')' if args.steps else ''}"
            if cost and peak and args.steps:
                line += f"; {cost / sec / 1e12:.3f} TFLOP/s = {cost / sec / peak:.0%} of the bf16 peak"
            if report:
                line += f"; {report}"
            print(line, flush=True)
        if args.steps and len(set(packings)) == 2:
            for precision, impl in ((pr, im) for pr in precisions for im in impls):
                speedup = rows[precision, impl, True][0] / rows[precision, impl, False][0]
                print(
                    f"ViT-{variant}: speedup of the visible-token path {speedup:.2f}x ({precision} matmuls, "
                    f"{impl} attention)"
                )
        if args.steps:
            for packed in sorted(set(packings)):
                path = "pairs in n+2 tokens" if packed else "plain masked passes"
                # Each other precision (first core) and each other core (first precision) to the first.
                others = [(pr, impls[0], f"{pr} / {precisions[0]} matmuls") for pr in precisions[1:]]
                others += [(precisions[0], im, f"{im} / {impls[0]} attention") for im in impls[1:]]
                for precision, impl, label in others:
                    ratio = rows[precision, impl, packed][0] / rows[precisions[0], impls[0], packed][0]
                    print(f"ViT-{variant} {path}: {label} {ratio:.2f}x")


def check_args(p, args) -> tuple[list[str], list[str], list[str]]:
    """The matmul precisions, attention cores and paths to measure; a value no step can take, a core
    this backend lacks, or (with `--signals`) `--flops`, `--memory` or several precisions or cores stops
    it before any compile, rather than after the first settings were timed."""
    precisions, impls, paths = (
        v.split(",") for v in (args.matmul_precision, args.attention_impl, args.paths)
    )
    for flag, values, known in (
        ("--matmul_precision", precisions, MATMUL_PRECISIONS),
        ("--attention_impl", impls, ("auto", *ATTENTION_IMPLS)),
        ("--paths", paths, ("plain", "packed")),
    ):
        if bad := [v for v in values if v not in known]:
            p.error(f"{flag}: {', '.join(bad)} unknown; choose from {', '.join(known)}")
    if "cudnn" in impls and jax.default_backend() not in ("gpu", "cuda"):  # would time matmul as cudnn
        p.error(f"--attention_impl=cudnn needs an NVIDIA GPU, not {jax.default_backend()}: try matmul,xla")
    for spec in args.signals.split(",") if args.signals else []:
        signal, _, sampler = spec.partition(":")
        if signal not in STEP_SIGNALS or sampler not in ("", *EXPLAINER_SAMPLERS):
            p.error(
                f"--signals: {spec} unknown; give signal[:sampler], signal one of {', '.join(STEP_SIGNALS)}, "
                f"sampler one of {', '.join(EXPLAINER_SAMPLERS)}"
            )
    if args.signals and (len(precisions) > 1 or len(impls) > 1 or args.flops or args.memory):
        p.error(
            "--signals measures the packed step at one matmul precision and attention core: drop "
            "--flops and --memory, and give one --matmul_precision and --attention_impl"
        )
    return precisions, impls, paths


# The signals that train from the surrogate inside the step (precomputed reads labels made before).
STEP_SIGNALS = tuple(s for s in EXPLAINER_SIGNALS if s != "precomputed")


def signals_report(args):
    """The packed explainer step under each training signal: speed and whether it trains.

    Random weights and one fixed batch of random images, so the loss falls only by fitting that batch's
    game (at the configured learning rate from the first step: no warmup); the losses of different
    signals are on different scales (WLS vs regression) and are not compared with each other.
    `permutation` needs 2 (n - 1) evaluations per image: it gets max(--coalitions, that), printed."""
    mesh = parallel.make_mesh()
    n = (args.image_size // 16) ** 2
    kind, count = jax.devices()[0].device_kind, len(jax.devices())
    print(f"device: {kind} x {count} ({jax.default_backend()}), jax {jax.__version__}")
    for variant in args.models.split(","):
        for spec in args.signals.split(","):
            signal, _, sampler = spec.partition(":")
            coalitions = max(args.coalitions, 2 * (n - 1)) if signal == "permutation" else args.coalitions
            losses = []
            ips, sec, _, _ = measure(
                variant,
                args.batch,
                coalitions,
                args.dtype,
                True,
                args.steps,
                mesh,
                False,
                args.image_size,
                args.remat,
                False,
                args.matmul_precision,
                signal,
                sampler or "shapley",
                losses,
                warmup_steps=1,  # the configured learning rate from the first step (no 500-step warmup)
                attention_impl=args.attention_impl,
            )
            print(
                f"ViT-{variant} {args.image_size}px signal {spec}, {coalitions} evaluations per image: "
                f"{ips:.2f} images/s ({sec:.3f} s/step, batch {args.batch}); loss {losses[0]:.4g} after the "
                f"warm-up step, {losses[-1]:.4g} after {len(losses)} steps",
                flush=True,
            )


if __name__ == "__main__":
    main()
