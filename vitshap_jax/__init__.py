"""vitshap_jax: ViT-Shapley in JAX/Flax.

Learned Shapley-value explanations of vision transformers: a classifier, a surrogate that
tolerates held-out patches, and an explainer that outputs every patch's Shapley value in one
forward pass. See README.md for the workflow and DESIGN.md (shared) for the method.

    import vitshap_jax
    run = vitshap_jax.load_explainer("runs/digits")          # a finished run (`vitshap_jax.runs`)
    out = run(run.preprocess(vitshap_jax.read_image("x.jpg"))[None])

The names below are imported on first use, so that `import vitshap_jax.config` (config parsing) stays
free of JAX.
"""

__version__ = "0.1.0"

_LAZY = {
    "TrainedRun": "vitshap_jax.runs",
    "load_explainer": "vitshap_jax.runs",
    "read_image": "vitshap_jax.data",
    "UserError": "vitshap_jax.errors",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vitshap_jax' has no attribute {name!r}")
