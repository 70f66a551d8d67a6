#!/usr/bin/env bash
# Trains a 196-player pipeline on CPU for benchmarks/explain_vs_kernelshap.py: digits upsampled to
# 56 px with 4 px patches (14 x 14 = 196 players, as a 224 px ViT with 16 px patches) and a small ViT
# (width 32, depth 2, 2 heads, MLP 64). Classifier: 30 epochs at peak lr 5e-3 after 50 warmup steps
# (test accuracy 0.963 on 2026-11-26, 0.952 with the code of 2026-11-27; the digits defaults, lr 1e-3
# with 200 warmup steps over 20 epochs, left the loss at ln 10 for the first epochs and stopped at 0.585).
# Surrogate: 30 epochs at 2e-3, 50 warmup steps. Explainer: 30 epochs, 50 warmup steps. 32 min 27 s on
# one core of the 2-core CPU (2026-11-26; classifier 3:50, surrogate 4:43, explainer 23:53;
# docs/performance.md, section (b)).
# Usage: bash benchmarks/digits196_run.sh WORKDIR
set -euo pipefail
workdir=$(realpath -m "${1:?usage: bash benchmarks/digits196_run.sh WORKDIR}")
cd "$(dirname "$0")/.."  # launch.py's folder: the script runs from anywhere
flags=()
for stage in classifier surrogate explainer; do
  for kv in dataset.image_size=56 dataset.resize_size=56 model.patch_size=4 model.hidden_size=32 \
            model.depth=2 model.num_heads=2 model.mlp_dim=64 optim.warmup_steps=50; do
    flags+=("--config.${stage}.${kv}")
  done
done
flags+=(--config.classifier.train.epochs=30 --config.classifier.optim.lr=5e-3
        --config.surrogate.train.epochs=30 --config.surrogate.optim.lr=2e-3
        --config.explainer.train.epochs=30)
exec python launch.py --config=configs/pipeline.py:digits --workdir="$workdir" "${flags[@]}"
