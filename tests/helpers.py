"""Helpers several test files share (test modules do not import each other for these)."""

import importlib.util
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from safetensors.numpy import save_file

from vitshap_jax.data import imagenette, mura
from vitshap_jax.models import ViT


def write_files(root, files: dict) -> None:
    """Writes `{relative path: bytes or str}` under `root`, creating folders as needed."""
    for rel, content in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)


# ---- configs and tiny stage runs


def load(stage, arg=None):
    """Loads configs/<stage>.py the way config_flags does (by path) and calls get_config(arg)."""
    spec = importlib.util.spec_from_file_location(f"cfg_{stage}", f"configs/{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


# The tiny ViT that `tiny` puts in every stage config.
TINY = dict(hidden_size=32, depth=1, num_heads=2, mlp_dim=64, patch_size=4)


def tiny(stage, dataset, data_dir, **train):
    """The `stage` config for `dataset` shrunk to a seconds-long run: TINY model, 16 px images, one epoch of
    batches of 8 (`train` overrides config.train fields) and a 4-coalition explainer."""
    c = load(stage, dataset)
    c.dataset.data_dir = str(data_dir)
    c.dataset.image_size, c.dataset.resize_size, c.dataset.read_threads = 16, 16, 1
    c.model.update(TINY)
    c.train.update(dict(batch_size=8, epochs=1, log_every_steps=1) | train)
    if stage == "explainer":
        c.explainer.update(dict(num_coalitions=4, mlp_ratio=1))
    return c


def perturbed(params, scale: float, seed: int):
    """`params` plus `scale` times standard normal noise, drawn by NumPy: no XLA compile per leaf shape
    (jax.random costs about 0.5 s per new shape on this CPU, the main cost of many small tests)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape), x.dtype), params
    )


def assert_same_params(a: dict, b: dict, rtol=1e-5, atol=1e-6):
    """Flat param dicts equal within float tolerance, except attention key biases: their gradient is zero
    in exact arithmetic (softmax ignores a shift shared by all keys), so Adam turns float noise, which
    differs with the device count, into +-lr updates."""
    assert a.keys() == b.keys()
    for k in a:
        if not k.endswith("key/bias"):
            np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


# ---- miniature downloads of the dataset builders


def _image_bytes(fmt="JPEG", mode="RGB", seed=0, size=(12, 10)):
    """A random `size` (width, height) image in `mode`, encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    pixels = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    image = PIL.Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


# The imagenette classes `_imagenette_tree` writes.
WNIDS = list(imagenette.CLASSES)[:3]


def _imagenette_tree(root, corrupt=False):
    """A miniature imagenette2 download under `root` (3 classes, gray and CMYK JPEGs among them, with
    `corrupt` one broken image): the files written, {relative path: content}."""
    files = {}
    for c, wnid in enumerate(WNIDS):
        for i in range(3):
            files[f"imagenette2/train/{wnid}/{wnid}_{i}.JPEG"] = _image_bytes(seed=c * 10 + i)
        for i in range(4):
            mode = "L" if i == 0 else "CMYK" if i == 1 else "RGB"  # imagenette has gray and CMYK JPEGs
            files[f"imagenette2/val/{wnid}/ILSVRC2012_val_{c}{i:04d}.JPEG"] = _image_bytes(
                mode=mode, seed=99 + i
            )
    files["imagenette2/noisy_imagenette.csv"] = "path,noisy_labels_0\n"
    if corrupt:
        files[f"imagenette2/train/{WNIDS[0]}/broken.JPEG"] = b"not a jpeg"
    write_files(root, files)
    return files


def _mura_tree(root, patients=30):
    """A miniature MURA-v1.1 download under `root` (PNG images and the two CSVs per split): the CSV rows,
    {split: (image paths, labeled studies)}."""
    files, rows = {}, {"train": ([], []), "valid": ([], [])}
    for split, count in (("train", patients), ("valid", 4)):
        for p in range(count):
            part = mura.BODY_PARTS[p % len(mura.BODY_PARTS)]
            patient = f"patient{(p if split == 'train' else 11000 + p):05d}"
            for s in range(1 + p % 2):
                label = (p + s) % 2
                study = (
                    f"MURA-v1.1/{split}/{part}/{patient}/study{s + 1}_{'positive' if label else 'negative'}/"
                )
                rows[split][1].append(f"{study},{label}")
                for m in range(1 + s):
                    files[f"{study}image{m + 1}.png"] = _image_bytes("PNG", "L", seed=p * 10 + s + m)
                    rows[split][0].append(f"{study}image{m + 1}.png")
    for split, (paths, studies) in rows.items():
        files[f"MURA-v1.1/{split}_image_paths.csv"] = "\n".join(paths) + "\n"
        files[f"MURA-v1.1/{split}_labeled_studies.csv"] = "\n".join(studies) + "\n"
    write_files(root, files)
    return rows


# ---- pretrained checkpoints of the ViT families

# The tiny ViT of the checkpoints written here (hidden size, depth, heads, MLP width, classes).
FAMILY_D, FAMILY_DEPTH, FAMILY_HEADS, FAMILY_MLP, FAMILY_CLASSES = 32, 2, 4, 64, 3


def _rng(seed):
    """A function of a shape giving float32 normal draws scaled by 0.2, from a generator seeded `seed`."""
    rng = np.random.default_rng(seed)
    return lambda *shape: (0.2 * rng.standard_normal(shape)).astype(np.float32)


def _hf_state(family, seed, *, patch=4, grid=4, registers=0, head=None):
    """A random state dict in the names `save_pretrained` writes for `family` (vit, deit, dinov2, clip)."""
    r = _rng(seed)
    n = grid * grid
    sd = {}
    if family == "clip":
        sd |= {
            "vision_model.embeddings.class_embedding": r(FAMILY_D),
            "vision_model.embeddings.patch_embedding.weight": r(FAMILY_D, 3, patch, patch),
            "vision_model.embeddings.position_embedding.weight": r(1 + n, FAMILY_D),
            "vision_model.pre_layrnorm.weight": 1 + r(FAMILY_D),
            "vision_model.pre_layrnorm.bias": r(FAMILY_D),
            "vision_model.post_layernorm.weight": 1 + r(FAMILY_D),
            "vision_model.post_layernorm.bias": r(FAMILY_D),
        }
        for i in range(FAMILY_DEPTH):
            b = f"vision_model.encoder.layers.{i}."
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                sd |= {
                    f"{b}self_attn.{name}.weight": r(FAMILY_D, FAMILY_D),
                    f"{b}self_attn.{name}.bias": r(FAMILY_D),
                }
            sd |= {f"{b}layer_norm1.weight": 1 + r(FAMILY_D), f"{b}layer_norm1.bias": r(FAMILY_D)}
            sd |= {f"{b}layer_norm2.weight": 1 + r(FAMILY_D), f"{b}layer_norm2.bias": r(FAMILY_D)}
            sd |= {f"{b}mlp.fc1.weight": r(FAMILY_MLP, FAMILY_D), f"{b}mlp.fc1.bias": r(FAMILY_MLP)}
            sd |= {f"{b}mlp.fc2.weight": r(FAMILY_D, FAMILY_MLP), f"{b}mlp.fc2.bias": r(FAMILY_D)}
        sd |= {"text_model.embeddings.token_embedding.weight": r(10, FAMILY_D), "logit_scale": r(1)}
        return sd
    pre = {"vit": "vit.", "deit": "deit.", "dinov2": ""}[family] if head else ""
    prefix_tokens = 2 if family == "deit" else 1
    sd |= {
        pre + "embeddings.cls_token": r(1, 1, FAMILY_D),
        pre + "embeddings.position_embeddings": r(1, prefix_tokens + n, FAMILY_D),
        pre + "embeddings.patch_embeddings.projection.weight": r(FAMILY_D, 3, patch, patch),
        pre + "embeddings.patch_embeddings.projection.bias": r(FAMILY_D),
        pre + "layernorm.weight": 1 + r(FAMILY_D),
        pre + "layernorm.bias": r(FAMILY_D),
    }
    if family == "deit":
        sd[pre + "embeddings.distillation_token"] = r(1, 1, FAMILY_D)
    if family == "dinov2":
        sd[pre + "embeddings.mask_token"] = r(1, FAMILY_D)
        if registers:
            sd[pre + "embeddings.register_tokens"] = r(1, registers, FAMILY_D)
    for i in range(FAMILY_DEPTH):
        b = f"{pre}encoder.layer.{i}."
        for name in ("query", "key", "value"):
            sd |= {
                f"{b}attention.attention.{name}.weight": r(FAMILY_D, FAMILY_D),
                f"{b}attention.attention.{name}.bias": r(FAMILY_D),
            }
        sd |= {
            f"{b}attention.output.dense.weight": r(FAMILY_D, FAMILY_D),
            f"{b}attention.output.dense.bias": r(FAMILY_D),
        }
        if family == "dinov2":
            sd |= {
                f"{b}norm1.weight": 1 + r(FAMILY_D),
                f"{b}norm1.bias": r(FAMILY_D),
                f"{b}norm2.weight": 1 + r(FAMILY_D),
            }
            sd |= {
                f"{b}norm2.bias": r(FAMILY_D),
                f"{b}mlp.fc1.weight": r(FAMILY_MLP, FAMILY_D),
                f"{b}mlp.fc1.bias": r(FAMILY_MLP),
            }
            sd |= {f"{b}mlp.fc2.weight": r(FAMILY_D, FAMILY_MLP), f"{b}mlp.fc2.bias": r(FAMILY_D)}
            sd |= {f"{b}layer_scale1.lambda1": 1 + r(FAMILY_D), f"{b}layer_scale2.lambda1": 1 + r(FAMILY_D)}
        else:
            sd |= {f"{b}layernorm_before.weight": 1 + r(FAMILY_D), f"{b}layernorm_before.bias": r(FAMILY_D)}
            sd |= {f"{b}layernorm_after.weight": 1 + r(FAMILY_D), f"{b}layernorm_after.bias": r(FAMILY_D)}
            sd |= {
                f"{b}intermediate.dense.weight": r(FAMILY_MLP, FAMILY_D),
                f"{b}intermediate.dense.bias": r(FAMILY_MLP),
            }
            sd |= {f"{b}output.dense.weight": r(FAMILY_D, FAMILY_MLP), f"{b}output.dense.bias": r(FAMILY_D)}
    if head == "classifier":
        sd |= {"classifier.weight": r(FAMILY_CLASSES, FAMILY_D), "classifier.bias": r(FAMILY_CLASSES)}
    elif head == "teacher":
        sd |= {"cls_classifier.weight": r(FAMILY_CLASSES, FAMILY_D), "cls_classifier.bias": r(FAMILY_CLASSES)}
        sd |= {
            "distillation_classifier.weight": r(FAMILY_CLASSES, FAMILY_D),
            "distillation_classifier.bias": r(FAMILY_CLASSES),
        }
    elif family in ("vit", "deit"):  # ViTModel / DeiTModel
        sd |= {"pooler.dense.weight": r(FAMILY_D, FAMILY_D), "pooler.dense.bias": r(FAMILY_D)}
    return sd


# The transformers checkpoints `_write_hf` writes, by the class name that saved them.
HF_CASES = {
    # name: (model_type, architectures, family, head, registers, hidden_act, eps)
    "ViTForImageClassification": ("vit", "ViTForImageClassification", "vit", "classifier", 0, "gelu", 1e-12),
    "ViTModel": ("vit", "ViTModel", "vit", None, 0, "gelu", 1e-12),
    "DeiTForImageClassificationWithTeacher": (
        "deit",
        "DeiTForImageClassificationWithTeacher",
        "deit",
        "teacher",
        0,
        "gelu",
        1e-12,
    ),
    "DeiTForImageClassification": (
        "deit",
        "DeiTForImageClassification",
        "deit",
        "classifier",
        0,
        "gelu",
        1e-12,
    ),
    "Dinov2Model": ("dinov2", "Dinov2Model", "dinov2", None, 0, "gelu", 1e-6),
    "Dinov2WithRegistersModel": (
        "dinov2_with_registers",
        "Dinov2WithRegistersModel",
        "dinov2",
        None,
        3,
        "gelu",
        1e-6,
    ),
    "CLIPVisionModel": ("clip_vision_model", "CLIPVisionModel", "clip", None, 0, "quick_gelu", 1e-5),
}


def _write_hf(tmp_path, case, seed=0, dtype=None):
    """A transformers directory for HF_CASES[case] (model.safetensors and config.json, weights in `dtype` if
    given) in tmp_path/case: (the folder, its state dict)."""
    model_type, architecture, family, head, registers, act, eps = HF_CASES[case]
    sd = _hf_state(family, seed, registers=registers, head=head)
    if dtype is not None:
        sd = {k: v.astype(dtype) for k, v in sd.items()}
    folder = tmp_path / case
    folder.mkdir()
    save_file(sd, str(folder / "model.safetensors"))
    cfg = dict(
        model_type=model_type,
        architectures=[architecture],
        hidden_size=FAMILY_D,
        num_hidden_layers=FAMILY_DEPTH,
        num_attention_heads=FAMILY_HEADS,
        intermediate_size=FAMILY_MLP,
        patch_size=4,
        image_size=16,
        hidden_act=act,
        layer_norm_eps=eps,
        num_channels=3,
        qkv_bias=True,
    )
    if registers:
        cfg["num_register_tokens"] = registers
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, sd


def _timm_state(
    seed,
    *,
    patch=4,
    grid=4,
    regs=0,
    no_embed_class=False,
    layer_scale=False,
    class_token=True,
    fc_norm=False,
    pre_norm=False,
    distilled=False,
):
    """A random timm VisionTransformer state dict (FAMILY_* sizes, patch 4 on a 4x4 grid by default) with
    timm's options: registers, no pos embed for the prefix tokens, layer scale, no class token, fc_norm,
    pre-norm, distillation head."""
    r = _rng(seed)
    prefix = int(class_token) + int(distilled) + regs
    sd = {
        "patch_embed.proj.weight": r(FAMILY_D, 3, patch, patch),
        "pos_embed": r(1, (0 if no_embed_class else prefix) + grid * grid, FAMILY_D),
        "head.weight": r(FAMILY_CLASSES, FAMILY_D),
        "head.bias": r(FAMILY_CLASSES),
    }
    if not pre_norm:  # timm: PatchEmbed(bias=not pre_norm)
        sd["patch_embed.proj.bias"] = r(FAMILY_D)
    if class_token:
        sd["cls_token"] = r(1, 1, FAMILY_D)
    if distilled:
        sd |= {
            "dist_token": r(1, 1, FAMILY_D),
            "head_dist.weight": r(FAMILY_CLASSES, FAMILY_D),
            "head_dist.bias": r(FAMILY_CLASSES),
        }
    if regs:
        sd["reg_token"] = r(1, regs, FAMILY_D)
    if pre_norm:
        sd |= {"norm_pre.weight": 1 + r(FAMILY_D), "norm_pre.bias": r(FAMILY_D)}
    final = "fc_norm" if fc_norm else "norm"
    sd |= {f"{final}.weight": 1 + r(FAMILY_D), f"{final}.bias": r(FAMILY_D)}
    for i in range(FAMILY_DEPTH):
        b = f"blocks.{i}."
        sd |= {
            b + "norm1.weight": 1 + r(FAMILY_D),
            b + "norm1.bias": r(FAMILY_D),
            b + "norm2.weight": 1 + r(FAMILY_D),
            b + "norm2.bias": r(FAMILY_D),
        }
        sd |= {
            b + "attn.qkv.weight": r(3 * FAMILY_D, FAMILY_D),
            b + "attn.qkv.bias": r(3 * FAMILY_D),
            b + "attn.proj.weight": r(FAMILY_D, FAMILY_D),
            b + "attn.proj.bias": r(FAMILY_D),
        }
        sd |= {
            b + "mlp.fc1.weight": r(FAMILY_MLP, FAMILY_D),
            b + "mlp.fc1.bias": r(FAMILY_MLP),
            b + "mlp.fc2.weight": r(FAMILY_D, FAMILY_MLP),
            b + "mlp.fc2.bias": r(FAMILY_D),
        }
        if layer_scale:
            sd |= {b + "ls1.gamma": 1 + r(FAMILY_D), b + "ls2.gamma": 1 + r(FAMILY_D)}
    return sd


# ---- Shapley ground truth


def members(n):
    """All coalitions as a float64 `[2^n, n]` 0/1 matrix, row = binary code."""
    codes = np.arange(2**n)
    return ((codes[:, None] >> np.arange(n)) & 1).astype(np.float64)


def order_two_games(n, seed=0):
    """Tables `[1, 2^n, 1]` of an additive and a pairwise game (order <= 2) and of a non-linear one
    (a random tanh network of the coalition)."""
    rng = np.random.default_rng(seed)
    z = members(n)
    additive = z @ rng.normal(size=n)
    pairwise = additive + np.einsum("mi,ij,mj->m", z, np.triu(rng.normal(size=(n, n)), 1), z)
    mlp = np.tanh(z @ rng.normal(size=(n, 32))) @ rng.normal(size=32)
    return {
        name: t[None, :, None] for name, t in [("additive", additive), ("pairwise", pairwise), ("mlp", mlp)]
    }


# ---- baselines and LRP

# The baselines' tiny ViT (`vit`) and the classes explained for its 3 images.
BASELINE_PATCH = 2  # patch size; 8x8 images -> 16 patches


def vit(depth=2, **kw):
    """A tiny ViT (patch 2, 3 classes) with perturbed random parameters and 3 random 8x8 images:
    (model, params, images)."""
    model = ViT(
        num_classes=3, patch_size=BASELINE_PATCH, hidden_size=16, depth=depth, num_heads=2, mlp_dim=32, **kw
    )
    images = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
    return model, perturbed(model.init(jax.random.key(0), images)["params"], 0.3, 2), images


BASELINE_CLASSES = jnp.array([0, 2, 1])
