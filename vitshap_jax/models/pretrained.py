"""Public pretrained ViT weights from local files, into our `ViT` parameters.

Formats (detected from the file):

* `.npz` from google-research/vision_transformer (e.g. the AugReg checkpoints,
  `Transformer/posembed_input/pos_embedding`, `encoderblock_{i}/MultiHeadDotProductAttention_1`): our
  naming, loaded by name.
* `.npz` from google-research/big_vision (`pos_embedding`, `encoderblock_{i}/MultiHeadDotProductAttention_0`,
  `LayerNorm_1`, `MlpBlock_0`; also the scanned layout `Transformer/encoderblock/...` with a leading depth
  axis, and an optional `params/` or `opt/target/` prefix).
* `.safetensors` timm ViT state dict (`patch_embed.proj.weight`, `blocks.{i}.attn.qkv.weight`, ...),
  as published on the Hugging Face Hub in the `timm/vit_*` repositories (file `model.safetensors`).

Every parameter of the model must come from the file, and every array of the file must be used, with
two exceptions: the classification head is re-initialized when the class count differs (or the file has
none; a `pre_logits` layer is then dropped with it), and the position embedding is resized
(bilinear) when the patch grid differs. Anything else is a `PretrainedMismatchError` that lists every
missing, unexpected and wrongly shaped key at once.
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

WHERE_TO_GET = (
    "Get ViT weights as .npz from google-research/vision_transformer (AugReg checkpoints, bucket "
    "gs://vit_models/augreg/) or as model.safetensors from a timm/vit_* repository on the Hugging Face Hub."
)

_POS = "Transformer/posembed_input/pos_embedding"
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.*)$")

# A rule turns the file's arrays into one of our parameters: (source keys, fn(arrays, our_shape)).
Rule = tuple[tuple[str, ...], Callable[..., np.ndarray]]


class PretrainedMismatchError(ValueError):
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


_TIMM_BLOCK = {
    "LayerNorm_0/scale": ("norm1.weight", _identity),
    "LayerNorm_0/bias": ("norm1.bias", _identity),
    "LayerNorm_2/scale": ("norm2.weight", _identity),
    "LayerNorm_2/bias": ("norm2.bias", _identity),
    "MlpBlock_3/Dense_0/kernel": ("mlp.fc1.weight", lambda a, s: a.T),
    "MlpBlock_3/Dense_0/bias": ("mlp.fc1.bias", _identity),
    "MlpBlock_3/Dense_1/kernel": ("mlp.fc2.weight", lambda a, s: a.T),
    "MlpBlock_3/Dense_1/bias": ("mlp.fc2.bias", _identity),
    "MultiHeadDotProductAttention_1/out/kernel": ("attn.proj.weight", lambda a, s: a.T.reshape(s)),
    "MultiHeadDotProductAttention_1/out/bias": ("attn.proj.bias", _identity),
    **{
        f"MultiHeadDotProductAttention_1/{name}/{part}": (f"attn.qkv.{timm_part}", _timm_qkv(i, part))
        for i, name in enumerate(("query", "key", "value"))
        for part, timm_part in (("kernel", "weight"), ("bias", "bias"))
    },
}

_TIMM_TOP = {
    "embedding/kernel": ("patch_embed.proj.weight", lambda a, s: a.transpose(2, 3, 1, 0)),
    "embedding/bias": ("patch_embed.proj.bias", _identity),
    "cls": ("cls_token", _identity),
    _POS: ("pos_embed", _identity),
    "Transformer/encoder_norm/scale": ("norm.weight", _identity),
    "Transformer/encoder_norm/bias": ("norm.bias", _identity),
    "head/kernel": ("head.weight", lambda a, s: a.T),
    "head/bias": ("head.bias", _identity),
}


def _timm_rule(key: str) -> Rule:
    match = _BLOCK.match(key)
    if match:
        source, fn = _TIMM_BLOCK.get(match.group(2), (f"<no timm name for {key}>", _identity))
        return (f"blocks.{match.group(1)}.{source}",), fn
    source, fn = _TIMM_TOP.get(key, (f"<no timm name for {key}>", _identity))
    return (source,), fn


def _strip_prefix(arrays: dict, prefixes) -> dict:
    for prefix in prefixes:
        if arrays and all(k.startswith(prefix) for k in arrays):
            return {k[len(prefix) :]: v for k, v in arrays.items()}
    return arrays


def _read(path: str) -> tuple[str, dict[str, np.ndarray], Callable[[str], Rule]]:
    """Returns (format name, arrays by source key, rule)."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        arrays = _strip_prefix(dict(load_file(path)), ("module.", "model."))
        return "timm", arrays, _timm_rule
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        arrays = _strip_prefix(arrays, ("opt/target/", "params/"))
        if _POS in arrays:
            return "vision_transformer", arrays, _vision_transformer_rule
        if "pos_embedding" in arrays:
            scanned = any(k.startswith("Transformer/encoderblock/") for k in arrays)
            return "big_vision", arrays, _big_vision_rule(scanned)
        shown = ", ".join(sorted(arrays)[:8])
        raise PretrainedMismatchError(
            f"{path}: not a ViT checkpoint in vision_transformer or big_vision format (no "
            f"'{_POS}' or 'pos_embedding' array); its first keys are: {shown}"
        )
    raise ValueError(
        f"{path}: unknown pretrained format; expected a .npz or .safetensors file. {WHERE_TO_GET}"
    )


