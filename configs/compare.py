"""The FastSHAP-style study: classifiers x surrogates (of any architecture), one explainer per pair.

    python launch.py --config=configs/compare.py:digits --workdir=runs/compare
    python launch.py --config=configs/compare.py:cifar10,classifiers=mini+resnet18,surrogates=mini+resnet18 \
        --workdir=runs/cifar_compare

For every classifier variant a classifier run (`{workdir}/{classifier}/classifier`), for every surrogate
variant a surrogate distilled from it and an explainer trained against that surrogate
(`{workdir}/{classifier}/{surrogate}/`); finished runs are skipped. Then `{workdir}/compare.md` and
`compare.json`: surrogate validation and test KL and accuracy per (classifier, surrogate) pair, the
classifiers' agreement on the test split (both right, one right, both wrong), and a heatmap grid per pair
(`{workdir}/heatmaps/`: `num_images` test images x every class). See docs/surrogates.md.

Argument: `<dataset>[,classifiers=<v>+<v>...][,surrogates=<v>+<v>...]`: model variants (configs/common.py;
ViT shapes and resnet18/34/50). The stage groups below are templates that every run starts from
(`--config.classifier.train.epochs=5` applies to all classifiers); the variant then sets the model.
"""

from ml_collections import config_dict

from configs import classifier, common, explainer, surrogate

# A ViT and a ResNet of about the digits ViT's cost, each as classifier and as surrogate.
DEFAULT_MODELS = {"digits": "micro+resnet18", "cifar10": "mini+resnet18", "cifar100": "mini+resnet18"}


def get_config(arg=None):
    opts = common.parse_arg(arg, dataset="digits", classifiers="", surrogates="")
    models = DEFAULT_MODELS.get(opts.dataset, "small+resnet18")
    c = config_dict.ConfigDict()
    c.stage = "compare"
    c.classifiers = (opts.classifiers or models).replace("+", ",")  # comma-separated model variants
    c.surrogates = (opts.surrogates or models).replace("+", ",")  # comma-separated model variants
    c.classifier = classifier.get_config(opts.dataset)  # template of every classifier run
    c.surrogate = surrogate.get_config(opts.dataset)  # template of every surrogate run
    c.explainer = explainer.get_config(opts.dataset)  # template of every explainer run
    c.explainer.explainer.architecture = "unet"  # FastSHAP's explainer: the same for every surrogate
    c.dataset = c.classifier.dataset  # the dataset of every run (one group, shared)
    for stage in ("surrogate", "explainer"):
        with c[stage].unlocked():
            c[stage].dataset = c.dataset
    c.num_images = 4  # test images in each pair's heatmap grid
    c.lock()
    return c
