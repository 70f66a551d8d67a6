"""The masked ViT forward against the PyTorch reference (timm), side by side in one run.

    . .venv-bench/bin/activate   # torch + timm (requirements-bench.txt), never the core install
    python benchmarks/torch_reference.py --models=tiny,small --batch=64

For each ViT variant at 224 px (patch 16, 196 patches), float32, random weights: a batch of images, each
with its own random coalition (half the patches), through

* timm's `VisionTransformer` the way the reference implementation masks: an additive attention bias
  (-inf on held-out patch keys) passed as `attn_mask` to every block, under `torch.no_grad()`;
* our `ViT` with attention masking (`models/vit.py`), jitted.

Both get the same weights (ours converted from timm's state dict through `models/pretrained.py`), and
the logits are compared first. Prints images/s of both (median of `--repeats` after a warm-up) and our
speed as a fraction of PyTorch's. Set the same malloc environment for both sides when comparing
(`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`; see issue 16): this script does not.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from vitshap_jax.models import ViT, load_pretrained  # noqa: E402

SHAPES = {"tiny": (192, 12, 3), "small": (384, 12, 6)}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (compiles ours)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def compare(variant: str, images: np.ndarray, keep: np.ndarray, repeats: int) -> str:
    batch = len(images)
    width, depth, heads = SHAPES[variant]
    ref = timm.create_model(f"vit_{variant}_patch16_224", pretrained=False, num_classes=10).eval()
    ours = ViT(
        num_classes=10, patch_size=16, hidden_size=width, depth=depth, num_heads=heads, mlp_dim=4 * width
    )
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.safetensors")
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
        shapes = jax.eval_shape(lambda: ours.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"])
        params = load_pretrained(path, shapes)
    # The reference's mask: -inf on held-out patch keys (the class token always visible).
    visible = torch.from_numpy(np.concatenate([np.ones((batch, 1), bool), keep], 1))
    bias = torch.zeros(batch, 1, 197, 197).masked_fill(~visible[:, None, None, :], float("-inf"))
    x_torch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def torch_forward():
        with torch.no_grad():
            return ref.forward_head(ref.forward_features(x_torch, attn_mask=bias))

    forward = jax.jit(lambda prm, x, m: ours.apply({"params": prm}, x, m))
    x_jax, m_jax = jnp.asarray(images), jnp.asarray(keep)

    def jax_forward():
        return jax.block_until_ready(forward(params, x_jax, m_jax))

    gap = np.abs(np.asarray(jax_forward()) - torch_forward().numpy()).max()
    t_torch, t_jax = timed(torch_forward, repeats), timed(jax_forward, repeats)
    return (
        f"ViT-{variant} masked forward, batch {batch}: PyTorch+timm {batch / t_torch:.1f} images/s, "
        f"vitshap_jax {batch / t_jax:.1f} images/s ({t_torch / t_jax:.2f}x PyTorch); "
        f"max |logit difference| {gap:.1e}"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,small")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__} ({threads} threads), timm {timm.__version__}; jax {jax.__version__}")
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch, 224, 224, 3)).astype(np.float32)
    keep = rng.random((args.batch, 196)) < 0.5
    for variant in args.models.split(","):
        print(compare(variant, images, keep, args.repeats), flush=True)


if __name__ == "__main__":
    main()
