"""Shared pieces of the stage configs: argument parsing, dataset presets, model variants.

A stage config is `configs/<stage>.py` with `get_config(arg)`, where `arg` is the text after the colon
in `--config=configs/<stage>.py:<arg>`: a dataset name, optionally followed by `,key=value` options,
e.g. `mura,model=small`. Everything else is overridden with flags (`--config.optim.lr=3e-5`).
This module imports no JAX, so configs load fast and anywhere.
"""

from __future__ import annotations

from ml_collections import config_dict

from vitshap_jax.config import RESNET_VARIANTS, VIT_VARIANTS, default_masking, variant_fields

# The model variants (a `model=` option): ViT shapes and ResNet depths, defined in vitshap_jax/config.py.
MODEL_VARIANTS = VIT_VARIANTS
ALL_VARIANTS = (*VIT_VARIANTS, *RESNET_VARIANTS)

_CIFAR_PRESET = dict(
    target="multiclass",
    image_size=32,
    patch_size=4,
    model="mini",
    resize_size=32,
    crop_scale_min=0.6,
    hflip=True,
)

# What the data fixes (classes, target type, image geometry, sensible augmentation) and a default model.
DATASET_PRESETS = {
    # scikit-learn's bundled 8x8 digits: 16 players of 2x2 pixels; runs anywhere, offline. A mild
    # random zoom (crop area >= 0.7), no flip: a mirrored digit is another digit or none.
    "digits": dict(
        num_classes=10,
        target="multiclass",
        image_size=8,
        patch_size=2,
        model="micro",
        resize_size=8,
        crop_scale_min=0.7,
        hflip=False,
    ),
    # fast.ai imagenette2 (10 ImageNet classes).
    "imagenette": dict(
        num_classes=10,
        target="multiclass",
        image_size=224,
        patch_size=16,
        model="base",
        resize_size=256,
        crop_scale_min=0.8,
        hflip=True,
    ),
    # Oxford-IIIT Pet (37 breeds).
    "pet": dict(
        num_classes=37,
        target="multiclass",
        image_size=224,
        patch_size=16,
        model="base",
        resize_size=256,
        crop_scale_min=0.8,
        hflip=True,
    ),
    # Stanford MURA musculoskeletal X-rays: abnormal vs normal, one logit with a sigmoid link.
    "mura": dict(
        num_classes=2,
        target="binary",
        image_size=224,
        patch_size=16,
        model="base",
        resize_size=256,
        crop_scale_min=0.8,
        hflip=True,
    ),
    # CIFAR-10 / CIFAR-100 from the official python tarballs: native 32 px with 4 px patches (64 players),
    # trained from scratch like digits. For a pretrained ViT at 224 px, set dataset.image_size and
    # dataset.resize_size to 224, model.pretrained, and a fine-tuning learning rate (docs/data.md).
    "cifar10": _CIFAR_PRESET | dict(num_classes=10),
    "cifar100": _CIFAR_PRESET | dict(num_classes=100),
    # Your own images (a folder per class, split folders, or a CSV manifest; vitshap_jax/data/folder.py),
    # with --config.dataset.manual_dir=DIR. The class count and names come from the data; two classes
    # get a sigmoid link ("auto" target); image and patch size are yours (a checkpoint fixes the patch).
    "folder": dict(
        num_classes=0,
        target="auto",
        image_size=224,
        patch_size=16,
        model="base",
        resize_size=256,
        crop_scale_min=0.8,
        hflip=True,
    ),
}


# Per-dataset training settings that differ from the reference's fine-tuning defaults (set in the
# stage configs). digits has no pretrained weights at 8x8 px, so each stage trains a small ViT from
# scratch: higher learning rates, regularization, more epochs; sized to run in minutes on a CPU.
_FROM_SCRATCH = {
    "classifier": dict(lr=1e-3, warmup_steps=200, weight_decay=0.05, dropout_rate=0.1, epochs=100),
    "surrogate": dict(lr=5e-4, warmup_steps=200, weight_decay=0.05, dropout_rate=0.1, epochs=60),
    "explainer": dict(lr=5e-4, warmup_steps=200, weight_decay=0.05, dropout_rate=0.0, epochs=30),
}
# CIFAR from scratch: the digits recipe with fewer epochs over 36x more images (not tuned yet).
_CIFAR = {
    stage: settings | dict(epochs=epochs)
    for (stage, settings), epochs in zip(_FROM_SCRATCH.items(), (40, 20, 10), strict=True)
}
TRAINING = {"digits": _FROM_SCRATCH, "cifar10": _CIFAR, "cifar100": _CIFAR}
_TRAINING_FIELDS = {
    "lr": "optim",
    "warmup_steps": "optim",
    "weight_decay": "optim",
    "dropout_rate": "model",
    "epochs": "train",
}


