#!/usr/bin/env bash
# Trains a 196-player pipeline on CPU for benchmarks/explain_vs_kernelshap.py: digits upsampled to
# 56 px with 4 px patches (14 x 14 = 196 players, as a 224 px ViT with 16 px patches), a small ViT
# (width 32, depth 2), short classifier and surrogate schedules, and the reference's 100 explainer
# epochs (8 epochs gave an explainer too weak for the benchmark: see the README).
# Usage: bash benchmarks/digits196_run.sh WORKDIR
set -euo pipefail
workdir=${1:?usage: bash benchmarks/digits196_run.sh WORKDIR}
flags=()
for stage in classifier surrogate explainer; do
  for kv in dataset.image_size=56 dataset.resize_size=56 model.patch_size=4 model.hidden_size=32 \
            model.depth=2 model.num_heads=2 model.mlp_dim=64; do
    flags+=("--config.${stage}.${kv}")
  done
done
flags+=(--config.classifier.train.epochs=20 --config.surrogate.train.epochs=15 --config.explainer.train.epochs=100
       --config.explainer.optim.warmup_steps=100)
exec python launch.py --config=configs/pipeline.py:digits --workdir="$workdir" "${flags[@]}"
