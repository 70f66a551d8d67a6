set -u
python3 -m pip install --quiet --no-deps --no-index .gpu-wheels/*.whl
export PYTHONUNBUFFERED=1 XLA_FLAGS=--xla_gpu_autotune_level=0
f() { grep --line-buffered -v -E "^(WARNING|I[0-9]{4}|W[0-9]{4})"; }
s=$SECONDS
echo "== step-bf16 autotune 0"; timeout 110 python3 benchmarks/explainer_step.py --models=small,base --batch=32 --steps=3 --dtype=bfloat16 --flops --memory --peak_size=8192 2>&1 | f
echo "== torch-f32 autotune 0 (at $((SECONDS-s))s)"; timeout 100 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 python3 benchmarks/torch_reference.py --models=small --batch=64 --step_batch=32 --classifier_batch=0 --repeats=3 --device=cuda 2>&1 | f
echo "== memory large (at $((SECONDS-s))s)"; timeout 45 python3 benchmarks/explainer_step.py --models=large --batch=32 --steps=0 --dtype=bfloat16 --memory 2>&1 | f
echo "== memory large remat (at $((SECONDS-s))s)"; timeout 45 python3 benchmarks/explainer_step.py --models=large --batch=32 --steps=0 --dtype=bfloat16 --memory --remat 2>&1 | f
echo "done at $((SECONDS-s))s"
