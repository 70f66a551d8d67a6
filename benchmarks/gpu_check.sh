#!/usr/bin/env bash
# The GPU checks of issues 16 and 18 as one prepared script, its parts in the order they run (what is
# still open first), each cut off by its own time limit and all by BUDGET seconds (default 540), so a
# slow part cannot starve the rest of the record:
#   1. attention-step: the packed ViT-S step with config.model.attention_impl=matmul and =cudnn (decides
#      attention_impl=auto on a GPU); torch-step: our explainer step against PyTorch + timm's, its
#      surrogate calls batched as the reference implementation's and per image (this script's form until
#      2026-11-28), on the same GPU (torch_reference.py --device=cuda);
#   2. step-bf16: the explainer's train step at 224 px in bfloat16 (batch 32 x 32 paired coalitions;
#      ViT-S with plain masked passes and packed pairs, ViT-B packed only), achieved matmul FLOP/s
#      against the measured bf16 matmul peak, XLA's memory analysis and compile time of each step;
#   3. attention: our attention core against jax.nn.dot_product_attention, XLA's and cuDNN's fused
#      kernel, at the step's shapes (attention_impl.py): speed, and exactness for the masked model;
#   4. torch-f32: ours against PyTorch + timm on the same GPU: masked forward, explainer step,
#      classifier step, FLOPs of each side;
#   5. profile: where the packed ViT-S explainer step's time goes (profile_ops.py);
#   6. signals: the packed ViT-S step under each training signal (issue 18), images/s and the loss;
#   7. torch-bf16: the forward and classifier comparison with bfloat16 matmuls (PyTorch autocast);
#   8. memory: ViT-L's step compiled with and without remat (XLA's memory analysis).
# On the H200 (2026-11-27, docs/gpu-runs/) compiling dominated: each 224 px explainer step took tens of
# seconds to compile (XLA's GEMM autotuning; turning it off made the kernels 10x slower), so all parts
# do not fit one 10-minute call, nor two in a 15-minute device budget (each call's start takes ~35 s, and
# a machine is not started with under 4 minutes left). So, in that order:
#   BUDGET=480 PARTS="step-bf16 attention torch-f32" bash benchmarks/gpu_check.sh WHEELS_DIR
#   BUDGET=300 PARTS="attention-step profile signals memory" bash benchmarks/gpu_check.sh WHEELS_DIR
# (timeout_s a minute above BUDGET; torch-bf16 when time is left). Done on 2026-11-28 (docs/performance.md
# (h2)): attention, torch-f32, profile, memory. Next (attention-step and torch-step run first):
#   BUDGET=480 PARTS="attention-step torch-step signals" bash benchmarks/gpu_check.sh WHEELS_DIR
#   MODELS=base BUDGET=200 PARTS=step-bf16 bash benchmarks/gpu_check.sh WHEELS_DIR   # if 4 min are left
# (MODELS: the step's ViT variants, first one both paths, the second packed only; default small,base).
#
#   bash benchmarks/gpu_check.sh [WHEELS_DIR]      # on the GPU machine, from the repository root
#   SMOKE=1 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh   # toy sizes, any CPU (no profile)
#   PYTHON=.venv/bin/python BUDGET=400 PARTS="step-bf16 signals" ...   # interpreter, seconds, parts
#
# WHEELS_DIR: wheels to install first with --no-deps (the device image lacks grain,
# tensorflow-datasets, ml_collections and array_record: ../shared/wheels-cp312, copied into the
# checkout and carried). Output: one log per part on stdout, each line prefixed by its part.
set -uo pipefail
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# One persistent compilation cache for all parts of this call: XLA keeps its GEMM autotuning results
# there too (jax_persistent_cache_enable_xla_caches), and the parts share many matmul shapes.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/gpu_check_jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
start=$SECONDS
budget=${BUDGET:-540}
all_parts="attention-step torch-step step-bf16 attention torch-f32 profile signals torch-bf16 memory"
parts=${PARTS:-$all_parts}
for name in $parts; do  # a misspelt part would otherwise run nothing, silently, on a lent machine
  [[ " $all_parts " == *" $name "* ]] || { echo "gpu_check: unknown part '$name': choose from $all_parts"; exit 2; }
