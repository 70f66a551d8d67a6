"""Stage configs: every stage x dataset loads and validates; options, presets and errors."""

import os

import pytest

from configs import common
from tests.helpers import load
from vitshap_jax.config import STAGES, ConfigError, num_outputs, validate


@pytest.mark.parametrize("dataset", sorted(common.DATASET_PRESETS))
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_and_dataset_loads_and_validates(stage, dataset):
    c = load(stage, dataset)
    if dataset == "folder":
        with pytest.raises(ConfigError, match="config.dataset.manual_dir=None: give the folder"):
            validate(c)
        c.dataset.manual_dir = "/images"
    validate(c)
    preset = common.DATASET_PRESETS[dataset]
    assert c.stage == stage and c.dataset.name == dataset
    assert (c.dataset.num_classes, c.dataset.target, c.dataset.image_size, c.model.patch_size) == (
        preset["num_classes"],
        preset["target"],
        preset["image_size"],
        preset["patch_size"],
    )
    assert c.model.hidden_size == common.MODEL_VARIANTS[preset["model"]]["hidden_size"]
    with pytest.raises(AttributeError):  # locked: a misspelled field cannot be created
        c.optim.learning_rate = 1.0


def test_default_dataset_is_digits():
    assert load("classifier").dataset.name == "digits"


def test_mura_is_binary_with_one_logit():
    c = load("explainer", "mura")
    assert c.dataset.target == "binary" and num_outputs(c) == 1
    assert num_outputs(load("classifier", "pet")) == 37


@pytest.mark.parametrize("variant", ["tiny", "small", "base", "large"])
def test_model_option_picks_the_variant(variant):
    c = load("classifier", f"imagenette,model={variant}")
    assert c.model.variant == variant
    assert {k: c.model[k] for k in common.MODEL_VARIANTS[variant]} == common.MODEL_VARIANTS[variant]


def test_stage_specific_options_and_defaults():
    assert load("surrogate", "pet,masking=zero").model.masking == "zero"
    e = load("explainer", "imagenette")
    assert (e.explainer.num_coalitions, e.explainer.paired, e.optim.lr) == (32, True, 1e-4)
    assert e.upstream is None
    with pytest.raises(ValueError, match="unknown option 'masking'"):
        load("classifier", "pet,masking=zero")


def test_parse_arg_rules():
    p = common.parse_arg("mura,flag,n=3", dataset="", flag=False, n=1, x=0.5)
    assert (p.dataset, p.flag, p.n, p.x) == ("mura", True, 3, 0.5)
    assert common.parse_arg("", dataset="digits").dataset == "digits"
    with pytest.raises(ValueError, match="unknown option 'nope'.*known options: dataset, n"):
        common.parse_arg("mura,nope=1", dataset="", n=1)
    with pytest.raises(ValueError, match="option n='x': expected int"):
        common.parse_arg("mura,n=x", dataset="", n=1)
    with pytest.raises(ValueError, match="option 'n' needs a value"):
        common.parse_arg("mura,n", dataset="", n=1)
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        load("classifier", "cifar")
    with pytest.raises(ValueError, match="unknown model 'huge'"):
        load("classifier", "pet,model=huge")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model.num_heads", 5, r"config.model.num_heads=5: must divide config.model.hidden_size=768"),
        (
            "model.masking",
            "pixel",
            r"config.model.masking='pixel': must be one of auto, attention, input, zero",
        ),
        ("dataset.num_classes", 3, r"config.dataset.num_classes=3: a binary target has 2 classes"),
        ("dataset.image_size", 200, r"config.dataset.image_size=200: must be a positive multiple"),
        ("optim.lr", 0.0, r"config.optim.lr=0.0: must be positive"),
        ("optim.ema_decay", 1.0, r"config.optim.ema_decay=1.0: must be in \[0, 1\)"),
        ("train.batch_size", 0, r"config.train.batch_size=0: must be positive"),
        ("explainer.num_coalitions", 31, r"config.explainer.num_coalitions=31: must be even"),
        (
            "model.pretrained",
            "/nonexistent/vit.npz",
            r"config.model.pretrained='/nonexistent/vit.npz': no such file",
        ),
        ("model.pretrained", "/tmp/vit.pth", r"expected a .npz .* or .safetensors"),
        ("model.dtype", "float16", r"config.model.dtype='float16': must be one of auto, float32, bfloat16"),
        (
            "model.matmul_precision",
            "tf32",
            r"config.model.matmul_precision='tf32': must be one of auto, float32, bfloat16",
        ),
        (
            "model.attention_impl",
            "flash",
            r"config.model.attention_impl='flash': must be one of auto, matmul, xla, cudnn",
        ),
        (
            "model.attention_impl",
            "cudnn",
            r"config.model.attention_impl='cudnn': .*NVIDIA GPU, and this backend is cpu",
        ),
        (
            "explainer.extra_images",
            "/nonexistent/images",
            r"extra_images='/nonexistent/images': no such folder",
        ),
        ("optim.lr", float("inf"), r"config.optim.lr=inf: must be a finite number"),
        ("optim.weight_decay", float("nan"), r"config.optim.weight_decay=nan: must be a finite number"),
        ("model.ln_eps", float("inf"), r"config.model.ln_eps=inf: must be a finite number"),
        (".seed", -1, r"config.seed=-1: must be >= 0"),
    ],
)
def test_validate_names_the_field(field, value, message):
    c = load("explainer", "mura")
    group, key = field.split(".")
    (c[group] if group else c)[key] = value
    with pytest.raises(ConfigError, match=message):
        validate(c)


