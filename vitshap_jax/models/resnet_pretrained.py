"""Public pretrained ResNet weights (a timm `.safetensors` state dict) into our `ResNet` parameters.

The file is timm's (and torchvision's) ResNet layout: `conv1.weight`, `bn1.*`,
`layer{1..4}.{i}.conv{1,2,3}.weight`, `layer{s}.{i}.bn{1,2,3}.*`, `layer{s}.{i}.downsample.{0,1}.*`,
`fc.{weight,bias}`; as on the Hugging Face Hub in the `timm/resnet*` repositories (`model.safetensors`,
with a `config.json` beside it that names the pixel normalization). Supported: ResNet-18, -34 and -50
with the single-convolution stem (7x7, or 3x3 for a CIFAR stem) and strided 1x1 downsampling, at any
width. timm's deep stems (the c/d/e/s/t variants), average-pool downsampling, a convolution in place of
the stem pool, squeeze-excitation and grouped (ResNeXt) or widened bottlenecks are refused by name.

Every BatchNorm is folded into our `Affine` norm (`scale = gamma / sqrt(var + eps)`,
`bias = beta - mean * scale`): the model to load into has `norm="affine"`, and its outputs equal timm's in
eval mode (`benchmarks/check_resnet_timm.py`). Every parameter comes from the file and every array of
the file is used, except: the head `fc` keeps its initial values when the class count differs (or the
file has none), `num_batches_tracked` is dropped, and a model with `mask_channel` gets zero stem weights
for its fourth (mask) channel. Anything else is a `PretrainedMismatchError` that lists every missing,
unexpected and wrongly shaped key at once.
"""

from __future__ import annotations

import os
import re

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from vitshap_jax.models.pretrained import PretrainedMismatchError, _json, check_fit, normalization_name
from vitshap_jax.models.resnet import DEPTHS, EXPANSION

WHERE_TO_GET = (
    "Get ResNet weights as model.safetensors from a timm/resnet* repository on the Hugging Face Hub "
    "(e.g. timm/resnet50.a1_in1k), or save a timm model's state_dict with safetensors.torch.save_file."
)
BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default, which timm's ResNets use

_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.")
# Our module names -> timm's, inside the stem and inside a block.
_MODULES = {"norm1": "bn1", "norm2": "bn2", "norm3": "bn3", "downsample_conv": "downsample.0"}
_MODULES |= {"downsample_norm": "downsample.1", "conv1": "conv1", "conv2": "conv2", "conv3": "conv3"}
_BN_PARTS = ("weight", "bias", "running_mean", "running_var")


