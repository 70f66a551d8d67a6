"""The three stages end to end on tiny generated datasets (real builders), and their guarantees:
checkpoints and chaining, 1 vs 8 devices, resume, NaN guard, upstream checks."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tests.helpers import _imagenette_tree, _mura_tree, assert_same_params, load, perturbed, tiny
from vitshap_jax import checkpoints, data, parallel
from vitshap_jax.models import build_explainer
from vitshap_jax.stages import classifier, common, explainer, surrogate
from vitshap_jax.train.loop import NonFiniteLossError, is_complete


@pytest.fixture(scope="module")
def imagenette_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenette")
    _imagenette_tree(root / "manual")
    data.prepare("imagenette", str(root / "manual"), str(root / "prepared"))
    return root / "prepared"


@pytest.fixture(scope="module")
def mura_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mura")
    _mura_tree(root / "manual")
    data.prepare("mura", str(root / "manual"), str(root / "prepared"))
    return root / "prepared"


def _flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _best(stage_path, like):
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
    return checkpoints.load_best_params(stage_path, target)


def _check_stage_dir(path, steps):
    assert str(steps) in os.listdir(os.path.join(path, "checkpoints"))
    assert os.listdir(os.path.join(path, "best"))
    assert json.load(open(os.path.join(path, "config.json")))["stage"] == os.path.basename(path)
    lines = [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]
    assert any("train/loss" in line for line in lines)
    assert any("epoch" in line and any(k.startswith("val/") for k in line) for line in lines)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(path, "tensorboard")))
    assert is_complete(path)


@pytest.mark.parametrize("dataset", ["imagenette", "mura"])
def test_three_stages_chain_through_checkpoints(tmp_path, dataset, request):
    data_dir = request.getfixturevalue(f"{dataset}_dir")
    mesh = parallel.make_mesh()
    work = str(tmp_path)
    steps = data.builder(dataset, str(data_dir)).info.splits["train"].num_examples // 8
    c1 = classifier.run(tiny("classifier", dataset, data_dir), work, mesh)
    _check_stage_dir(c1["path"], steps)
    assert set(c1["test"]) >= {"loss", "accuracy"} | ({"auroc"} if dataset == "mura" else set())

    c2 = surrogate.run(tiny("surrogate", dataset, data_dir), work, mesh)
    _check_stage_dir(c2["path"], steps)
    assert {"kl", "kl_heldout_0.50", "accuracy_heldout_0.90"} <= set(c2["test"])
    cls = _flat(_best(c1["path"], _shapes("classifier", dataset, data_dir)))
    sur = _flat(_best(c2["path"], _shapes("classifier", dataset, data_dir)))
    diffs = [np.abs(cls[k] - sur[k]).max() for k in cls]
    assert 0 < max(diffs) < 1e-3 * steps  # the surrogate is the classifier after a few small AdamW steps

    c3 = explainer.run(tiny("explainer", dataset, data_dir), work, mesh)
    _check_stage_dir(c3["path"], steps)
    assert c3["test"]["efficiency_gap"] < 1e-5
    exp = _flat(_best(c3["path"], _explainer_shapes(dataset, data_dir)))
    backbone = {k.removeprefix("backbone/"): v for k, v in exp.items() if k.startswith("backbone/")}
    assert set(backbone) == {k for k in sur if not k.startswith("head/")}
    assert max(np.abs(backbone[k] - sur[k]).max() for k in backbone) < 1e-3 * steps
    outputs = 1 if dataset == "mura" else 10
    assert exp[f"explainer_head/mlp_{2}/kernel"].shape == (32, outputs)
    if dataset == "mura":
        _evaluate_and_explain_a_binary_run(work, mesh, tmp_path)


def _evaluate_and_explain_a_binary_run(work, mesh, tmp_path):
    """The binary (sigmoid) path through the evaluation and load_explainer: one output, explained as the
    positive class, ground truth and explainer efficient for it."""
    from vitshap_jax.commands import evaluate
    from vitshap_jax.config import validate
    from vitshap_jax.data import open_split
    from vitshap_jax.runs import load_explainer

    c = load("evaluate", "mura")
    c.update(
        dict(
            num_images=4,
            batch_size=4,
            methods="explainer,kernelshap,permutation,leave_one_out",
            kernelshap_budgets="64",
            permutation_budgets="64",
            explain_class="predicted",  # ignored for one output: the positive class is explained
            num_heatmaps=1,
            output_dir=str(tmp_path / "evaluation"),
        )
    )
    validate(c)
    results = evaluate.run(c, work, mesh)
    assert results["explain_class"] == "positive output" and results["players"] == 16
    values = np.load(tmp_path / "evaluation" / "values.npz")
    assert (values["classes"] == 0).all() and values["ground_truth"].shape == (4, 16)
    explain = load_explainer(work)
    source = open_split(explain.config, "test")
    x = np.stack([explain.preprocess(np.asarray(source[i]["image"])) for i in range(4)])
    out = explain(x)
    assert out["phi"].shape == (4, 16, 1) and explain.class_names == ["abnormal (positive)"]
    total = np.asarray(out["v_all"] - out["v_empty"])[:, 0]
    assert ((np.asarray(out["v_all"]) > 0) & (np.asarray(out["v_all"]) < 1)).all()  # sigmoid probabilities
    np.testing.assert_allclose(values["ground_truth"].sum(1), total, atol=1e-4)
    np.testing.assert_allclose(values["explainer"].sum(1), total, atol=1e-4)
    # The explain command on a user's image: one output, named, with its heatmap.
    import PIL.Image

    from vitshap_jax.commands import explain as explain_stage

    PIL.Image.fromarray(np.asarray(source[0]["image"])).save(tmp_path / "xray.png")
    e = load("explain", "mura")
    e.images, e.output_dir = str(tmp_path / "xray.png"), str(tmp_path / "explanations")
    explain_stage.run(e, work, mesh)
    saved = np.load(tmp_path / "explanations" / "xray.npz")
    assert saved["phi"].shape == (16, 1) and list(saved["class_names"]) == ["abnormal (positive)"]
    np.testing.assert_allclose(saved["phi"], np.asarray(out["phi"])[0], atol=1e-5)
    assert (tmp_path / "explanations" / "xray.png").exists()


def _shapes(stage, dataset, data_dir):
    from vitshap_jax.models import build_model

    c = tiny(stage, dataset, data_dir)
    return jax.eval_shape(lambda: build_model(c).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"])


def _explainer_shapes(dataset, data_dir):
    c = tiny("explainer", dataset, data_dir)
    model = build_explainer(c)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"])


def test_upstream_is_checked_before_training(tmp_path, imagenette_dir):
    mesh = parallel.make_mesh()
    with pytest.raises(
        common.StageError, match=r"no classifier run in .*classifier.*run the classifier stage"
    ):
        surrogate.run(tiny("surrogate", "imagenette", imagenette_dir), str(tmp_path), mesh)
    assert not os.path.exists(tmp_path / "surrogate")  # a refused start writes nothing
    classifier.run(tiny("classifier", "imagenette", imagenette_dir), str(tmp_path), mesh)
    other_size = tiny("surrogate", "imagenette", imagenette_dir)
    other_size.dataset.image_size = other_size.dataset.resize_size = 32
    with pytest.raises(common.StageError, match=r"config.dataset.image_size=32, the classifier has 16"):
        surrogate.run(other_size, str(tmp_path), mesh)
    # A different model into the same stage directory is refused: its checkpoints could not resume.
    other = tiny("classifier", "imagenette", imagenette_dir)
    other.model.depth = 2
    with pytest.raises(common.StageError, match=r"different setup \(model.depth: 1 -> 2\)"):
        classifier.run(other, str(tmp_path), mesh)


def _digits(data_dir, **train):
    c = tiny("classifier", "digits", data_dir, **train)
    c.dataset.image_size, c.dataset.resize_size, c.model.patch_size = 8, 8, 2
    return c


def test_a_killed_run_resumes_to_the_same_result(tmp_path):
    """With a moving average of the parameters (`optim.ema_decay`), which the resumed run must carry on
    from the checkpoint, and which (not the optimizer's parameters) is the best checkpoint (one epoch:
    the last step's)."""
    mesh = parallel.make_mesh()
    config = _digits(tmp_path / "tfds", batch_size=64, checkpoint_every_steps=5, log_every_steps=5)
    config.optim.ema_decay = 0.9
    whole = classifier.run(config, str(tmp_path / "a"), mesh)
    shapes = _digits_shapes(config)
    tx = common.make_optimizer(config, common.total_steps(config, 1257))
    like = common.create_state(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes), tx, mesh, 0.9)
    manager = checkpoints.StageCheckpoints(whole["path"])
    last, _, _ = manager.restore_latest(like)
    manager.close()
    kept, average, own = (
        _flat(t) for t in (_best(whole["path"], shapes), last["ema"]["params"], last["params"])
    )
    for k in kept:
        np.testing.assert_allclose(kept[k], average[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert max(np.abs(kept[k] - own[k]).max() for k in kept) > 1e-4  # the average is not the parameters
    assert (
        classifier.run(config, str(tmp_path / "b"), mesh, stop_after=7) is not None
    )  # "killed" after step 7
    assert not is_complete(str(tmp_path / "b" / "classifier"))
    resumed = classifier.run(config, str(tmp_path / "b"), mesh)  # resumes from the step-5 checkpoint
    assert resumed["test"] == whole["test"]
    a = _flat(_best(whole["path"], _digits_shapes(config)))
    b = _flat(_best(resumed["path"], _digits_shapes(config)))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_the_moving_average_follows_its_recursion():
    """`apply_gradients` moves the average by 1 - min(decay, (1 + t) / (10 + t)) towards the new
    parameters at step t; without `ema_decay` the state has none and `model_params` gives the parameters."""
    import optax

    mesh = parallel.make_mesh()
    tx = optax.sgd(0.5)
    params = {"w": jnp.array([1.0, -2.0])}
    grads = [{"w": jnp.array([g, 2 * g])} for g in (1.0, -3.0, 0.5, 2.0)]
    for decay in (0.0, 0.3, 0.9):
        state = common.create_state(params, tx, mesh, decay)
        assert ("ema" in state) == (decay > 0)
        w, average = np.array([1.0, -2.0]), np.array([1.0, -2.0])
        for t, g in enumerate(grads):
            state = jax.jit(functools.partial(common.apply_gradients, tx=tx))(state, g)
            w = w - 0.5 * np.asarray(g["w"])
            average += (1 - min(decay, (1 + t) / (10 + t))) * (w - average)
        np.testing.assert_allclose(state["params"]["w"], w, rtol=1e-6)
        np.testing.assert_allclose(common.model_params(state)["w"], average if decay else w, rtol=1e-6)


@pytest.mark.parametrize("stage", ["classifier", "surrogate", "explainer"])
def test_a_run_killed_before_an_epoch_boundary_resumes_across_it(tmp_path, stage):
    """Two epochs of 4 steps (1,257 digits at batch 256), a checkpoint every 3 steps, killed after step
    3: the resumed run crosses into epoch 2 (a new permutation of the data) and ends like an
    uninterrupted one, for every stage (upstream stages trained once and copied)."""
    import shutil

    mesh = parallel.make_mesh()
    runners = {"classifier": classifier.run, "surrogate": surrogate.run, "explainer": explainer.run}
    order = list(runners)

    def config(name):
        c = tiny(name, "digits", tmp_path / "tfds", batch_size=256, epochs=2, checkpoint_every_steps=3)
        c.dataset.image_size, c.dataset.resize_size, c.model.patch_size = 8, 8, 2
        c.train.log_every_steps = 100
        return c

    for upstream in order[: order.index(stage)]:
        runners[upstream](config(upstream), str(tmp_path / "a"), mesh)
    if order.index(stage):
        shutil.copytree(tmp_path / "a", tmp_path / "b")
    whole = runners[stage](config(stage), str(tmp_path / "a"), mesh)
    runners[stage](config(stage), str(tmp_path / "b"), mesh, stop_after=3)
    assert not is_complete(str(tmp_path / "b" / stage))
    resumed = runners[stage](config(stage), str(tmp_path / "b"), mesh)
    assert resumed["test"] == whole["test"]
    lines = [json.loads(line) for line in open(tmp_path / "b" / stage / "metrics.jsonl")]
    assert any(line.get("epoch") == 2 for line in lines)  # the resumed run went through epoch 2
    if stage == "explainer":
        model = build_explainer(config(stage))
    else:
        from vitshap_jax.models import build_model

        model = build_model(config(stage))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"])
    a, b = (_flat(_best(str(tmp_path / d / stage), shapes)) for d in ("a", "b"))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


def _digits_shapes(config):
    from vitshap_jax.models import build_model

    return jax.eval_shape(
        lambda: build_model(config).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    )


@pytest.mark.parametrize("lr", [1e30, 1e6, float("inf")])
def test_a_nan_loss_stops_the_run_and_keeps_only_a_good_checkpoint(tmp_path, lr):
    """The kept checkpoint is finite and its parameters give a finite loss (a state saved after the
    last finite loss, but before its own loss was known, is deleted), or none is kept."""
    mesh = parallel.make_mesh()
    config = _digits(tmp_path / "tfds", batch_size=64, checkpoint_every_steps=1, log_every_steps=100)
    config.optim.update(dict(lr=lr, warmup_steps=0, grad_clip=0.0))
    with pytest.raises(NonFiniteLossError) as error:
        classifier.run(config, str(tmp_path), mesh)
    manager = checkpoints.StageCheckpoints(str(tmp_path / "classifier"))
    kept = manager.latest_step()
    if kept is None:
        manager.close()
        assert "no good checkpoint was saved" in str(error.value)
        return
    state, _, meta = manager.restore_latest(_train_state_like(config, mesh))
    manager.close()
    assert f"the last good checkpoint (step {kept})" in str(error.value)
    assert meta["step"] == kept and not meta["complete"]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
    from vitshap_jax.models import build_model

    images = np.random.default_rng(0).standard_normal((16, 8, 8, 3)).astype(np.float32)
    logits = build_model(config).apply({"params": state["params"]}, images)
    labels = np.arange(16) % 10
    loss = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), labels[:, None], 1).mean()
    assert np.isfinite(np.asarray(logits)).all() and np.isfinite(loss)