def parse_arg(arg: str | None, **spec) -> config_dict.ConfigDict:
    """Parses `"value,key=value,flag"` against `spec` (option name -> default, which fixes the type).

    A lone value in first position fills the first option; a bare word elsewhere sets a boolean
    option to True; an unknown option or a value of the wrong type is a ValueError.
    """
    result = dict(spec)
    names = list(spec)
    for i, item in enumerate((arg or "").split(",")):
        item = item.strip()
        if not item:
            continue
        if "=" in item:
            key, value = (s.strip() for s in item.split("=", 1))
        elif i == 0:
            key, value = names[0], item
        else:
            key, value = item, True
        if key not in spec:
            raise ValueError(
                f"unknown option {key!r} in config argument {arg!r}; known options: {', '.join(names)}"
            )
        result[key] = _convert(key, value, spec[key])
    return config_dict.ConfigDict(result)


def dataset_arg(arg: str | None) -> str:
    """The dataset named by the config argument of a command that reads a finished run."""
    dataset = parse_arg(arg, dataset="digits").dataset
    if dataset not in DATASET_PRESETS:
        raise ValueError(f"unknown dataset {dataset!r}; known datasets: {', '.join(DATASET_PRESETS)}")
    return dataset


def _convert(key, value, default):
    if isinstance(default, bool):
        if value is True or str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"option {key}={value!r}: expected a boolean (True/False)")
    if value is True:
        raise ValueError(f"option {key!r} needs a value: write {key}=...")
    try:
        return type(default)(value)
    except ValueError:
        raise ValueError(f"option {key}={value!r}: expected {type(default).__name__}") from None


