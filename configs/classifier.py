"""Stage 1: fine-tune a ViT classifier on the dataset.

    python launch.py --config=configs/classifier.py:imagenette,model=small --workdir=runs/imagenette \
        --config.model.pretrained=/path/to/vit_small.npz

Argument: `<dataset>[,model=<variant>]`; datasets and variants are listed in configs/common.py.
"""

from configs import common


def get_config(arg=None):
    opts = common.parse_arg(arg, dataset="digits", model="")
    c = common.base_config("classifier", opts)
    c.optim.lr = 1e-5  # reference classifier learning rate
    c.train.epochs = 25  # reference: 25 epochs, best checkpoint by validation accuracy
    c.train.mask_patches = False  # train on random coalitions (can then serve as its own surrogate)
    common.apply_training(c)  # per-dataset settings, e.g. digits trains from scratch
    c.lock()
    return c
