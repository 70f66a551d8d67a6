"""The main job: classifier -> surrogate -> explainer, each stage as configured in its own file.

    python launch.py --config=configs/pipeline.py:digits --workdir=runs/digits

Stages that finished in the workdir are skipped; override a stage's field with
`--config.<stage>.<group>.<field>=value`, e.g. `--config.explainer.train.epochs=10`.
Argument: `<dataset>[,model=<variant>][,masking=attention|zero]`.
"""

from ml_collections import config_dict

from configs import classifier, common, explainer, surrogate


def get_config(arg=None):
    opts = common.parse_arg(arg, dataset="digits", model="", masking="attention")
    base = f"{opts.dataset},model={opts.model}"
    c = config_dict.ConfigDict()
    c.stage = "pipeline"  # runs the three stages below in order
    c.classifier = classifier.get_config(base)  # stage 1, see configs/classifier.py
    c.surrogate = surrogate.get_config(f"{base},masking={opts.masking}")  # stage 2, see configs/surrogate.py
    c.explainer = explainer.get_config(base)  # stage 3, see configs/explainer.py
    c.lock()
    return c
