"""launch.py as a user runs it: parse, validate, dispatch; bad flags are one-line errors."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(*args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "launch.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def _one_line_error(result):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("launch.py: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_overrides_parse_validate_and_reach_the_stage(tmp_path):
    r = launch(
        "--config=configs/explainer.py:mura", f"--workdir={tmp_path}", "--config.optim.lr=3e-5", "--dry_run"
    )
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)
    assert (config["stage"], config["dataset"]["name"], config["optim"]["lr"]) == ("explainer", "mura", 3e-5)
    r = launch("--config=configs/explainer.py:mura", f"--workdir={tmp_path}", "--config.optim.lr=3e-5")
    # Dispatched to the explainer stage, which finds no surrogate: one line, exit 1, nothing written.
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "launch.py: error: no surrogate run in" in r.stderr
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config.optim.nope=1"], "--config.optim.nope: config.optim has no field 'nope'"),
        (["--config.optimm.lr=1"], "--config.optimm.lr: config has no field 'optimm'"),
        (["--config.optim.lr=fast"], "--config.optim.lr=fast: could not convert string to float"),
        (["--config.model.num_heads=5"], "config.model.num_heads=5: must divide"),
        (["--config.train.batch_size=12"], "batch_size=12 does not split over 8 devices"),
    ],
)
def test_bad_overrides_are_one_line_errors_naming_the_key(tmp_path, args, expected):
    line = _one_line_error(launch("--config=configs/explainer.py:mura", f"--workdir={tmp_path}", *args))
    assert expected in line


@pytest.mark.parametrize(
    "config, expected",
    [
        ("configs/explainer.py:murra", "unknown dataset 'murra'"),
        ("configs/surrogate.py:pet,masking", "option 'masking' needs a value"),
        ("configs/nostage.py:pet", "cannot load the config file: [Errno 2] No such file"),
    ],
)
def test_bad_config_arguments_are_one_line_errors(tmp_path, config, expected):
    assert expected in _one_line_error(launch(f"--config={config}", f"--workdir={tmp_path}"))


def test_an_unreachable_coordinator_is_one_line_after_a_bounded_wait(tmp_path):
    r = launch(
        "--config=configs/classifier.py:digits",
        f"--workdir={tmp_path / 'work'}",
        "--distributed",
        "--coordinator_address=127.0.0.1:9",
        "--num_processes=2",
        "--process_id=1",
        "--distributed_timeout=2",
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr and "Fatal" not in r.stderr, r.stderr[-2000:]
    assert "launch.py: error: the coordinator 127.0.0.1:9 did not answer within 2 s" in r.stderr
    assert not (tmp_path / "work").exists()


def _fake_upstream_surrogate(path):
    """A surrogate run's config file (all `refuse_dropped_flags` reads): digits' `micro` shape."""
    from configs import surrogate

    config = surrogate.get_config("digits").to_dict()
    config["model"]["variant"] = "micro"  # what a run records once it took its classifier's shape
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return config


def test_shape_flags_an_explainer_would_drop_are_refused(tmp_path):
    _fake_upstream_surrogate(tmp_path / "surrogate")
    work = tmp_path / "work"
    r = launch(
        "--config=configs/explainer.py:digits",
        f"--workdir={work}",
        f"--config.upstream={tmp_path / 'surrogate'}",
        "--config.model.hidden_size=128",
        "--config.model.depth=4",  # the surrogate's: kept, not named
    )
    line = _one_line_error(r)
    assert "--config.model.hidden_size=128 (the upstream's: 64)" in line
    assert "depth" not in line and "other than the upstream's (micro)" in line and "model=<variant>" in line
    assert not work.exists()


def test_shape_flags_are_refused_only_where_the_upstream_would_replace_them(tmp_path):
    from configs import explainer
    from vitshap_jax.errors import StageError
    from vitshap_jax.stages.common import refuse_dropped_flags

    upstream = tmp_path / "surrogate"
    _fake_upstream_surrogate(upstream)

    def config(arg="digits", **model):
        c = explainer.get_config(arg)
        c.upstream = str(upstream)
        c.model.update(model)
        return c

    refuse_dropped_flags(config(hidden_size=64), {"model.hidden_size": 64}, str(tmp_path))  # the same
    refuse_dropped_flags(config(hidden_size=128), {}, str(tmp_path))  # not a flag: a config file's value
    # A variant named: the explainer keeps its own shape (from scratch), so the flag is used.
    mini = config("digits,model=mini", hidden_size=96)
    refuse_dropped_flags(mini, {"model.hidden_size": 96}, str(tmp_path))
    with pytest.raises(StageError, match=r"--config.model.num_heads=2 \(the upstream's: 4\)"):
        refuse_dropped_flags(config(num_heads=2), {"model.num_heads": 2}, str(tmp_path))
    # The same variant as the upstream's also takes its shape.
    with pytest.raises(StageError, match="mlp_dim=512"):
        refuse_dropped_flags(config("digits,model=micro", mlp_dim=512), {"model.mlp_dim": 512}, str(tmp_path))
    # The players are the upstream's patches, whatever the variant: no other shape to point to.
    with pytest.raises(StageError, match="patch_size=4 .* a patch is one player.*drop the flag"):
        refuse_dropped_flags(config(patch_size=4), {"model.patch_size": 4}, str(tmp_path))


def _vit_npz(path, depth=2):
    """A ViT checkpoint in the vision_transformer .npz layout (our parameter names): hidden 32, 4 heads."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import traverse_util

    from vitshap_jax.models import ViT

    model = ViT(num_classes=10, patch_size=2, hidden_size=32, depth=depth, num_heads=4, mlp_dim=64)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    np.savez(path, **{k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()})
    return path


