"""shapiq both ways: our values in its file format, our games as its games, its games as ours.

* `interaction_values_dict` / `write_interaction_values`: one explanation (Shapley values, index "SV",
  order 1; or order-2 interactions, "k-SII" / "FSII") as the JSON that `shapiq.InteractionValues.load`
  reads, written with the standard library (the core install does not need shapiq). The metadata's
  `parameters` carry what image plots need: the patch grid and size, which patch each player is, the
  class and the image's name.
* `shapiq_game(value_fn, image, class_index, n)`: one image's game (e.g. `TrainedRun.game()`, the
  surrogate with its masking; or the classifier's) as a `shapiq.Game`, whose `value_function` evaluates
  the coalitions shapiq asks for in large jitted batches, so any shapiq approximator runs on it.
* `from_shapiq(game)`: a shapiq game, or any numpy function of coalitions `[M, n] -> [M]` (or
  `[M, C]`), as a `value_fn(images, masks)` for our estimators (`kernelshap`, `exact_shapley`,
  `interactions`); the images are ignored (a shapiq game is one image's game), the batch is one image.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vitshap_jax.files import write_json
from vitshap_jax.shapley.game import as_game, value_pairs

FORMAT_VERSION = "1.4.1"  # the shapiq release whose InteractionValues JSON this writes (and is tested on)


def _key(players: tuple[int, ...]) -> str:
    return ",".join(map(str, players)) if players else "Empty"


def interaction_values_dict(
    values,
    baseline: float,
    *,
    pairs=None,
    index: str = "SV",
    estimated: bool = False,
    budget: int | None = None,
    description: str | None = None,
    **parameters,
) -> dict:
    """shapiq's InteractionValues JSON: `values [n]` (order 1) and, with `pairs [n, n]` (symmetric),
    order 2 (index "k-SII" or "FSII"); `baseline` is v(empty). `parameters` (JSON values) go to the
    file's `parameters` block."""
    values = np.asarray(values, np.float64).reshape(-1)
    n = len(values)
    data = {"Empty": float(baseline)} | {_key((i,)): float(v) for i, v in enumerate(values)}
    if pairs is not None:
        pairs = np.asarray(pairs, np.float64)
        if pairs.shape != (n, n):
            raise ValueError(f"pairs must be [{n}, {n}] like the values, got {pairs.shape}")
        data |= {_key((i, j)): float(pairs[i, j]) for i in range(n) for j in range(i + 1, n)}
    elif index != "SV":
        raise ValueError(f"index {index!r} has order 2: give the pairs")
    return {
        "object_name": "InteractionValues",
        "data_type": "interaction_values",
        "version": FORMAT_VERSION,
        "created_from": "vitshap_jax",
        "description": description,
        "parameters": parameters,
        "metadata": {
            "n_players": n,
            "index": index,
            "max_order": 1 if pairs is None else 2,
            "min_order": 0,
            "estimated": bool(estimated),
            "estimation_budget": budget,
            "baseline_value": float(baseline),
        },
        "data": data,
    }


def write_interaction_values(path: str, values, baseline: float, **options) -> str:
    """Writes `interaction_values_dict(values, baseline, **options)` to `path` (must end in .json, as
    shapiq requires); returns the path."""
    if not os.fspath(path).endswith(".json"):
        raise ValueError(f"{path}: shapiq reads InteractionValues only from files ending in .json")
    write_json(path, interaction_values_dict(values, baseline, **options))
    return path


def image_parameters(
    *, image_size: int, patch_size: int, players=None, class_name: str, class_index: int, image: str
) -> dict:
    """The `parameters` block of an image explanation: the patch grid (rows, columns; player p is patch
    `players[p]`, counted row by row), and what was explained."""
    side = image_size // patch_size
    return {
        "image": image,
        "class_name": class_name,
        "class_index": int(class_index),
        "image_size": int(image_size),
        "patch_size": int(patch_size),
        "patch_grid": [side, side],
        "players": [int(p) for p in (range(side * side) if players is None else players)],
    }


