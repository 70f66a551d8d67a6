"""ROAR (remove and retrain, Hooker et al. 2019) for a finished pipeline.

    python launch.py --config=configs/roar.py:digits --workdir=runs/digits

For each method and each fraction k, the top-k share of patches of every train and test image (ranked by
the method's explanation of the image's label) is replaced by zeros (the dataset mean after
normalization), a classifier of the run's architecture is trained from scratch on the train images and
its test accuracy recorded. The faster accuracy falls with k, the better the ranking. Writes
`{workdir}/roar/results.json` (finished cells are kept and skipped on a rerun) and `roar.png`.
Argument: the dataset of the run. Method settings (RISE masks, noise samples, ...) as in evaluate.py.
"""

from configs import evaluate

# Epochs of each retrained classifier (CIFAR: about the digits' share of the classifier's epochs; not tuned).
ROAR_EPOCHS = {"digits": 30, "imagenette": 5, "pet": 5, "mura": 5, "cifar10": 15, "cifar100": 15, "folder": 5}


def get_config(arg=None):
    c = evaluate.get_config(arg)
    c.unlock()
    c.stage = "roar"
    c.methods = "explainer,kernelshap,leave_one_out,integrated_gradients,attention_rollout,random"
    c.kernelshap_budgets = "512"  # one budget: evaluations per image
    c.fractions = "0.25,0.5,0.75"  # shares of patches removed (0 is always run as the reference)
    c.epochs = ROAR_EPOCHS[c.dataset]  # training of each retrained classifier (run's optimizer settings)
    c.batch_size = 64  # images per step when explaining and training
    for unused in ("split", "num_images", "ground_truth", "ground_truth_threshold", "ground_truth_max_evals"):
        del c[unused]
    for unused in ("explain_class", "top_k", "extra_surrogates", "num_heatmaps"):
        del c[unused]
    # output_dir (None): {workdir}/roar
    c.lock()
    return c