@pytest.mark.parametrize("dataset", sorted(common.DATASET_PRESETS))
def test_pipeline_config_holds_the_three_stages(dataset):
    c = load("pipeline", f"{dataset},masking=zero")
    c.dataset.manual_dir = "/images"  # folder needs it
    validate(c)
    assert c.stage == "pipeline"
    assert [c[s].stage for s in STAGES] == list(STAGES)
    assert c.surrogate.model.masking == "zero" and c.classifier.dataset.name == dataset
    # One dataset group and one architecture for the three stages: set once, seen by every stage.
    c.dataset.image_size, c.dataset.resize_size, c.model.patch_size = 48, 64, 8
    assert all((c[s].dataset.image_size, c[s].model.patch_size) == (48, 8) for s in STAGES)
    c.model.num_heads = 5
    assert c.explainer.model.num_heads == 5
    with pytest.raises(ConfigError, match=r"config.classifier.model.num_heads=5: must divide"):
        validate(c)
    c.model.num_heads = 4
    c.explainer.optim.lr = -1.0  # the rest stays per stage
    assert c.classifier.optim.lr > 0
    with pytest.raises(ConfigError, match=r"config.explainer.optim.lr=-1.0: must be positive"):
        validate(c)


def test_matmul_precision_reaches_every_matmul_of_the_vit_and_is_refused_for_a_resnet(monkeypatch):
    from vitshap_jax import models
    from vitshap_jax.models import build_explainer, build_model

    c = load("explainer", "digits")
    assert c.model.matmul_precision == "auto"  # the default: bfloat16 where the CPU has bfloat16 dots
    for fast in (True, False):
        monkeypatch.setattr(models, "cpu_has_bfloat16_dots", lambda fast=fast: fast)
        assert build_model(c).dot_dtype == ("bfloat16" if fast else None)
    c.model.matmul_precision = "float32"
    assert build_model(c).dot_dtype is None
    assert models.dot_dtype({"model": {"depth": 4}}) is None  # a run recorded before the field: float32
    c.model.matmul_precision = "bfloat16"
    validate(c)
    explainer = build_explainer(c)
    assert build_model(c).dot_dtype == "bfloat16"
    assert explainer.backbone.dot_dtype == explainer.explainer_head.dot_dtype == "bfloat16"
    r = load("classifier", "digits,model=resnet18")
    validate(r)  # "auto": float32 convolutions for a ResNet
    r.model.matmul_precision = "bfloat16"
    with pytest.raises(ConfigError, match=r"config.model.matmul_precision='bfloat16': applies to ViTs"):
        validate(r)


def test_attention_impl_reaches_every_attention_and_the_upstream_model(tmp_path, monkeypatch):
    """`model.attention_impl`: "auto" is the matmul core; a choice reaches the backbone, the explainer
    head and the upstream model a stage builds (whose recorded config stays as it was); cuDNN is refused
    with float32 compute and, for a new run, on this CPU, where a recorded run with it loads with the
    matmul core; a rerun may change it (FREE_FIELDS)."""
    from vitshap_jax import checkpoints as ckpt_lib
    from vitshap_jax import models, parallel
    from vitshap_jax.files import write_json
    from vitshap_jax.models import build_explainer, build_model
    from vitshap_jax.stages import common as stages

    c = load("explainer", "digits")
    assert c.model.attention_impl == "auto" and build_model(c).attention_impl == "matmul"
    assert models.attention_impl({"model": {"depth": 4}}) == "matmul"  # recorded before the field
    c.model.attention_impl = "xla"
    validate(c)
    explainer = build_explainer(c)
    assert explainer.backbone.attention_impl == explainer.explainer_head.attention_impl == "xla"
    c.model.update(dict(attention_impl="cudnn", dtype="float32"))
    with pytest.raises(ConfigError, match=r"attention_impl='cudnn': cuDNN's fused attention takes bfloat16"):
        validate(c)
    c.model.dtype = "auto"
    with pytest.raises(
        ConfigError, match=r"attention_impl='cudnn': cuDNN's fused attention runs on an NVIDIA"
    ):
        validate(c)  # a new run asks for it on this CPU
    assert build_model(c).attention_impl == "matmul"  # a recorded run trained with it loads here
    assert "model.attention_impl" in stages.FREE_FIELDS
    # The upstream model of a stage computes with this stage's core; its record is unchanged.
    up = load("surrogate", "digits")
    up.model.attention_impl = "matmul"
    os.makedirs(tmp_path / "surrogate")
    write_json(str(tmp_path / "surrogate" / ckpt_lib.CONFIG_FILE), up.to_dict())
    monkeypatch.setattr(ckpt_lib, "load_best_params", lambda path, target: target)  # no checkpoint needed
    c.model.update(dict(attention_impl="xla", dtype="auto"))
    _, recorded, model = stages.upstream_params(c, str(tmp_path), "surrogate", parallel.make_mesh())
    assert model.attention_impl == "xla" and recorded["model"]["attention_impl"] == "matmul"
