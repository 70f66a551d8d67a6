"""What rematerialization (`config.model.remat`) saves: memory kept for the backward pass, and its cost.

    python benchmarks/remat_memory.py --models=tiny,small,base,large --batch=8 [--time]

For each ViT variant at 224 px (patch 16): the gradient of a loss of the ViT's logits (the part of
every train step that remat changes; the explainer step's frozen surrogate runs without gradients),
with `remat` off and on. Prints, side by side in one run:

* the residuals autodiff keeps from the forward pass for the backward pass (`saved_residuals`: the
  memory remat exists to cut, independent of the backend's buffer assignment);
* XLA's memory analysis of the compiled gradient (temporaries), the backend's own figure;
* with --time, the median seconds of 3 gradient steps of each, and the ratio (remat's cost).
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
from jax._src.ad_checkpoint import saved_residuals  # noqa: E402

from configs.common import MODEL_VARIANTS  # noqa: E402
from vitshap_jax.models import ViT  # noqa: E402

GIB = 2**30


def measure(variant: str, batch: int, remat: bool, timed: bool):
    shape = MODEL_VARIANTS[variant]
    model = ViT(num_classes=10, patch_size=16, remat=remat, **shape)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, 224, 224, 3)), jnp.float32)
    params = model.init(jax.random.key(0), x[:1])["params"]

    def loss(p, x):
        return (model.apply({"params": p}, x) ** 2).sum()

    kept = sum(np.prod(a.shape) * a.dtype.itemsize for a, _ in saved_residuals(loss, params, x))
    grad = jax.jit(jax.grad(loss)).lower(params, x).compile()
    temp = grad.memory_analysis().temp_size_in_bytes
    seconds = None
    if timed:
        jax.block_until_ready(grad(params, x))
        times = []
        for _ in range(3):
            start = time.perf_counter()
            jax.block_until_ready(grad(params, x))
            times.append(time.perf_counter() - start)
        seconds = float(np.median(times))
    return kept, temp, seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,small,base,large")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--time", action="store_true", help="also time 3 gradient steps of each")
    args = p.parse_args()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    for variant in args.models.split(","):
        rows = {remat: measure(variant, args.batch, remat, args.time) for remat in (False, True)}
        for remat, (kept, temp, seconds) in rows.items():
            line = (
                f"ViT-{variant} batch {args.batch} remat={remat}: residuals kept {kept / GIB:.3f} GiB, "
                f"XLA temporaries {temp / GIB:.2f} GiB"
            )
            print(line + (f", {seconds:.2f} s per gradient" if seconds else ""), flush=True)
        ratio = rows[True][0] / rows[False][0]
        cost = f"; {rows[True][2] / rows[False][2]:.2f}x the time" if args.time else ""
        print(f"ViT-{variant}: remat keeps {ratio:.2f}x the residuals{cost}", flush=True)


if __name__ == "__main__":
    main()
