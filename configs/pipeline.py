"""The main job: classifier -> surrogate -> explainer, each stage as configured in its own file.

    python launch.py --config=configs/pipeline.py:digits --workdir=runs/digits
    python launch.py --config=configs/pipeline.py:folder --workdir=runs/mine \
        --config.dataset.manual_dir=~/my_images --config.model.pretrained=~/my_finetuned_vit

Stages that finished in the workdir are skipped. `config.dataset` is the one dataset group of all three
stages, and `config.model` holds the architecture the three share (`pretrained` is read by the
classifier; the other stages take the architecture from it), so `--config.dataset.image_size=...` or
`--config.model.patch_size=...` applies everywhere. Override anything else per stage with
`--config.<stage>.<group>.<field>=value`, e.g. `--config.explainer.train.epochs=10`.
Argument: `<dataset>[,model=<variant>][,masking=<masking>]`. The three stages share one architecture
here; for a surrogate of another architecture run the stages one by one (configs/surrogate.py) or
compare several with configs/compare.py.
"""

from ml_collections import config_dict

from configs import classifier, common, explainer, surrogate

# The model fields the three stages share (linked: setting config.model.X sets every stage's).
SHARED_MODEL_FIELDS = (
    "variant",
    "architecture",
    "stem",
    "norm",
    "mask_channel",
    "patch_size",
    "hidden_size",
    "depth",
    "num_heads",
    "mlp_dim",
    "pretrained",
    "from_checkpoint",
    "checkpoint_overrides",
    "class_token",
    "distill_token",
    "distill_head",
    "reg_tokens",
    "pos_prefix",
    "pool",
    "fc_norm",
    "pre_norm",
    "layer_scale",
    "act",
    "ln_eps",
    "dtype",
)


def get_config(arg=None):
    opts = common.parse_arg(arg, dataset="digits", model="", masking="auto")
    base = f"{opts.dataset},model={opts.model}"
    c = config_dict.ConfigDict()
    c.stage = "pipeline"  # runs the three stages below in order
    c.classifier = classifier.get_config(base)  # stage 1, see configs/classifier.py
    c.surrogate = surrogate.get_config(f"{base},masking={opts.masking}")  # stage 2, see configs/surrogate.py
    c.explainer = explainer.get_config(base)  # stage 3, see configs/explainer.py
    if c.classifier.model.architecture == "resnet":  # a ViT explainer needs a ViT backbone
        c.explainer.explainer.architecture = "unet"
    c.dataset = c.classifier.dataset  # the dataset of every stage (one group, shared)
    c.model = config_dict.ConfigDict()  # the architecture of every stage (fields linked into each)
    for field in SHARED_MODEL_FIELDS:
        c.model[field] = c.classifier.model.get_ref(field)
    for stage in ("surrogate", "explainer"):
        with c[stage].unlocked():
            c[stage].dataset = c.dataset
        for field in SHARED_MODEL_FIELDS:
            c[stage].model[field] = c.model.get_ref(field)
    c.lock()
    return c
