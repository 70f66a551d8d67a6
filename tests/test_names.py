"""Every name a config may hold is defined once, in vitshap_jax/config.py; the code keyed by those names
(builders, presets, activation functions, stage modules) covers exactly them."""

import importlib

from configs import common
from configs.roar import ROAR_EPOCHS
from vitshap_jax import config, data
from vitshap_jax.models import explainer_head, resnet, vit


def test_registries_cover_exactly_the_names_a_config_accepts():
    assert set(data.BUILDERS) == set(config.DATASETS)
    assert set(common.DATASET_PRESETS) == set(config.DATASETS)
    assert set(ROAR_EPOCHS) == set(config.DATASETS)  # configs/roar.py:cifar10 was a KeyError
    assert set(vit.ACTIVATIONS) == set(config.MLP_ACTIVATIONS)
    assert set(explainer_head.ACTIVATIONS) == set(config.ACTIVATIONS)
    assert config.NORMALIZATIONS == ("auto", *config.NORMALIZATION_STATS)
    assert data.SPLITS is config.SPLITS
    assert set(resnet.MASKINGS) == set(config.MASKINGS["resnet"])
    assert set(vit.MASKING_STRATEGIES) == set(config.MASKINGS["vit"])
    assert set(config.RESNET_VARIANTS) | set(common.MODEL_VARIANTS) == set(common.ALL_VARIANTS)
    assert {config.variant_fields(v)["architecture"] for v in common.ALL_VARIANTS} == set(
        config.ARCHITECTURES
    )


def test_every_stage_and_command_has_its_module_and_config():
    from vitshap_jax import stages

    for name in (*config.STAGES, *stages.JOBS):
        assert callable(importlib.import_module(f"vitshap_jax.stages.{name}").run)
        assert callable(importlib.import_module(f"configs.{name}").get_config)
    for name in config.COMMANDS:
        assert callable(importlib.import_module(f"vitshap_jax.commands.{name}").run)
        assert callable(importlib.import_module(f"configs.{name}").get_config)


def test_every_user_error_shares_one_base():
    from vitshap_jax.checkpoints import CheckpointError
    from vitshap_jax.config import ConfigError
    from vitshap_jax.data import BadImageError, DataNotFoundError
    from vitshap_jax.errors import StageError, UserError
    from vitshap_jax.models import PretrainedMismatchError
    from vitshap_jax.train.loop import NonFiniteLossError

    kinds = (
        CheckpointError,
        ConfigError,
        BadImageError,
        DataNotFoundError,
        StageError,
        PretrainedMismatchError,
        NonFiniteLossError,
    )
    assert all(issubclass(k, UserError) for k in kinds)
