"""Explaining users' images with a trained run: the Python call, the command, the pictures."""

import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from vitshap_jax.errors import StageError
from vitshap_jax.runs import load_explainer, read_explainer_config
from vitshap_jax.viz.heatmaps import figure_size, save_explanation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_heatmap_file_size_and_symmetric_scale(tmp_path):
    phi = np.linspace(-0.2, 0.5, 16 * 3).reshape(16, 3)
    image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    limits = save_explanation(image, phi, ["a", "b", "c"], str(tmp_path / "x.png"))
    assert limits == (-0.5, 0.5)  # symmetric around 0, set by the largest |value| of the figure
    with PIL.Image.open(tmp_path / "x.png") as png:
        assert png.size == figure_size(3)
    with pytest.raises(ValueError, match="square grid"):
        save_explanation(image, phi[:15], ["a", "b", "c"], str(tmp_path / "y.png"))


def test_load_explainer_gives_efficient_values(trained_run):
    explain = load_explainer(str(trained_run))
    image = np.random.default_rng(1).integers(0, 255, (30, 20, 3), dtype=np.uint8)  # any size
    x = explain.preprocess(image)
    assert x.shape == (16, 16, 3) and x.dtype == np.float32
    out = explain(np.stack([x, x[::-1]]))
    assert out["phi"].shape == (2, 16, 10) and out["v_all"].shape == (2, 10)
    np.testing.assert_allclose(
        np.asarray(out["phi"]).sum(1), np.asarray(out["v_all"] - out["v_empty"]), atol=1e-5
    )
    assert len(explain.class_names) == 10 and explain.class_names[0] == "tench"
    for where in (trained_run, trained_run / "explainer"):  # the config alone, no parameters loaded
        assert read_explainer_config(str(where)).to_dict() == explain.config.to_dict()
    with pytest.raises(StageError, match="no explainer run in"):
        read_explainer_config(str(trained_run / "surrogate"))


def test_explain_command_writes_values_and_pictures_and_reports_bad_files(trained_run, tmp_path):
    PIL.Image.fromarray(np.full((50, 40), 128, np.uint8)).save(tmp_path / "gray.png")  # grayscale, odd size
    PIL.Image.fromarray(np.zeros((20, 20, 4), np.uint8), mode="RGBA").save(tmp_path / "alpha.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "launch.py",
            "--config=configs/explain.py:imagenette",
            f"--workdir={trained_run}",
            f"--config.images={tmp_path}",
            f"--config.output_dir={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1"),
    )
    assert r.returncode == 1, r.stderr[-2000:]
    assert "1 of 3 files could not be explained" in r.stderr and "broken.jpg" in r.stderr
    assert sorted(os.listdir(out)) == ["alpha.npz", "alpha.png", "gray.npz", "gray.png"]
    values = np.load(out / "gray.npz")
    assert values["phi"].shape == (16, 10)
    np.testing.assert_allclose(values["phi"].sum(0), values["v_all"] - values["v_empty"], atol=1e-5)
    with PIL.Image.open(out / "gray.png") as png:
        assert png.size == figure_size(3)


def test_curve_pictures_are_written_at_their_size(tmp_path):
    from vitshap_jax.viz.curves import curve_size, save_insertion_deletion, save_kl_curves

    save_kl_curves(
        [0.0, 0.5, 0.9], {"attention": [0.01, 0.2, 0.5], "zero": [0.02, 0.4, 0.9]}, str(tmp_path / "kl.png")
    )
    curves = {
        "insertion": np.linspace(0, 1, 17)[None].repeat(3, 0),
        "deletion": np.linspace(1, 0, 17)[None].repeat(3, 0),
    }
    curves |= {"insertion_auc": curves["insertion"].mean(1), "deletion_auc": curves["deletion"].mean(1)}
    save_insertion_deletion({"explainer": curves, "random": curves}, str(tmp_path / "curves.png"))
    for name in ("kl.png", "curves.png"):
        with PIL.Image.open(tmp_path / name) as png:
            assert png.size == curve_size()
            assert np.asarray(png.convert("L")).std() > 5  # something was drawn


