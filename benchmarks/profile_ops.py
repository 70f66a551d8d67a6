"""Where the time of a hot path goes: per-op timings from the XLA profile, grouped by what they compute.

    python benchmarks/profile_ops.py --path=forward --model=tiny --batch=64
    python benchmarks/profile_ops.py --path=classifier --model=tiny --batch=32
    python benchmarks/profile_ops.py --path=explainer --model=tiny --batch=2 [--packed=false]

Each with `--matmul_precision=bfloat16` for the ViT's matmuls with bfloat16 operands (`mixed_einsum`).

Runs the path's real jitted function (`forward`: the masked ViT surrogate forward, each image its own
coalition of half the patches; `classifier`: the classifier stage's train step; `explainer`: the
explainer stage's train step, 32 paired coalitions per image) under `jax.profiler.trace`, reads every
executed HLO op's duration from the trace (`hlo_op` of each event) and the op's source from the compiled
HLO's metadata (`op_name`: the Flax module path and the jax primitive; `transpose(jvp(...))` marks the
backward pass), and prints the time per group (pass, module kind, primitive) with its share, then the
slowest single ops. On CPU the events are the thunks XLA:CPU runs (fusions, library matmuls); the sum
is the step's time minus dispatch and thread-pool waits. On a GPU or TPU only the device's own events
count (`accelerator_pids`).
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vitshap_jax.config import VIT_VARIANTS  # noqa: E402
from vitshap_jax.models import ViT  # noqa: E402

OP_LINE = re.compile(r"%([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]+)\"")
MODULE_KINDS = (
    ("MultiHeadDotProductAttention", ("query", "key", "value", "out"), "attention projections"),
    ("MultiHeadDotProductAttention", (), "attention core"),
    ("MlpBlock", (), "MLP"),
    ("LayerNorm", (), "LayerNorm"),
    ("embedding", (), "patch embedding"),
    ("ExplainerHead", (), "explainer head"),
    ("head", (), "head"),
)


def op_sources(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the `op_name` of its metadata (module path and primitive)."""
    return {m.group(1): m.group(2) for m in OP_LINE.finditer(hlo_text)}


def classify(op_name: str) -> tuple[str, str, str]:
    """(pass, module kind, primitive) of an op's metadata `op_name`."""
    parts = op_name.split("/")
    backward = "transpose(" in op_name
    primitive = re.sub(r"\[.*$", "", parts[-1]) or "?"
    kind = "other"
    for marker, children, label in MODULE_KINDS:
        hits = [i for i, p in enumerate(parts) if marker in p]
        if not hits:
            continue
        rest = parts[hits[-1] + 1 : -1]
        if children and not any(c == r for c in children for r in rest):
            continue
        kind = label
        break
    if kind == "other" and ("optax" in op_name or "adam" in op_name.lower()):
        kind = "optimizer"
    return ("backward" if backward else "forward", kind, primitive)


def trace_events(trace_dir: str) -> list[dict]:
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        raise SystemExit(f"no trace written under {trace_dir}")
    data = json.load(gzip.open(files[0]))
    return data["traceEvents"] if isinstance(data, dict) else data


def profile(fn, args: tuple, runs: int, stateful: bool) -> tuple[dict, float, str]:
    """Per-op durations (ms per run, keyed by HLO op name), the wall time per run, the compiled HLO.
    `stateful`: `fn` is a train step donating its first argument, which its first output replaces."""
    compiled = fn.lower(*args).compile()  # compiled once: its HLO is read, then it is run
    hlo = compiled.as_text()
    holder = list(args)

    def run():
        out = compiled(*holder)
        if stateful:
            holder[0] = out[0]
        jax.block_until_ready(out)

    run()
    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(runs):
                run()
        wall = (time.perf_counter() - start) / runs
        events = trace_events(d)

    def collect(pids):
        durations = collections.Counter()
        for e in events:
            op = (e.get("args") or {}).get("hlo_op")
            if e.get("ph") == "X" and op and (pids is None or e.get("pid") in pids):
                durations[op] += e.get("dur", 0) / 1000 / runs
        return durations

    devices = accelerator_pids(events)
    durations = collect(devices or None)
    if devices and not durations:
        print("profile_ops: no device event names its HLO op; counting the host's events instead")
        durations = collect(None)
    return durations, wall, hlo