def _train_state_like(config, mesh):
    from vitshap_jax.models import build_model

    params = build_model(config).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    tx = common.make_optimizer(config, common.total_steps(config, 1257))
    return common.create_state(params, tx, mesh)


# ---- 1 vs 8 devices


def _one_step(step_fn, mesh, state, batch, *frozen):
    jitted = common.jit_train_step(step_fn, mesh, num_frozen=len(frozen))
    rep = parallel.replicated(mesh)
    state = jax.device_put(jax.tree.map(jnp.copy, state), rep)
    frozen = jax.device_put(frozen, rep)
    new_state, metrics = jitted(state, parallel.global_batch(batch, mesh), *frozen)
    return jax.device_get(new_state), jax.device_get(metrics)


@pytest.mark.parametrize("stage", ["classifier", "explainer"])
def test_one_step_on_8_devices_equals_1_device(tmp_path, stage):
    config = tiny(stage, "imagenette", tmp_path)
    config.optim.update(dict(warmup_steps=0, lr=1e-3))  # warmup would make the first step's lr 0
    # float32 matmuls: the sharding must not change the result beyond float32 summation order (with
    # bfloat16 operands the backward pass's roundings differ by ~2e-4 between the two layouts)
    config.model.matmul_precision = "float32"
    from vitshap_jax.models import build_model

    rng = np.random.default_rng(0)
    batch = {
        "image": rng.standard_normal((16, 16, 16, 3)).astype(np.float32),
        "label": rng.integers(0, 10, 16).astype(np.int32),
        "index": np.arange(16, dtype=np.int32),
        "valid": np.ones(16, bool),
    }
    vit = build_model(config)
    vit_params = perturbed(vit.init(jax.random.key(1), batch["image"][:1])["params"], 0.05, 2)
    tx = common.make_optimizer(config, 100)
    if stage == "classifier":
        params, frozen = vit_params, ()
        fn = functools.partial(
            classifier.train_step, model=vit, tx=tx, target="multiclass", seed=0, mask_patches=True
        )
    else:
        model = build_explainer(config)
        params = model.init(jax.random.key(3), batch["image"][:1])["params"]
        frozen = (vit_params,)
        fn = functools.partial(
            explainer.train_step,
            explainer=model,
            surrogate=vit,
            tx=tx,
            target="multiclass",
            seed=0,
            num_coalitions=4,
            paired=True,
            packed=True,
        )
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    one, m1 = _one_step(fn, parallel.make_mesh(jax.devices()[:1]), state, batch, *frozen)
    eight, m8 = _one_step(fn, parallel.make_mesh(), state, batch, *frozen)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    a, b = _flat(one["params"]), _flat(eight["params"])
    assert_same_params(a, b)
    if stage == "explainer":  # coalition pairs in n + 2 tokens: the same step as plain masked passes
        plain, mp = _one_step(
            functools.partial(fn, packed=False), parallel.make_mesh(jax.devices()[:1]), state, batch, *frozen
        )
        np.testing.assert_allclose(mp["loss"], m1["loss"], rtol=1e-5)
        assert_same_params(_flat(plain["params"]), a)
    assert max(np.abs(a[k] - _flat(params)[k]).max() for k in a) > 0  # the step did move the parameters