# ------------------------------------------------------------------------------------------------------
# Games, both ways.


def complement_pairs(coalitions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first, second, alone): row indices such that `coalitions[second[k]]` is the complement of
    `coalitions[first[k]]`, and the rows without their complement among the others (each row once)."""
    codes: dict[bytes, list[int]] = {}
    for i, row in enumerate(np.packbits(coalitions, axis=1)):
        codes.setdefault(row.tobytes(), []).append(i)
    first, second, used = [], [], np.zeros(len(coalitions), bool)
    for i, row in enumerate(np.packbits(~coalitions, axis=1)):
        if used[i]:
            continue
        j = next((j for j in codes.get(row.tobytes(), ()) if not used[j] and j != i), None)
        if j is not None:
            first.append(i)
            second.append(j)
            used[i] = used[j] = True
    return np.asarray(first, int), np.asarray(second, int), np.flatnonzero(~used)


def shapiq_game(value_fn, image, class_index: int, n: int, *, batch_size: int = 1024):
    """One image's game of `value_fn` (our `value_fn(images, masks) -> [B, M, C]`) for one class, as a
    `shapiq.Game` with n players. Coalitions are evaluated `batch_size` at a time in one jitted call
    (padded to that size, so it compiles once); a coalition asked together with its complement (paired
    sampling: shapiq's KernelSHAP, KernelSHAP-IQ, ...) is evaluated with it as a pair (`value_pairs`:
    one n + 2 token pass for an attention-masked surrogate). Values are the game's own (not centred:
    shapiq's `normalize` is off), so `baseline_value` of shapiq's results is v(empty)."""
    import shapiq

    game = as_game(value_fn)
    image = jnp.asarray(image)[None]
    single = jax.jit(lambda g, x, m: g(x, m)[0, :, class_index])
    pair = jax.jit(lambda g, x, m: tuple(v[0, :, class_index] for v in value_pairs(g, x, m)))

    def batched(fn, masks, size):
        out = []
        for s in range(0, len(masks), size):
            chunk = masks[s : s + size]
            padded = np.concatenate([chunk, np.ones((size - len(chunk), n), bool)])
            values = fn(game, image, jnp.asarray(padded)[None])
            out.append(np.stack(values, -1) if isinstance(values, tuple) else np.asarray(values))
        return np.concatenate(out)[: len(masks)]

    class _Game(shapiq.Game):
        def value_function(self, coalitions: np.ndarray) -> np.ndarray:
            coalitions = np.asarray(coalitions, bool)
            values = np.zeros(len(coalitions))
            first, second, alone = complement_pairs(coalitions)
            if len(first):
                both = batched(pair, coalitions[first], max(1, batch_size // 2))
                values[first], values[second] = both[:, 0], both[:, 1]
            if len(alone):
                values[alone] = batched(single, coalitions[alone], batch_size)
            return values

    return _Game(n_players=n, normalize=False)


def _host_values(fn, masks: np.ndarray) -> np.ndarray:
    out = []
    for m in np.asarray(masks, bool):  # one image's coalitions [M, n]
        v = np.asarray(fn(m), np.float32)
        out.append(v.reshape(len(m), -1))
    return np.stack(out)


def from_shapiq(game: Any, num_outputs: int = 1):
    """A shapiq game, or any function of coalitions `[M, n] bool -> [M]` (or `[M, C]` with
    `num_outputs=C`), as our game `value_fn(images, masks [B, M, n]) -> [B, M, C]` (evaluated on the host
    through `jax.pure_callback`; usable inside jitted estimators). A shapiq game centred with
    `normalize=True` gives v - v(empty): Shapley values and interactions are the same, v(empty) is 0."""

    def value_fn(images, masks):
        shape = jax.ShapeDtypeStruct((*masks.shape[:2], num_outputs), jnp.float32)
        return jax.pure_callback(lambda m: _host_values(game, m), shape, masks, vmap_method="sequential")

    return jax.tree_util.Partial(value_fn)
