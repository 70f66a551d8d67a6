"""Stage 2: fine-tune the classifier into a surrogate that tolerates held-out patches.

    python launch.py --config=configs/surrogate.py:imagenette,masking=zero --workdir=runs/imagenette

Reads the classifier from `{workdir}/classifier/` unless `--config.upstream=PATH` is given.
Argument: `<dataset>[,model=<variant>][,masking=<masking>]`. Without `model`, the surrogate has the
classifier's architecture and starts from its weights; with another variant (e.g. `model=resnet18` for a
ViT classifier) it is that model, started from `config.model.pretrained` or from scratch, and distilled
from the classifier all the same (docs/surrogates.md). `masking`: attention or zero for a ViT, input or
zero for a ResNet; auto (the default) is the first.
"""

from ml_collections import config_dict

from configs import common


def get_config(arg=None):
    opts = common.parse_arg(arg, dataset="digits", model="", masking="auto")
    c = common.base_config("surrogate", opts, inherit=True)
    c.model.masking = opts.masking  # one surrogate is trained per masking strategy (auto: see above)
    c.upstream = config_dict.placeholder(str)  # classifier run directory (None: {workdir}/classifier)
    c.optim.lr = 1e-5  # reference surrogate learning rate
    c.train.epochs = 50  # reference: 50 epochs, best checkpoint by validation KL
    common.apply_training(c)  # per-dataset settings, e.g. digits trains from scratch
    c.lock()
    return c
