"""Explain your own images with a trained run (one explainer forward pass per batch).

    python launch.py --config=configs/explain.py:digits --workdir=runs/digits --config.images=a.png,b.jpg

Writes, per image, `<name>.npz` (phi [n_patches, classes], v_all, v_empty, class names) and
`<name>.png` (heatmaps) to `{workdir}/explanations/` unless `--config.output_dir` says otherwise;
with `--config.export=shapiq` also `<name>.class<c>.json` (shapiq's InteractionValues); with
`--config.interactions=k-SII` (or FSII) `<name>.<index>.json` and `<name>.interactions.png`.
Argument: the dataset the run was trained on.
"""

from ml_collections import config_dict

from configs import common


def get_config(arg=None):
    dataset = common.dataset_arg(arg)
    c = config_dict.ConfigDict()
    c.stage = "explain"  # explain images with the run in --workdir
    c.dataset = dataset  # the dataset the run was trained on (checked against the run)
    c.images = config_dict.placeholder(str)  # comma-separated image files and/or folders of images
    c.output_dir = config_dict.placeholder(str)  # where results go (None: {workdir}/explanations)
    c.max_classes = 3  # classes drawn per heatmap, highest v(all) first (the .npz holds all)
    c.batch_size = 8  # images per explainer forward pass
    c.export = ""  # "shapiq": also each drawn class's values as shapiq InteractionValues JSON
    # "k-SII" or "FSII": pairwise interactions of the top class among its strongest patches (surrogate game)
    c.interactions = ""
    c.interaction_players = 12  # patches with the largest |value| whose pairs are computed
    c.interaction_budget = 4096  # coalitions per image: exact (all 2^players) if they fit, else sampled
    c.lock()
    return c