def resize_pos_embedding(pos: np.ndarray, num_tokens: int) -> np.ndarray:
    """Resizes `[1, 1 + g*g, D]` to `[1, num_tokens, D]`: class entry kept, grid resized bilinearly."""
    old, new = math.isqrt(pos.shape[1] - 1), math.isqrt(num_tokens - 1)
    if old * old != pos.shape[1] - 1 or new * new != num_tokens - 1:
        raise ValueError(f"cannot resize a position embedding of {pos.shape[1]} tokens to {num_tokens}")
    grid = pos[0, 1:].reshape(old, old, -1)
    grid = jax.image.resize(jnp.asarray(grid), (new, new, grid.shape[-1]), method="bilinear")
    return np.concatenate([pos[:, :1], np.asarray(grid).reshape(1, new * new, -1)], axis=1)


def load_pretrained(path: str, params: dict) -> dict:
    """Loads a public ViT checkpoint into `params` (the model's freshly initialized "params" dict).

    Returns a new params dict with the same structure, shapes and dtypes as `params`. The head keeps its
    initial values when the file's class count differs or the file has no head; the position embedding is
    resized when the patch grid differs. Raises FileNotFoundError, or PretrainedMismatchError listing
    every missing, unexpected and mis-shaped key.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights {path!r} do not exist. {WHERE_TO_GET}")
    fmt, arrays, rule = _read(path)
    ours = traverse_util.flatten_dict(params, sep="/")
    used: set[str] = set()
    loaded, missing, mismatched = {}, [], []
    head_reinit = None
    for key, init in ours.items():
        sources, fn = rule(key)
        if not all(s in arrays for s in sources):
            if key.startswith("head/"):
                head_reinit = "the file has no classification head"
            else:
                missing.append(f"{key} (from {', '.join(sources)})")
            continue
        used.update(sources)
        value = np.asarray(fn(*(arrays[s] for s in sources), init.shape))
        if key == _POS and value.shape[1] != init.shape[1] and value.shape[2:] == init.shape[2:]:
            try:
                value = resize_pos_embedding(value, init.shape[1])
            except ValueError as e:
                mismatched.append(f"{key}: {e} (a checkpoint without a class-token entry?)")
                continue
            logging.info("%s: resized the position embedding to %d tokens", path, init.shape[1])
        if key.startswith("head/") and value.shape != init.shape:
            head_reinit = f"the file's head has shape {value.shape}, the model's {init.shape}"
            continue
        if value.shape != init.shape:
            mismatched.append(f"{key}: file {value.shape} (from {', '.join(sources)}), model {init.shape}")
            continue
        loaded[key] = jnp.asarray(value, dtype=init.dtype)

    pre_logits = {k for k in arrays if k.startswith(("pre_logits/", "pre_logits."))}
    unexpected = sorted(set(arrays) - used - pre_logits)
    if pre_logits and head_reinit is None:
        mismatched.append(
            f"the file has a pre_logits layer ({', '.join(sorted(pre_logits))}) that this ViT lacks, and its "
            "head was trained on top of it: use the checkpoint with a new head (a different class count)"
        )
    if missing or unexpected or mismatched:
        lines = [
            f"{path} ({fmt} format) does not fit the model: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(mismatched)} mismatched"
        ]
        lines += [f"  missing: {k}" for k in missing]
        lines += [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  mismatched: {k}" for k in mismatched]
        raise PretrainedMismatchError("\n".join(lines))
    if head_reinit is not None:
        logging.info("%s: the head is re-initialized (%s)", path, head_reinit)
        loaded.update({k: v for k, v in ours.items() if k.startswith("head/")})
    logging.info("%s: loaded %d arrays (%s format)", path, len(used), fmt)
    return traverse_util.unflatten_dict(loaded, sep="/")
