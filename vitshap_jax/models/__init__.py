"""Models: the patch-maskable ViT and ResNet, the explainers (ViT backbone + explainer head, or a UNet),
and loading of public pretrained weights. `build_model` / `build_explainer` make them from a stage config
(a ConfigDict, or a run's recorded config as a dict)."""

import functools

import jax
import jax.numpy as jnp
from absl import logging
from ml_collections import config_dict

from vitshap_jax.config import default_masking, num_outputs
from vitshap_jax.models.explainer_head import Explainer, ExplainerHead
from vitshap_jax.models.pretrained import PretrainedMismatchError, load_pretrained, read_architecture
from vitshap_jax.models.vit import MASKING_STRATEGIES, ViT, num_patches

__all__ = [
    "MASKING_STRATEGIES",
    "Explainer",
    "ExplainerHead",
    "PretrainedMismatchError",
    "ViT",
    "abstract_params",
    "architecture",
    "masking_of",
    "transfer_params",
    "build_explainer",
    "build_model",
    "checkpoint_architecture",
    "compute_dtype",
    "attention_impl",
    "cpu_has_bfloat16_dots",
    "dot_dtype",
    "load_pretrained",
    "load_pretrained_into",
    "num_patches",
    "read_architecture",
]

# `config.model` fields that are `ViT` options, with the value of configs written before they existed.
ARCHITECTURE_OPTIONS = {
    "class_token": True,
    "distill_token": False,
    "distill_head": False,
    "reg_tokens": 0,
    "pos_prefix": -1,
    "pool": "token",
    "fc_norm": False,
    "pre_norm": False,
    "layer_scale": False,
    "act": "gelu",
    "ln_eps": 1e-6,
}


