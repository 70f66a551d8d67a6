"""Checks a stage config before any work starts, with one-line errors that name the field.

The configs themselves live in `configs/` (plain ml_collections, no JAX); this module holds the rules
that a config must satisfy, whoever built it (launch.py, a notebook, a test).
"""

from __future__ import annotations

import math
import os

from vitshap_jax.errors import UserError

# The training stages, in the order the pipeline runs them, and the commands that read a finished run.
STAGES = ("classifier", "surrogate", "explainer")
COMMANDS = ("explain", "evaluate", "roar")
MASKING_STRATEGIES = ("attention", "zero")  # how a ViT holds patches out (vitshap_jax/models/vit.py)
# The model families (`config.model.architecture`) and how each holds a patch out (`config.model.masking`;
# "auto" is the first, resolved when the stage starts). A ResNet masks its input (models/resnet.py).
ARCHITECTURES = ("vit", "resnet")
MASKINGS = {"vit": MASKING_STRATEGIES, "resnet": ("input", "zero")}
RESNET_STEMS = ("auto", "imagenet", "cifar")  # auto: cifar below 64 px, else imagenet
RESNET_NORMS = ("group", "affine")  # affine: a BatchNorm with frozen statistics (imported timm weights)
EXPLAINER_ARCHITECTURES = ("vit", "unet")  # see vitshap_jax/models/explainer_head.py and unet.py
# Public ViT shapes (Dosovitskiy et al. 2021; Touvron et al. 2021 for tiny/small), plus two small shapes for
# CPU runs and tests; the patch size comes from the dataset preset.
VIT_VARIANTS = {
    "tiny": dict(hidden_size=192, depth=12, num_heads=3, mlp_dim=768),
    "small": dict(hidden_size=384, depth=12, num_heads=6, mlp_dim=1536),
    "base": dict(hidden_size=768, depth=12, num_heads=12, mlp_dim=3072),
    "large": dict(hidden_size=1024, depth=24, num_heads=16, mlp_dim=4096),
    "mini": dict(hidden_size=128, depth=6, num_heads=4, mlp_dim=512),
    "micro": dict(hidden_size=64, depth=4, num_heads=4, mlp_dim=256),
}
# ResNets (He et al. 2016): `depth` picks the blocks, `hidden_size` is the stem's width (stages 1x-8x it).
RESNET_VARIANTS = {f"resnet{d}": dict(depth=d, hidden_size=64, num_heads=0, mlp_dim=0) for d in (18, 34, 50)}


def apply_variant(config, name: str, *, masking: str = "auto") -> None:
    """Makes `config.model` the model variant `name` (its architecture and shape) with `masking`."""
    config.model.variant = name
    for key, value in variant_fields(name).items():
        config.model[key] = value
    config.model.masking = masking


def variant_fields(name: str) -> dict:
    """The `config.model` fields a model variant fixes: its architecture and shape."""
    if name in VIT_VARIANTS:
        return {"architecture": "vit", **VIT_VARIANTS[name]}
    if name in RESNET_VARIANTS:
        return {"architecture": "resnet", **RESNET_VARIANTS[name]}
    raise ValueError(f"unknown model {name!r}; known models: {', '.join([*VIT_VARIANTS, *RESNET_VARIANTS])}")


def default_masking(architecture: str) -> str:
    """How a model of `architecture` holds patches out unless told otherwise."""
    return MASKINGS[architecture][0]


