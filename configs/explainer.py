"""Stage 3: train the explainer (ViT backbone + explainer head) against the frozen surrogate.

    python launch.py --config=configs/explainer.py:mura --workdir=runs/mura --config.optim.lr=3e-5

Reads the surrogate from `{workdir}/surrogate/` unless `--config.upstream=PATH` is given.
Argument: `<dataset>[,model=<variant>]`. Without `model`, a ViT explainer's backbone has the surrogate's
architecture and starts from its weights (a ResNet surrogate: the dataset's default ViT, from scratch or
`config.model.pretrained`). `--config.explainer.architecture=unet` trains FastSHAP's UNet instead.
"""

from ml_collections import config_dict

from configs import common


def get_config(arg=None):
    opts = common.parse_arg(arg, dataset="digits", model="")
    c = common.base_config("explainer", opts, inherit=True)
    c.upstream = config_dict.placeholder(str)  # surrogate run directory (None: {workdir}/surrogate)
    c.optim.lr = 1e-4  # reference explainer learning rate
    c.train.epochs = 100  # reference: 100 epochs, best checkpoint by validation loss

    c.explainer = config_dict.ConfigDict()
    # "vit" (a ViT backbone + the explainer head) or "unet" (FastSHAP's image explainer)
    c.explainer.architecture = "vit"
    c.explainer.unet_width = 32  # unet: channels of the first level (doubling per level)
    c.explainer.unet_levels = 3  # unet: down-sampling steps (fewer where the image is too small)
    c.explainer.num_coalitions = 32  # surrogate evaluations per image per step (coalitions)
    c.explainer.paired = True  # each coalition comes with its complement (num_coalitions must be even)
    # Training signal (docs/explainer_training.md): "wls" (the Shapley weighted-least-squares loss),
    # "kernelshap" or "permutation" (regression on an unbiased estimate from num_coalitions evaluations).
    # "precomputed": regression on each training image's standard KernelSHAP estimate, computed once
    # before training with target_evals evaluations (no augmentation then).
    c.explainer.signal = "wls"
    c.explainer.target_evals = 1026  # signal=precomputed: KernelSHAP evaluations per training image
    # signal=precomputed: fixed views per training image, each with its own label (1: the image itself;
    # K > 1 adds K - 1 random crops drawn once; an epoch passes over all of them)
    c.explainer.target_views = 1
    # target_views > 1: blend each extra view with a crop of another image, weight uniform in [0, this)
    c.explainer.view_mix = 0.0
    # signal=precomputed: comma-separated explainer runs (workdirs) trained against this same surrogate;
    # the labels are then the mean of their outputs (distillation) instead of KernelSHAP estimates
    c.explainer.teachers = ""
    # A folder of more images to train the explainer on, after the training split (no classes needed:
    # the surrogate's game is the label); recursively, any format Pillow reads
    c.explainer.extra_images = ""
    # Coalition sampler of wls and kernelshap: "shapley" (exact kernel) or "reference_compat" (wls only).
    c.explainer.sampler = "shapley"
    c.explainer.packed = True  # run each coalition pair as one n + 2 token sequence (attention masking)
    c.explainer.head_blocks = 1  # extra transformer blocks in the head, over all tokens
    c.explainer.mlp_layers = 3  # Dense layers of the head MLP (the last one outputs the classes)
    c.explainer.mlp_ratio = 4  # hidden width of the head MLP, in multiples of hidden_size
    c.explainer.activation = "gelu"  # activation between head MLP layers: "gelu" or "relu"
    c.explainer.freeze_backbone = False  # train only the head (the reference trains everything)
    common.apply_training(c)  # per-dataset settings, e.g. digits trains from scratch
    c.lock()
    return c
