"""Coalition samplers, jit-friendly (static shapes, explicit keys).

* `uniform_size_coalitions`: a size uniform in 0..n, then a uniformly random coalition of that size
  (the surrogate's training distribution).
* `shapley_kernel_coalitions`: a size k in 1..n-1 with probability proportional to 1 / (k (n - k)),
  then a uniformly random coalition of that size (the Shapley kernel; the explainer's loss). With
  `paired=True` the second half of the coalitions are the complements of the first half. Unlike the
  reference implementation, whose visible count is only approximately kernel-distributed, the size
  here is drawn exactly.
* `reference_compat_coalitions`: the reference implementation's sampler (suinleelab/vit-shapley,
  `generate_mask(mode="shapley")` in `main.py`), reproduced as a distribution: j in 0..n-2 is drawn with
  the kernel's probability of size j + 1, then every player is visible independently with probability
  1 - j / n, so the visible count is Binomial(n, 1 - j / n) (`reference_compat_size_probs`). It is not
  the Shapley kernel: j = 0, the kernel's likeliest draw, always gives the full coalition (and its
  complement the empty one), which carry no information under the efficiency normalization, and sizes
  1 and n - 1 are under-sampled. For comparisons (`config.explainer.sampler`), not the default.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def coalitions_of_size(key, sizes, n: int):
    """Uniformly random coalitions with `sizes [...]` players each: bool `[..., n]`."""
    noise = jax.random.uniform(key, (*jnp.shape(sizes), n))
    ranks = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)  # a uniform random permutation
    return ranks < jnp.asarray(sizes)[..., None]


def uniform_size_coalitions(key, shape: tuple[int, ...], n: int):
    """bool `[*shape, n]`: size uniform in 0..n, then a uniform coalition of that size."""
    k_size, k_set = jax.random.split(key)
    sizes = jax.random.randint(k_size, shape, 0, n + 1)
    return coalitions_of_size(k_set, sizes, n)


def shapley_kernel_size_probs(n: int) -> np.ndarray:
    """`p[k]` for k = 0..n: proportional to 1 / (k (n - k)) for 0 < k < n, zero at 0 and n."""
    if n < 2:
        raise ValueError(f"the Shapley kernel needs at least 2 players, got {n}")
    k = np.arange(1, n)
    w = 1.0 / (k * (n - k))
    return np.concatenate([[0.0], w / w.sum(), [0.0]])


def shapley_kernel_coalitions(key, shape: tuple[int, ...], n: int, num: int, paired: bool = True):
    """bool `[*shape, num, n]` drawn from the Shapley kernel; with `paired`, coalition `num/2 + j` is
    the complement of coalition j (num must then be even)."""
    if paired and num % 2:
        raise ValueError(f"paired sampling needs an even number of coalitions, got {num}")
    draws = num // 2 if paired else num
    k_size, k_set = jax.random.split(key)
    logits = jnp.log(jnp.asarray(shapley_kernel_size_probs(n)[1:n], jnp.float32))
    sizes = 1 + jax.random.categorical(k_size, logits, shape=(*shape, draws))
    masks = coalitions_of_size(k_set, sizes, n)
    return jnp.concatenate([masks, ~masks], axis=-2) if paired else masks


def reference_compat_size_probs(n: int) -> np.ndarray:
    """`p[m]` for m = 0..n: the visible count of `reference_compat_coalitions` (before pairing), the
    mixture over j of Binomial(n, 1 - j / n) with j + 1 drawn from the Shapley kernel."""
    kernel = shapley_kernel_size_probs(n)[1:n]  # the weight of j = size - 1
    m = np.arange(n + 1)
    comb = np.asarray([math.comb(n, k) for k in m], np.float64)
    probs = np.zeros(n + 1)
    for j, weight in enumerate(kernel):
        q = 1.0 - j / n
        probs += weight * comb * q**m * (1.0 - q) ** (n - m)
    return probs


def reference_compat_coalitions(key, shape: tuple[int, ...], n: int, num: int, paired: bool = True):
    """bool `[*shape, num, n]` from the reference implementation's sampler (see the module docstring);
    with `paired`, coalition `num/2 + j` is the complement of coalition j (num must then be even)."""
    if paired and num % 2:
        raise ValueError(f"paired sampling needs an even number of coalitions, got {num}")
    draws = num // 2 if paired else num
    k_size, k_set = jax.random.split(key)
    logits = jnp.log(jnp.asarray(shapley_kernel_size_probs(n)[1:n], jnp.float32))
    shift = jax.random.categorical(k_size, logits, shape=(*shape, draws))  # j = kernel size - 1: 0..n-2
    masks = jax.random.uniform(k_set, (*shape, draws, n)) > (shift / n)[..., None]
    return jnp.concatenate([masks, ~masks], axis=-2) if paired else masks


# The explainer's coalition samplers by the name `config.explainer.sampler` gives them.
SAMPLERS = {"shapley": shapley_kernel_coalitions, "reference_compat": reference_compat_coalitions}


def eval_keys(seed: int, indices, salt: int):
    """A key per example, fixed by its index in the split: evaluation masks are the same every epoch."""
    base = jax.random.fold_in(jax.random.key(seed), salt)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)
