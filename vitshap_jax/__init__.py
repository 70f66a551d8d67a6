"""vitshap_jax: ViT-Shapley in JAX/Flax.

Learned Shapley-value explanations of vision transformers: a classifier, a surrogate that
tolerates held-out patches, and an explainer that outputs every patch's Shapley value in one
forward pass. See README.md for the workflow and DESIGN.md (shared) for the method.
"""

__version__ = "0.1.0"
