"""Explain images with a trained run: one forward pass of the explainer per batch.

    from vitshap_jax.explain import load_explainer
    explain = load_explainer("runs/digits")  # the workdir of a finished pipeline
    x = explain.preprocess(uint8_image)      # [S, S, 3] float32, as in evaluation
    out = explain(x[None])     # {"phi": [B, n, C], "v_all": [B, C], "v_empty": [B, C]}

`phi` satisfies efficiency: `phi.sum(1) == v_all - v_empty` (up to float error). For a binary target C = 1
(the positive class).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from absl import logging
from ml_collections import config_dict

from vitshap_jax import checkpoints as ckpt_lib
from vitshap_jax import data, shapley
from vitshap_jax.config import DTYPES, num_outputs
from vitshap_jax.data import transforms
from vitshap_jax.models import build_model
from vitshap_jax.stages.common import StageError
from vitshap_jax.stages.explainer import build_explainer, grand_and_null


@dataclasses.dataclass
class LoadedExplainer:
    """A trained explainer and its surrogate, ready to explain images.

    Calling it maps preprocessed images `[B, S, S, 3]` to {"phi", "v_all", "v_empty"} (jitted, with the
    parameters as arguments: `params` may be moved, e.g. replicated over a mesh with `jax.device_put`).
    """

    config: config_dict.ConfigDict
    class_names: list[str]
    fn: Callable  # jitted (params, images) -> {"phi", "v_all", "v_empty"}
    params: dict  # {"explainer": ..., "surrogate": ...}, the best checkpoints
    surrogate: Any  # the surrogate ViT (flax module)
    explainer_dir: str
    surrogate_dir: str

    def __call__(self, images) -> dict:
        return self.fn(self.params, jnp.asarray(images, jnp.float32))

    @property
    def surrogate_params(self):
        return self.params["surrogate"]

    @property
    def image_size(self) -> int:
        return self.config.dataset.image_size

    @property
    def patch_size(self) -> int:
        return self.config.model.patch_size

    def crop(self, image: np.ndarray) -> np.ndarray:
        """uint8 `[H, W, 3]` -> the uint8 `[S, S, 3]` view the model sees (resize + center crop)."""
        d = self.config.dataset
        return transforms.eval_crop(image, size=d.image_size, resize_size=d.resize_size)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """uint8 `[H, W, 3]` (any size) -> float32 `[S, S, 3]`, exactly as in evaluation."""
        d = self.config.dataset
        return transforms.eval_transform(
            image, size=d.image_size, resize_size=d.resize_size, norm=transforms.normalization_of(self.config)
        )


def read_image(path: str) -> np.ndarray:
    """Any image file Pillow reads, in any mode -> uint8 RGB `[H, W, 3]`, decoded as the datasets decode
    (`data.base.to_rgb`: EXIF orientation applied, transparency over white, 16-bit and float images
    scaled to 0..255, never clipped)."""
    from vitshap_jax.data.base import to_rgb, upright

    with PIL.Image.open(path) as image:
        image.load()
        return np.asarray(to_rgb(upright(image, path)))


def _explainer_dir(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    for candidate in (os.path.join(path, "explainer"), path):
        if os.path.exists(os.path.join(candidate, ckpt_lib.CONFIG_FILE)):
            if ckpt_lib.read_config(candidate).get("stage") == "explainer":
                return candidate
    raise StageError(
        f"no explainer run in {path}: give the workdir of a finished pipeline or its explainer/ folder"
    )


def load_explainer(workdir: str, *, dtype: str | None = None) -> LoadedExplainer:
    """Loads the best explainer of a run (`{workdir}/explainer`, or that folder itself) and its surrogate.

    `dtype` overrides the compute dtype the run was trained with ("float32", "bfloat16" or "auto");
    parameters and outputs stay float32."""
    explainer_dir = _explainer_dir(workdir)
    config = config_dict.ConfigDict(ckpt_lib.read_config(explainer_dir))
    if not os.path.exists(os.path.join(explainer_dir, "results.json")):
        logging.warning(
            "the explainer in %s has not finished training: explaining with its best checkpoint so far "
            "(rerun its training command to finish it)",
            explainer_dir,
        )
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: must be one of {', '.join(DTYPES)}")
        config.model.dtype = dtype
    surrogate_dir = config.upstream or os.path.join(os.path.dirname(explainer_dir), "surrogate")
    if not os.path.exists(os.path.join(surrogate_dir, ckpt_lib.CONFIG_FILE)):
        raise StageError(
            f"the explainer in {explainer_dir} was trained against {surrogate_dir}, which is missing"
        )
    masking = ckpt_lib.read_config(surrogate_dir)["model"]["masking"]
    surrogate, explainer = build_model(config, masking=masking), build_explainer(config)
    sample = jnp.zeros((1, config.dataset.image_size, config.dataset.image_size, 3))
    e_params = ckpt_lib.load_best_params(
        explainer_dir, jax.eval_shape(lambda: explainer.init(jax.random.key(0), sample)["params"])
    )
    s_params = ckpt_lib.load_best_params(
        surrogate_dir, jax.eval_shape(lambda: surrogate.init(jax.random.key(0), sample)["params"])
    )
    target = config.dataset.target

    @jax.jit
    def explain(params, images):
        grand, null = grand_and_null(surrogate, params["surrogate"], images, target)
        phi = shapley.additive_efficient_normalization(
            explainer.apply({"params": params["explainer"]}, images), grand - null
        )
        return {"phi": phi, "v_all": grand, "v_empty": null}

    names = list(config.dataset.get("class_names") or data.class_names(config.dataset.name))
    if num_outputs(config) == 1:
        names = names[1:]  # a binary target explains the positive class
    return LoadedExplainer(
        config,
        names,
        explain,
        {"explainer": e_params, "surrogate": s_params},
        surrogate=surrogate,
        explainer_dir=explainer_dir,
        surrogate_dir=surrogate_dir,
    )
