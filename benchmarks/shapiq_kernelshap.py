"""Our estimators against shapiq's on the same games: error to exact Shapley values per evaluation budget.

    python -m venv .venv-bench && . .venv-bench/bin/activate && pip install -r requirements-bench.txt
    python benchmarks/shapiq_kernelshap.py [--workdir=runs/digits] [--seeds=20]

Games with 16 players whose every coalition is tabulated (2^16 values), so exact values are known:

* `mlp`: a random tanh network of the coalition's indicator vector (non-linear, all orders);
* `vit`: a randomly initialized attention-masked ViT (8x8 image, 2x2 patches, 10 classes), v = the
  softmax probability of class 0 with the patches of the coalition visible;
* `digits` (with `--workdir`): a finished digits run's surrogate game on its first test image, for the
  label's class (the game the evaluation table is about).

Exact values come from our `exact_shapley` and are checked against shapiq's `ExactComputer` first. Then,
for each budget (evaluations per game, v(empty) and v(all) included, as shapiq counts them) and seed,
it runs shapiq's `KernelSHAP` (pairing trick on), `UnbiasedKernelSHAP` and `PermutationSamplingSV`, and
ours: `kernelshap` (standard, paired), `kernelshap(estimator="unbiased")` and `permutation_shapley`. It
prints the relative L2 error `|phi - exact| / |exact|` (mean over seeds, and its standard error) side by
side. Ours run with a different random stream than shapiq's, so only the averages compare.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vitshap_jax.shapley import exact_shapley, kernelshap, permutation_shapley, table_game  # noqa: E402

N = 16


def coalitions(n: int) -> np.ndarray:
    codes = np.arange(2**n)
    return ((codes[:, None] >> np.arange(n)) & 1).astype(bool)  # row = binary code, player i = bit i


def mlp_table(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = coalitions(N).astype(np.float64)
    return np.tanh(z @ rng.normal(size=(N, 32))) @ rng.normal(size=32)


def vit_table(seed: int = 0) -> np.ndarray:
    from vitshap_jax.models import ViT
    from vitshap_jax.shapley import surrogate_game

    model = ViT(num_classes=10, patch_size=2, hidden_size=32, depth=2, num_heads=2, mlp_dim=64)
    image = jax.random.normal(jax.random.key(seed + 1), (1, 8, 8, 3))
    params = model.init(jax.random.key(seed), image)["params"]
    params = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.key(seed + 2), x.shape), params)
    return surrogate_table(surrogate_game(model, params, "multiclass"), image, 0)


def surrogate_table(game, image, cls: int) -> np.ndarray:
    masks = jnp.asarray(coalitions(N))
    values = [np.asarray(game(image, masks[None, s : s + 8192]))[0, :, cls] for s in range(0, 2**N, 8192)]
    return np.concatenate(values).astype(np.float64)


def digits_table(workdir: str) -> np.ndarray:
    from vitshap_jax.runs import load_explainer

    loaded = load_explainer(workdir)
    if loaded.num_players != N:  # every coalition is tabulated: a 16-player game only
        raise SystemExit(
            f"--workdir={workdir}: {loaded.num_players} players; this benchmark's games have {N}"
        )
    _, images, labels = loaded.examples("test", 1, views=False)
    game = loaded.game()
    return surrogate_table(game, jnp.asarray(images), int(labels[0]))


def shapiq_estimates(table: np.ndarray, budget: int, seed: int) -> dict[str, np.ndarray]:
    from shapiq.approximator import KernelSHAP, PermutationSamplingSV, UnbiasedKernelSHAP

    weights = 1 << np.arange(N)

    def game(c):  # shapiq: coalitions [M, n] (or one [n]) bool -> values [M]
        return table[np.atleast_2d(np.asarray(c, bool)).astype(np.int64) @ weights]

    out = {}
    for name, approx in (
        ("shapiq KernelSHAP", KernelSHAP(N, pairing_trick=True, random_state=seed)),
        ("shapiq UnbiasedKernelSHAP", UnbiasedKernelSHAP(N, pairing_trick=True, random_state=seed)),
        ("shapiq PermutationSamplingSV", PermutationSamplingSV(N, random_state=seed)),
    ):
        iv = approx.approximate(budget, game)
        out[name] = np.array([iv[(i,)] for i in range(N)])
    return out


def our_estimates(table: np.ndarray, budget: int, seeds: int) -> dict[str, np.ndarray]:
    """`[seeds, n]` per method: the seeds run as one batch of identical games (independent keys per row)."""
    game = table_game(np.repeat(table[None, :, None], seeds, 0).astype(np.float32))
    x = jnp.zeros((seeds, 1))
    key = jax.random.key(budget)
    out = {}
    for name, estimator in (
        ("ours kernelshap (standard)", "standard"),
        ("ours kernelshap (unbiased)", "unbiased"),
    ):
        phi, info = kernelshap(game, x, N, key=key, threshold=None, max_evals=budget, estimator=estimator)
        assert info["evals"] == budget
        out[name] = np.asarray(phi)[..., 0]
    if budget >= 2 + 2 * (N - 1):
        phi, info = permutation_shapley(game, x, N, key=key, threshold=None, max_evals=budget)
        out["ours permutation (antithetic)"] = np.asarray(phi)[..., 0]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="", help="a finished digits run: adds its surrogate game")
    p.add_argument("--budgets", default="64,256,1024,4096")
    p.add_argument("--seeds", type=int, default=20)
    args = p.parse_args()
    try:
        budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError:
        raise SystemExit(f"--budgets={args.budgets}: give comma-separated integers, e.g. 64,256") from None
    from importlib.metadata import version

    from shapiq import ExactComputer

    print(f"shapiq {version('shapiq')}, jax {jax.__version__}, {args.seeds} seeds")
    games = {"digits": digits_table(args.workdir)} if args.workdir else {}  # first: it checks the run
    games = {"mlp": mlp_table(), "vit": vit_table(), **games}
    weights = 1 << np.arange(N)
    for name, table in games.items():
        exact = np.asarray(
            exact_shapley(table_game(table[None, :, None].astype(np.float32)), jnp.zeros((1, 1)), N)
        )
        exact = exact[0, :, 0].astype(np.float64)
        computer = ExactComputer(
            lambda c, t=table: t[np.asarray(c, bool).astype(np.int64) @ weights], n_players=N
        )
        theirs = computer("SV")
        theirs = np.array([theirs[(i,)] for i in range(N)])
        gap = np.abs(theirs - exact).max() / np.abs(exact).max()
        print(f"\ngame {name}: exact values agree with shapiq's ExactComputer to {gap:.1e} (relative)")
        print("| budget | method | relative L2 error (mean over seeds) | its std error |")
        print("|---|---|---|---|")
        for budget in budgets:
            errors: dict[str, list[float]] = {}
            for seed in range(args.seeds):
                for method, phi in shapiq_estimates(table, budget, seed).items():
                    errors.setdefault(method, []).append(np.linalg.norm(phi - exact) / np.linalg.norm(exact))
            for method, phi in our_estimates(table, budget, args.seeds).items():
                errors[method] = list(np.linalg.norm(phi - exact, axis=1) / np.linalg.norm(exact))
            for method, e in errors.items():
                e = np.asarray(e)
                print(
                    f"| {budget} | {method} | {e.mean():.4f} | {e.std(ddof=1) / np.sqrt(len(e)):.4f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