DATASETS = ("digits", "imagenette", "pet", "mura", "cifar10", "cifar100", "folder")
TARGETS = ("multiclass", "binary")
DTYPES = ("auto", "float32", "bfloat16")
MATMUL_PRECISIONS = ("auto", "float32", "bfloat16")  # a ViT's dense-layer operands (models: dot_dtype)
ATTENTION_IMPLS = ("matmul", "xla", "cudnn")  # a ViT's attention core (models/vit.py); config: "auto" too
ACTIVATIONS = ("gelu", "relu")
PRETRAINED_SUFFIXES = (".npz", ".safetensors")  # or a Hugging Face save_pretrained directory
BAD_IMAGE_POLICIES = ("fail", "skip")  # what preparing a dataset does with an unreadable image
# Pixel statistics (mean, std per channel on [0, 1] pixels) by the name `config.dataset.normalization`
# uses; "auto" takes what the pretrained checkpoint states (vitshap_jax/data/transforms.py).
NORMALIZATION_STATS = {
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # google-research ViT / AugReg, timm augreg: [-1, 1]
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # DeiT, DINOv2, torchvision-style weights
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),  # OpenAI CLIP
}
NORMALIZATIONS = ("auto", *NORMALIZATION_STATS)
POOLING = ("token", "avg")  # see vitshap_jax/models/vit.py
MLP_ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")
SPLITS = ("train", "validation", "test")
# What configs/evaluate.py can compare (vitshap_jax/evaluation/methods.py, evaluation/baselines.py).
EVALUATION_METHODS = (
    "explainer",
    "kernelshap",
    "permutation",
    "leave_one_out",
    "rise",
    "integrated_gradients",
    "vanilla_gradient",
    "smoothgrad",
    "vargrad",
    "gradcam",
    "transformer_attribution",
    "generic_attention",
    "attention_rollout",
    "attention_last",
    "random",
)
INTERACTION_INDICES = ("k-SII", "FSII")  # see vitshap_jax/shapley/interactions.py
FSII_MAX_PLAYERS = 64  # FSII solves a dense system of n + n(n-1)/2 + 1 unknowns
EXPORTS = ("", "shapiq")  # extra file formats of the explain command
GROUND_TRUTH = ("auto", "exact", "kernelshap", "permutation")
KERNELSHAP_ESTIMATORS = ("standard", "unbiased")  # see vitshap_jax/shapley/kernelshap.py
EXPLAINER_SIGNALS = ("wls", "kernelshap", "permutation", "precomputed")  # see vitshap_jax/stages/explainer.py
EXPLAINER_SAMPLERS = ("shapley", "reference_compat")  # see vitshap_jax/shapley/sampling.py


class ConfigError(UserError, ValueError):
    """A config field has a value the run cannot use; the message names the field."""


def num_outputs(config) -> int:
    """Logits the model produces: one for a binary target (sigmoid link), else one per class."""
    return 1 if config.dataset.target == "binary" else config.dataset.num_classes


def _require(ok: bool, key: str, value, why: str):
    if not ok:
        raise ConfigError(f"config.{key}={value!r}: {why}")


def _one_of(config, key: str, allowed):
    value = _get(config, key)
    _require(value in allowed, key, value, f"must be one of {', '.join(map(str, allowed))}")