def test_bfloat16_compute_stays_close_to_float32(trained_run):
    f32 = load_explainer(str(trained_run), dtype="float32")
    bf16 = load_explainer(str(trained_run), dtype="bfloat16")
    x = np.random.default_rng(2).standard_normal((8, 16, 16, 3)).astype(np.float32)
    a, b = f32(x), bf16(x)
    assert b["phi"].dtype == np.float32  # float32 outputs
    v_gap = float(np.abs(np.asarray(a["v_all"]) - np.asarray(b["v_all"])).max())
    phi_gap = float(np.abs(np.asarray(a["phi"]) - np.asarray(b["phi"])).max())
    scale = float(np.abs(np.asarray(a["phi"])).max())
    print(f"bf16 vs f32: max |v_all diff| {v_gap:.2e}, max |phi diff| {phi_gap:.2e} (max |phi| {scale:.2e})")
    assert v_gap < 2e-2 and phi_gap < 0.05 * scale
    assert v_gap > 0  # bfloat16 did run
    with pytest.raises(ValueError, match="dtype='float16'"):
        load_explainer(str(trained_run), dtype="float16")


def test_output_names_never_collide_and_folders_without_images_are_errors(tmp_path):
    from vitshap_jax.commands.explain import image_paths, output_names
    from vitshap_jax.errors import StageError

    paths = [
        "runs/other/a.png",
        "runs/other/a.jpg",
        "runs/mixed/a.png",
        "runs/mixed/b.png",
        "runs/mixed/b.png",
    ]
    names = output_names(paths[:4])
    assert names == {
        "runs/other/a.png": "other__a_png",
        "runs/other/a.jpg": "other__a_jpg",
        "runs/mixed/a.png": "mixed__a_png",
        "runs/mixed/b.png": "b",
    }
    assert len(set(output_names(paths).values())) == 4  # the same file twice: one name
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(StageError, match="empty holds no image files"):
        image_paths(str(tmp_path / "empty"))
    with pytest.raises(StageError, match="names no files"):
        image_paths(" , ")


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    from vitshap_jax.data import read_image

    PIL.Image.fromarray(np.full((4, 5), 32896, np.uint16)).save(tmp_path / "deep.png")  # 16-bit gray
    assert read_image(str(tmp_path / "deep.png")).tolist() == np.full((4, 5, 3), 128).tolist()
    PIL.Image.fromarray(np.full((4, 5), 0.25, np.float32)).save(tmp_path / "float.tif")
    assert (read_image(str(tmp_path / "float.tif")) == 64).all()


def test_explain_exports_shapiq_files_and_pairwise_interactions(trained_run, tmp_path):
    """--config.export=shapiq writes each drawn class's values as InteractionValues shapiq loads;
    --config.interactions adds the top class's pairs among its strongest patches (exact here: 2^5
    coalitions fit the budget) as a k-SII file, a picture and arrays in the .npz."""
    import shapiq

    from tests.helpers import load
    from vitshap_jax import parallel
    from vitshap_jax.commands import explain as explain_command

    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    c = load("explain", "imagenette")
    c.images, c.output_dir, c.max_classes = str(tmp_path / "a.png"), str(tmp_path / "out"), 2
    c.export, c.interactions, c.interaction_players, c.interaction_budget = "shapiq", "k-SII", 5, 64
    explain_command.run(c, str(trained_run), parallel.make_mesh())
    out = tmp_path / "out"
    saved = np.load(out / "a.npz")
    top = int(np.argmax(saved["v_all"]))
    files = sorted(os.listdir(out))
    assert f"a.class{top}.json" in files and "a.k-SII.json" in files and "a.interactions.png" in files
    sv = shapiq.InteractionValues.load(str(out / f"a.class{top}.json"))
    assert (sv.index, sv.n_players) == ("SV", 16)
    np.testing.assert_allclose([sv[(i,)] for i in range(16)], saved["phi"][:, top], atol=1e-6)
    np.testing.assert_allclose(sv.baseline_value, saved["v_empty"][top], atol=1e-6)
    pairs = shapiq.InteractionValues.load(str(out / "a.k-SII.json"))
    assert (pairs.index, pairs.max_order, pairs.n_players, pairs.estimated) == ("k-SII", 2, 5, False)
    players = saved["interaction_players"]
    assert list(players) == sorted(np.argsort(-np.abs(saved["phi"][:, top]))[:5])
    np.testing.assert_allclose(pairs[(1, 3)], saved["interaction_pairs"][1, 3], atol=1e-6)
    # efficiency of the restricted game: its players and pairs add up to v(all) - v(all but them)
    total = saved["interaction_values"].sum() + saved["interaction_pairs"].sum() / 2
    assert abs(total + pairs.baseline_value - saved["v_all"][top]) < 1e-4
