"""The hot paths against the PyTorch reference (timm), side by side in one run.

    . .venv-bench/bin/activate   # torch + timm (requirements-bench.txt), never the core install
    python benchmarks/torch_reference.py --models=tiny,small --batch=64 --step_batch=2 --classifier_batch=32

1. The masked surrogate forward (below).
2. The explainer's train step, `--step_batch` images with 32 paired coalitions each: in PyTorch, as the
   reference trains it (the frozen surrogate under `no_grad` on every coalition, v(all) and v(empty),
   in the reference's calls: every image's coalitions at once, `--torch_batching`),
   the explainer = timm ViT backbone + our head's shape (one block, LayerNorm, a 3-layer MLP of width
   4D, tanh), the additive efficient normalization, the Shapley WLS loss, backward, AdamW); ours, the
   explainer stage's real jitted step (`benchmarks/explainer_step.py`), plain masked passes and packed
   pairs. Weights are random for both (speed does not depend on them).
   Also the work of each: FLOPs per step (PyTorch: torch's FlopCounterMode plus the attention
   products it does not count; ours: the step's matmul FLOPs counted from its jaxpr,
   `explainer_step.matmul_flops`) and the FLOP/s each achieves, so a ratio can be read as less work
   or faster work.
3. The classifier's train step, `--classifier_batch` full images: timm forward, cross-entropy,
   backward, AdamW in PyTorch; the classifier stage's jitted `train_step` (same loss, AdamW with
   clipping, no masking) in ours.

For each ViT variant at 224 px (patch 16, 196 patches), float32, random weights: a batch of images, each
with its own random coalition (half the patches), through

* timm's `VisionTransformer` the way the reference implementation masks: an additive attention bias
  (-inf on held-out patch keys) passed as `attn_mask` to every block, under `torch.no_grad()`;
* our `ViT` with attention masking (`models/vit.py`), jitted.

Both get the same weights (ours converted from timm's state dict through `models/pretrained.py`), and
the logits are compared first. Prints images/s of both (median of `--repeats` after a warm-up) and our
speed as a fraction of PyTorch's. `--matmul_precision=bfloat16` compares the two at bfloat16 matmuls:
ours with `config.model.matmul_precision=bfloat16` (bfloat16 operands, float32 sums and outputs),
PyTorch under `torch.autocast` on its device in bfloat16 (its way: matmuls in bfloat16, their outputs
bfloat16 too); run it once per precision. Set the same malloc environment for both sides when
comparing (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`; see issue 16): this script does not.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from vitshap_jax.config import VIT_VARIANTS  # noqa: E402
from vitshap_jax.models import ViT, load_pretrained  # noqa: E402

DEVICE = torch.device("cpu")  # PyTorch's side; --device=cuda moves it to the GPU


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (compiles ours)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def precision_context(precision: str):
    """PyTorch's bfloat16 matmuls (autocast on its device), or nothing for float32."""
    if precision == "bfloat16":
        return torch.autocast(DEVICE.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compare(
    variant: str, images: np.ndarray, keep: np.ndarray, repeats: int, precision: str = "float32"
) -> str:
    batch = len(images)
    ref = timm.create_model(f"vit_{variant}_patch16_224", pretrained=False, num_classes=10).eval()
    dot_dtype = None if precision == "float32" else precision
    ours = ViT(num_classes=10, patch_size=16, dot_dtype=dot_dtype, **VIT_VARIANTS[variant])
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.safetensors")
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
        shapes = jax.eval_shape(lambda: ours.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"])
        params = load_pretrained(path, shapes)
    # The reference's mask: -inf on held-out patch keys (the class token always visible).
    visible = torch.from_numpy(np.concatenate([np.ones((batch, 1), bool), keep], 1))
    bias = torch.zeros(batch, 1, 197, 197).masked_fill(~visible[:, None, None, :], float("-inf"))
    x_torch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(DEVICE)
    ref, bias = ref.to(DEVICE), bias.to(DEVICE)

    def torch_forward():
        with torch.no_grad(), precision_context(precision):
            return ref.forward_head(ref.forward_features(x_torch, attn_mask=bias)).float()

    forward = jax.jit(lambda prm, x, m: ours.apply({"params": prm}, x, m))
    x_jax, m_jax = jnp.asarray(images), jnp.asarray(keep)

    def jax_forward():
        return jax.block_until_ready(forward(params, x_jax, m_jax))

    gap = np.abs(np.asarray(jax_forward()) - torch_forward().cpu().numpy()).max()
    t_torch, t_jax = timed(torch_forward, repeats), timed(jax_forward, repeats)
    return (
        f"ViT-{variant} masked forward, batch {batch}, {precision} matmuls: "
        f"PyTorch+timm {batch / t_torch:.1f} images/s, "
        f"vitshap_jax {batch / t_jax:.1f} images/s ({t_torch / t_jax:.2f}x PyTorch); "
        f"max |logit difference| {gap:.1e}"
    )


class TorchExplainer(torch.nn.Module):
    """timm ViT backbone + the shape of our explainer head, on the patch tokens."""

    def __init__(self, variant: str, classes: int):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.backbone = timm.create_model(f"vit_{variant}_patch16_224", pretrained=False, num_classes=0)
        d = self.backbone.embed_dim
        self.block = Block(d, self.backbone.blocks[0].attn.num_heads, mlp_ratio=4.0, qkv_bias=True)
        self.norm = torch.nn.LayerNorm(d, eps=1e-6)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(d, 4 * d),
            torch.nn.GELU(),
            torch.nn.Linear(4 * d, 4 * d),
            torch.nn.GELU(),
            torch.nn.Linear(4 * d, classes),
        )

    def forward(self, x):
        tokens = self.block(self.backbone.forward_features(x))
        return torch.tanh(self.mlp(self.norm(tokens[:, 1:])))


def torch_flops(fn) -> float:
    """FLOPs of one call of `fn` in PyTorch: torch's FlopCounterMode (linear layers, convolutions and
    their gradients) plus the attention products, which it does not count for the fused
    `scaled_dot_product_attention` on CPU: 4 T_q T_k d per head (QK^T and PV), x3 with a gradient
    (added only where the counter saw no attention kernel: on CUDA it counts the fused ones)."""
    from torch.utils.flop_counter import FlopCounterMode

    attention = [0.0]
    original = torch.nn.functional.scaled_dot_product_attention

    def counted(q, k, v, *args, **kwargs):
        work = 4 * q.shape[:-2].numel() * q.shape[-2] * k.shape[-2] * q.shape[-1]
        attention[0] += work * (3 if torch.is_grad_enabled() and q.requires_grad else 1)
        return original(q, k, v, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = counted
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    counted_ops = {str(op) for ops in counter.get_flop_counts().values() for op in ops}
    if any("attention" in op for op in counted_ops):
        return counter.get_total_flops()
    return counter.get_total_flops() + attention[0]


TORCH_BATCHINGS = ("reference", "per_image")  # the forms of --torch_batching (surrogate_calls)


def surrogate_calls(values, x, masks, batching: str):
    """(v(all) [B, K], v(empty) [B or 1, K], v(coalitions) [B, C, K]) of images `x [B, ...]` and
    coalitions `masks [B, C, n]` (True = visible) through `values(images, keep [M, n]) -> [M, K]`, in
    the calls `batching` says (`torch_step_time`)."""
    (batch, coalitions, n), device = masks.shape, masks.device
    ends = torch.stack([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)]).to(device)
    if batching == "per_image":
        both = torch.stack([values(x[i : i + 1].expand(2, -1, -1, -1), ends) for i in range(batch)])
        v = torch.stack([values(x[i : i + 1].expand(coalitions, -1, -1, -1), masks[i]) for i in range(batch)])
        return both[:, 0], both[:, 1], v
    if batching not in TORCH_BATCHINGS:
        raise ValueError(f"--torch_batching: {batching!r} is neither reference nor per_image")
    grand = values(x, ends[:1].expand(batch, -1))
    null = values(x[:1], ends[1:])
    v = values(x.repeat_interleave(coalitions, 0), masks.flatten(0, 1))
    return grand, null, v.reshape(batch, coalitions, -1)


def torch_step_time(
    variant: str,
    batch: int,
    coalitions: int,
    repeats: int,
    precision: str = "float32",
    batching: str = "reference",
) -> tuple[float, float]:
    """(seconds per explainer train step in PyTorch, median of `repeats` after a warm-up; FLOPs of one
    step). `batching="reference"` evaluates the surrogate as the reference implementation does: every
    image's coalitions in one call (the images repeated, `batch x coalitions` rows), v(all) in one call
    and v(empty) on one image (under attention masking it does not depend on the image; the reference
    computes it once and caches it). `"per_image"`: one call per image (`coalitions` rows) and v(all),
    v(empty) per image, this script's form until 2026-11-28 (slower on a GPU, where the calls are small)."""
    classes, n = 10, 196
    surrogate = timm.create_model(f"vit_{variant}_patch16_224", pretrained=False, num_classes=classes)
    surrogate = surrogate.eval().to(DEVICE)
    explainer = TorchExplainer(variant, classes).to(DEVICE)
    opt = torch.optim.AdamW(explainer.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, generator=gen).to(DEVICE)

    def values(images, keep):  # softmax outputs of the surrogate with `keep [M, n]` visible
        visible = torch.cat([torch.ones(len(keep), 1, dtype=torch.bool, device=DEVICE), keep], 1)
        bias = torch.zeros(len(keep), 1, n + 1, n + 1, device=DEVICE).masked_fill(
            ~visible[:, None, None, :], float("-inf")
        )
        return surrogate.forward_head(surrogate.forward_features(images, attn_mask=bias)).softmax(-1)

    def step():
        half = torch.rand(batch, coalitions // 2, n, generator=gen).to(DEVICE) < 0.5
        masks = torch.cat([half, ~half], 1)  # paired (sizes uniform here: the cost is the same)
        with torch.no_grad(), precision_context(precision):
            grand, null, v = surrogate_calls(values, x, masks, batching)
        grand, null, v = grand.float(), null.float(), v.float()
        with precision_context(precision):
            raw = explainer(x).float()
        phi = raw + ((grand - null) - raw.sum(1))[:, None] / n
        pred = null[:, None] + torch.einsum("bmn,bnc->bmc", masks.float(), phi)
        loss = n * ((pred - v) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return timed(step, repeats), torch_flops(step)


def torch_classifier_time(variant: str, batch: int, repeats: int, precision: str = "float32") -> float:
    model = (
        timm.create_model(f"vit_{variant}_patch16_224", pretrained=False, num_classes=10).train().to(DEVICE)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, 224, 224, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    x, y = x.to(DEVICE), y.to(DEVICE)

    def step():
        with precision_context(precision):
            logits = model(x).float()
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return timed(step, repeats)


def jax_classifier_time(variant: str, batch: int, repeats: int, precision: str = "float32") -> float:
    from profile_ops import classifier_path  # the classifier stage's jitted train step

    step, (state, data) = classifier_path(variant, batch, precision)
    holder = {"state": state}

    def run():
        holder["state"], m = step(holder["state"], data)
        jax.block_until_ready(m)

    return timed(run, repeats)


def jax_step_time(
    variant: str, batch: int, coalitions: int, packed: bool, repeats: int, precision: str = "float32"
):
    """(seconds per explainer step, its matmul FLOPs)."""
    from explainer_step import measure

    from vitshap_jax import parallel

    _, seconds, cost, _ = measure(
        variant,
        batch,
        coalitions,
        "float32",
        packed,
        repeats,
        parallel.make_mesh(),
        True,
        224,
        matmul_precision=precision,
    )
    return seconds, cost


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,small")
    p.add_argument("--batch", type=int, default=64, help="images of the masked forward (0: skip)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--step_batch", type=int, default=2, help="images per explainer step (0: skip)")
    p.add_argument("--coalitions", type=int, default=32)
    p.add_argument(
        "--torch_batching",
        default="reference",
        help="how PyTorch's step calls its surrogate: reference (all images' coalitions in one call, as "
        "the reference implementation), per_image (one call per image), or both (reference,per_image)",
    )
    p.add_argument("--classifier_batch", type=int, default=32, help="images per classifier step (0: skip)")
    p.add_argument(
        "--matmul_precision",
        default="float32",
        choices=("float32", "bfloat16"),
        help="bfloat16: ours with config.model.matmul_precision=bfloat16, PyTorch under autocast",
    )
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="PyTorch's device (ours runs on JAX's default backend: match them). On cuda, float32 "
        "matmuls may use TF32 on both sides, as each library does by default there (JAX's DEFAULT "
        "precision; torch.backends.cuda.matmul.allow_tf32 set to match)",
    )
    args = p.parse_args()
    unknown = set(args.torch_batching.split(",")) - set(TORCH_BATCHINGS)
    if unknown:  # before minutes of compiling and timing, not after
        p.error(f"--torch_batching: {', '.join(sorted(unknown))} unknown; give reference, per_image or both")
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = args.matmul_precision
    threads = torch.get_num_threads()
    print(
        f"torch {torch.__version__} ({threads} threads, {DEVICE}), timm {timm.__version__}; "
        f"jax {jax.__version__} ({jax.default_backend()})"
    )
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch, 224, 224, 3)).astype(np.float32)
    keep = rng.random((args.batch, 196)) < 0.5
    for variant in args.models.split(",") if args.batch else []:
        print(compare(variant, images, keep, args.repeats, precision), flush=True)
    for variant in args.models.split(",") if args.step_batch else []:
        b, m = args.step_batch, args.coalitions
        t_plain, f_plain = jax_step_time(variant, b, m, False, args.repeats, precision)
        t_packed, f_packed = jax_step_time(variant, b, m, True, args.repeats, precision)
        for batching in args.torch_batching.split(","):
            t_torch, f_torch = torch_step_time(variant, b, m, args.repeats, precision, batching)
            head = f"ViT-{variant} explainer step, batch {b} x {m} coalitions, {precision} matmuls"
            head += f", PyTorch surrogate calls {batching.replace('_', ' ')}"
            print(
                f"{head}: PyTorch+timm {b / t_torch:.2f} images/s, vitshap_jax {b / t_plain:.2f} plain "
                f"masked ({t_torch / t_plain:.2f}x), {b / t_packed:.2f} packed ({t_torch / t_packed:.2f}x "
                "PyTorch)",
                flush=True,
            )
            rates = [
                f"{name} {f / 1e9:.0f} GFLOP per step at {f / t / 1e9:.0f} GFLOP/s"
                for name, f, t in (
                    ("PyTorch", f_torch, t_torch),
                    ("plain", f_plain, t_plain),
                    ("packed", f_packed, t_packed),
                )
            ]
            print(
                f"{head}, work: {'; '.join(rates)}; PyTorch does {f_torch / f_packed:.2f}x the packed "
                "step's FLOPs",
                flush=True,
            )
    for variant in args.models.split(",") if args.classifier_batch else []:
        b = args.classifier_batch
        t_torch, t_jax = (
            torch_classifier_time(variant, b, args.repeats, precision),
            jax_classifier_time(variant, b, args.repeats, precision),
        )
        print(
            f"ViT-{variant} classifier step, batch {b}, {precision} matmuls: "
            f"PyTorch+timm {b / t_torch:.1f} images/s, "
            f"vitshap_jax {b / t_jax:.1f} images/s ({t_torch / t_jax:.2f}x PyTorch)",
            flush=True,
        )


if __name__ == "__main__":
    main()
