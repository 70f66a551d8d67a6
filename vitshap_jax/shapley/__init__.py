"""Shapley-value machinery: coalition samplers and the efficiency normalization.

Vocabulary (as in shapiq): players are patches, a coalition is a boolean mask `[..., n_players]`
(True = present), a game is `value_fn(images, masks) -> values`.
"""

from vitshap_jax.shapley.exact import exact_shapley
from vitshap_jax.shapley.game import surrogate_game, surrogate_values, table_game
from vitshap_jax.shapley.kernelshap import kernelshap
from vitshap_jax.shapley.normalize import additive_efficient_normalization
from vitshap_jax.shapley.permutation import permutation_shapley
from vitshap_jax.shapley.sampling import (
    coalitions_of_size,
    shapley_kernel_coalitions,
    shapley_kernel_size_probs,
    uniform_size_coalitions,
)

__all__ = [
    "additive_efficient_normalization",
    "coalitions_of_size",
    "exact_shapley",
    "kernelshap",
    "permutation_shapley",
    "surrogate_game",
    "surrogate_values",
    "shapley_kernel_coalitions",
    "shapley_kernel_size_probs",
    "table_game",
    "uniform_size_coalitions",
]