def test_shape_flags_a_pretrained_checkpoint_would_replace_are_refused(tmp_path):
    npz = _vit_npz(tmp_path / "vit.npz")
    work = tmp_path / "work"
    r = launch(
        "--config=configs/classifier.py:digits",
        f"--workdir={work}",
        f"--config.model.pretrained={npz}",
        "--config.model.depth=3",
        "--config.model.hidden_size=32",  # the file's: kept, not named
    )
    line = _one_line_error(r)
    assert "--config.model.depth=3 (the checkpoint's: 2)" in line and "hidden_size" not in line
    assert "checkpoint_overrides" in line and "drop config.model.pretrained" in line
    assert not work.exists()


def test_shape_flags_are_refused_only_where_the_checkpoint_would_replace_them(tmp_path):
    from configs import classifier
    from vitshap_jax.errors import StageError
    from vitshap_jax.stages.common import refuse_dropped_flags

    npz = _vit_npz(tmp_path / "vit.npz")

    def config(pretrained=npz, overrides="", **model):
        c = classifier.get_config("digits")
        c.model.update(dict(pretrained=str(pretrained), checkpoint_overrides=overrides, **model))
        return c

    refuse_dropped_flags(config(num_heads=4), {"model.num_heads": 4}, str(tmp_path))  # the file's value
    refuse_dropped_flags(config(num_heads=8), {}, str(tmp_path))  # a config file's value, not a flag
    refuse_dropped_flags(config(num_heads=8), {"optim.lr": 1e-3}, str(tmp_path))  # no shape flag
    # A file that cannot be read is the stage's to report (with its own message), not this check's.
    refuse_dropped_flags(config(tmp_path / "missing.npz", depth=3), {"model.depth": 3}, str(tmp_path))
    with pytest.raises(StageError, match=r"--config.model.mlp_dim=128 \(the checkpoint's: 64\)"):
        refuse_dropped_flags(config(mlp_dim=128), {"model.mlp_dim": 128}, str(tmp_path))
    # What checkpoint_overrides states is what the stage uses: a flag that disagrees is refused too.
    refuse_dropped_flags(config(overrides="num_heads=8", num_heads=8), {"model.num_heads": 8}, str(tmp_path))
    with pytest.raises(StageError, match=r"num_heads=4 \(the checkpoint's: 8\)"):
        refuse_dropped_flags(
            config(overrides="num_heads=8", num_heads=4), {"model.num_heads": 4}, str(tmp_path)
        )
