"""The benchmarks run (smoke tests on tiny settings; their numbers come from runs by hand)."""

import os
import subprocess
import sys

import pytest

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
    # Both precisions side by side, and the GPU part of the benchmark (matmul FLOP/s vs a measured
    # bf16 matmul peak), exercised on CPU at toy sizes: its numbers only mean something
    # on an accelerator.
    # The library's attention core through the real step (as cudnn runs on a GPU); one core keeps the
    # test at four compiles (--attention_impl=matmul,cudnn, the ratios, is the GPU check's).
    out = run(
        "explainer_step.py",
        *TOY_STEP,
        "--matmul_precision=float32,bfloat16",
        "--attention_impl=xla",
        "--flops",
        "--peak_size=256",
    )
    assert out.count("plain masked passes, ") == 2 and out.count("pairs in n+2 tokens, ") == 2
    assert out.count("ViT-micro: speedup of the visible-token path") == 2
    assert "ViT-micro pairs in n+2 tokens: bfloat16 / float32 matmuls" in out
    assert "measured bfloat16 matmul peak (256^2)" in out
    assert out.count("of the bf16 peak") == 4  # both paths, both precisions


def test_explainer_step_signals_mode_trains_under_each_signal():
    # The GPU check of issue 18 at toy sizes: the packed step under each signal, and the loss on the
    # fixed batch falls over the steps (the configured learning rate from the first step).
    out = run("explainer_step.py", *TOY_STEP[:-1], "--steps=4", "--signals=wls:reference_compat,kernelshap")
    lines = [line for line in out.splitlines() if " signal " in line]
    assert [line.split(" signal ")[1].split(",")[0] for line in lines] == [
        "wls:reference_compat",
        "kernelshap",
    ]
    for line in lines:
        first, last = (float(part.split()[0]) for part in line.split("loss ")[1].split(", "))
        assert last < 0.5 * first, line


def test_attention_benchmark_compares_the_implementations_and_checks_exactness():
    out = run("attention_impl.py", "--models=tiny", "--sequences=4", "--repeats=1", "--dtype=float32")
    lines = [line for line in out.splitlines() if line.startswith("ViT-tiny")]
    assert len(lines) == 4  # ours and XLA's, masked and packed (no GPU: no cuDNN)
    for line in lines:
        assert float(line.split("from ours ")[1].split(",")[0]) < 1e-5, line
    assert sum("exact for the masked model: True" in line for line in lines) == 2


def test_matmul_flops_counts_products_in_nested_jaxprs():
    # The FLOP count behind --flops (explainer_step.matmul_flops), against hand counts: a batched
    # einsum, a grouped strided convolution, a scan (body x length), a cond (its costliest branch),
    # a custom VJP and its gradient (the backward's two products), inside a jit.
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from explainer_step import matmul_flops

    def count(fn, *shapes):
        return matmul_flops(jax.make_jaxpr(fn)(*(jnp.ones(s) for s in shapes)))

    assert count(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), (3, 4, 5), (3, 5, 6)) == 2 * 3 * 4 * 5 * 6

    def conv(x, w):  # 2 groups of 2 input channels, 6 outputs, 2 x 2 kernel, stride 2: 4 x 4 outputs
        dims = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(
            x, w, (2, 2), "VALID", dimension_numbers=dims, feature_group_count=2
        )

    assert count(conv, (1, 8, 8, 4), (2, 2, 2, 6)) == 2 * (4 * 4 * 6) * (2 * 2 * 2)

    def scanned(x, w):
        return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0]

    assert count(scanned, (2, 3), (3, 3)) == 5 * 2 * 2 * 3 * 3

    def branches(p, x, w):
        return jax.lax.cond(p.sum() > 0, lambda: x @ w @ w, lambda: x @ w)

    assert count(branches, (1,), (2, 3), (3, 3)) == 2 * (2 * 2 * 3 * 3)

    @jax.custom_vjp
    def product(x, w):
        return x @ w

    product.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))
    loss = jax.jit(jax.value_and_grad(lambda x, w: product(x, w).sum(), argnums=(0, 1)))
    assert count(loss, (2, 3), (3, 4)) == 3 * (2 * 2 * 3 * 4)  # forward + both cotangent products


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


