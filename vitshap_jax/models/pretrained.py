"""Public pretrained ViT weights from local files, into our `ViT` parameters.

Formats (detected from the file):

* `.npz` from google-research/vision_transformer (e.g. the AugReg checkpoints,
  `Transformer/posembed_input/pos_embedding`, `encoderblock_{i}/MultiHeadDotProductAttention_1`): our
  naming, loaded by name.
* `.npz` from google-research/big_vision (`pos_embedding`, `encoderblock_{i}/MultiHeadDotProductAttention_0`,
  `LayerNorm_1`, `MlpBlock_0`; also the scanned layout `Transformer/encoderblock/...` with a leading depth
  axis, and an optional `params/` or `opt/target/` prefix).
* `.safetensors` timm ViT state dict (`patch_embed.proj.weight`, `blocks.{i}.attn.qkv.weight`, ...),
  as published on the Hugging Face Hub in the `timm/vit_*` repositories (file `model.safetensors`),
  with the options of the DeiT, DINOv2, CLIP and register families (`dist_token`/`head_dist`,
  `reg_token`, `blocks.{i}.ls1.gamma`, `norm_pre`, `fc_norm`, no `cls_token`), and MAE encoders
  (`vit_*_224.mae`: no head; a full MAE pretraining state dict's decoder is dropped). A timm `config.json`
  beside the file (the Hub's: `architecture`, `global_pool`, `model_args`, `pretrained_cfg`) refines
  what the state dict cannot say (heads, activation, pooling, normalization).
* A Hugging Face `transformers` directory written by `save_pretrained` (`config.json` +
  `model.safetensors`, or a sharded `model.safetensors.index.json`): `ViTModel`,
  `ViTForImageClassification`, `DeiTModel`, `DeiTForImageClassification(WithTeacher)`, `Dinov2Model`,
  `Dinov2WithRegistersModel`, `CLIPVisionModel` and the vision tower of a `CLIPModel`, and the MAE
  encoder of `ViTMAEModel` / `ViTMAEForPreTraining` (ViT's names; its fixed sin-cos position embedding,
  class-token row included, is in the file and loads like a learned one).

`read_architecture(path)` gives the model fields (`configs/common.py`'s `config.model`) a checkpoint
needs, read from its `config.json` and its arrays' shapes: the stages apply them, so nobody types shapes.

Every parameter of the model must come from the file, and every array of the file must be used, with
these exceptions: the classification head is re-initialized when the class count differs (or the file
has none; a `pre_logits` layer is then dropped with it), the position embedding is resized (bilinear)
when the patch grid differs, a patch embedding without bias (CLIP) gets a zero bias, and arrays that
inference never reads are dropped and logged by name (Hugging Face `pooler.*` and DINOv2's
`embeddings.mask_token`; a CLIPModel's text tower and projections; an MAE's decoder, `decoder.*` in
transformers, `decoder_*` and `mask_token` in the MAE/timm naming). Anything else is a
`PretrainedMismatchError` that lists every missing, unexpected and wrongly shaped key at once.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from vitshap_jax.config import NORMALIZATION_STATS
from vitshap_jax.errors import UserError

WHERE_TO_GET = (
    "Get ViT weights as .npz from google-research/vision_transformer (AugReg checkpoints, bucket "
    "gs://vit_models/augreg/) or as model.safetensors from a timm/vit_* repository on the Hugging Face Hub."
)

_POS = "Transformer/posembed_input/pos_embedding"
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.*)$")

# A rule turns the file's arrays into one of our parameters: (source keys, fn(arrays, our_shape)).
Rule = tuple[tuple[str, ...], Callable[..., np.ndarray]]


class PretrainedMismatchError(UserError, ValueError):
    """The file does not fit the model; the message lists every offending key."""


def _identity(a, shape):
    return a


def _vision_transformer_rule(key: str) -> Rule:
    return (key,), _identity


_BIG_VISION_RENAMES = {
    "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
    "LayerNorm_2": "LayerNorm_1",
    "MlpBlock_3": "MlpBlock_0",
}


def _big_vision_rule(scanned: bool) -> Callable[[str], Rule]:
    def rule(key: str) -> Rule:
        if key == _POS:
            return ("pos_embedding",), _identity
        match = _BLOCK.match(key)
        if not match:
            return (key,), _identity
        index, rest = int(match.group(1)), match.group(2)
        sub, _, tail = rest.partition("/")
        rest = f"{_BIG_VISION_RENAMES.get(sub, sub)}/{tail}"
        if scanned:  # one stacked array per parameter, blocks along axis 0
            return (f"Transformer/encoderblock/{rest}",), lambda a, shape: a[index]
        return (f"Transformer/encoderblock_{index}/{rest}",), _identity

    return rule


def _timm_qkv(which: int, part: str):
    def fn(a, shape):
        width = math.prod(shape[-2:]) if part == "bias" else math.prod(shape[1:])
        chunk = a[which * width : (which + 1) * width]
        return chunk.reshape(shape) if part == "bias" else chunk.T.reshape(shape)

    return fn


def _transpose(a, shape):  # PyTorch Linear [out, in] -> [in, out], split into heads where ours is
    return a.T.reshape(shape) if a.size == math.prod(shape) else a.T


def _conv(a, shape):  # PyTorch [D, C, p, p] -> flax [p, p, C, D]
    return a.transpose(2, 3, 1, 0)


def _reshape(a, shape):
    return a.reshape(shape) if a.size == math.prod(shape) else a


_TIMM_BLOCK = {
    "LayerNorm_0/scale": ("norm1.weight", _identity),
    "LayerNorm_0/bias": ("norm1.bias", _identity),
    "LayerNorm_2/scale": ("norm2.weight", _identity),
    "LayerNorm_2/bias": ("norm2.bias", _identity),
    "MlpBlock_3/Dense_0/kernel": ("mlp.fc1.weight", _transpose),
    "MlpBlock_3/Dense_0/bias": ("mlp.fc1.bias", _identity),
    "MlpBlock_3/Dense_1/kernel": ("mlp.fc2.weight", _transpose),
    "MlpBlock_3/Dense_1/bias": ("mlp.fc2.bias", _identity),
    "MultiHeadDotProductAttention_1/out/kernel": ("attn.proj.weight", _transpose),
    "MultiHeadDotProductAttention_1/out/bias": ("attn.proj.bias", _identity),
    "ls1": ("ls1.gamma", _identity),
    "ls2": ("ls2.gamma", _identity),
    **{
        f"MultiHeadDotProductAttention_1/{name}/{part}": (f"attn.qkv.{timm_part}", _timm_qkv(i, part))
        for i, name in enumerate(("query", "key", "value"))
        for part, timm_part in (("kernel", "weight"), ("bias", "bias"))
    },
}

_TIMM_TOP = {
    "embedding/kernel": ("patch_embed.proj.weight", _conv),
    "embedding/bias": ("patch_embed.proj.bias", _identity),
    "cls": ("cls_token", _identity),
    "dist": ("dist_token", _identity),
    "reg": ("reg_token", _identity),
    _POS: ("pos_embed", _identity),
    "Transformer/norm_pre/scale": ("norm_pre.weight", _identity),
    "Transformer/norm_pre/bias": ("norm_pre.bias", _identity),
    "Transformer/encoder_norm/scale": ("norm.weight", _identity),
    "Transformer/encoder_norm/bias": ("norm.bias", _identity),
    "norm_pooled/scale": ("fc_norm.weight", _identity),
    "norm_pooled/bias": ("fc_norm.bias", _identity),
    "head/kernel": ("head.weight", _transpose),
    "head/bias": ("head.bias", _identity),
    "head_dist/kernel": ("head_dist.weight", _transpose),
    "head_dist/bias": ("head_dist.bias", _identity),
}


def _timm_rule(key: str) -> Rule:
    match = _BLOCK.match(key)
    if match:
        source, fn = _TIMM_BLOCK.get(match.group(2), (f"<no timm name for {key}>", _identity))
        return (f"blocks.{match.group(1)}.{source}",), fn
    source, fn = _TIMM_TOP.get(key, (f"<no timm name for {key}>", _identity))
    return (source,), fn


# Hugging Face transformers names (as `save_pretrained` writes them), per family: block parts, then top.
_HF_BLOCK = {
    "vit": {
        "LayerNorm_0": "layernorm_before",
        "LayerNorm_2": "layernorm_after",
        "MlpBlock_3/Dense_0": "intermediate.dense",
        "MlpBlock_3/Dense_1": "output.dense",
        "MultiHeadDotProductAttention_1/query": "attention.attention.query",
        "MultiHeadDotProductAttention_1/key": "attention.attention.key",
        "MultiHeadDotProductAttention_1/value": "attention.attention.value",
        "MultiHeadDotProductAttention_1/out": "attention.output.dense",
    },
    "dinov2": {
        "LayerNorm_0": "norm1",
        "LayerNorm_2": "norm2",
        "MlpBlock_3/Dense_0": "mlp.fc1",
        "MlpBlock_3/Dense_1": "mlp.fc2",
        "MultiHeadDotProductAttention_1/query": "attention.attention.query",
        "MultiHeadDotProductAttention_1/key": "attention.attention.key",
        "MultiHeadDotProductAttention_1/value": "attention.attention.value",
        "MultiHeadDotProductAttention_1/out": "attention.output.dense",
        "ls1": "layer_scale1.lambda1",
        "ls2": "layer_scale2.lambda1",
    },
    "clip": {
        "LayerNorm_0": "layer_norm1",
        "LayerNorm_2": "layer_norm2",
        "MlpBlock_3/Dense_0": "mlp.fc1",
        "MlpBlock_3/Dense_1": "mlp.fc2",
        "MultiHeadDotProductAttention_1/query": "self_attn.q_proj",
        "MultiHeadDotProductAttention_1/key": "self_attn.k_proj",
        "MultiHeadDotProductAttention_1/value": "self_attn.v_proj",
        "MultiHeadDotProductAttention_1/out": "self_attn.out_proj",
    },
}
_HF_BLOCK["deit"] = _HF_BLOCK["vit"]
_HF_LAYERS = {
    "vit": "encoder.layer",
    "deit": "encoder.layer",
    "dinov2": "encoder.layer",
    "clip": "encoder.layers",
}
_HF_TOP = {
    "vit": {
        "embedding": "embeddings.patch_embeddings.projection",
        "cls": "embeddings.cls_token",
        "dist": "embeddings.distillation_token",
        "reg": "embeddings.register_tokens",
        _POS: "embeddings.position_embeddings",
        "Transformer/encoder_norm": "layernorm",
        "head": "classifier",
    },
    "clip": {
        "embedding": "embeddings.patch_embedding",
        "cls": "embeddings.class_embedding",
        _POS: "embeddings.position_embedding.weight",
        "Transformer/norm_pre": "pre_layrnorm",  # sic, the transformers name
        # CLIP normalizes the pooled class token only; for a class-token model that is the same output.
        "Transformer/encoder_norm": "post_layernorm",
    },
}
_HF_TOP["deit"] = _HF_TOP["vit"] | {"head": "cls_classifier", "head_dist": "distillation_classifier"}
_HF_TOP["dinov2"] = _HF_TOP["vit"]
# Arrays inference never reads: dropped (and logged) instead of reported as unexpected.
_HF_UNUSED = re.compile(
    r"^(pooler\.|embeddings\.mask_token$|embeddings\.position_ids$|text_model\.|visual_projection\.|"
    r"text_projection\.|logit_scale$)"
)
_HF_PREFIXES = ("vit.", "deit.", "dinov2.", "vision_model.")
# The decoder of masked-autoencoder pretraining (MAE): transformers' ViTMAEForPreTraining `decoder.*`; the
# MAE repository's (and timm-named) `decoder_embed`, `decoder_blocks.*`, `decoder_pos_embed`, ...,
# `mask_token`.
_HF_MAE_DECODER = re.compile(r"^decoder\.")
_TIMM_MAE_DECODER = re.compile(r"^decoder[._]")
MAE_DECODER = "the MAE decoder (pretraining only)"
MASK_TOKEN = "the mask token of masked-image pretraining (MAE, DINOv2)"


def _hf_rule(family: str, deit_teacher: bool) -> Callable[[str], Rule]:
    block, top = _HF_BLOCK[family], _HF_TOP[family]

    def leaf(source: str, key: str, leaf_name: str) -> Rule:
        if leaf_name == "scale":
            return (f"{source}.weight",), _identity
        if leaf_name == "bias":
            return (f"{source}.bias",), _reshape
        if key.startswith("embedding/"):
            return (f"{source}.weight",), _conv
        return (f"{source}.weight",), _transpose  # Dense, DenseGeneral: PyTorch [out, in]

    def rule(key: str) -> Rule:
        match = _BLOCK.match(key)
        if match:
            index, rest = match.groups()
            layer = f"{_HF_LAYERS[family]}.{index}"
            if rest in block:  # a bare parameter (layer scale)
                return (f"{layer}.{block[rest]}",), _identity
            module, _, leaf_name = rest.rpartition("/")
            if module not in block:
                return (f"<no transformers name for {key}>",), _identity
            return leaf(f"{layer}.{block[module]}", key, leaf_name)
        if key == _POS:  # CLIP's is [tokens, D]
            return (top[key],), lambda a, shape: a.reshape(1, -1, a.shape[-1])
        if key in top:  # a bare parameter (tokens)
            return (top[key],), _reshape
        module, _, leaf_name = key.rpartition("/")
        if module == "head" and family == "deit" and not deit_teacher:
            module = "head_plain"
        source = {"head_plain": "classifier"}.get(module) or top.get(module)
        if source is None:
            return (f"<no transformers name for {key}>",), _identity
        return leaf(source, key, leaf_name)

    return rule


class Checkpoint:
    """A checkpoint's arrays and what is known about its architecture.

    Attributes: `format` (a name for messages), `arrays` (source key -> numpy array), `rule` (our key ->
    source keys and conversion), `config` (the `config.json` beside it, or {}), `unused` (source keys
    dropped on purpose, with the reason), `optional` (our keys a file may lack, filled with zeros).
    """

    def __init__(self, fmt, arrays, rule, config=None, unused=None, optional=()):
        self.format, self.arrays, self.rule = fmt, arrays, rule
        self.config = config or {}
        self.unused = unused or {}
        self.optional = set(optional)


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return dict(load_file(path))
    except Exception as e:  # safetensors raises its own error kinds for a file of another format
        raise PretrainedMismatchError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: {str(e)[:200]}); is it "
            f"another format with a .safetensors name, or cut short by the download? {WHERE_TO_GET}"
        ) from None


def _json(path: str) -> dict:
    import json

    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise PretrainedMismatchError(f"{path}: not valid JSON ({e})") from None


HF_MODEL_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers", "clip_vision_model", "clip", "vit_mae")


def _hf_family(path: str, cfg: dict) -> str:
    model_type = cfg.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise PretrainedMismatchError(
            f"{path}/config.json: model_type {model_type!r} is not supported; supported Hugging Face "
            f"models: {', '.join(HF_MODEL_TYPES)} (ViT, DeiT, DINOv2 with or without registers, CLIP vision, "
            "ViT-MAE)"
        )
    # ViT-MAE's encoder is a ViT with ViT's names (its position embedding is fixed, but saved).
    aliases = {"dinov2_with_registers": "dinov2", "clip_vision_model": "clip", "vit_mae": "vit"}
    return aliases.get(model_type, model_type)


def _read_hf_dir(path: str) -> Checkpoint:
    cfg = _json(os.path.join(path, "config.json"))
    family = _hf_family(path, cfg)
    single, index = (
        os.path.join(path, "model.safetensors"),
        os.path.join(path, "model.safetensors.index.json"),
    )
    if os.path.isfile(single):
        arrays = _load_safetensors(single)
    elif os.path.isfile(index):
        arrays = {}
        for shard in sorted(set(_json(index).get("weight_map", {}).values())):
            arrays |= _load_safetensors(os.path.join(path, shard))
    else:
        found = ", ".join(sorted(os.listdir(path)))
        raise PretrainedMismatchError(
            f"{path}: a Hugging Face directory needs model.safetensors (or a sharded "
            f"model.safetensors.index.json); it holds: {found}. Save it with "
            "model.save_pretrained(dir) (safetensors is the default), or convert a pytorch_model.bin"
        )
    arrays = {_strip_hf_prefix(k): v for k, v in arrays.items()}
    unused = {k: "never read for classification" for k in arrays if _HF_UNUSED.match(k)}
    if cfg.get("model_type") == "vit_mae":
        unused |= {k: MAE_DECODER for k in arrays if _HF_MAE_DECODER.match(k)}
    architectures = cfg.get("architectures") or []
    teacher = any(a.endswith("WithTeacher") for a in architectures)
    optional = ("embedding/bias",) if family == "clip" else ()
    return Checkpoint(
        f"transformers {cfg['model_type']}", arrays, _hf_rule(family, teacher), cfg, unused, optional
    )


def _strip_hf_prefix(key: str) -> str:
    for prefix in _HF_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _strip_prefix(arrays: dict, prefixes) -> dict:
    for prefix in prefixes:
        if arrays and all(k.startswith(prefix) for k in arrays):
            return {k[len(prefix) :]: v for k, v in arrays.items()}
    return arrays


def _read(path: str) -> Checkpoint:
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise PretrainedMismatchError(
                f"{path}: a directory must be a Hugging Face save_pretrained directory (config.json + "
                f"model.safetensors); it has no config.json. {WHERE_TO_GET}"
            )
        return _read_hf_dir(path)
    if path.endswith(".safetensors"):
        arrays = _strip_prefix(_load_safetensors(path), ("module.", "model."))
        beside = os.path.join(os.path.dirname(path), "config.json")
        cfg = _json(beside) if os.path.isfile(beside) else {}
        if cfg.get("model_type") in HF_MODEL_TYPES:  # a transformers file: read it with its directory
            return _read_hf_dir(os.path.dirname(path) or ".")
        optional = ("embedding/bias",) if "patch_embed.proj.bias" not in arrays else ()
        unused = {k: MAE_DECODER for k in arrays if _TIMM_MAE_DECODER.match(k)}
        unused |= {"mask_token": MASK_TOKEN} if "mask_token" in arrays else {}
        return Checkpoint("timm", arrays, _timm_rule, cfg, unused, optional=optional)
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except Exception as e:  # not a zip of arrays (or a pickled object), or cut short
            raise PretrainedMismatchError(
                f"{path}: not a readable .npz of arrays ({type(e).__name__}: {str(e)[:200]}); is it another "
                f"format with a .npz name, or cut short by the download? {WHERE_TO_GET}"
            ) from None
        arrays = _strip_prefix(arrays, ("opt/target/", "params/"))
        if _POS in arrays:
            return Checkpoint("vision_transformer", arrays, _vision_transformer_rule)
        if "pos_embedding" in arrays:
            scanned = any(k.startswith("Transformer/encoderblock/") for k in arrays)
            return Checkpoint("big_vision", arrays, _big_vision_rule(scanned))
        shown = ", ".join(sorted(arrays)[:8])
        raise PretrainedMismatchError(
            f"{path}: not a ViT checkpoint in vision_transformer or big_vision format (no "
            f"'{_POS}' or 'pos_embedding' array); its first keys are: {shown}"
        )
    raise ValueError(
        f"{path}: unknown pretrained format; expected a .npz or .safetensors file or a Hugging Face "
        f"directory. {WHERE_TO_GET}"
    )


def resize_pos_embedding(pos: np.ndarray, num_tokens: int, prefix: int = 1) -> np.ndarray:
    """Resizes `[1, prefix + g*g, D]` to `[1, num_tokens, D]`: the `prefix` entries (class token etc.)
    kept, the grid resized bilinearly."""
    old, new = math.isqrt(pos.shape[1] - prefix), math.isqrt(num_tokens - prefix)
    if old * old != pos.shape[1] - prefix or new * new != num_tokens - prefix:
        raise ValueError(f"cannot resize a position embedding of {pos.shape[1]} tokens to {num_tokens}")
    grid = pos[0, prefix:].reshape(old, old, -1)
    grid = jax.image.resize(jnp.asarray(grid), (new, new, grid.shape[-1]), method="bilinear")
    return np.concatenate([pos[:, :prefix], np.asarray(grid).reshape(1, new * new, -1)], axis=1)


def check_fit(path: str, fmt: str, missing, unexpected, mismatched) -> None:
    """Raises PretrainedMismatchError listing every missing, unexpected and mismatched key at once."""
    if missing or unexpected or mismatched:
        lines = [
            f"{path} ({fmt} format) does not fit the model: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(mismatched)} mismatched"
        ]
        lines += [f"  missing: {k}" for k in missing]
        lines += [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  mismatched: {k}" for k in mismatched]
        raise PretrainedMismatchError("\n".join(lines))


def load_pretrained(path: str, params: dict, *, pos_prefix: int = 1) -> dict:
    """Loads a pretrained ViT checkpoint into `params` (the model's freshly initialized "params" dict).

    Returns a new params dict with the same structure, shapes and dtypes as `params`. The heads keep
    their initial values when the file's class count differs or the file has no head; the position
    embedding (whose first `pos_prefix` entries belong to prefix tokens) is resized when the patch grid
    differs. Raises FileNotFoundError, or PretrainedMismatchError listing every missing, unexpected and
    mis-shaped key.
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"pretrained weights {path!r} do not exist. {WHERE_TO_GET}")
    ckpt = _read(path)
    arrays, rule = ckpt.arrays, ckpt.rule
    ours = traverse_util.flatten_dict(params, sep="/")
    used: set[str] = set()
    loaded, missing, mismatched = {}, [], []
    head_reinit = None
    for key, init in ours.items():
        sources, fn = rule(key)
        if not all(s in arrays for s in sources):
            if key.startswith(("head/", "head_dist/")):
                head_reinit = "the file has no classification head"
            elif key in ckpt.optional:
                loaded[key] = jnp.zeros(init.shape, init.dtype)
                logging.info("%s: %s is not in the file (a layer without bias): zeros", path, key)
            else:
                missing.append(f"{key} (from {', '.join(sources)})")
            continue
        used.update(sources)
        value = np.asarray(fn(*(arrays[s] for s in sources), init.shape))
        if key == _POS and value.shape[1] != init.shape[1] and value.shape[2:] == init.shape[2:]:
            try:
                value = resize_pos_embedding(value, init.shape[1], pos_prefix)
            except ValueError as e:
                mismatched.append(f"{key}: {e} (a different number of prefix tokens?)")
                continue
            logging.info("%s: resized the position embedding to %d tokens", path, init.shape[1])
        if key.startswith(("head/", "head_dist/")) and value.shape != init.shape:
            if key.endswith("kernel") and value.shape[-1] == init.shape[-1]:  # same classes, other input
                mismatched.append(
                    f"{key}: the file's head reads a {value.shape[0]}-wide feature, this ViT's a "
                    f"{init.shape[0]}-wide one (e.g. Dinov2ForImageClassification's class token + patch "
                    "mean): load its backbone without that head"
                )
                continue
            head_reinit = f"the file's head has shape {value.shape}, the model's {init.shape}"
            continue
        if value.shape != init.shape:
            mismatched.append(f"{key}: file {value.shape} (from {', '.join(sources)}), model {init.shape}")
            continue
        loaded[key] = jnp.asarray(value, dtype=init.dtype)

    pre_logits = {k for k in arrays if k.startswith(("pre_logits/", "pre_logits."))}
    unexpected = sorted(set(arrays) - used - pre_logits - set(ckpt.unused))
    if pre_logits and head_reinit is None:
        mismatched.append(
            f"the file has a pre_logits layer ({', '.join(sorted(pre_logits))}) that this ViT lacks, and its "
            "head was trained on top of it: use the checkpoint with a new head (a different class count)"
        )
    check_fit(path, ckpt.format, missing, unexpected, mismatched)
    if head_reinit is not None:
        logging.info("%s: the head is re-initialized (%s)", path, head_reinit)
        loaded.update({k: v for k, v in ours.items() if k.startswith(("head/", "head_dist/"))})
    if ckpt.unused:
        logging.info(
            "%s: dropped %d arrays inference never reads: %s",
            path,
            len(ckpt.unused),
            ", ".join(sorted(ckpt.unused)),
        )
    logging.info("%s: loaded %d arrays (%s format)", path, len(used), ckpt.format)
    return traverse_util.unflatten_dict(loaded, sep="/")


