"""bfloat16 matmul operands (`config.model.matmul_precision`) against float32, side by side in one run.

    python benchmarks/matmul_precision.py --models=tiny,small --batch=64 --workdir=runs/digits --images=32

1. The matmuls alone: a ViT's MLP and projection shapes (`--batch` images x 197 tokens) in float32,
   with bfloat16 operands and a float32 result (what `matmul_precision=bfloat16` runs), and all in
   bfloat16; GFLOP/s of each.
2. The masked forward of each ViT variant at 224 px (random weights and head, a random half of the
   patches visible per image): images/s under both precisions, their ratio, and the largest logit
   difference relative to the largest logit.
3. With `--workdir` (a finished run with at most 20 players, e.g. the digits main job): the exact
   Shapley values of `--images` test images from its surrogate under both precisions, the seconds of
   each and the mean squared difference between them, against the mean square of the values.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vitshap_jax.config import VIT_VARIANTS  # noqa: E402
from vitshap_jax.models import ViT  # noqa: E402


def seconds(fn, *args, repeats: int) -> float:
    """Median seconds of `fn(*args)` after a warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmuls(variant: str, rows: int, repeats: int) -> str:
    width, mlp = VIT_VARIANTS[variant]["hidden_size"], VIT_VARIANTS[variant]["mlp_dim"]
    forms = {
        "float32": jax.jit(lambda x, w: x @ w),
        "bfloat16 operands, float32 result": jax.jit(
            lambda x, w: jnp.dot(
                x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32
            )
        ),
        "all bfloat16": jax.jit(lambda x, w: x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)),
    }
    rng = np.random.default_rng(0)
    lines = []
    for k, n in ((width, 3 * width), (width, mlp), (mlp, width)):
        x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
        rates = [
            f"{name} {2 * rows * k * n / seconds(f, x, w, repeats=repeats) / 1e9:.0f}"
            for name, f in forms.items()
        ]
        lines.append(f"ViT-{variant} matmul [{rows}, {k}] x [{k}, {n}], GFLOP/s: {', '.join(rates)}")
    return "\n".join(lines)


def forward(variant: str, batch: int, size: int, repeats: int) -> str:
    kw = dict(num_classes=10, patch_size=16, **VIT_VARIANTS[variant])
    models = {p: ViT(**kw, dot_dtype=None if p == "float32" else p) for p in ("float32", "bfloat16")}
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
    masks = jnp.asarray(rng.random((batch, (size // 16) ** 2)) < 0.5)
    params = models["float32"].init(jax.random.key(0), images[:1])["params"]
    head = params["head"]["kernel"]
    params["head"]["kernel"] = 0.02 * jax.random.normal(jax.random.key(1), head.shape)  # not the zero init
    speed, logits = {}, {}
    for precision, model in models.items():
        fn = jax.jit(lambda p, x, m, model=model: model.apply({"params": p}, x, m))
        speed[precision] = batch / seconds(fn, params, images, masks, repeats=repeats)
        logits[precision] = np.asarray(fn(params, images, masks))
    gap = np.abs(logits["bfloat16"] - logits["float32"]).max() / np.abs(logits["float32"]).max()
    return (
        f"ViT-{variant} masked forward, batch {batch}, {size} px: float32 matmuls {speed['float32']:.1f} "
        f"images/s, bfloat16 {speed['bfloat16']:.1f} images/s ({speed['bfloat16'] / speed['float32']:.2f}x); "
        f"largest logit difference {gap:.1e} of the largest logit"
    )


def load_small_run(workdir: str):
    """The finished run for the Shapley values, loaded and checked before any timing."""
    from vitshap_jax.runs import load_explainer

    run = load_explainer(workdir)
    if run.num_players > 20:
        raise SystemExit(f"--workdir={workdir}: {run.num_players} players; exact values need at most 20")
    return run


def shapley_values(run, workdir: str, images: int) -> str:
    from benchmarks.training_signals import exact_in_groups
    from vitshap_jax.shapley.game import surrogate_game

    n = run.num_players
    _, x, _ = run.examples("test", images, views=False)
    x = jnp.asarray(x)
    values, times = {}, {}
    for precision in ("float32", "bfloat16"):
        module = run.surrogate.clone(dot_dtype=None if precision == "float32" else precision)
        game = surrogate_game(module, run.surrogate_params, run.target, packed=True)
        start = time.perf_counter()
        values[precision] = exact_in_groups(game, x, n)
        times[precision] = time.perf_counter() - start
    mse = ((values["bfloat16"] - values["float32"]) ** 2).mean()
    speedup = times["float32"] / times["bfloat16"]
    return (
        f"exact Shapley values of {len(x)} test images ({n} players, {workdir}): float32 matmuls "
        f"{times['float32']:.0f} s, bfloat16 {times['bfloat16']:.0f} s ({speedup:.2f}x); "
        f"mean squared difference {mse:.2e}, mean square of the values {(values['float32'] ** 2).mean():.2e}"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,small")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image_size", type=int, default=224, help="pixels (patches of 16)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default="", help="a finished run (<= 20 players) for the Shapley values")
    p.add_argument("--images", type=int, default=32)
    args = p.parse_args()
    run = load_small_run(args.workdir) if args.workdir else None
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    tokens = args.batch * ((args.image_size // 16) ** 2 + 1)
    for variant in args.models.split(","):
        print(matmuls(variant, tokens, args.repeats), flush=True)
        print(forward(variant, args.batch, args.image_size, args.repeats), flush=True)
    if run is not None:
        print(shapley_values(run, args.workdir, args.images), flush=True)


if __name__ == "__main__":
    main()
