"""A finished run: the explainer, the surrogate it was trained against and the classifier behind them.

    import vitshap_jax
    run = vitshap_jax.load_explainer("runs/digits")   # the workdir of a finished pipeline
    x = run.preprocess(vitshap_jax.read_image("cat.jpg"))   # [S, S, 3] float32, as in evaluation
    out = run(x[None])     # {"phi": [B, n, C], "v_all": [B, C], "v_empty": [B, C]}

`phi` satisfies efficiency: `phi.sum(1) == v_all - v_empty` (up to float error). For a binary target C = 1
(the positive class).

`TrainedRun` owns everything about reading a run back: where its stages are (`{workdir}/explainer`, the
surrogate it names as upstream, the classifier behind that), their configs and best checkpoints, the
checks that they fit together and fit what the caller expects (`dataset=`), and parameter placement. It
is immutable: `placed(sharding)` returns a copy with the parameters moved. The commands (explain,
evaluate, roar), the benchmarks and notebooks all read runs through it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import config_dict

from vitshap_jax import checkpoints as ckpt_lib
from vitshap_jax import data
from vitshap_jax.config import DTYPES, num_outputs
from vitshap_jax.data import transforms
from vitshap_jax.errors import StageError
from vitshap_jax.files import absolute
from vitshap_jax.models import abstract_params, build_explainer, build_model, num_patches
from vitshap_jax.shapley.game import grand_and_null, surrogate_game
from vitshap_jax.shapley.normalize import additive_efficient_normalization


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A trained explainer and its surrogate, ready to explain images; the classifier on demand.

    Calling it maps preprocessed images `[B, S, S, 3]` to {"phi", "v_all", "v_empty"} (jitted, with the
    parameters as arguments, so `placed` copies reuse the compilation).
    """

    config: config_dict.ConfigDict  # the explainer stage's config
    class_names: list[str]  # of the explained outputs (a binary target: the positive class only)
    explainer: Any  # models.Explainer (a ViT backbone + head) or models.unet.UNetExplainer
    surrogate: Any  # the surrogate (a ViT or ResNet, with the surrogate run's masking strategy)
    params: dict  # {"explainer": ..., "surrogate": ...}, the best checkpoints
    explainer_dir: str
    surrogate_dir: str
    surrogate_config: dict  # the surrogate run's config (its architecture may differ from the explainer's)
    fn: Callable  # jitted (params, images) -> {"phi", "v_all", "v_empty"}
    dtype: str | None = None  # the compute dtype override of `load`, for the classifier too

    @classmethod
    def load(
        cls, workdir: str, *, dtype: str | None = None, dataset: str | None = None, command: str = "explain"
    ) -> TrainedRun:
        """The best explainer of a run (`{workdir}/explainer`, or that folder itself) and its surrogate.

        `dtype` overrides the compute dtype the run was trained with ("float32", "bfloat16" or "auto");
        parameters and outputs stay float32. `dataset` (a command's `config.dataset`) must be the one the
        run was trained on; the error names `configs/{command}.py` with the right one."""
        explainer_dir = _explainer_dir(workdir)
        config = config_dict.ConfigDict(ckpt_lib.read_config(explainer_dir))
        if dataset is not None and config.dataset.name != dataset:
            raise StageError(
                f"the run in {workdir} was trained on {config.dataset.name}, not {dataset}: "
                f"use configs/{command}.py:{config.dataset.name}"
            )
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
        surrogate_dir = _upstream_dir(explainer_dir, config.to_dict(), "surrogate")
        surrogate_config = ckpt_lib.read_config(surrogate_dir)
        if dtype is not None:
            surrogate_config["model"]["dtype"] = dtype
        if surrogate_config.get("stage") not in ("surrogate", "classifier"):  # a masked classifier serves
            stage = surrogate_config.get("stage")
            raise StageError(f"{surrogate_dir} holds a {stage} run, not a surrogate run")
        surrogate = build_model(surrogate_config)  # its own architecture and masking
        explainer = build_explainer(config)
        size = config.dataset.image_size
        params = {
            "explainer": ckpt_lib.load_best_params(explainer_dir, abstract_params(explainer, size)),
            "surrogate": ckpt_lib.load_best_params(surrogate_dir, abstract_params(surrogate, size)),
        }
        target = config.dataset.target

        @jax.jit
        def explain(params, images):
            grand, null = grand_and_null(surrogate, params["surrogate"], images, target)
            raw = explainer.apply({"params": params["explainer"]}, images)
            return {
                "phi": additive_efficient_normalization(raw, grand - null),
                "v_all": grand,
                "v_empty": null,
            }

        names = list(config.dataset.get("class_names") or data.class_names(config.dataset.name))
        if num_outputs(config) == 1:
            names = names[1:]  # a binary target explains the positive class
        parts = (explainer_dir, surrogate_dir, surrogate_config, explain, dtype)
        return cls(config, names, explainer, surrogate, params, *parts)

    def __call__(self, images) -> dict:
        return self.fn(self.params, jnp.asarray(images, jnp.float32))

    def placed(self, sharding) -> TrainedRun:
        """This run with its parameters placed with `sharding` (e.g. `parallel.replicated(mesh)`)."""
        return dataclasses.replace(self, params=jax.device_put(self.params, sharding))

    # -- what the run is --------------------------------------------------------------------------------
    @property
    def surrogate_params(self):
        return self.params["surrogate"]

    @property
    def target(self) -> str:
        return self.config.dataset.target

    @property
    def num_outputs(self) -> int:
        return num_outputs(self.config)

    @property
    def image_size(self) -> int:
        return self.config.dataset.image_size

    @property
    def patch_size(self) -> int:
        return self.config.model.patch_size

    @property
    def num_players(self) -> int:
        """Patches of an image: the players of the game."""
        return num_patches(self.image_size, self.patch_size)

    def game(self, *, model: str = "surrogate", masking: str | None = None, packed: bool = True):
        """The game `value_fn(images, masks) -> [B, M, C]` (`shapley.game.surrogate_game`) of the surrogate
        (with its own masking unless `masking` is given) or, with `model="classifier"`, of the
        classifier with `masking` (default: its architecture's first, attention for a ViT) and no
        fine-tuning."""
        if model == "surrogate":
            module = (
                self.surrogate if masking is None else build_model(self.surrogate_config, masking=masking)
            )
            return surrogate_game(module, self.surrogate_params, self.target, packed=packed)
        if model != "classifier":
            raise ValueError(f"model={model!r}: must be surrogate or classifier")
        module, params = self.classifier(masking=masking or "auto")
        return surrogate_game(module, params, self.target, packed=packed)

    # -- the classifier behind the surrogate ------------------------------------------------------------
    @property
    def classifier_dir(self) -> str:
        """The classifier the surrogate was distilled from (a masked classifier is its own)."""
        return _upstream_dir(self.surrogate_dir, ckpt_lib.read_config(self.surrogate_dir), "classifier")

    @property
    def classifier_config(self) -> dict:
        """The classifier run's config (with `load`'s dtype override)."""
        config = ckpt_lib.read_config(self.classifier_dir)
        if self.dtype is not None:
            config["model"]["dtype"] = self.dtype
        return config

    def classifier(self, sharding=None, *, masking: str = "auto") -> tuple[Any, dict]:
        """(model, best parameters) of the classifier, the parameters placed with `sharding` if given.
        The model is built from the classifier run's config (its architecture) with `masking` (auto: its
        architecture's first)."""
        model = build_model(self.classifier_config, masking=masking)
        target = abstract_params(model, self.image_size, sharding)
        return model, ckpt_lib.load_best_params(self.classifier_dir, target)

    # -- images as the models see them ------------------------------------------------------------------
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

    def examples(self, split: str, count: int | None = None, *, views: bool = True):
        """The first `count` images of a split of the run's dataset (all with None): (uint8 views
        `[N, S, S, 3]` (None with `views=False`), model inputs `[N, S, S, 3]`, labels `[N]`)."""
        source = data.open_split(self.config, split)
        count = len(source) if count is None else min(count, len(source))
        examples = [source[i] for i in range(count)]
        crops = np.stack([self.crop(np.asarray(e["image"])) for e in examples]) if views else None
        inputs = np.stack([self.preprocess(np.asarray(e["image"])) for e in examples])
        return crops, inputs, np.asarray([int(e["label"]) for e in examples], np.int32)