@pytest.fixture(scope="module")
def masked_classifier(tmp_path_factory, imagenette_dir):
    """A classifier trained on random coalitions (`train.mask_patches`): its own surrogate."""
    c = tiny("classifier", "imagenette", imagenette_dir, mask_patches=True)
    return classifier.run(c, str(tmp_path_factory.mktemp("masked")), parallel.make_mesh())


def test_a_masked_classifier_serves_as_its_own_surrogate(tmp_path, imagenette_dir, masked_classifier):
    mesh = parallel.make_mesh()
    first = masked_classifier
    e = tiny("explainer", "imagenette", imagenette_dir)
    e.upstream = first["path"]  # no surrogate stage: the explainer reads the classifier's run
    e.explainer.freeze_backbone = True
    e.optim.update(dict(warmup_steps=0, lr=1e-3))
    result = explainer.run(e, str(tmp_path), mesh)
    assert result["test"]["efficiency_gap"] < 1e-5
    assert not os.path.exists(tmp_path / "surrogate")
    cls = _flat(_best(first["path"], _shapes("classifier", "imagenette", imagenette_dir)))
    exp = _flat(_best(result["path"], _explainer_shapes("imagenette", imagenette_dir)))
    for k, v in exp.items():  # a frozen backbone stays the classifier's, bit for bit; the head trains
        if k.startswith("backbone/"):
            np.testing.assert_array_equal(v, cls[k.removeprefix("backbone/")], err_msg=k)
    init = _flat(build_explainer(e).init(jax.random.key(e.seed), jnp.zeros((1, 16, 16, 3)))["params"])
    assert np.abs(exp["explainer_head/mlp_2/kernel"] - init["explainer_head/mlp_2/kernel"]).max() > 1e-4