def test_explain_vs_kernelshap_benchmark_on_a_trained_run(trained_run, tmp_path):
    common = (f"--workdir={trained_run}", "--images=2", "--pairs_per_step=8")
    out = run("explain_vs_kernelshap.py", *common, "--max_budget=4096", f"--truth_file={tmp_path}/truth")
    assert "ground truth: exact (65,536 evaluations per image)" in out
    # The ground truth kept under the name np.savez gives it, and read back from there the next time.
    again = run("explain_vs_kernelshap.py", *common, "--max_budget=64", f"--truth_file={tmp_path}/truth")
    assert f"(read from {tmp_path}/truth.npz)" in again
    assert "explainer: MSE" in out
    assert "x faster" in out
    assert "(smallest budget, to 16 evaluations)" in out or "did not reach the explainer's error" in out
    # The explainer's training cost, read from its log, and the break-even.
    assert "surrogate evaluations; break-even after" in out


def test_break_even_sums_the_cost_of_several_runs(trained_run):
    """Two runs are one explainer (their mean): twice the training evaluations of one, from its log."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from explain_vs_kernelshap import training_cost

    from vitshap_jax.runs import load_explainer

    _, evals = training_cost(load_explainer(str(trained_run)))
    twice = (str(trained_run), str(trained_run))
    out = run("break_even.py", *twice, "--evals=34", "--images=2", "--pairs_per_step=8")
    assert "2 explainer run(s); 2 test images, 16 players" in out
    assert "KernelSHAP (standard) at 34 evaluations:" in out
    assert f"{2 * evals:,} surrogate evaluations; break-even after" in out


def test_profile_ops_counts_only_device_events_where_a_device_has_them():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from profile_ops import accelerator_pids

    def named(pid, name):
        return {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}

    gpu_trace = [named(1, "/host:CPU"), named(7, "/device:GPU:0 (stream 13)"), {"ph": "X", "pid": 7}]
    assert accelerator_pids(gpu_trace) == {7}
    assert accelerator_pids([named(1, "/host:CPU"), named(2, "python3")]) == set()


def test_warped_digits_come_from_the_training_split_only_and_look_like_digits(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import numpy as np
    from sklearn.datasets import load_digits
    from warped_digits import training_digits, warp

    from vitshap_jax.data.digits import split_indices

    images, labels = training_digits()
    everything = load_digits()
    held_out = np.concatenate([split_indices()["test"], split_indices()["validation"]])
    assert len(images) == 1257 and not any(
        np.array_equal(everything.images[i], images[j]) for i in held_out[:20] for j in range(len(images))
    ), "a validation or test digit among the ones to warp"
    rng = np.random.default_rng(0)
    still = [warp(x, rng, rotate=0, scale=0, shear=0, shift=0, alpha=0) for x in images[:50]]
    assert np.abs(np.stack(still) - images[:50]).mean() < 1.0  # no warp: the digit, up to the bitmap
    moved = np.stack([warp(x, rng) for x in images[:50]])
    assert moved.dtype.kind == "i" and moved.min() >= 0 and moved.max() <= 16
    assert 1.0 < np.abs(moved - images[:50]).mean() < 4.0  # warped, not destroyed

    out = tmp_path / "warped"
    printed = run("warped_digits.py", f"--out={out}", "--copies=1")
    assert "1257 digits written" in printed
    assert sum(len(files) for _, _, files in os.walk(out)) == 1257
    again = subprocess.run(
        [sys.executable, "benchmarks/warped_digits.py", f"--out={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert again.returncode != 0 and "is not empty" in again.stderr  # nothing overwritten


def test_training_signals_groups_name_their_rows_and_warn_of_rows_sized_for_more_images(capsys):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from training_signals import CONFIGS, GROUPS, SIZED_FOR_EXTRA_IMAGES, resolve_configs

    assert all(name in CONFIGS for names in GROUPS.values() for name in names)
    assert SIZED_FOR_EXTRA_IMAGES <= set(CONFIGS)
    # The views group is the five rows of its table, not every precomputed-v* row added since.
    views = resolve_configs("precomputed-views", extra_images="")
    assert len(views) == 5 and not set(views) & SIZED_FOR_EXTRA_IMAGES
    assert capsys.readouterr().err == ""
    # A warped-digits row without the warped digits: it runs, with a warning naming it; each name once.
    names = resolve_configs("precomputed-v4shared-e10-lr2e-3-mini,precomputed-views,wls-32,wls-32", "")
    assert names == ["precomputed-v4shared-e10-lr2e-3-mini", *views, "wls-32"]
    assert "precomputed-v4shared-e10-lr2e-3-mini are sized for --extra_images" in capsys.readouterr().err
    resolve_configs("precomputed-v4shared-e10-lr2e-3-mini", extra_images="runs/warp30")
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit, match="unknown --configs wls-33: choose from wls-32"):
        resolve_configs("wls-32,wls-33", "")
    # The default group trains without teachers; a distillation row needs them, said before any work.
    assert not [n for n in resolve_configs("signals") if n.startswith("distill")]
    with pytest.raises(SystemExit, match="distill-v16-e38-lr2e-3 distill finished explainers: give those"):
        resolve_configs("wls-32,distill-v16-e38-lr2e-3")
    assert resolve_configs("distill-v16-e38-lr2e-3", teachers="runs/a,runs/b") == ["distill-v16-e38-lr2e-3"]


def test_gpu_check_refuses_a_misspelt_part_before_running_anything():
    # A part name that matched nothing used to run nothing, silently, on a machine lent for minutes.
    env = dict(os.environ, PARTS="signals step_bf16", PYTHON=sys.executable)
    out = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "unknown part 'step_bf16': choose from" in out.stdout
    assert "gpu_check: jax" not in out.stdout  # stopped before the first check ran


def test_training_signals_reads_back_a_finished_run_only_if_it_has_this_calls_settings(tmp_path):
    # A finished run folder is reused (an interrupted benchmark resumes), but not under other settings
    # nor from another surrogate run: its MSE would be reported in a row that states this call's.
    import argparse
    import json

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from training_signals import as_paths, configure, train

    surrogate = tmp_path / "surrogate"
    surrogate.mkdir()
    (surrogate / "config.json").write_text(json.dumps({"run_id": "abc"}))
    args = argparse.Namespace(epochs=4, extra_images="", out=str(tmp_path), teachers="", train_images=1257)
    path = tmp_path / "wls-32-s0"  # a finished run of wls-32, seed 0, with --epochs=4, as train records it
    (path / "explainer").mkdir(parents=True)
    config = configure("wls-32", 0, args, str(surrogate)).to_dict() | {"upstream_run_id": "abc"}
    (path / "explainer" / "config.json").write_text(json.dumps(config))
    (path / "benchmark_seconds.json").write_text(json.dumps({"seconds": 12.5}))
    assert train("wls-32", 0, args, str(surrogate), None)[:2] == (str(path), 12.5)
    args.epochs = 8
    with pytest.raises(SystemExit, match=r"other settings \(.*train.epochs: 4 -> 8.*give another --out"):
        train("wls-32", 0, args, str(surrogate), None)
    args.epochs = 4
    (surrogate / "config.json").write_text(json.dumps({"run_id": "def"}))  # retrained in the same folder
    with pytest.raises(SystemExit, match=r"other settings \(upstream_run_id: abc -> def"):
        train("wls-32", 0, args, str(surrogate), None)
    # One folder spelt two ways is one setting.
    spelt = [as_paths({"explainer": {"extra_images": p}}) for p in ("runs/warp30/", "./runs/warp30")]
    assert spelt[0] == spelt[1]


def test_training_signals_times_runs_from_their_start_and_keeps_labels_of_a_stopped_start(tmp_path, capsys):
    # A run stopped after its labels used to crash when started again (its own labels copied onto
    # themselves); one stopped while training would resume and time only the rest.
    import argparse
    import json

    import numpy as np

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from training_signals import configure, share_labels, train

    surrogate = tmp_path / "surrogate"
    surrogate.mkdir()
    (surrogate / "config.json").write_text(json.dumps({"run_id": "abc"}))
    args = argparse.Namespace(epochs=4, extra_images="", out=str(tmp_path), teachers="", train_images=1257)
    c = configure("precomputed", 0, args, str(surrogate))
    path = tmp_path / "precomputed-s0"
    (path / "explainer").mkdir(parents=True)
    (path / "explainer" / "config.json").write_text(json.dumps(c.to_dict()))
    labels = path / "explainer" / "targets.npz"
    np.savez(labels, targets=np.zeros((2, 16, 10)), evals=c.explainer.target_evals)
    share_labels(c, str(tmp_path), 0, str(path))
    assert "labels of an earlier start" in capsys.readouterr().out
    (path / "explainer" / "checkpoints" / "120").mkdir(parents=True)
    with pytest.raises(SystemExit, match="holds an interrupted run .* its seconds would count only the rest"):
        train("precomputed", 0, args, str(surrogate), None)


def test_training_signals_results_keep_earlier_calls_rows_and_join_only_runs_of_this_surrogate(tmp_path):
    # A call for seed 1 used to overwrite the results.json of the call for seed 0 in the same --out.
    import json

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from training_signals import ensemble_runs, save_results

    curves = {"kernelshap": {"66": 1e-3}, "kernelshap_unsure": {}}
    save_results(
        str(tmp_path),
        curves,
        [{"name": "a", "seed": 0, "mse": 2.0}, {"name": "b", "seed": 0, "mse": 3.0}],
        {},
    )
    save_results(
        str(tmp_path), curves, [{"name": "a", "seed": 1, "mse": 1.0}], {"runs": ["x", "y"], "mse": 1.5}
    )
    save_results(
        str(tmp_path), curves, [{"name": "a", "seed": 0, "mse": 0.5}], {"runs": ["x", "y"], "mse": 1.2}
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [(r["name"], r["seed"], r["mse"]) for r in saved["rows"]] == [
        ("b", 0, 3.0),
        ("a", 1, 1.0),
        ("a", 0, 0.5),
    ]
    assert saved["ensembles"] == [{"runs": ["x", "y"], "mse": 1.2}]  # the same runs again: replaced
    assert saved["kernelshap"] == {"66": 1e-3}

    def finished(name, upstream):
        (tmp_path / name / "explainer").mkdir(parents=True)
        (tmp_path / name / "explainer" / "config.json").write_text(json.dumps({"upstream_run_id": upstream}))
        (tmp_path / name / "explainer" / "results.json").write_text("{}")
        return str(tmp_path / name)

    mine, other = finished("mine", "abc"), finished("other", "def")
    assert ensemble_runs(f"{mine},", "abc") == [os.path.realpath(mine)]
    with pytest.raises(SystemExit, match="explains surrogate run def, not abc"):
        ensemble_runs(f"{mine},{other}", "abc")
    with pytest.raises(SystemExit, match="holds no finished explainer run"):
        ensemble_runs(str(tmp_path / "nowhere"), "abc")
    with pytest.raises(SystemExit, match="given twice"):
        ensemble_runs(f"{mine},{mine}/", "abc")
    with pytest.raises(SystemExit, match="given twice .or also by --configs and --seeds"):
        ensemble_runs(mine, "abc", own=[mine])


def test_training_signals_out_folder_keeps_one_surrogates_ground_truth(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from training_signals import keep_one_surrogate

    keep_one_surrogate(str(tmp_path), "abc")
    keep_one_surrogate(str(tmp_path), "abc")  # the same surrogate run again: its files are reused
    with pytest.raises(SystemExit, match="holds the ground truth and runs of surrogate run abc, not"):
        keep_one_surrogate(str(tmp_path), "def")
    assert os.listdir(tmp_path) == ["surrogate.txt"]


@pytest.mark.parametrize(
    "flags, said",
    [
        (("--signals=wls,kernelshap:bogus",), "--signals: kernelshap:bogus unknown"),
        (("--attention_impl=matmul,cudnn",), "--attention_impl=cudnn needs an NVIDIA GPU, not cpu"),
        (("--matmul_precision=float32,fp8",), "--matmul_precision: fp8 unknown"),
        (("--signals=wls", "--flops"), "--signals measures the packed step at one matmul precision"),
        (("--signals=wls,",), "--signals:  unknown"),
    ],
)
def test_explainer_step_refuses_settings_it_cannot_measure_before_compiling(flags, said):
    # Each used to fail (or, cudnn on a CPU, time the matmul core under cudnn's name) only after the
    # settings before it had been compiled and timed.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "benchmarks/explainer_step.py", *TOY_STEP, *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and said in out.stderr and "images/s" not in out.stdout, out.stderr[-2000:]