def base_config(stage: str, opts: config_dict.ConfigDict, *, inherit: bool = False) -> config_dict.ConfigDict:
    """The fields every stage shares, filled from the dataset preset and the model variant.

    `opts` must hold `dataset` and `model` ("" = the preset's default model). With `inherit` (the
    surrogate and explainer stages), `model=""` leaves `config.model.variant` empty: the stage then takes
    its upstream run's architecture when it starts (`vitshap_jax/stages/common.resolve`).
    """
    if opts.dataset not in DATASET_PRESETS:
        raise ValueError(f"unknown dataset {opts.dataset!r}; known datasets: {', '.join(DATASET_PRESETS)}")
    preset = DATASET_PRESETS[opts.dataset]
    variant = opts.model or preset["model"]
    shape = variant_fields(variant)  # a ValueError naming the known models
    c = config_dict.ConfigDict()
    c.stage = stage  # which stage launch.py runs
    c.seed = 0  # seeds parameter init, data order and coalition sampling
    # A run in the stage directory with other settings or upstream: move it aside, start afresh.
    c.restart = False
    c.run_id = ""  # set by the run: identifies it (the next stage records it)
    c.upstream_run_id = ""  # set by the run: the run_id of the upstream run it was trained from

    c.dataset = config_dict.ConfigDict()
    c.dataset.name = opts.dataset  # a key of DATASET_PRESETS
    c.dataset.num_classes = preset["num_classes"]  # classes in the data (2 for binary; folder: 0 = from it)
    # "multiclass" (softmax, cross-entropy) or "binary" (sigmoid, BCE); folder: "auto" = binary for 2 classes
    c.dataset.target = preset["target"]
    c.dataset.image_size = preset["image_size"]  # side of the square model input, in pixels
    # Where prepared data is (None: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    c.dataset.data_dir = config_dict.placeholder(str)
    c.dataset.manual_dir = config_dict.placeholder(str)  # the user's download, to prepare from on first use
    c.dataset.on_bad_image = "fail"  # an unreadable image while preparing: "fail" (with its path) or "skip"
    c.dataset.split_fractions = "0.8,0.1,0.1"  # folder: train,validation,test shares of the splits not given
    c.dataset.class_names = []  # set by the run: the class names in label order (from the data)
    c.dataset.resize_size = preset["resize_size"]  # eval: shorter side resized to this, then center crop
    # Train: random-resized-crop area in [this, 1] (1: none).
    c.dataset.crop_scale_min = preset["crop_scale_min"]
    c.dataset.hflip = preset["hflip"]  # train: random horizontal flips
    c.dataset.train_examples = 0  # 0: the whole training split; N: its first N examples (learning curves)
    # Pixel normalization: "inception" ([-1, 1]), "imagenet", "clip", or "auto" (what the pretrained
    # checkpoint states, else inception); the run records the one it used.
    c.dataset.normalization = "auto"
    c.dataset.workers = 0  # grain worker processes for decoding and augmentation (0: threads only)
    c.dataset.read_threads = 4  # grain threads reading and transforming examples
    c.dataset.prefetch = 4  # batches grain prepares ahead

    c.model = config_dict.ConfigDict()
    # A key of MODEL_VARIANTS or RESNET_VARIANTS (informational once the shape is set); "" in a surrogate or
    # explainer config: the upstream run's architecture (the surrogate also starts from its weights).
    c.model.variant = "" if inherit and not opts.model else variant
    c.model.architecture = shape["architecture"]  # "vit" or "resnet" (set by the variant)
    c.model.patch_size = preset["patch_size"]  # side of a square patch (one player) in pixels
    c.model.hidden_size = shape["hidden_size"]  # token width D (ResNet: the stem's width)
    c.model.depth = shape["depth"]  # transformer blocks (ResNet: 18, 34 or 50)
    c.model.num_heads = shape["num_heads"]  # attention heads (must divide hidden_size; ResNet: 0)
    c.model.mlp_dim = shape["mlp_dim"]  # hidden width of each block's MLP (ResNet: 0)
    c.model.dropout_rate = 0.0  # dropout after attention and MLP while training
    # How held-out patches are removed: ViT "attention" or "zero"; ResNet "input" (a mask value outside
    # the data) or "zero"; "auto": the first of the architecture's.
    c.model.masking = default_masking(shape["architecture"])
    c.model.mask_value = -3.0  # ResNet input masking: the held-out pixels' value (normalized units)
    c.model.mask_channel = False  # ResNet: the patch mask as a 4th input channel
    c.model.stem = "auto"  # ResNet: "imagenet" (7x7/2 + max pool), "cifar" (3x3/1), auto: cifar below 64 px
    c.model.norm = "group"  # ResNet: "group" (GroupNorm) or "affine" (frozen BatchNorm; imported weights)
    c.model.dtype = "auto"  # compute dtype: "float32", "bfloat16", or "auto" (bfloat16 on GPU/TPU, else
    # float32); parameters, logits and losses stay float32
    # "bfloat16": a ViT's dense layers round their operands to bfloat16 and sum in float32 (TPU's default
    # precision), the rest in model.dtype: a 1.4-1.6x faster ViT on CPU, Shapley values within ~1e-5;
    # "auto": bfloat16 on a CPU with bfloat16 dot instructions, else float32 (docs/performance.md)
    c.model.matmul_precision = "auto"
    # The ViT's attention core: "matmul" (heads-leading batched products, the mask as a -1e30 bias, a
    # float32 softmax), "xla" or "cudnn" (jax.nn.dot_product_attention; cudnn: NVIDIA GPU, bfloat16).
    # The same masked model whichever; "auto": matmul (the fastest measured on CPU; docs/performance.md)
    c.model.attention_impl = "auto"
    # Recompute each block's activations in the backward pass (less memory, more compute; same results)
    c.model.remat = False
    # Pretrained weights: a .npz (big_vision / vision_transformer), a timm .safetensors, or a Hugging
    # Face save_pretrained directory. The architecture fields above and below are then read from it.
    c.model.pretrained = config_dict.placeholder(str)
    c.model.from_checkpoint = ""  # set by the run: the checkpoint the architecture was read from
    # What a checkpoint cannot tell, by hand: "num_heads=16,act=gelu_tanh" (a timm file without config.json)
    c.model.checkpoint_overrides = ""
    # Architecture options of the ViT families (vitshap_jax/models/vit.py); a checkpoint sets them.
    c.model.class_token = True  # a learned class token leads the sequence
    c.model.distill_token = False  # a DeiT distillation token follows it
    c.model.distill_head = False  # logits = mean of the class-token head and a distillation head
    c.model.reg_tokens = 0  # register tokens (DINOv2 with registers)
    c.model.pos_prefix = -1  # prefix tokens with a position embedding (-1: all)
    c.model.pool = "token"  # "token" (class token) or "avg" (mean of the visible patch tokens)
    c.model.fc_norm = False  # the final LayerNorm after pooling instead of on every token
    c.model.pre_norm = False  # a LayerNorm before the blocks (CLIP)
    c.model.layer_scale = False  # per-channel residual scales (DINOv2)
    c.model.act = "gelu"  # MLP activation: "gelu", "gelu_tanh" or "quick_gelu" (CLIP)
    c.model.ln_eps = 1e-6  # LayerNorm epsilon

    c.optim = config_dict.ConfigDict()
    c.optim.lr = 1e-5  # peak learning rate of AdamW (reference: 1e-5 classifier and surrogate)
    c.optim.weight_decay = 1e-5  # AdamW decoupled weight decay
    c.optim.warmup_steps = 500  # linear warmup before the cosine decay
    c.optim.grad_clip = 1.0  # global-norm gradient clipping (0 disables)
    # decay of an exponential moving average of the parameters, used for validation, the best checkpoint
    # and the test (0: none, the optimizer's own parameters)
    c.optim.ema_decay = 0.0

    c.train = config_dict.ConfigDict()
    c.train.epochs = 25  # passes over the training split
    c.train.batch_size = 64  # global batch, split over all devices (must divide evenly)
    c.train.log_every_steps = 50  # steps between logged training metrics
    c.train.checkpoint_every_steps = 1000  # steps between "latest" checkpoints (also at validated epochs)
    # Validate (and checkpoint) after every this many epochs and after the last: the best checkpoint is
    # chosen among those. Raise it where epochs are cheap next to validation (explainer.signal=precomputed).
    c.train.eval_every_epochs = 1
    return c


def apply_training(c: config_dict.ConfigDict) -> None:
    """Applies `TRAINING[dataset][stage]` (call last in a stage's get_config, before locking)."""
    for key, value in TRAINING.get(c.dataset.name, {}).get(c.stage, {}).items():
        c[_TRAINING_FIELDS[key]][key] = value