def test_pipeline_runs_the_stages_and_skips_finished_ones(tmp_path, imagenette_dir, capsys):
    from vitshap_jax.stages import pipeline

    config = load("pipeline", "imagenette")
    for stage in ("classifier", "surrogate", "explainer"):
        config[stage] = tiny(stage, "imagenette", imagenette_dir)
    mesh = parallel.make_mesh()
    pipeline.run(config, str(tmp_path), mesh)
    out = capsys.readouterr().out
    assert "vitshap_jax pipeline finished" in out and str(tmp_path / "explainer" / "results.json") in out
    stamps = {s: os.path.getmtime(tmp_path / s / "results.json") for s in pipeline.ORDER}
    again = pipeline.run(config, str(tmp_path), mesh)  # everything finished: nothing is retrained
    assert {s: os.path.getmtime(tmp_path / s / "results.json") for s in pipeline.ORDER} == stamps
    assert again["explainer"]["test"]["efficiency_gap"] < 1e-5


def test_a_start_that_fails_its_checks_writes_nothing(tmp_path):
    """A wrong class count or a batch larger than the data stops before the stage directory exists, so
    the corrected command is not refused as "a different setup"."""
    mesh = parallel.make_mesh()
    wrong_classes = _digits(tmp_path / "tfds")
    wrong_classes.dataset.num_classes = 5
    with pytest.raises(ValueError, match="has 10 classes"):
        classifier.run(wrong_classes, str(tmp_path / "work"), mesh)
    too_big = _digits(tmp_path / "tfds", batch_size=2048)
    with pytest.raises(common.StageError, match="batch_size=2048 is larger than the 1257 training examples"):
        classifier.run(too_big, str(tmp_path / "work"), mesh)
    uneven = _digits(tmp_path / "tfds", batch_size=12)
    with pytest.raises(common.StageError, match="does not split over 8 devices"):
        classifier.run(uneven, str(tmp_path / "work"), mesh)
    assert not (tmp_path / "work").exists()