def load_explainer(workdir: str, *, dtype: str | None = None) -> TrainedRun:
    """`TrainedRun.load(workdir, dtype=dtype)`: the notebook entry point."""
    return TrainedRun.load(workdir, dtype=dtype)


def read_explainer_config(workdir: str) -> config_dict.ConfigDict:
    """The config of the explainer run in `workdir` (or that `explainer/` folder itself), without loading
    its parameters."""
    return config_dict.ConfigDict(ckpt_lib.read_config(_explainer_dir(workdir)))


def _explainer_dir(path: str) -> str:
    path = absolute(path)
    for candidate in (os.path.join(path, "explainer"), path):
        if os.path.exists(os.path.join(candidate, ckpt_lib.CONFIG_FILE)):
            if ckpt_lib.read_config(candidate).get("stage") == "explainer":
                return candidate
    raise StageError(
        f"no explainer run in {path}: give the workdir of a finished pipeline or its explainer/ folder"
    )


def _upstream_dir(stage_dir: str, config: dict, upstream_stage: str) -> str:
    """The upstream run a stage was trained from (its `upstream` field, else the sibling folder)."""
    path = config.get("upstream") or os.path.join(os.path.dirname(stage_dir), upstream_stage)
    if not os.path.exists(os.path.join(path, ckpt_lib.CONFIG_FILE)):
        raise StageError(f"the run in {stage_dir} was trained from {path}, which is missing")
    return path