def _read(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """The state dict's arrays (a `module.`/`model.` prefix stripped) and the config.json beside it."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"pretrained weights {path!r} do not exist. {WHERE_TO_GET}")
    if not path.endswith(".safetensors"):
        raise PretrainedMismatchError(
            f"{path}: a ResNet must be a timm .safetensors state dict. {WHERE_TO_GET}"
        )
    from safetensors.numpy import load_file

    try:
        arrays = dict(load_file(path))
    except Exception as e:  # safetensors raises its own error kinds for a file of another format
        raise PretrainedMismatchError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: {str(e)[:200]}). {WHERE_TO_GET}"
        ) from None
    for prefix in ("module.", "model."):
        if arrays and all(k.startswith(prefix) for k in arrays):
            arrays = {k[len(prefix) :]: v for k, v in arrays.items()}
    beside = os.path.join(os.path.dirname(path), "config.json")
    return arrays, (_json(beside) if os.path.isfile(beside) else {})


def _refuse_variants(path: str, a: dict) -> None:
    """A clear error for the timm ResNet variants our `ResNet` does not have."""
    if "conv1.0.weight" in a:
        raise PretrainedMismatchError(
            f"{path}: a deep stem (three 3x3 convolutions, conv1.0/conv1.3/conv1.6: timm's resnet*c, d, "
            "e, s, t variants) is not supported; use a plain ResNet (resnet18/34/50, a single 7x7 stem "
            "convolution)"
        )
    if "conv1.weight" not in a:
        raise PretrainedMismatchError(
            f"{path}: not a timm ResNet state dict (no conv1.weight); its first keys are: "
            f"{', '.join(sorted(a)[:8])}. {WHERE_TO_GET}"
        )
    if any(k.startswith("maxpool.") for k in a):
        raise PretrainedMismatchError(f"{path}: a convolution in place of the stem max pool is not supported")
    if any(re.match(r"^layer\d\.\d+\.downsample\.2\.", k) for k in a):
        raise PretrainedMismatchError(
            f"{path}: average-pool downsampling (downsample.1 is a convolution: timm's avg_down, the 'd' "
            "variants) is not supported"
        )
    attn = sorted({k.split(".")[2] for k in a if _BLOCK.match(k) and k.split(".")[2] in ("se", "attn")})
    if attn:
        raise PretrainedMismatchError(
            f"{path}: blocks with attention ({', '.join(attn)}: SE / ECA ResNets) are not supported"
        )
    conv2 = a.get("layer1.0.conv2.weight")
    if conv2 is not None and conv2.shape[0] != conv2.shape[1]:
        raise PretrainedMismatchError(
            f"{path}: layer1.0.conv2 has shape {conv2.shape}: grouped convolutions (ResNeXt) are not "
            "supported"
        )


def read_resnet_architecture(path: str) -> dict:
    """What a timm ResNet file says about the `ResNet` that fits it.

    Returns `{"model": {"depth", "width", "stem", "norm": "affine"}, "normalization": a
    NORMALIZATION_STATS name or None, "image_size": the training image size or None, "num_classes":
    classes of its head or None, "format": "timm resnet"}`. The shape comes from the arrays; the
    normalization and image size from the timm `config.json` beside the file (`pretrained_cfg`), if any.
    Raises PretrainedMismatchError for a variant we do not have (deep stem, ResNet-101, ...).
    """
    a, cfg = _read(path)
    _refuse_variants(path, a)
    stem_conv = a["conv1.weight"]  # [width, in, k, k]
    stems = {7: "imagenet", 3: "cifar"}
    if stem_conv.shape[-1] not in stems or stem_conv.shape[1] != 3:
        raise PretrainedMismatchError(
            f"{path}: conv1.weight has shape {stem_conv.shape}; supported: a 7x7 (ImageNet) or 3x3 (CIFAR) "
            "stem convolution over 3 channels"
        )
    width = int(stem_conv.shape[0])
    counts = tuple(
        len({m.group(2) for k in a if (m := _BLOCK.match(k)) and m.group(1) == str(s)}) for s in (1, 2, 3, 4)
    )
    bottleneck = "layer1.0.conv3.weight" in a
    depth = next((d for d, layout in DEPTHS.items() if layout == (bottleneck, counts)), None)
    if depth is None:
        kind = {False: "basic", True: "bottleneck"}
        supported = ", ".join(f"{d}: {kind[b]} {layout}" for d, (b, layout) in DEPTHS.items())
        raise PretrainedMismatchError(
            f"{path}: {kind[bottleneck]} blocks per stage {counts} are none of the supported ResNets "
            f"(depth {supported})"
        )
    for s in range(4):  # our stages have width * 2**s channels (times 4 out of a bottleneck)
        planes = width * 2**s
        inner = a[f"layer{s + 1}.0.conv1.weight"].shape[0]
        out = a[f"layer{s + 1}.0.conv{3 if bottleneck else 2}.weight"].shape[0]
        if (inner, out) != (planes, planes * (EXPANSION if bottleneck else 1)):
            raise PretrainedMismatchError(
                f"{path}: stage {s + 1} has {inner} inner and {out} output channels, but a ResNet whose stem "
                f"has {width} channels has {planes} and {planes * (EXPANSION if bottleneck else 1)} "
                "(a wide ResNet, or stage widths that do not double from the stem's?)"
            )
    pcfg = cfg.get("pretrained_cfg") or {}
    normalization = None
    if "mean" in pcfg and "std" in pcfg:
        normalization = normalization_name(pcfg["mean"], pcfg["std"])
    return {
        "model": {"depth": depth, "width": width, "stem": stems[stem_conv.shape[-1]], "norm": "affine"},
        "normalization": normalization,
        "image_size": (pcfg.get("input_size") or [None])[-1],
        "num_classes": int(a["fc.weight"].shape[0]) if "fc.weight" in a else None,
        "format": "timm resnet",
    }


def _source(key: str) -> tuple[str, str]:
    """Our `module/.../leaf` -> (timm module, our leaf); e.g. `layer2_0/norm1/scale` -> (`layer2.0.bn1`,
    `scale`). An unknown name maps to a `<...>` module no file has."""
    *modules, leaf = key.split("/")
    parts = []
    for m in modules:
        block = re.fullmatch(r"layer(\d)_(\d+)", m)
        parts.append(
            f"layer{block.group(1)}.{block.group(2)}" if block else _MODULES.get(m, f"<no timm name for {m}>")
        )
    return ".".join(parts), leaf


def _from_file(key: str, a: dict, eps: float) -> tuple[tuple[str, ...], np.ndarray | None]:
    """The file's keys for our parameter `key` and its value in our layout (None if any key is absent)."""
    if key in ("fc/kernel", "fc/bias"):
        source = "fc.weight" if key == "fc/kernel" else "fc.bias"
        return (source,), (None if source not in a else a[source].T if key == "fc/kernel" else a[source])
    module, leaf = _source(key)
    if leaf == "kernel":
        source = f"{module}.weight"
        return (source,), (a[source].transpose(2, 3, 1, 0) if source in a else None)  # OIHW -> HWIO
    sources = tuple(f"{module}.{p}" for p in _BN_PARTS)
    if not all(s in a for s in sources):
        return sources, None
    gamma, beta, mean, var = (a[s].astype(np.float64) for s in sources)
    scale = gamma / np.sqrt(var + eps)
    return sources, (scale if leaf == "scale" else beta - mean * scale)


def load_resnet_pretrained(path: str, params: dict, *, eps: float = BN_EPS) -> dict:
    """Loads a timm ResNet `.safetensors` file into `params` (a `ResNet(norm="affine")`'s freshly
    initialized "params" dict), folding each BatchNorm with epsilon `eps`.

    Returns a new params dict with the same structure, shapes and dtypes as `params`. The head `fc`
    keeps its initial values when the file's class count differs or the file has none; with a mask
    channel, the stem's weights for it start at zero. Raises FileNotFoundError, or
    PretrainedMismatchError listing every missing, unexpected and mis-shaped key.
    """
    a, _ = _read(path)
    _refuse_variants(path, a)
    ours = traverse_util.flatten_dict(params, sep="/")
    used: set[str] = set()
    loaded, missing, mismatched = {}, [], []
    head_reinit = None
    for key, init in ours.items():
        sources, value = _from_file(key, a, eps)
        if value is None:
            if key.startswith("fc/"):
                head_reinit = "the file has no classification head"
            else:  # the sources it has are accounted for by this line, not listed as unexpected too
                missing.append(f"{key} (from {', '.join(s for s in sources if s not in a)})")
                used.update(s for s in sources if s in a)
            continue
        used.update(sources)
        if (
            key == "conv1/kernel"
            and value.shape[:2] == init.shape[:2]
            and init.shape[2] == value.shape[2] + 1
        ):
            logging.info(
                "%s: the stem's mask channel (input channel %d) starts at zero", path, value.shape[2]
            )
            value = np.concatenate(
                [value, np.zeros((*value.shape[:2], 1, value.shape[3]), value.dtype)], axis=2
            )
        if key.startswith("fc/") and value.shape != init.shape:
            if key == "fc/kernel" and value.shape[0] != init.shape[0]:
                mismatched.append(
                    f"{key}: the file's head reads {value.shape[0]} features, the model's {init.shape[0]}"
                )
                continue
            head_reinit = f"the file's head has shape {value.shape}, the model's {init.shape}"
            continue
        if value.shape != init.shape:
            mismatched.append(f"{key}: file {value.shape} (from {', '.join(sources)}), model {init.shape}")
            continue
        loaded[key] = jnp.asarray(value, dtype=init.dtype)

    unexpected = sorted(k for k in set(a) - used if not k.endswith(".num_batches_tracked"))
    check_fit(path, "timm resnet", missing, unexpected, mismatched)
    if head_reinit is not None:
        logging.info("%s: the head fc is re-initialized (%s)", path, head_reinit)
        loaded.update({k: v for k, v in ours.items() if k.startswith("fc/")})
    logging.info("%s: loaded %d arrays (timm resnet format)", path, len(used))
    return traverse_util.unflatten_dict(loaded, sep="/")