def accelerator_pids(events: list[dict]) -> set:
    """The trace's processes of GPU or TPU devices (named `/device:GPU:0` and the like): there the
    kernels' own times, not the host threads that launch them (empty on CPU, where the host runs the
    ops). Written for the GPU before this script ran on one."""
    names = {
        e.get("pid"): str((e.get("args") or {}).get("name", ""))
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    return {pid for pid, name in names.items() if re.search(r"/device:(GPU|TPU)", name)}


def forward_path(variant: str, batch: int, matmul_precision: str = "float32"):
    width, depth, heads = (VIT_VARIANTS[variant][k] for k in ("hidden_size", "depth", "num_heads"))
    model = ViT(
        num_classes=10,
        patch_size=16,
        hidden_size=width,
        depth=depth,
        num_heads=heads,
        mlp_dim=4 * width,
        dot_dtype=None if matmul_precision == "float32" else matmul_precision,
    )
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((batch, 224, 224, 3)).astype(np.float32))
    mask = jnp.asarray(rng.random((batch, 196)) < 0.5)
    params = model.init(jax.random.key(0), images[:1], mask[:1])["params"]
    return jax.jit(lambda p, x, m: model.apply({"params": p}, x, m)), (params, images, mask)


def classifier_path(variant: str, batch: int, matmul_precision: str = "float32"):
    from configs import classifier as classifier_config
    from vitshap_jax import parallel
    from vitshap_jax.models import build_model
    from vitshap_jax.stages import classifier, common

    config = classifier_config.get_config(f"imagenette,model={variant}")
    config.model.dtype = "float32"
    config.model.matmul_precision = matmul_precision
    mesh = parallel.make_mesh()
    model = build_model(config)
    images = np.random.default_rng(0).standard_normal((batch, 224, 224, 3)).astype(np.float32)
    params = model.init(jax.random.key(0), images[:1])["params"]
    tx = common.make_optimizer(config, 1000)
    state = common.create_state(params, tx, mesh)
    fn = functools.partial(
        classifier.train_step, model=model, tx=tx, target="multiclass", seed=0, mask_patches=False
    )
    data = parallel.global_batch({"image": images, "label": np.zeros(batch, np.int32)}, mesh)
    return common.jit_train_step(fn, mesh), (state, data)


def explainer_path(variant: str, batch: int, packed: bool, matmul_precision: str = "float32"):
    from explainer_step import step_setup

    from vitshap_jax import parallel

    step, state, data, s_params = step_setup(
        variant, batch, 32, "float32", packed, parallel.make_mesh(), 224, matmul_precision=matmul_precision
    )
    return step, (state, data, s_params)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", default="forward", choices=("forward", "classifier", "explainer"))
    p.add_argument("--model", default="tiny", choices=sorted(VIT_VARIANTS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--packed", default="true", choices=("true", "false"), help="explainer path only")
    p.add_argument("--runs", type=int, default=2, help="profiled runs (the mean is reported)")
    p.add_argument("--top", type=int, default=12, help="slowest single ops listed")
    p.add_argument("--matmul_precision", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args()
    precision = args.matmul_precision

    if args.path == "forward":
        fn, fn_args = forward_path(args.model, args.batch, precision)
    elif args.path == "classifier":
        fn, fn_args = classifier_path(args.model, args.batch, precision)
    else:
        fn, fn_args = explainer_path(args.model, args.batch, args.packed == "true", precision)
    durations, wall, hlo = profile(fn, fn_args, args.runs, stateful=args.path != "forward")
    sources = op_sources(hlo)
    groups = collections.Counter()
    for op, ms in durations.items():
        groups[classify(sources.get(op, op))] += ms
    total = sum(durations.values())
    print(
        f"{args.path}, ViT-{args.model}, batch {args.batch}, {precision} matmuls, "
        f"{jax.devices()[0].platform}, jax {jax.__version__}: "
        f"{wall * 1000:.0f} ms per run (wall), {total:.0f} ms in {len(durations)} ops"
    )
    print(f"{'ms':>9} {'share':>6}  pass      module                 primitive")
    for (direction, kind, primitive), ms in groups.most_common():
        if ms >= 0.002 * total:
            print(f"{ms:9.1f} {ms / total:6.1%}  {direction:9} {kind:22} {primitive}")
    print(f"slowest {args.top} ops:")
    for op, ms in durations.most_common(args.top):
        print(f"{ms:9.1f}  {op:28} {sources.get(op, '?')[:110]}")


if __name__ == "__main__":
    main()
