"""What batching buys shapiq: its KernelSHAP on our surrogate game, batched and jitted, against the same
approximator on a per-coalition Python game over the same model.

    python benchmarks/shapiq_game_throughput.py [--workdir=runs/digits] [--budget=512] [--batch=512]

Both games evaluate the same ViT (a finished run's surrogate with `--workdir`, else a random
attention-masked ViT with 16 patches). `vitshap_jax.shapiq_interop.shapiq_game` answers each of shapiq's
`value_function` calls with jitted batches of `--batch` coalitions; the per-coalition game calls the
same jitted model once per coalition, as a straightforward shapiq `Game` subclass would. shapiq's
KernelSHAP runs with the same seed on both, so it asks for the same coalitions and the two estimates
must agree (printed). Prints seconds per explained image (the best of 4 runs, the first compiles) and
the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib.metadata import version

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import shapiq  # noqa: E402

from vitshap_jax.models import ViT  # noqa: E402
from vitshap_jax.shapiq_interop import shapiq_game  # noqa: E402
from vitshap_jax.shapley.game import as_game, surrogate_game  # noqa: E402


def random_game():
    model = ViT(num_classes=10, patch_size=2, hidden_size=64, depth=4, num_heads=4, mlp_dim=128)
    image = jax.random.normal(jax.random.key(0), (1, 8, 8, 3))
    params = model.init(jax.random.key(1), image)["params"]
    return surrogate_game(model, params, "multiclass"), image[0], 0, 16, "random ViT, 16 patches"


def run_game(workdir: str):
    from vitshap_jax.runs import TrainedRun

    run = TrainedRun.load(workdir)
    _, images, labels = run.examples("test", 1, views=False)
    return (
        run.game(),
        images[0],
        int(labels[0]),
        run.num_players,
        f"{workdir} surrogate, {run.num_players} patches",
    )


class PerCoalition(shapiq.Game):
    """The same game, one jitted model call per coalition."""

    def __init__(self, value_fn, image, class_index, n):
        self.game, self.image, self.c = as_game(value_fn), jnp.asarray(image)[None], class_index
        self.one = jax.jit(lambda g, x, m: g(x, m)[0, 0, class_index])
        super().__init__(n_players=n, normalize=False)

    def value_function(self, coalitions):
        return np.array(
            [float(self.one(self.game, self.image, jnp.asarray(c)[None, None])) for c in coalitions]
        )


def timed(game, n, budget, seed=0, repeats=4):
    best, values = float("inf"), None
    for _ in range(repeats):  # the first run compiles; the best of the others counts
        start = time.perf_counter()
        values = shapiq.KernelSHAP(n=n, random_state=seed).approximate(budget=budget, game=game)
        best = min(best, time.perf_counter() - start)
    return best, np.array([values[(i,)] for i in range(n)])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="a finished run (default: a random ViT)")
    p.add_argument("--budget", type=int, default=512, help="game evaluations per image")
    p.add_argument("--batch", type=int, default=512, help="coalitions per jitted call (ours)")
    args = p.parse_args()
    value_fn, image, c, n, what = run_game(args.workdir) if args.workdir else random_game()
    batched = shapiq_game(value_fn, image, c, n, batch_size=args.batch)
    t_batched, phi_batched = timed(batched, n, args.budget)
    t_single, phi_single = timed(PerCoalition(value_fn, image, c, n), n, args.budget)
    print(f"{what}; shapiq {version('shapiq')} KernelSHAP, budget {args.budget}; {jax.devices()[0].platform}")
    print(f"  per-coalition game: {t_single:.3f} s per image")
    print(f"  batched jitted game (batch {args.batch}): {t_batched:.3f} s per image")
    gap = np.abs(phi_batched - phi_single).max()
    print(f"  speedup {t_single / t_batched:.1f}x; max |difference| of the estimates {gap:.2e}")


if __name__ == "__main__":
    main()