# ----------------------------------------------------------------------------------------------------
# The architecture a checkpoint needs, as `config.model` fields (and the pixel normalization it expects).

_HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
}
# By model_type, else by family. MAE pretrains on ImageNet-normalized pixels (its image processor's too).
_HF_DEFAULT_NORMALIZATION = {
    "vit": "inception",
    "deit": "imagenet",
    "dinov2": "imagenet",
    "clip": "clip",
    "vit_mae": "imagenet",
}
# timm model names -> heads where the head width is not 64 (ViT-H/14, ViT-g/14 and ViT-G/14).
_TIMM_HEADS = (("gigantic", 16), ("huge", 16), ("giant", 16))


def normalization_name(mean, std) -> str | None:
    """The name of the pixel normalization with these statistics (within 1e-3), or None."""
    for name, (m, s) in NORMALIZATION_STATS.items():
        if np.allclose(mean, m, atol=1e-3) and np.allclose(std, s, atol=1e-3):
            return name
    return None


def _count_blocks(arrays, pattern: str) -> int:
    return len({m.group(1) for k in arrays if (m := re.match(pattern, k))})


def read_architecture(path: str) -> dict:
    """What a checkpoint says about the model that fits it.

    Returns `{"model": {config.model field: value}, "normalization": a NORMALIZATION_STATS name or None,
    "image_size": the training image size or None, "num_classes": classes of its head or None,
    "format": ...}`. The model fields are the shape (`patch_size`, `hidden_size`, `depth`, `num_heads`,
    `mlp_dim`) and the options of `ViT` (`class_token`, `distill_token`, `distill_head`, `reg_tokens`,
    `pos_prefix`, `pool`, `fc_norm`, `pre_norm`, `layer_scale`, `act`, `ln_eps`). Shapes come from the
    arrays; what arrays cannot say (heads of a fused qkv, activation, epsilon, pooling) from the
    checkpoint's config.json, else from the timm model name, else the common value (logged).
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"pretrained weights {path!r} do not exist. {WHERE_TO_GET}")
    ckpt = _read(path)
    if ckpt.format.startswith("transformers"):
        return _hf_architecture(path, ckpt)
    if ckpt.format == "timm":
        return _timm_architecture(path, ckpt)
    return _npz_architecture(ckpt)


def _npz_architecture(ckpt: Checkpoint) -> dict:
    a = ckpt.arrays

    def ours(key: str) -> np.ndarray | None:
        """The file's array for our parameter `key` (through the format's rule), or None."""
        (source,), fn = ckpt.rule(key)
        return np.asarray(fn(a[source], None)) if source in a else None

    kernel = ours("embedding/kernel")
    query = ours("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel")  # [D, heads, d]
    scanned = "Transformer/encoderblock/LayerNorm_0/scale" in a  # big_vision: blocks stacked on axis 0
    depth = (
        a["Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
        if scanned
        else _count_blocks(a, r"^Transformer/encoderblock_(\d+)/")
    )
    model = {
        "patch_size": int(kernel.shape[0]),
        "hidden_size": int(kernel.shape[-1]),
        "depth": int(depth),
        "num_heads": int(query.shape[-2]) if query is not None else int(kernel.shape[-1]) // 64,
        "mlp_dim": int(ours("Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel").shape[-1]),
    }
    head = a.get("head/kernel")
    return {
        "model": _with_defaults(model),
        "normalization": "inception",
        "image_size": None,
        "num_classes": int(head.shape[-1]) if head is not None else None,
        "format": ckpt.format,
    }


def _with_defaults(model: dict) -> dict:
    defaults = dict(
        class_token=True,
        distill_token=False,
        distill_head=False,
        reg_tokens=0,
        pos_prefix=-1,
        pool="token",
        fc_norm=False,
        pre_norm=False,
        layer_scale=False,
        act="gelu",
        ln_eps=1e-6,
    )
    return defaults | model


def _hf_architecture(path: str, ckpt: Checkpoint) -> dict:
    cfg = ckpt.config
    model_type = cfg["model_type"]
    family = _hf_family(path, cfg)
    vc = cfg.get("vision_config", cfg) if model_type == "clip" else cfg
    where = f"{path}: config.json"

    def need(key):
        if key not in vc:
            raise PretrainedMismatchError(f"{where} has no {key!r}; it is not a complete {model_type} config")
        return vc[key]

    act = vc.get("hidden_act", "gelu")
    if act not in _HF_ACTIVATIONS:
        raise PretrainedMismatchError(
            f"{where}: hidden_act {act!r} is not supported ({', '.join(_HF_ACTIVATIONS)})"
        )
    if vc.get("num_channels", 3) != 3:
        raise PretrainedMismatchError(
            f"{where}: num_channels {vc['num_channels']}; only RGB (3) is supported"
        )
    if not vc.get("qkv_bias", True):
        raise PretrainedMismatchError(f"{where}: qkv_bias false is not supported")
    if vc.get("use_swiglu_ffn", False):
        raise PretrainedMismatchError(f"{where}: use_swiglu_ffn (DINOv2 giant) is not supported")
    layers = _HF_LAYERS[family]
    fc1 = f"{layers}.0.{_HF_BLOCK[family]['MlpBlock_3/Dense_0']}.weight"
    if fc1 not in ckpt.arrays:
        raise PretrainedMismatchError(f"{path}: no array {fc1!r}; is it a {model_type} checkpoint?")
    teacher = any(a.endswith("WithTeacher") for a in cfg.get("architectures") or [])
    model = {
        "patch_size": int(need("patch_size")),
        "hidden_size": int(need("hidden_size")),
        "depth": int(need("num_hidden_layers")),
        "num_heads": int(need("num_attention_heads")),
        "mlp_dim": int(ckpt.arrays[fc1].shape[0]),
        "act": _HF_ACTIVATIONS[act],
        "ln_eps": float(vc.get("layer_norm_eps", 1e-12)),
        "distill_token": family == "deit",
        "distill_head": family == "deit" and teacher,
        "layer_scale": family == "dinov2",
        "reg_tokens": int(vc.get("num_register_tokens", 0)) if family == "dinov2" else 0,
        "pos_prefix": 1 if family == "dinov2" else -1,
        "pre_norm": family == "clip",
    }
    normalization = _HF_DEFAULT_NORMALIZATION.get(model_type) or _HF_DEFAULT_NORMALIZATION[family]
    pre = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "preprocessor_config.json")
    if os.path.isfile(pre):
        p = _json(pre)
        if "image_mean" in p and "image_std" in p:
            normalization = normalization_name(p["image_mean"], p["image_std"])
            if normalization is None:
                raise PretrainedMismatchError(
                    f"{pre}: image_mean {p['image_mean']} / image_std {p['image_std']} are none of the "
                    f"supported normalizations ({', '.join(NORMALIZATION_STATS)})"
                )
    head = "cls_classifier.weight" if teacher else "classifier.weight"
    classes = ckpt.arrays[head].shape[0] if head in ckpt.arrays else None
    return {
        "model": _with_defaults(model),
        "normalization": normalization,
        "image_size": vc.get("image_size"),
        "num_classes": classes,
        "format": ckpt.format,
    }


def _timm_architecture(path: str, ckpt: Checkpoint) -> dict:
    a, cfg = ckpt.arrays, ckpt.config
    args = cfg.get("model_args") or {}
    name = cfg.get("architecture", "")
    if "patch_embed.proj.weight" not in a or "blocks.0.mlp.fc1.weight" not in a:
        raise PretrainedMismatchError(
            f"{path}: not a timm VisionTransformer state dict (no patch_embed.proj.weight or "
            f"blocks.0.mlp.fc1.weight); its first keys are: {', '.join(sorted(a)[:8])}"
        )
    embed = a["patch_embed.proj.weight"]
    hidden = int(embed.shape[0])
    class_token = "cls_token" in a
    reg = int(a["reg_token"].shape[1]) if "reg_token" in a else 0
    distill = "dist_token" in a
    prefix = int(class_token) + int(distill) + reg
    fc_norm = "fc_norm.weight" in a
    pool = (
        args.get("global_pool")
        or cfg.get("global_pool")
        or ("avg" if fc_norm or not class_token else "token")
    )
    if pool not in ("token", "avg"):
        raise PretrainedMismatchError(f"{path}: global_pool {pool!r} is not supported (token or avg)")
    tokens = int(a["pos_embed"].shape[1]) if "pos_embed" in a else 0
    if "no_embed_class" in args:
        pos_prefix = 0 if args["no_embed_class"] else prefix
    elif tokens >= prefix and math.isqrt(tokens - prefix) ** 2 == tokens - prefix:
        pos_prefix = prefix
    else:
        pos_prefix = 0
    heads, how = args.get("num_heads"), "model_args"
    if heads is None:
        heads = next((h for word, h in _TIMM_HEADS if word in name), None)
        how = f"the timm name {name!r}"
    if heads is None and hidden == 1280:  # ViT-H (e.g. MAE's ViT-H/14 state dict, which has no config)
        heads, how = 16, "its width 1280 (ViT-H: 16 heads of 80 channels)"
    if heads is None:
        heads, how = max(hidden // 64, 1), "64 channels per head (no config.json says otherwise)"
    logging.info("%s: %d heads, from %s", path, heads, how)
    act = args.get("act_layer") or ("quick_gelu" if "quickgelu" in name else "gelu")
    act = {"gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "gelu": "gelu"}.get(act)
    if act is None:
        raise PretrainedMismatchError(f"{path}: act_layer {args.get('act_layer')!r} is not supported")
    model = {
        "patch_size": int(embed.shape[-1]),
        "hidden_size": hidden,
        "depth": _count_blocks(a, r"^blocks\.(\d+)\."),
        "num_heads": int(heads),
        "mlp_dim": int(a["blocks.0.mlp.fc1.weight"].shape[0]),
        "class_token": class_token,
        "distill_token": distill,
        "distill_head": "head_dist.weight" in a,
        "reg_tokens": reg,
        "pos_prefix": pos_prefix,
        "pool": pool,
        "fc_norm": fc_norm,
        "pre_norm": "norm_pre.weight" in a,
        "layer_scale": "blocks.0.ls1.gamma" in a,
        "act": act,
        "ln_eps": 1e-5 if "clip" in name else 1e-6,
    }
    pcfg = cfg.get("pretrained_cfg") or {}
    normalization = None
    if "mean" in pcfg and "std" in pcfg:
        normalization = normalization_name(pcfg["mean"], pcfg["std"])
    elif any(reason == MAE_DECODER for reason in ckpt.unused.values()):
        normalization = "imagenet"  # an MAE pretraining state dict: ImageNet statistics, as MAE trains
        logging.info("%s: an MAE checkpoint without config.json: imagenet pixel normalization", path)
    size = (pcfg.get("input_size") or [None])[-1]
    classes = int(a["head.weight"].shape[0]) if "head.weight" in a else None
    return {
        "model": _with_defaults(model),
        "normalization": normalization,
        "image_size": size,
        "num_classes": classes,
        "format": ckpt.format,
    }
