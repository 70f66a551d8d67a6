"""Your own ViT on your own images, end to end with the README's commands: a folder of images with the
quirks of real folders, a Hugging Face DINOv2-with-registers directory (no classification head), the
pipeline command, then the explain command on the finished run."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from tests.helpers import _timm_state, _write_hf, load
from vitshap_jax import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("cat", "dog", "zebra")
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")


def _launch(*args):
    """launch.py as a user runs it; its output when it succeeds."""
    r = subprocess.run(
        [sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _image_tree(root):
    """Three class folders of 20x24 images, with hidden files, a Mac sidecar, a README, and images in
    CMYK, 16-bit grayscale, RGBA and palette modes."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(14):
            pixels = rng.integers(0, 80, (20, 24, 3), dtype=np.uint8)
            pixels[..., c] += 150  # a class colour
            PIL.Image.fromarray(pixels).save(folder / f"img{i}.{'JPG' if i % 2 else 'png'}")
        (folder / "._img0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    cat = root / "cat"
    PIL.Image.new("CMYK", (24, 20), (0, 200, 200, 0)).save(cat / "cmyk.jpg")
    PIL.Image.fromarray(np.full((20, 24), 40000, np.uint16)).save(cat / "deep.png")
    PIL.Image.new("RGBA", (24, 20), (200, 0, 0, 128)).save(cat / "alpha.png")
    PIL.Image.new("P", (24, 20), 3).save(root / "dog" / "palette.png")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "README.txt").write_text("my pets")


def test_folder_and_a_transformers_checkpoint_to_heatmaps_with_the_readme_commands(tmp_path):
    _image_tree(tmp_path / "images")
    checkpoint, _ = _write_hf(tmp_path, "Dinov2WithRegistersModel")  # 16 px, patch 4, 3 registers, no head
    work = tmp_path / "work"
    common = [
        f"--workdir={work}",
        f"--config.dataset.manual_dir={tmp_path / 'images'}",
        f"--config.dataset.data_dir={tmp_path / 'prepared'}",
        "--config.dataset.image_size=16",
        "--config.dataset.resize_size=16",
        "--config.dataset.read_threads=1",
    ]
    stages = []
    for stage in ("classifier", "surrogate", "explainer"):
        stages += [f"--config.{stage}.train.epochs=1", f"--config.{stage}.train.batch_size=8"]
    r = _launch(
        "--config=configs/pipeline.py:folder",
        f"--config.model.pretrained={checkpoint}",
        *common,
        *stages,
        "--config.explainer.explainer.num_coalitions=4",
        "--config.explainer.explainer.mlp_ratio=1",
    )
    assert "vitshap_jax pipeline finished" in r.stdout
    for stage in ("classifier", "surrogate", "explainer"):
        config = checkpoints.read_config(str(work / stage))
        d, m = config["dataset"], config["model"]
        # Read from the data and the checkpoint, not typed: classes, target, architecture, normalization.
        assert d["class_names"] == list(CLASSES) and d["num_classes"] == 3 and d["target"] == "multiclass"
        assert (m["hidden_size"], m["depth"], m["num_heads"], m["patch_size"]) == (32, 2, 4, 4)
        assert (m["reg_tokens"], m["pos_prefix"], m["layer_scale"]) == (3, 1, True)
        assert d["normalization"] == "imagenet" and m["from_checkpoint"] == str(checkpoint)
    prepared = json.loads((work / "classifier" / "results.json").read_text())
    assert 0 <= prepared["test"]["accuracy"] <= 1

    PIL.Image.fromarray(np.full((30, 30, 3), 200, np.uint8)).save(tmp_path / "mine.jpg")
    out = tmp_path / "explained"
    _launch(
        "--config=configs/explain.py:folder",
        f"--workdir={work}",
        f"--config.images={tmp_path / 'mine.jpg'}",
        f"--config.output_dir={out}",
    )
    assert sorted(os.listdir(out)) == ["mine.npz", "mine.png"]
    values = np.load(out / "mine.npz")
    assert values["phi"].shape == (16, 3) and list(values["class_names"]) == list(CLASSES)
    np.testing.assert_allclose(values["phi"].sum(0), values["v_all"] - values["v_empty"], atol=1e-5)


def test_a_run_reads_classes_target_architecture_and_normalization_instead_of_typing_them(tmp_path):
    """`stages.common.resolve`: two classes give a sigmoid target; a checkpoint's architecture replaces
    the variant's; the next stage takes them from the upstream run's config."""
    from configs import common as presets
    from vitshap_jax.stages import common

    for name in ("no", "yes"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(12):
            PIL.Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / "images" / name / f"{i}.png")
    checkpoint, _ = _write_hf(tmp_path, "CLIPVisionModel")

    def folder_config(stage):
        c = load(stage, "folder")
        c.dataset.manual_dir, c.dataset.data_dir = str(tmp_path / "images"), str(tmp_path / "prep")
        return c

    config = folder_config("classifier")
    config.model.pretrained = str(checkpoint)
    assert (config.dataset.num_classes, config.dataset.target, config.model.hidden_size) == (0, "auto", 768)
    common.resolve(config)
    d, m = config.dataset, config.model
    assert (d.num_classes, d.target, list(d.class_names)) == (2, "binary", ["no", "yes"])
    assert (m.hidden_size, m.depth, m.num_heads, m.mlp_dim, m.patch_size) == (32, 2, 4, 64, 4)
    assert (m.pre_norm, m.act, m.ln_eps, d.normalization) == (True, "quick_gelu", 1e-5, "clip")
    # A surrogate config of the preset's shape adopts the classifier run's architecture.
    surrogate = folder_config("surrogate")
    assert surrogate.model.hidden_size == presets.MODEL_VARIANTS["base"]["hidden_size"]
    common.resolve(surrogate, config.to_dict())
    assert all(surrogate.model[k] == config.model[k] for k in ("hidden_size", "pre_norm", "act", "ln_eps"))
    assert surrogate.dataset.normalization == "clip" and surrogate.dataset.target == "binary"
    # A normalization that contradicts the checkpoint's is refused, not silently used.
    other = folder_config("surrogate")
    other.dataset.normalization = "imagenet"
    with pytest.raises(common.StageError, match="used 'clip': leave it at auto"):
        common.resolve(other, config.to_dict())


def test_what_a_checkpoint_cannot_tell_is_given_by_hand(tmp_path):
    """A timm file without config.json cannot say its heads: 64 channels per head is the guess, and
    config.model.checkpoint_overrides states the truth (typed, checked)."""
    from safetensors.numpy import save_file

    from vitshap_jax.stages import common

    save_file(_timm_state(0), str(tmp_path / "model.safetensors"))
    config = load("classifier", "digits")
    config.model.pretrained = str(tmp_path / "model.safetensors")
    common.resolve(config)
    assert config.model.num_heads == 1  # 32 channels: the 64-channel guess
    config.model.checkpoint_overrides = "num_heads=4, act=gelu_tanh, layer_scale=false"
    common.resolve(config)
    assert (config.model.num_heads, config.model.act, config.model.layer_scale) == (4, "gelu_tanh", False)
    for bad, message in (("heads=4", "not field=value with a field of"), ("num_heads=four", "is not a int")):
        config.model.checkpoint_overrides = bad
        with pytest.raises(common.StageError, match=message):
            common.resolve(config)
