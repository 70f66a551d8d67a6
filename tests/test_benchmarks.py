"""The benchmarks run (smoke tests on tiny settings; their numbers come from runs by hand)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run(
        [sys.executable, os.path.join("benchmarks", script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


# explainer_step.py at toy sizes: the micro ViT on 32 px, 2 images x 4 coalitions, one timed step
TOY_STEP = ("--models=micro", "--image_size=32", "--batch=2", "--coalitions=4", "--steps=1")


def test_explainer_step_benchmark_prints_both_paths_the_ratios_and_the_flops():
    # Both precisions side by side, and the GPU part of the benchmark (FLOP/s from XLA's cost analysis
    # vs a measured bf16 matmul peak), exercised on CPU at toy sizes: its numbers only mean something
    # on an accelerator.
    out = run(
        "explainer_step.py", *TOY_STEP, "--matmul_precision=float32,bfloat16", "--flops", "--peak_size=256"
    )
    assert out.count("plain masked passes, ") == 2 and out.count("pairs in n+2 tokens, ") == 2
    assert out.count("ViT-micro: speedup of the visible-token path") == 2
    assert "ViT-micro pairs in n+2 tokens: bfloat16 / float32 matmuls" in out
    assert "measured bfloat16 matmul peak (256^2)" in out
    assert out.count("of the bf16 peak") == 4  # both paths, both precisions


def test_matmul_precision_benchmark_on_a_trained_run(trained_run):
    out = run(
        "matmul_precision.py",
        "--models=micro",
        "--batch=2",
        "--image_size=32",
        "--repeats=1",
        f"--workdir={trained_run}",
        "--images=2",
    )
    assert out.count("GFLOP/s: float32") == 3
    assert "ViT-micro masked forward, batch 2, 32 px: float32 matmuls" in out
    assert "exact Shapley values of 2 test images (16 players" in out and "mean squared difference" in out


def test_explain_vs_kernelshap_benchmark_on_a_trained_run(trained_run):
    out = run(
        "explain_vs_kernelshap.py",
        f"--workdir={trained_run}",
        "--images=2",
        "--pairs_per_step=8",
        "--max_budget=4096",
    )
    assert "ground truth: exact (65,536 evaluations per image)" in out
    assert "explainer: MSE" in out
    assert "x faster" in out
    assert "(smallest budget, to 16 evaluations)" in out or "did not reach the explainer's error" in out
    # The explainer's training cost, read from its log, and the break-even.
    assert "surrogate evaluations; break-even after" in out
