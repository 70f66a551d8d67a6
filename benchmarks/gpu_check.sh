#!/usr/bin/env bash
# The GPU check of issue 16 as one prepared script (a few minutes on one GPU): the explainer's train
# step at 224 px in bfloat16 and float32 with achieved FLOP/s against the measured bf16 matmul peak,
# XLA's memory analysis of the step per model size with and without remat, the masked forward's
# time per batch and where it goes (profile_ops.py). (torch_reference.py runs PyTorch on the CPU only:
# not part of this check.)
#
#   bash benchmarks/gpu_check.sh [WHEELS_DIR]      # on the GPU machine, from the repository root
#   SMOKE=1 bash benchmarks/gpu_check.sh            # the same code paths at toy sizes (any CPU)
#   PYTHON=.venv/bin/python ...                     # another interpreter than `python`
#
# WHEELS_DIR: wheels to install first with --no-deps (the device image lacks grain,
# tensorflow-datasets, ml_collections and array_record: ../shared/wheels-cp312, copied into the
# checkout and carried). Output: one log per part on stdout, each line prefixed by its part.
set -uo pipefail
py=${PYTHON:-python}
cd "$(dirname "$0")/.."
if [ -n "${1:-}" ]; then
  $py -m pip install --quiet --no-deps "$1"/*.whl || echo "gpu_check: installing wheels from $1 failed"
fi
$py -c "import jax; print('gpu_check: jax', jax.__version__, jax.devices())"
if [ -n "${SMOKE:-}" ]; then
  models=tiny; big=tiny; batch=2; size=32; fwd_batch=4; peak=256
else
  models=small,base; big=base,large; batch=32; size=224; fwd_batch=64; peak=4096
fi
part() { local name=$1; shift; echo "== $name: $*"; "$@" 2>&1 | grep -v -E "^(WARNING|I[0-9]{4}|W[0-9]{4})" | sed "s/^/$name: /"; }
for dtype in bfloat16 float32; do
  part "step-$dtype" $py benchmarks/explainer_step.py --models=$models --batch=$batch --steps=3 \
    --image_size=$size --dtype=$dtype --flops --peak_size=$peak
done
for remat in "" --remat; do
  part "memory${remat}" $py benchmarks/explainer_step.py --models=$big --batch=$batch --steps=0 \
    --image_size=$size --dtype=bfloat16 --memory $remat
done
if [ -z "${SMOKE:-}" ]; then
  part forward $py benchmarks/profile_ops.py --path=forward --model=small --batch=$fwd_batch --top=5
  part explainer-profile $py benchmarks/profile_ops.py --path=explainer --model=small --batch=$batch --top=5
fi
