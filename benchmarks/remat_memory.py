"""Memory and time of the explainer's train step with and without rematerialization (`model.remat`).

    python benchmarks/remat_memory.py --models=tiny,small,base,large --batch=8 [--time]

For each ViT variant at 224 px: the explainer stage's jitted train step (`benchmarks/explainer_step.py`'s
setup: 32 paired coalitions per image, packed pairs, AdamW), compiled with `config.model.remat` off and
on. Prints XLA's memory analysis of the compiled step (temporaries, arguments, outputs; the peak is at
most their sum, outputs aliasing the donated state) and, with --time, the median seconds per step of
both and the cost of remat, side by side in one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from explainer_step import step_setup  # noqa: E402

from vitshap_jax import parallel  # noqa: E402

GIB = 2**30


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,small,base,large")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--coalitions", type=int, default=32)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--time", action="store_true", help="also time 3 steps of each")
    args = p.parse_args()
    mesh = parallel.make_mesh()
    print(f"device: {jax.devices()[0].device_kind} x {len(jax.devices())}, jax {jax.__version__}")
    for variant in args.models.split(","):
        row = {}
        for remat in (False, True):
            step, state, data, s_params = step_setup(
                variant, args.batch, args.coalitions, args.dtype, True, mesh, 224, remat=remat
            )
            compiled = step.lower(state, data, s_params).compile()
            mem = compiled.memory_analysis()
            temp, arg, out = mem.temp_size_in_bytes, mem.argument_size_in_bytes, mem.output_size_in_bytes
            line = (
                f"ViT-{variant} batch {args.batch} remat={remat}: temporaries {temp / GIB:.2f} GiB, "
                f"arguments {arg / GIB:.2f} GiB, outputs {out / GIB:.2f} GiB"
            )
            seconds = None
            if args.time:
                state, m = compiled(state, data, s_params)
                jax.block_until_ready(m)
                times = []
                for _ in range(3):
                    start = time.perf_counter()
                    state, m = compiled(state, data, s_params)
                    jax.block_until_ready(m)
                    times.append(time.perf_counter() - start)
                seconds = float(np.median(times))
                line += f"; {seconds:.2f} s/step"
            row[remat] = (temp, seconds)
            print(line, flush=True)
        ratio = row[True][0] / max(row[False][0], 1)
        cost = f", {row[True][1] / row[False][1]:.2f}x the time" if args.time else ""
        print(f"ViT-{variant}: remat keeps {ratio:.2f}x the temporaries{cost}", flush=True)


if __name__ == "__main__":
    main()
