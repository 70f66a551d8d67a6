"""How much does a ROAR removal mask alone reveal the label?

    python benchmarks/roar_mask_leakage.py --workdir=runs/digits --fraction=0.5

For each method (the ROAR config's settings), every train and test image of a finished pipeline is
explained (its label) and the `fraction` highest-ranked patches form its removal mask. A logistic
regression is fit on the train masks alone (which patches were removed, nothing else) and its test
accuracy printed. Far above chance, the retrained classifier of ROAR can read the class from the hole
in the image, and ROAR then rewards inconsistent rankings rather than informative ones.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from configs import roar as roar_config  # noqa: E402
from vitshap_jax.config import EVALUATION_METHODS  # noqa: E402
from vitshap_jax.evaluation import methods  # noqa: E402
from vitshap_jax.runs import TrainedRun  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a finished pipeline")
    p.add_argument("--fraction", type=float, default=0.5, help="share of patches removed")
    p.add_argument("--methods", default="explainer,kernelshap,leave_one_out,random")
    args = p.parse_args()
    if unknown := [m for m in args.methods.split(",") if m not in EVALUATION_METHODS]:
        p.error(f"--methods: {', '.join(unknown)} unknown; choose from {', '.join(EVALUATION_METHODS)}")
    loaded = TrainedRun.load(args.workdir)
    config = roar_config.get_config(loaded.config.dataset.name)
    config.methods = args.methods
    classifier, params = loaded.classifier()
    n = loaded.num_players
    k = round(args.fraction * n)
    fns = methods.method_functions(config, loaded, classifier, params, n)
    splits = {split: loaded.examples(split, views=False)[1:] for split in ("train", "test")}
    print(f"run: {args.workdir}; {k} of {n} patches removed; chance: {1 / len(loaded.class_names):.3f}")
    for name, fn in fns.items():
        masks = {}
        for split, (images, labels) in splits.items():
            scores, _ = methods.run_batched(
                fn, images, labels, batch_size=config.batch_size, key=jax.random.key(0), put=jax.device_put
            )
            rank = np.argsort(np.argsort(-scores, axis=1), axis=1)
            masks[split] = (rank < k).astype(np.float32)
        model = LogisticRegression(max_iter=2000).fit(masks["train"], splits["train"][1])
        accuracy = model.score(masks["test"], splits["test"][1])
        print(
            f"{name}: label predicted from the removal mask alone, test accuracy {accuracy:.3f}", flush=True
        )


if __name__ == "__main__":
    main()
