"""Evaluate a finished pipeline: the explainer against ground truth and every baseline.

    python launch.py --config=configs/evaluate.py:digits --workdir=runs/digits

Reads `{workdir}/classifier`, `surrogate` and `explainer`; writes `{workdir}/evaluation/` (unless
`--config.output_dir` says otherwise): `results.json`, `table.md`, `values.npz`, `kl_curves.png`,
`accuracy_curves.png`, `insertion_deletion.png` and `heatmaps/`. Argument: the dataset of the run.
"""

from ml_collections import config_dict

from configs import common
from vitshap_jax.config import EVALUATION_METHODS

# Images explained per dataset: ground truth costs 2^16 evaluations per digits image (exact), and
# KernelSHAP to 1% standard error for 196 patches.
NUM_IMAGES = {
    "digits": 64,
    "imagenette": 32,
    "pet": 32,
    "mura": 32,
    "cifar10": 32,
    "cifar100": 32,
    "folder": 32,
}


def get_config(arg=None):
    dataset = common.dataset_arg(arg)
    c = config_dict.ConfigDict()
    c.stage = "evaluate"
    c.dataset = dataset  # the dataset the run was trained on (checked against the run)
    c.split = "test"
    c.num_images = NUM_IMAGES[dataset]  # the first images of the split
    c.batch_size = 8  # images per call of each method
    c.seed = 0
    c.explain_class = "label"  # the class explained per image: "label" or "predicted" (by the classifier)
    c.methods = ",".join(EVALUATION_METHODS)  # comma-separated; see vitshap_jax/config.py
    c.kernelshap_budgets = "64,256,1024,4096"  # evaluations per image, one table row each
    c.kernelshap_estimator = "standard"  # KernelSHAP rows and ground truth: "standard" or "unbiased"
    c.permutation_budgets = "1024,4096"  # antithetic permutation sampling: evaluations per image (>= 2n)
    c.ground_truth = "auto"  # "exact", "kernelshap", "permutation", or "auto" (exact up to 20 patches)
    c.ground_truth_threshold = 0.01  # sampled ground truth: std error <= this x range of the values
    c.ground_truth_max_evals = 1_000_000  # ... or stop at this many evaluations per image
    c.ig_steps = 32  # integrated gradients: points on the path
    c.noise_samples = 32  # SmoothGrad / VarGrad: noisy copies per image
    c.noise = 0.15  # SmoothGrad / VarGrad: noise std as a fraction of the image's value range
    c.rise_masks = 2000
    c.top_k = 5  # top-k overlap and sign agreement
    c.extra_surrogates = ""  # more surrogate runs (comma-separated dirs) for the KL curves, e.g. zero masking
    c.num_heatmaps = 4  # images drawn with every method
    c.output_dir = config_dict.placeholder(str)  # None: {workdir}/evaluation
    c.lock()
    return c