@functools.cache
def cpu_has_bfloat16_dots() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (x86 AVX512-BF16 or AMX-BF16, read from
    Linux's /proc/cpuinfo), with which XLA:CPU runs matmuls with bfloat16 operands 1.6-2x faster than
    float32 ones (docs/performance.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = {word for line in f if line.startswith("flags") for word in line.split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def dot_dtype(config) -> str | None:
    """The ViT's `dot_dtype` for `config.model.matmul_precision` (None: the backend's own precision,
    float32 on CPU): "auto" is "bfloat16" on a CPU backend with bfloat16 dot instructions
    (`cpu_has_bfloat16_dots`), else None. Configs written before the field existed are float32."""
    precision = _as_config(config).model.get("matmul_precision", "float32")
    if precision == "auto":
        fast = jax.default_backend() == "cpu" and cpu_has_bfloat16_dots()
        return "bfloat16" if fast and architecture(config) == "vit" else None
    return None if precision == "float32" else precision


def attention_impl(config) -> str:
    """The ViT's attention core for `config.model.attention_impl` (`ATTENTION_IMPLS`): "auto" is
    "matmul" on every backend (the fastest measured on CPU, docs/performance.md (i); on a GPU not yet
    compared end to end). Configs written before the field existed are "matmul". "cudnn" needs an
    NVIDIA GPU: a new run asking for it elsewhere is refused by `config.validate`, and a recorded run
    trained with it (explained on a laptop, say) computes with "matmul" there, the same model."""
    impl = _as_config(config).model.get("attention_impl", "auto")
    if impl == "cudnn" and jax.default_backend() not in ("gpu", "cuda"):
        logging.info("attention_impl='cudnn' on %s: the matmul core (the same model)", jax.default_backend())
        return "matmul"
    return "matmul" if impl == "auto" else impl


def compute_dtype(name: str):
    """The compute dtype of `config.model.dtype`: "auto" is bfloat16 on GPU and TPU, float32 on CPU."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else jnp.float32
    return jnp.dtype(name)


def _as_config(config):
    return config_dict.ConfigDict(config) if isinstance(config, dict) else config


def architecture(config) -> str:
    """ "vit" or "resnet": the model family of a stage config (runs recorded before ResNets: "vit")."""
    return _as_config(config).model.get("architecture", "vit")


def masking_of(config, masking: str | None = None) -> str:
    """The masking strategy `build_model` uses: `masking`, else the config's ("auto": the family's first)."""
    chosen = masking or _as_config(config).model.masking
    return default_masking(architecture(config)) if chosen == "auto" else chosen


def resnet_stem(config) -> str:
    """`config.model.stem` with "auto" resolved: the CIFAR stem below 64 px, else the ImageNet one."""
    config = _as_config(config)
    stem = config.model.get("stem", "auto")
    return stem if stem != "auto" else ("cifar" if config.dataset.image_size < 64 else "imagenet")


def build_model(config, *, masking: str | None = None):
    """The classifier or surrogate a stage config describes (`config.model`, `config.dataset`): a `ViT`
    or a `ResNet` (`config.model.architecture`). `masking` overrides the config's strategy."""
    config = _as_config(config)
    m = config.model
    if architecture(config) == "resnet":
        from vitshap_jax.models.resnet import ResNet

        return ResNet(
            num_classes=num_outputs(config),
            depth=m.depth,
            width=m.hidden_size,
            stem=resnet_stem(config),
            patch_size=m.patch_size,
            masking=masking_of(config, masking),
            mask_value=m.mask_value,
            mask_channel=m.mask_channel,
            norm=m.norm,
            dtype=compute_dtype(m.dtype),
        )
    return ViT(
        num_classes=num_outputs(config),
        patch_size=m.patch_size,
        hidden_size=m.hidden_size,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_dim=m.mlp_dim,
        dropout_rate=m.dropout_rate,
        masking=masking_of(config, masking),
        dtype=compute_dtype(m.dtype),
        remat=m.get("remat", False),
        dot_dtype=dot_dtype(config),
        attention_impl=attention_impl(config),
        **{k: m.get(k, default) for k, default in ARCHITECTURE_OPTIONS.items()},
    )


def build_explainer(config):
    """The explainer a stage config describes, giving raw values `[B, n, C]`: with
    `config.explainer.architecture="vit"` the ViT of `build_model` as backbone and an `ExplainerHead`
    (`config.explainer`), with "unet" a `UNetExplainer` (FastSHAP's)."""
    config = _as_config(config)
    m, e = config.model, config.explainer
    if e.get("architecture", "vit") == "unet":
        from vitshap_jax.models.unet import UNetExplainer

        return UNetExplainer(
            num_classes=num_outputs(config),
            patch_size=m.patch_size,
            width=e.unet_width,
            levels=e.unet_levels,
            dtype=compute_dtype(m.dtype),
        )
    backbone = build_model(config)
    head = ExplainerHead(
        num_classes=num_outputs(config),
        num_heads=m.num_heads,
        mlp_dim=m.mlp_dim,
        head_blocks=e.head_blocks,
        mlp_layers=e.mlp_layers,
        mlp_ratio=e.mlp_ratio,
        activation=e.activation,
        dtype=compute_dtype(m.dtype),
        dot_dtype=dot_dtype(config),
        attention_impl=attention_impl(config),
        num_prefix_tokens=backbone.num_prefix_tokens,
    )
    return Explainer(backbone=backbone, explainer_head=head)


def abstract_params(model, image_size: int, sharding=None):
    """Shapes and dtypes of `model`'s parameters for square `image_size` images, without computing
    them (`jax.eval_shape`): the restore target of a checkpoint, placed with `sharding` if given."""
    sample = jnp.zeros((1, image_size, image_size, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), sample)["params"])
    if sharding is None:
        return shapes
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def num_pos_prefix(config) -> int:
    """How many prefix tokens of the model `config.model` describes have a position embedding."""
    m = config.model
    prefix = int(m.get("class_token", True)) + int(m.get("distill_token", False)) + m.get("reg_tokens", 0)
    return prefix if m.get("pos_prefix", -1) < 0 else m.pos_prefix


def load_pretrained_into(config, params: dict) -> dict:
    """`config.model.pretrained` loaded into `params` of the model `config` describes (a ViT:
    `load_pretrained`; a ResNet: `resnet_pretrained.load_resnet_pretrained`)."""
    if architecture(config) == "resnet":
        from vitshap_jax.models.resnet_pretrained import load_resnet_pretrained

        return load_resnet_pretrained(config.model.pretrained, params)
    return load_pretrained(config.model.pretrained, params, pos_prefix=num_pos_prefix(config))


def checkpoint_architecture(path: str) -> dict:
    """`{"model": config.model fields, "normalization": name or None}` of a pretrained file: a timm
    ResNet state dict (`resnet_pretrained.read_resnet_architecture`) or any ViT format
    (`pretrained.read_architecture`)."""
    if str(path).endswith(".safetensors") and _is_resnet_file(path):
        from vitshap_jax.models.resnet_pretrained import read_resnet_architecture

        arch = read_resnet_architecture(path)
        m = arch["model"]
        model = {"architecture": "resnet", "depth": m["depth"], "hidden_size": m["width"]}
        model |= {"num_heads": 0, "mlp_dim": 0, "stem": m["stem"], "norm": m["norm"]}
        return {"model": model, "normalization": arch["normalization"]}
    arch = read_architecture(path)
    return {**arch, "model": {"architecture": "vit", **arch["model"]}}


def _is_resnet_file(path: str) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            keys = set(f.keys())
    except Exception:  # not readable as safetensors: the ViT reader names the problem
        return False
    return any(k.endswith("layer1.0.conv1.weight") for k in keys)


def transfer_params(source: dict, target: dict) -> tuple[dict, list[str]]:
    """`target` (freshly initialized parameters) with every leaf that `source` has at the same path
    copied from it. A leaf whose shape differs in one axis only, where the target is larger (a stem that
    gains an input channel for the mask), takes the source in its leading part and zeros after it, so the
    model starts out computing what the source computed. Returns (parameters, paths not copied)."""
    from flax import traverse_util

    src, out = traverse_util.flatten_dict(source, sep="/"), traverse_util.flatten_dict(target, sep="/")
    missing = []
    for path, leaf in out.items():
        if path not in src:
            missing.append(path)
            continue
        a, shape = src[path], leaf.shape
        if a.shape == shape:  # a copy: the train state that holds it is donated to the step
            out[path] = jnp.array(a, leaf.dtype)
            continue
        differ = [i for i, (x, y) in enumerate(zip(a.shape, shape, strict=False)) if x != y]
        if a.ndim == leaf.ndim and len(differ) == 1 and a.shape[differ[0]] < shape[differ[0]]:
            leading = tuple(slice(0, s) for s in a.shape)
            out[path] = jnp.zeros(shape, leaf.dtype).at[leading].set(jnp.asarray(a, leaf.dtype))
        else:
            missing.append(path)
    return traverse_util.unflatten_dict(out, sep="/"), missing