done
if [ -n "${1:-}" ]; then
  $py -m pip install --quiet --no-deps --no-index "$1"/*.whl || echo "gpu_check: installing wheels from $1 failed"
fi
$py -c "import jax" 2>/dev/null || {
  echo "gpu_check: $py cannot import jax: name an interpreter that can, e.g. PYTHON=.venv/bin/python"
  exit 2
}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
# What float32 matmuls do on this backend (TF32 rounds operands to 10 mantissa bits: error ~1e-3).
$py - <<'EOF'
import jax, jax.numpy as jnp, numpy as np
a = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
err = np.abs(np.asarray(jax.jit(lambda x: x @ x)(jnp.asarray(a))) - a.astype(np.float64) @ a).max()
print(f"gpu_check: jax {jax.__version__}, {jax.devices()}; float32 512^2 matmul max error {err:.1e}")
EOF
if [ -n "${SMOKE:-}" ]; then
  models=micro,tiny; big=tiny; batch=2; size=32; peak=256; tsize=(--models=tiny --batch=2 --step_batch=1
    --coalitions=2 --classifier_batch=2 --repeats=1); device=cpu; fused=xla
else
  models=${MODELS:-small,base}; big=large; batch=32; size=224; peak=8192; tsize=(--models=small --batch=64
    --step_batch=32 --classifier_batch=64 --repeats=3); device=cuda; fused=cudnn
fi
# part NAME LIMIT CMD...: run CMD under min(LIMIT, what is left of BUDGET) seconds, output prefixed.
part() {
  local name=$1 limit=$2; shift 2
  [[ " $parts " == *" $name "* ]] || return 0
  local left=$((budget - (SECONDS - start)))
  ((left < limit)) && limit=$left
  if ((limit < 10)); then echo "== $name: skipped (budget of ${budget}s spent)"; return 0; fi
  echo "== $name (at $((SECONDS - start))s, limit ${limit}s): $*"
  timeout -k 5 "$limit" "$@" 2>&1 | grep --line-buffered -v -E "^(WARNING|I[0-9]{4}|W[0-9]{4})" |
    sed -u "s/^/$name: /"
  local rc=${PIPESTATUS[0]}
  ((rc == 124 || rc == 137)) && echo "== $name: cut off at its limit (${limit}s)"
  ((rc != 0 && rc != 124 && rc != 137)) && echo "== $name: exit status $rc"
  return 0
}
# First what the 2026-11-28 calls left open: the whole packed step with each attention core
# (config.model.attention_impl; cuDNN needs the GPU), which decides attention_impl=auto on a GPU, and the
# explainer step against PyTorch with its surrogate batched as the reference implementation does.
part attention-step 100 $py benchmarks/explainer_step.py --models=${models%%,*} --paths=packed \
  --batch=$batch --steps=3 --image_size=$size --dtype=bfloat16 --memory --attention_impl=matmul,$fused
if $py -c "import torch, timm" 2>/dev/null; then
  part torch-step 150 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 $py benchmarks/torch_reference.py \
    "${tsize[@]}" --batch=0 --classifier_batch=0 --device=$device --torch_batching=reference,per_image
fi
part step-bf16 150 $py benchmarks/explainer_step.py --models=${models%%,*} --batch=$batch --steps=3 \
  --image_size=$size --dtype=bfloat16 --flops --memory --peak_size=$peak
[ "$models" != "${models%%,*}" ] && part step-bf16 120 $py benchmarks/explainer_step.py \
  --models=${models#*,} --paths=packed --batch=$batch --steps=3 --image_size=$size --dtype=bfloat16 \
  --flops --memory --peak_size=$peak
part attention 90 $py benchmarks/attention_impl.py --models=$models --sequences=$((batch * 32)) \
  --dtype=bfloat16
if $py -c "import torch, timm" 2>/dev/null; then
  part torch-f32 200 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 $py benchmarks/torch_reference.py \
    "${tsize[@]}" --device=$device --torch_batching=reference,per_image
else
  echo "== torch-step, torch-f32, torch-bf16: skipped (no torch + timm for $py)"
fi
# Command buffers (CUDA graphs) would hide the kernels in a few command_buffer ops: off for the profile.
[ -z "${SMOKE:-}" ] && part profile 120 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
  $py benchmarks/profile_ops.py --path=explainer --model=small \
  --batch=$batch --top=8
part signals 240 $py benchmarks/explainer_step.py --models=${models%%,*} --batch=$batch --steps=5 \
  --image_size=$size --dtype=bfloat16 --signals=wls,wls:reference_compat,kernelshap,permutation
if $py -c "import torch, timm" 2>/dev/null; then
  part torch-bf16 120 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 $py benchmarks/torch_reference.py \
    "${tsize[@]}" --step_batch=0 --device=$device --matmul_precision=bfloat16
fi
part memory 120 $py benchmarks/explainer_step.py --models=$big --batch=$batch --steps=0 \
  --image_size=$size --dtype=bfloat16 --memory
part memory 120 $py benchmarks/explainer_step.py --models=$big --batch=$batch --steps=0 \
  --image_size=$size --dtype=bfloat16 --memory --remat
echo "gpu_check: done in $((SECONDS - start))s"