def _get(config, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def split_list(value: str) -> list[str]:
    """A comma-separated config string as a list (blanks dropped)."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def budgets(config, field: str = "kernelshap_budgets") -> list[int]:
    """`config.<field>` of an evaluate config (evaluations per image) as ints."""
    try:
        return [int(b) for b in split_list(config[field])]
    except ValueError:
        raise ConfigError(
            f"config.{field}={config[field]!r}: give comma-separated integers such as 64,256"
        ) from None


def fractions(config) -> list[float]:
    """`config.fractions` of a roar config as floats, each in (0, 1)."""
    try:
        values = [float(f) for f in split_list(config.fractions)]
    except ValueError:
        values = []
    _require(
        bool(values) and all(0 < f < 1 for f in values),
        "fractions",
        config.fractions,
        "give comma-separated shares of patches to remove, each between 0 and 1, such as 0.25,0.5",
    )
    return values


def _validate_methods(config) -> None:
    _one_of(config, "dataset", DATASETS)
    methods = split_list(config.methods)
    _require(bool(methods), "methods", config.methods, "name at least one method")
    unknown = [m for m in methods if m not in EVALUATION_METHODS]
    _require(
        not unknown, "methods", config.methods, f"unknown {unknown}; known: {', '.join(EVALUATION_METHODS)}"
    )
    for method in ("kernelshap", "permutation"):
        field = f"{method}_budgets"
        if method in methods and field in config:
            for b in budgets(config, field):
                _require(b >= 4, field, config[field], "each budget must be >= 4")
    if "kernelshap_estimator" in config:
        _one_of(config, "kernelshap_estimator", KERNELSHAP_ESTIMATORS)
    for key in ("batch_size", "ig_steps", "noise_samples", "rise_masks"):
        _require(config[key] >= 1, key, config[key], "must be positive")
    _require(config.noise >= 0, "noise", config.noise, "must be >= 0")


def _validate_evaluate(config) -> None:
    _validate_methods(config)
    _one_of(config, "split", SPLITS)
    _one_of(config, "explain_class", ("label", "predicted"))
    _one_of(config, "ground_truth", GROUND_TRUTH)
    for key in ("num_images", "top_k"):
        _require(config[key] >= 1, key, config[key], "must be positive")
    _require(config.num_heatmaps >= 0, "num_heatmaps", config.num_heatmaps, "must be >= 0")
    _require(
        config.ground_truth_threshold > 0,
        "ground_truth_threshold",
        config.ground_truth_threshold,
        "must be > 0",
    )


def _finite_numbers(node, prefix: str = "") -> None:
    """Every float field is a finite number and every seed non-negative (no field takes inf or NaN)."""
    for key in node.keys():
        value, name = node[key], f"{prefix}{key}"
        if hasattr(value, "keys"):
            _finite_numbers(value, f"{name}.")
        elif isinstance(value, float):
            _require(math.isfinite(value), name, value, "must be a finite number")
        elif key == "seed" and isinstance(value, int):
            _require(value >= 0, name, value, "must be >= 0")


def validate(config) -> None:
    """Raises ConfigError (one line, naming the field) if `config` cannot run."""
    _finite_numbers(config)
    if config.stage == "evaluate":
        _validate_evaluate(config)
        return
    if config.stage == "roar":
        _validate_methods(config)
        fractions(config)
        _require(config.epochs >= 1, "epochs", config.epochs, "must be positive")
        return
    if config.stage == "explain":
        _require(
            bool(config.images),
            "images",
            config.images,
            "name image files or folders: --config.images=a.jpg,b.png",
        )
        _one_of(config, "dataset", DATASETS)
        _require(config.batch_size >= 1, "batch_size", config.batch_size, "must be positive")
        _require(config.max_classes >= 1, "max_classes", config.max_classes, "must be positive")
        _one_of(config, "export", EXPORTS)
        _one_of(config, "interactions", ("", *INTERACTION_INDICES))
        p, b = config.interaction_players, config.interaction_budget
        _require(p >= 2, "interaction_players", p, "must be at least 2 (pairs of patches)")
        fsii_ok = config.interactions != "FSII" or p <= FSII_MAX_PLAYERS
        _require(fsii_ok, "interaction_players", p, f"FSII takes at most {FSII_MAX_PLAYERS} players")
        _require(b >= 4, "interaction_budget", b, "must be at least 4 coalitions")
        return
    if config.stage == "compare":
        for key in ("classifiers", "surrogates"):
            names = split_list(config[key])
            known = [*VIT_VARIANTS, *RESNET_VARIANTS]
            _require(bool(names), key, config[key], "name at least one model variant")
            unknown = [v for v in names if v not in known]
            _require(not unknown, key, config[key], f"unknown {unknown}; known: {', '.join(known)}")
        _require(config.num_images >= 1, "num_images", config.num_images, "must be positive")
    if config.stage in ("pipeline", "compare"):
        for stage in STAGES:
            try:
                validate(config[stage])
            except ConfigError as e:
                raise ConfigError(str(e).replace("config.", f"config.{stage}.", 1)) from None
        return
    _one_of(config, "stage", STAGES)
    d, m, o, t = config.dataset, config.model, config.optim, config.train

    _one_of(config, "dataset.name", DATASETS)
    if d.name == "folder":  # class count and target may come from the data (stages/common.resolve)
        _one_of(config, "dataset.target", TARGETS + ("auto",))
        _require(
            bool(d.manual_dir),
            "dataset.manual_dir",
            d.manual_dir,
            "give the folder of your images (or a CSV manifest): --config.dataset.manual_dir=DIR",
        )
    else:
        _one_of(config, "dataset.target", TARGETS)
    if d.target == "binary":
        _require(
            d.num_classes in (0, 2), "dataset.num_classes", d.num_classes, "a binary target has 2 classes"
        )
    elif d.name != "folder" or d.num_classes != 0:
        _require(d.num_classes >= 2, "dataset.num_classes", d.num_classes, "needs at least 2 classes")
    _one_of(config, "dataset.on_bad_image", BAD_IMAGE_POLICIES)
    _one_of(config, "dataset.normalization", NORMALIZATIONS)
    _require(
        d.resize_size >= d.image_size,
        "dataset.resize_size",
        d.resize_size,
        f"must be >= config.dataset.image_size={d.image_size} (resize, then center crop)",
    )
    _require(0 < d.crop_scale_min <= 1, "dataset.crop_scale_min", d.crop_scale_min, "must be in (0, 1]")
    examples = d.get("train_examples", 0)
    _require(examples >= 0, "dataset.train_examples", examples, "must be >= 0 (0: the whole training split)")
    for key in ("workers", "read_threads", "prefetch"):
        _require(d[key] >= 0, f"dataset.{key}", d[key], "must be >= 0")
    _require(m.patch_size >= 1, "model.patch_size", m.patch_size, "must be positive")
    _require(
        d.image_size >= m.patch_size and d.image_size % m.patch_size == 0,
        "dataset.image_size",
        d.image_size,
        f"must be a positive multiple of config.model.patch_size={m.patch_size}",
    )

    architecture = m.get("architecture", "vit")
    if "architecture" in m:
        _one_of(config, "model.architecture", ARCHITECTURES)
    if m.get("variant"):
        _one_of(config, "model.variant", [*VIT_VARIANTS, *RESNET_VARIANTS])
        _require(
            variant_fields(m.variant)["architecture"] == architecture,
            "model.variant",
            m.variant,
            f"is not a {architecture} (config.model.architecture): choose the model with the config "
            f"argument, e.g. configs/{config.stage}.py:{config.dataset.name},model={m.variant}",
        )
    if architecture == "resnet":
        _require(m.depth in (18, 34, 50), "model.depth", m.depth, "a ResNet has depth 18, 34 or 50")
        _require(m.hidden_size >= 1, "model.hidden_size", m.hidden_size, "must be positive (the stem width)")
        _one_of(config, "model.stem", RESNET_STEMS)
        _one_of(config, "model.norm", RESNET_NORMS)
    else:
        for key in ("hidden_size", "depth", "num_heads", "mlp_dim"):
            _require(m[key] >= 1, f"model.{key}", m[key], "must be positive")
        _require(
            m.hidden_size % m.num_heads == 0,
            "model.num_heads",
            m.num_heads,
            f"must divide config.model.hidden_size={m.hidden_size}",
        )
    _require(0.0 <= m.dropout_rate < 1.0, "model.dropout_rate", m.dropout_rate, "must be in [0, 1)")
    # A stage that takes its upstream's architecture (variant "") learns it only when it starts.
    inheriting = config.stage in ("surrogate", "explainer") and not m.get("variant")
    maskings = {k for ms in MASKINGS.values() for k in ms} if inheriting else MASKINGS[architecture]
    _one_of(config, "model.masking", ("auto", *sorted(maskings, key=lambda k: (k != "attention", k))))
    _one_of(config, "model.dtype", DTYPES)
    if "attention_impl" in m:
        _one_of(config, "model.attention_impl", ("auto", *ATTENTION_IMPLS))
        _require(
            m.attention_impl != "cudnn" or m.dtype != "float32",
            "model.attention_impl",
            m.attention_impl,
            "cuDNN's fused attention takes bfloat16 or float16 inputs: use it with "
            "config.model.dtype=bfloat16 (or auto, bfloat16 on a GPU)",
        )
        if m.attention_impl == "cudnn":
            import jax

            _require(
                jax.default_backend() in ("gpu", "cuda"),
                "model.attention_impl",
                m.attention_impl,
                "cuDNN's fused attention runs on an NVIDIA GPU, and this backend is "
                f"{jax.default_backend()}: use auto (or matmul, xla) here",
            )
    if "matmul_precision" in m:
        _one_of(config, "model.matmul_precision", MATMUL_PRECISIONS)
        _require(
            architecture != "resnet" or m.matmul_precision != "bfloat16",
            "model.matmul_precision",
            m.matmul_precision,
            "applies to ViTs; a ResNet runs its convolutions in config.model.dtype",
        )
    if m.pretrained is not None:
        m.pretrained = os.path.expanduser(m.pretrained)
        _require(
            os.path.isdir(m.pretrained) or m.pretrained.endswith(PRETRAINED_SUFFIXES),
            "model.pretrained",
            m.pretrained,
            "expected a .npz (big_vision / vision_transformer) or .safetensors (timm) file, or a Hugging "
            "Face save_pretrained directory",
        )
        _require(os.path.exists(m.pretrained), "model.pretrained", m.pretrained, "no such file or directory")
    if "pool" in m:
        _one_of(config, "model.pool", POOLING)
        _one_of(config, "model.act", MLP_ACTIVATIONS)
        _require(m.reg_tokens >= 0, "model.reg_tokens", m.reg_tokens, "must be >= 0")
        _require(m.ln_eps > 0, "model.ln_eps", m.ln_eps, "must be > 0")
        _require(
            m.class_token or m.pool == "avg" or m.pretrained,
            "model.pool",
            m.pool,
            "a ViT without a class token (config.model.class_token=False) needs pool=avg",
        )

    _require(o.lr > 0, "optim.lr", o.lr, "must be positive")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    _require(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")
    ema = o.get("ema_decay", 0.0)
    _require(0 <= ema < 1, "optim.ema_decay", ema, "must be in [0, 1) (0: no moving average)")

    for key in ("epochs", "batch_size", "log_every_steps", "checkpoint_every_steps", "eval_every_epochs"):
        if key in t:  # eval_every_epochs: absent from the configs of older runs
            _require(t[key] >= 1, f"train.{key}", t[key], "must be positive")

    if config.stage == "explainer":
        e = config.explainer
        _require(e.num_coalitions >= 1, "explainer.num_coalitions", e.num_coalitions, "must be positive")
        if e.paired:
            _require(
                e.num_coalitions % 2 == 0,
                "explainer.num_coalitions",
                e.num_coalitions,
                "must be even with config.explainer.paired=True (each coalition comes with its complement)",
            )
        _one_of(config, "explainer.signal", EXPLAINER_SIGNALS)
        _one_of(config, "explainer.sampler", EXPLAINER_SAMPLERS)
        _require(
            e.sampler == "shapley" or e.signal == "wls",
            "explainer.sampler",
            e.sampler,
            f"applies to signal=wls only (signal={e.signal} needs the exact Shapley kernel)",
        )
        if e.signal == "precomputed":
            _require(
                e.target_evals >= 4,
                "explainer.target_evals",
                e.target_evals,
                "must be at least 4 (KernelSHAP's v(empty), v(all) and one pair)",
            )
        views = e.get("target_views", 1)
        _require(views >= 1, "explainer.target_views", views, "must be at least 1")
        _require(
            views == 1 or e.signal == "precomputed",
            "explainer.target_views",
            views,
            f"applies to signal=precomputed only (signal={e.signal} augments every epoch)",
        )
        teachers = e.get("teachers", "")
        _require(
            not teachers or e.signal == "precomputed",
            "explainer.teachers",
            teachers,
            f"labels the views of signal=precomputed (signal={e.signal}): set explainer.signal=precomputed",
        )
        extra = e.get("extra_images", "")
        if extra:
            e.extra_images = os.path.expanduser(extra)
            _require(
                os.path.isdir(e.extra_images),
                "explainer.extra_images",
                extra,
                "no such folder: give a folder of image files (searched recursively)",
            )
        mix = e.get("view_mix", 0.0)
        _require(0.0 <= mix < 1.0, "explainer.view_mix", mix, "must be in [0, 1)")
        _require(
            mix == 0.0 or views > 1,
            "explainer.view_mix",
            mix,
            "blends the extra views of target_views > 1: set explainer.target_views too",
        )
        if e.signal == "permutation" and not m.pretrained:  # a checkpoint may set another patch size
            n = (d.image_size // m.patch_size) ** 2
            _require(
                e.num_coalitions >= 2 * (n - 1),
                "explainer.num_coalitions",
                e.num_coalitions,
                f"signal=permutation needs at least {2 * (n - 1)} (two orders of {n} players, one reversed)",
            )
        _require(e.head_blocks >= 0, "explainer.head_blocks", e.head_blocks, "must be >= 0")
        _require(e.mlp_layers >= 1, "explainer.mlp_layers", e.mlp_layers, "must be positive")
        _require(e.mlp_ratio >= 1, "explainer.mlp_ratio", e.mlp_ratio, "must be positive")
        _one_of(config, "explainer.activation", ACTIVATIONS)
        if "architecture" in e:
            _one_of(config, "explainer.architecture", EXPLAINER_ARCHITECTURES)
            _require(
                e.architecture != "vit" or architecture == "vit",
                "explainer.architecture",
                e.architecture,
                "a ViT explainer needs a ViT backbone (config.model is a ResNet): use "
                "explainer.architecture=unet, or a ViT with the config argument model=<variant>",
            )
            _require(
                not e.freeze_backbone or e.architecture == "vit",
                "explainer.freeze_backbone",
                e.freeze_backbone,
                "a UNet explainer has no backbone to freeze",
            )
            _require(e.unet_width >= 1, "explainer.unet_width", e.unet_width, "must be positive")
            _require(e.unet_levels >= 0, "explainer.unet_levels", e.unet_levels, "must be >= 0")
