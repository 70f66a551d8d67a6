"""The attention core on this backend: ours against `jax.nn.dot_product_attention`, at the step's shapes.

    python benchmarks/attention_impl.py --models=small,base --sequences=1024 --dtype=bfloat16

Ours is `models/vit.py: attention` (heads-leading batched products, the key mask as a -1e30 bias, a
float32 softmax) with the layout transposes the model does around it; the others are
`jax.nn.dot_product_attention` with a boolean mask, `implementation="xla"` and, on a GPU,
`implementation="cudnn"` (cuDNN's fused kernel, which never writes the [T, T] weights to memory; its mask
broadcast to [B, 1, T, T], the shape cuDNN takes). For
each ViT variant (its heads, head_dim 64) and both shapes the explainer step runs (a masked pass: 197
tokens, each sequence its own key mask of about half the patches, the class token always visible; a
packed pair: 198 tokens, each token attending only within its half), `--sequences` sequences: forward
time, forward + backward time (gradients of q, k and v), the largest difference from ours, and whether
the implementation is exact for the masked model (held-out keys' k and v replaced by other values
change no output of a masked pass, bit for bit). Where cuDNN refuses the shapes or the dtype, its error
is printed instead. Prints ratios to ours, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from matmul_precision import seconds  # noqa: E402  (median after a warm-up call)

from vitshap_jax.config import VIT_VARIANTS  # noqa: E402
from vitshap_jax.models.vit import attention  # noqa: E402


def ours(q, k, v, mask):
    """[B, T, heads, head_dim] in and out, as the model's projections give and take them."""
    t = functools.partial(jnp.transpose, axes=(0, 2, 1, 3))
    return t(attention(t(q), t(k), t(v), mask))


def library(implementation):
    def fn(q, k, v, mask):
        if implementation == "cudnn":  # cuDNN takes a bias of [B|1, N|1, Tq, Tk] (as models/vit.py gives it)
            mask = jnp.broadcast_to(mask, (*mask.shape[:2], q.shape[1], k.shape[1]))
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)

    return fn


def inputs(rng, sequences, tokens, heads, dtype, packed):
    """q, k, v `[S, T, heads, 64]` and the boolean mask the model builds for that pass."""
    q, k, v = (jnp.asarray(rng.standard_normal((sequences, tokens, heads, 64)), dtype) for _ in range(3))
    if packed:  # two class tokens, then the patches; each token attends within its own half
        side = rng.random((sequences, tokens)) < 0.5
        side[:, 0], side[:, 1] = True, False
        mask = side[:, None, :, None] == side[:, None, None, :]
    else:  # the class token and about half the patches visible to every query
        mask = rng.random((sequences, 1, 1, tokens)) < 0.5
        mask[..., 0] = True
    return q, k, v, jnp.asarray(mask)


def exact_for_the_masked_model(forward, q, k, v, mask, rng):
    """Held-out keys' k and v replaced by other values leave every output bit as it was (key masks);
    `forward` the implementation, jitted."""
    held_out = ~np.asarray(mask)[:, 0, 0, :, None, None]  # [S, T, 1, 1]
    other = [jnp.asarray(rng.standard_normal(x.shape), x.dtype) for x in (k, v)]
    k2, v2 = (jnp.where(held_out, o, x) for o, x in zip(other, (k, v), strict=True))
    return bool(jnp.array_equal(forward(q, k, v, mask), forward(q, k2, v2, mask)))


def compare(variant, sequences, dtype, repeats, implementations, packed, rng):
    heads = VIT_VARIANTS[variant]["num_heads"]
    tokens = 198 if packed else 197
    args = inputs(rng, sequences, tokens, heads, dtype, packed)
    kind = "packed pairs" if packed else "masked"
    shape = f"ViT-{variant} ({heads} heads), {sequences} x {tokens} tokens ({kind}), {dtype}"
    reference = None
    times = {}
    for name, fn in implementations.items():
        forward = jax.jit(fn)
        backward = jax.jit(
            jax.grad(lambda q, k, v, m, fn=fn: fn(q, k, v, m).astype(jnp.float32).sum(), argnums=(0, 1, 2))
        )
        try:
            out = np.asarray(forward(*args), np.float32)
            fwd = seconds(forward, *args, repeats=repeats)
        except Exception as error:  # cuDNN refusing a shape or dtype: reported, the others still run
            print(f"{shape}: {name} not run: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
            continue
        try:  # cuDNN refuses to differentiate a masked pass of odd length (197 tokens)
            bwd = seconds(backward, *args, repeats=repeats)
        except Exception as error:
            why = str(error).splitlines()[0][:200]
            print(f"{shape}: {name} backward not run: {type(error).__name__}: {why}")
            bwd = float("nan")
        times[name] = (fwd, bwd)
        reference = out if reference is None else reference
        exact = (
            ""
            if packed
            else f", exact for the masked model: {exact_for_the_masked_model(forward, *args, rng)}"
        )
        base = times[next(iter(times))]
        print(
            f"{shape}: {name} forward {fwd * 1e3:.2f} ms ({base[0] / fwd:.2f}x ours), forward+backward "
            f"{bwd * 1e3:.2f} ms ({base[1] / bwd:.2f}x ours), max |difference| from ours "
            f"{np.abs(out - reference).max():.1e}{exact}",
            flush=True,
        )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="small,base")
    p.add_argument("--sequences", type=int, default=1024, help="sequences per call (images x coalitions)")
    p.add_argument("--dtype", default="bfloat16", help="of q, k, v: bfloat16 or float32")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    implementations = {"ours": ours, "jax xla": library("xla")}
    if jax.default_backend() == "gpu":
        implementations["jax cudnn"] = library("cudnn")
    kind = jax.devices()[0].device_kind
    print(f"device: {kind} ({jax.default_backend()}), jax {jax.__version__}; {', '.join(implementations)}")
    rng = np.random.default_rng(0)
    for variant in args.models.split(","):
        for packed in (False, True):
            compare(
                variant, args.sequences, jnp.dtype(args.dtype), args.repeats, implementations, packed, rng
            )


if __name__ == "__main__":
    main()
