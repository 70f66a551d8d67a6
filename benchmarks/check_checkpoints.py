"""Checkpoints written by the libraries themselves load to the libraries' own outputs.

Run by hand in the bench venv (torch, timm, transformers; see requirements-bench.txt), never in CI:

    .venv-bench/bin/python benchmarks/check_checkpoints.py [--out runs/check_checkpoints.json]

For each family it builds a small randomly initialized model with the library (transformers
`ViTForImageClassification`, `ViTModel`, `DeiTForImageClassificationWithTeacher`, `Dinov2Model`,
`Dinov2WithRegistersModel`, `CLIPVisionModel`, `ViTMAEModel`, `ViTMAEForPreTraining`; timm `vit_*` models
with registers, layer scale, pre-norm + quick GELU, average pooling without class token, a distillation
head, patch 14, an MAE encoder), writes it the way users get it (`save_pretrained`; timm:
`model.safetensors` + the Hub's `config.json`), reads the architecture and loads it with vitshap_jax,
and prints the largest difference between the library's outputs (logits, or the pooled feature of a
backbone; for ViT-MAE every token of `last_hidden_state`, with `mask_ratio=0` and the identity patch
order) and ours on the same random images, float32.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import transformers as T  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from vitshap_jax.models import ViT, load_pretrained, read_architecture  # noqa: E402

SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)


def _transformers_cases():
    vit = dict(SMALL, image_size=32, patch_size=8)
    # Nothing masked; the decoder small and random (it is dropped).
    mae = dict(
        vit,
        mask_ratio=0.0,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
    )
    return {
        "transformers ViTForImageClassification": (
            T.ViTForImageClassification(T.ViTConfig(**vit, num_labels=5)),
            "logits",
        ),
        "transformers ViTModel": (T.ViTModel(T.ViTConfig(**vit)), "cls"),
        "transformers DeiTForImageClassificationWithTeacher": (
            T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**vit, num_labels=5)),
            "logits",
        ),
        "transformers Dinov2Model": (T.Dinov2Model(T.Dinov2Config(**dict(vit, patch_size=4))), "cls"),
        "transformers Dinov2WithRegistersModel": (
            T.Dinov2WithRegistersModel(
                T.Dinov2WithRegistersConfig(**dict(vit, patch_size=4), num_register_tokens=4)
            ),
            "cls",
        ),
        "transformers CLIPVisionModel": (T.CLIPVisionModel(T.CLIPVisionConfig(**vit)), "pooler"),
        "transformers ViTMAEModel": (T.ViTMAEModel(T.ViTMAEConfig(**mae)), "tokens"),
        "transformers ViTMAEForPreTraining (decoder dropped)": (
            T.ViTMAEForPreTraining(T.ViTMAEConfig(**mae)),
            "tokens",
        ),
    }


def _timm_cases():
    kw = dict(img_size=32, depth=3, embed_dim=64, num_heads=4, num_classes=5)
    return {
        "timm vit patch16 (augreg layout)": ("vit_base_patch16_224", dict(kw, patch_size=16)),
        "timm dinov2 + registers (no_embed_class, layer scale, patch 14)": (
            "vit_small_patch14_reg4_dinov2",
            dict(kw, img_size=28, patch_size=14),
        ),
        "timm clip quickgelu (pre_norm, no patch bias)": (
            "vit_base_patch16_clip_quickgelu_224",
            dict(kw, patch_size=8),
        ),
        "timm avg pool, no class token (fc_norm)": (
            "vit_base_patch16_224",
            dict(kw, patch_size=8, class_token=False, global_pool="avg", reg_tokens=2, no_embed_class=True),
        ),
        "timm deit distilled": ("deit_tiny_distilled_patch16_224", dict(kw, patch_size=8)),
        "timm MAE encoder (vit_*.mae: no head, pooled feature)": (
            "vit_base_patch16_224.mae",
            dict(kw, patch_size=8, num_classes=0),
        ),
        "timm MAE + decoder arrays (MAE pretraining layout)": (
            "vit_base_patch16_224.mae",
            dict(kw, patch_size=8, num_classes=0),
        ),
    }


# The arrays an MAE pretraining state dict adds to the encoder (facebookresearch/mae `MaskedAutoencoderViT`,
# decoder width 32, one block), random: vitshap_jax must drop them.
def _mae_decoder(dim=64, width=32, tokens=17, seed=2):
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "mask_token": (1, 1, width),
        "decoder_embed.weight": (width, dim),
        "decoder_embed.bias": (width,),
        "decoder_pos_embed": (1, tokens, width),
        "decoder_blocks.0.norm1.weight": (width,),
        "decoder_blocks.0.attn.qkv.weight": (3 * width, width),
        "decoder_blocks.0.mlp.fc1.weight": (2 * width, width),
        "decoder_norm.weight": (width,),
        "decoder_pred.weight": (8 * 8 * 3, width),
    }
    return {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}


def _randomize(model, seed):
    """Random values everywhere (the libraries' inits leave zeros and ones that would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if "norm" in name and name.endswith("weight") else 0.0  # LayerNorm gains near 1
            p.copy_(scale + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _ours(path, image):
    arch = read_architecture(path)
    fields = {k: v for k, v in arch["model"].items() if k != "patch_size"}
    num_classes = arch["num_classes"] or 1
    model = ViT(num_classes=num_classes, patch_size=arch["model"]["patch_size"], **fields)
    params = model.init(jax.random.key(0), jnp.zeros((1, image, image, 3)))["params"]
    prefix = int(model.class_token) + int(model.distill_token) + model.reg_tokens
    pos_prefix = prefix if model.pos_prefix < 0 else model.pos_prefix
    return model, load_pretrained(path, params, pos_prefix=pos_prefix), arch


def check_transformers(tmp) -> dict:
    results = {}
    for name, (model, output) in _transformers_cases().items():
        model = _randomize(model, 0)
        folder = os.path.join(tmp, name.replace(" ", "_"))
        model.save_pretrained(folder)
        image = model.config.image_size
        x = np.random.default_rng(1).standard_normal((3, image, image, 3)).astype(np.float32)
        pixels = torch.from_numpy(x.transpose(0, 3, 1, 2))
        with torch.no_grad():
            if output == "tokens":  # ViT-MAE: ascending noise keeps the patches in their own order
                n = (image // model.config.patch_size) ** 2
                noise = torch.arange(n, dtype=torch.float32).expand(len(x), n)
                encoder = getattr(model, "vit", model)  # ViTMAEForPreTraining's encoder
                out = encoder(pixel_values=pixels, noise=noise)
                assert (out.ids_restore == torch.arange(n)).all() and not out.mask.any()
            else:
                out = model(pixel_values=pixels)
            ref = {
                "logits": lambda o: o.logits,
                "cls": lambda o: o.last_hidden_state[:, 0],
                "pooler": lambda o: o.pooler_output,
                "tokens": lambda o: o.last_hidden_state,
            }[output](out).numpy()
        ours_model, params, arch = _ours(folder, image)
        if output == "logits":
            ours = ours_model.apply({"params": params}, jnp.asarray(x))
        elif output == "tokens":
            ours = ours_model.apply({"params": params}, jnp.asarray(x), method=ours_model.encode)
        else:
            ours = ours_model.apply(
                {"params": params}, jnp.asarray(x), method=lambda m, im: m.pooled(m.encode(im))
            )
        results[name] = _compare(ref, np.asarray(ours))
    return results


def check_timm(tmp) -> dict:
    results = {}
    for name, (arch_name, kw) in _timm_cases().items():
        model = _randomize(timm.create_model(arch_name, pretrained=False, **kw), 0)
        folder = os.path.join(tmp, name.split(" (")[0].replace(" ", "_").replace(",", ""))
        os.makedirs(folder)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if "+ decoder" in name:
            state |= _mae_decoder(dim=kw["embed_dim"], tokens=1 + (kw["img_size"] // kw["patch_size"]) ** 2)
        save_file(state, os.path.join(folder, "model.safetensors"))
        cfg = {
            "architecture": arch_name.split(".")[0],
            "num_classes": kw["num_classes"],
            "global_pool": model.global_pool,
            "model_args": {k: v for k, v in kw.items() if k in ("num_heads", "no_embed_class")},
            "pretrained_cfg": dict(model.pretrained_cfg),
        }
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(cfg, f, default=str)
        image = kw["img_size"]
        x = np.random.default_rng(1).standard_normal((3, image, image, 3)).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
        ours_model, params, _ = _ours(os.path.join(folder, "model.safetensors"), image)
        if kw["num_classes"]:
            ours = ours_model.apply({"params": params}, jnp.asarray(x))
        else:  # a backbone without head (MAE): timm returns the pooled feature
            ours = ours_model.apply(
                {"params": params}, jnp.asarray(x), method=lambda m, im: m.pooled(m.encode(im))
            )
        results[name] = _compare(ref, np.asarray(ours))
    return results


def _compare(ref, ours) -> dict:
    diff = float(np.abs(ref - ours).max())
    return {
        "max_abs_diff": diff,
        "max_abs_value": float(np.abs(ref).max()),
        "ok": bool(diff < 1e-4 * max(1, np.abs(ref).max())),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    versions = (torch.__version__, timm.__version__, T.__version__, jax.__version__)
    print("torch {}, timm {}, transformers {}, jax {}".format(*versions))
    with tempfile.TemporaryDirectory() as tmp:
        results = check_transformers(tmp) | check_timm(tmp)
    width = max(map(len, results))
    for name, r in results.items():
        verdict = "ok" if r["ok"] else "MISMATCH"
        diff, size = r["max_abs_diff"], r["max_abs_value"]
        print(f"{name:<{width}}  max |diff| {diff:.2e} of max |output| {size:.2f}  {verdict}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    if not all(r["ok"] for r in results.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