def test_an_explainer_wider_than_its_surrogate_trains_from_scratch(
    tmp_path, imagenette_dir, masked_classifier
):
    """A ViT explainer of another shape than its surrogate (`model=<variant>` and its own fields) cannot
    start from the surrogate's encoder: it starts from its fresh initialization and trains (its test
    evaluation runs it with the surrogate: efficient values)."""
    mesh = parallel.make_mesh()
    first = masked_classifier
    e = tiny("explainer", "imagenette", imagenette_dir)
    e.upstream = first["path"]  # the masked classifier (width 32, one block) is the surrogate
    e.model.update(dict(variant="mini", hidden_size=48, depth=2, num_heads=4, mlp_dim=96))
    result = explainer.run(e, str(tmp_path), mesh)
    assert result["test"]["efficiency_gap"] < 1e-5
    model = build_explainer(e)
    init = model.init(jax.random.key(e.seed), jnp.zeros((1, 16, 16, 3)))["params"]
    exp, init = _flat(_best(result["path"], init)), _flat(init)
    assert exp["backbone/Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"].shape == (48, 96)
    # AdamW moves a weight by about lr per step at most: the trained backbone is its fresh start moved.
    steps = data.builder("imagenette", str(imagenette_dir)).info.splits["train"].num_examples // 8
    moved = max(np.abs(exp[k] - init[k]).max() for k in exp if k.startswith("backbone/"))
    assert 0 < moved < 2 * e.optim.lr * steps
