"""The patch-maskable ResNet and the import of timm ResNet state dicts (written here, no download).

The import is checked against an independent NumPy forward of the timm layout (NCHW, OIHW, BatchNorm in
eval mode); `benchmarks/check_resnet_timm.py` compares against timm itself, outside CI.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from vitshap_jax.models.pretrained import PretrainedMismatchError
from vitshap_jax.models.resnet import DEPTHS, MASKINGS, ResNet
from vitshap_jax.models.resnet_pretrained import load_resnet_pretrained, read_resnet_architecture

WIDTH, CLASSES, EPS = 8, 5, 1e-5


def _init(model, image):
    """Zero parameters of the right shapes (traced, never compiled: the tests' time goes to compiling)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, image, image, 3)))["params"])
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _random_like(params, seed):
    """Random values everywhere: the init's zero gains and zero head would make every output equal."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (0.5 + 0.3 * rng.standard_normal(x.shape)).astype(np.float32), params)


def _apply(model):
    return jax.jit(lambda params, images, mask=None: model.apply({"params": params}, images, mask))


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
@pytest.mark.parametrize("depth", sorted(DEPTHS))
def test_forward_shapes_and_dtypes(depth, stem):
    model = ResNet(num_classes=CLASSES, depth=depth, patch_size=8, width=WIDTH, stem=stem, dtype=jnp.bfloat16)
    images = jnp.zeros((2, 32, 32, 3))
    params = _init(model, 32)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
    bottleneck = DEPTHS[depth][0]
    last_conv = params["layer4_0"]["conv3" if bottleneck else "conv2"]["kernel"]
    assert last_conv.shape[-1] == WIDTH * 8 * (4 if bottleneck else 1)
    mask = jnp.array([[True] * 16, [False] * 8 + [True] * 8])
    # The stages call models with train=True and a dropout rng: accepted (traced here, run below).
    logits = jax.eval_shape(
        lambda p: model.apply({"params": p}, images, mask, train=True, rngs={"dropout": jax.random.key(2)}),
        params,
    )
    assert logits.shape == (2, CLASSES) and logits.dtype == jnp.float32


def test_bfloat16_forward_runs():
    model = ResNet(num_classes=CLASSES, depth=18, patch_size=4, width=WIDTH, stem="cifar", dtype=jnp.bfloat16)
    params = _random_like(_init(model, 8), 0)
    images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    logits = jax.jit(
        lambda p: model.apply({"params": p}, images, None, train=True, rngs={"dropout": jax.random.key(2)})
    )(params)
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_rejects_bad_fields_and_mask_shapes():
    with pytest.raises(ValueError, match="masking='attention'"):
        _init(ResNet(num_classes=2, depth=18, patch_size=4, width=WIDTH, masking="attention"), 16)
    with pytest.raises(ValueError, match="depth=101"):
        _init(ResNet(num_classes=2, depth=101, patch_size=4, width=WIDTH), 16)
    model = ResNet(num_classes=2, depth=18, patch_size=4, width=WIDTH, stem="cifar")
    params = _init(model, 16)
    with pytest.raises(ValueError, match="patch_mask has shape"):
        model.apply({"params": params}, jnp.zeros((1, 16, 16, 3)), jnp.ones((1, 15), bool))
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        model.apply({"params": params}, jnp.zeros((1, 18, 18, 3)))


@pytest.mark.parametrize("mask_channel", [False, True])
@pytest.mark.parametrize("masking", MASKINGS)
def test_masking_holds_out_exactly_the_patch_pixels(masking, mask_channel):
    p, image = 4, 16  # 16 patches
    model = ResNet(
        num_classes=CLASSES, depth=18, patch_size=p, width=WIDTH, stem="cifar", masking=masking,
        mask_channel=mask_channel,
    )  # fmt: skip
    x = np.asarray(jax.random.normal(jax.random.key(1), (1, image, image, 3)))
    mask = np.ones((1, 16), bool)
    mask[0, [0, 6]] = False  # patches 0 (rows 0-3, cols 0-3) and 6 (rows 4-7, cols 8-11) held out
    held_out, visible = x.copy(), x.copy()
    held_out[0, 4:8, 8:12] += 5.0  # patch 6: held out
    visible[0, 0:4, 4:8] += 5.0  # patch 1: visible
    batch = jnp.asarray(np.concatenate([x, held_out, visible]))
    masks = jnp.asarray(np.repeat(mask, 3, axis=0))
    # What the network sees (`__call__` reads the images only through `masked_input`): the fill value in
    # held-out pixels, the mask as a 4th channel; the same for both images that differ in a held-out patch.
    masked_input = jax.jit(
        lambda images, mask=None: model.apply({}, images, mask, method=ResNet.masked_input)
    )
    seen = np.asarray(masked_input(batch, masks))
    assert seen.shape == (3, image, image, 4 if mask_channel else 3)
    np.testing.assert_array_equal(seen[1], seen[0])
    assert (seen[2] != seen[0]).sum() == 4 * 4 * 3
    fill = -3.0 if masking == "input" else 0.0
    assert (seen[0, 4:8, 8:12, :3] == fill).all() and (seen[0, 8:, :, :3] == x[0, 8:]).all()
    if mask_channel:
        assert seen[0, 0:4, 0:4, 3].max() == 0 and seen[0, 0:4, 4:8, 3].min() == 1
        full = np.asarray(masked_input(batch))
        assert (full[..., 3] == 1).all()
    # A float mask (> 0.5 visible) is the same coalition; no mask is every patch visible.
    as_float = masked_input(batch, masks.astype(jnp.float32) * 0.9)
    np.testing.assert_array_equal(as_float, seen)
    np.testing.assert_array_equal(masked_input(batch), masked_input(batch, jnp.ones((3, 16), bool)))
    if masking == "input" and not mask_channel:
        return  # the whole network: once per input layout (3 or 4 channels)
    out = np.asarray(_apply(model)(_random_like(_init(model, image), 0), batch, masks))
    np.testing.assert_array_equal(out[1], out[0])
    assert np.abs(out[2] - out[0]).max() > 1e-3


# ----------------------------------------------------------------------------------------------------
# A timm-layout state dict and an independent NumPy forward of it.


def _bn(rng, c):
    return {
        "weight": 1 + 0.2 * rng.standard_normal(c),
        "bias": 0.2 * rng.standard_normal(c),
        "running_mean": 0.2 * rng.standard_normal(c),
        "running_var": rng.uniform(0.5, 1.5, c),
        "num_batches_tracked": np.array(7, np.int64),
    }


def _timm_state_dict(depth, stem, classes=CLASSES, width=WIDTH, seed=0):
    rng = np.random.default_rng(seed)
    sd = {}

    def conv(name, o, i, k):
        sd[f"{name}.weight"] = rng.standard_normal((o, i, k, k)) * np.sqrt(2 / (i * k * k))

    def bn(name, c):
        sd.update({f"{name}.{k}": v for k, v in _bn(rng, c).items()})

    conv("conv1", width, 3, 7 if stem == "imagenet" else 3)
    bn("bn1", width)
    bottleneck, blocks = DEPTHS[depth]
    inplanes = width
    for s, count in enumerate(blocks):
        planes = width * 2**s
        out = planes * (4 if bottleneck else 1)
        for i in range(count):
            b = f"layer{s + 1}.{i}"
            if bottleneck:
                conv(f"{b}.conv1", planes, inplanes, 1)
                conv(f"{b}.conv2", planes, planes, 3)
                conv(f"{b}.conv3", out, planes, 1)
            else:
                conv(f"{b}.conv1", planes, inplanes, 3)
                conv(f"{b}.conv2", planes, planes, 3)
            for k in range(1, 4 if bottleneck else 3):
                bn(f"{b}.bn{k}", planes if k < 3 or not bottleneck else out)
            if i == 0 and (s > 0 or inplanes != out):
                conv(f"{b}.downsample.0", out, inplanes, 1)
                bn(f"{b}.downsample.1", out)
            inplanes = out
    sd["fc.weight"] = rng.standard_normal((classes, inplanes)) / np.sqrt(inplanes)
    sd["fc.bias"] = 0.1 * rng.standard_normal(classes)
    return {k: (v if v.dtype == np.int64 else v.astype(np.float32)) for k, v in sd.items()}


def _np_conv(x, w, stride=1, pad=0):  # x [B, C, H, W], w [O, C, k, k]
    k = w.shape[-1]
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    return np.einsum("bchwij,ocij->bohw", windows, w)


def _np_forward(sd, x, depth, stem):
    """timm's ResNet in eval mode, NCHW, float64."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}

    def bn(name, y):
        g, b, m, v = (
            sd[f"{name}.{p}"][None, :, None, None] for p in ("weight", "bias", "running_mean", "running_var")
        )
        return (y - m) / np.sqrt(v + EPS) * g + b

    relu = lambda y: np.maximum(y, 0)  # noqa: E731
    x = x.transpose(0, 3, 1, 2).astype(np.float64)
    if stem == "imagenet":
        x = relu(bn("bn1", _np_conv(x, sd["conv1.weight"], 2, 3)))
        x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
        x = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max((-1, -2))
    else:
        x = relu(bn("bn1", _np_conv(x, sd["conv1.weight"], 1, 1)))
    bottleneck, blocks = DEPTHS[depth]
    for s, count in enumerate(blocks):
        for i in range(count):
            b, stride = f"layer{s + 1}.{i}", (2 if s > 0 and i == 0 else 1)
            if bottleneck:
                y = relu(bn(f"{b}.bn1", _np_conv(x, sd[f"{b}.conv1.weight"])))
                y = relu(bn(f"{b}.bn2", _np_conv(y, sd[f"{b}.conv2.weight"], stride, 1)))
                y = bn(f"{b}.bn3", _np_conv(y, sd[f"{b}.conv3.weight"]))
            else:
                y = relu(bn(f"{b}.bn1", _np_conv(x, sd[f"{b}.conv1.weight"], stride, 1)))
                y = bn(f"{b}.bn2", _np_conv(y, sd[f"{b}.conv2.weight"], 1, 1))
            if f"{b}.downsample.0.weight" in sd:
                x = bn(f"{b}.downsample.1", _np_conv(x, sd[f"{b}.downsample.0.weight"], stride))
            x = relu(y + x)
    return x.mean((2, 3)) @ sd["fc.weight"].T + sd["fc.bias"]


def _write(tmp_path, sd, name="model.safetensors", config=None):
    path = tmp_path / name
    save_file(sd, str(path))
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("depth,stem", [(18, "imagenet"), (50, "cifar")])
def test_import_matches_numpy_forward(tmp_path, depth, stem):
    sd = _timm_state_dict(depth, stem)
    path = _write(tmp_path, sd)
    arch = read_resnet_architecture(path)
    assert arch["model"] == {"depth": depth, "width": WIDTH, "stem": stem, "norm": "affine"}
    assert arch["num_classes"] == CLASSES
    model = ResNet(num_classes=CLASSES, patch_size=8, **arch["model"])
    params = load_resnet_pretrained(path, _init(model, 32))
    x = np.asarray(jax.random.normal(jax.random.key(3), (2, 32, 32, 3)))
    ours = np.asarray(_apply(model)(params, jnp.asarray(x)))
    ref = _np_forward(sd, x, depth, stem)
    np.testing.assert_allclose(ours, ref, atol=1e-4 * max(1, np.abs(ref).max()), rtol=0)


def _flat(params):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def test_head_reinitialized_for_another_class_count_and_mask_channel_starts_at_zero(tmp_path):
    sd = _timm_state_dict(18, "cifar", classes=7)
    path = _write(tmp_path, sd)
    model = ResNet(
        num_classes=3, depth=18, patch_size=4, width=WIDTH, stem="cifar", norm="affine", mask_channel=True
    )
    init = _flat(_random_like(_init(model, 16), 1))
    loaded = _flat(load_resnet_pretrained(path, traverse_util.unflatten_dict(init, sep="/")))
    assert set(loaded) == set(init)
    for key in ("fc/kernel", "fc/bias"):
        np.testing.assert_array_equal(loaded[key], init[key])
    stem = loaded["conv1/kernel"]  # [3, 3, 4, W]
    np.testing.assert_array_equal(stem[:, :, :3], sd["conv1.weight"].transpose(2, 3, 1, 0))
    assert (stem[:, :, 3] == 0).all()
    scale = sd["layer2.0.bn1.weight"] / np.sqrt(sd["layer2.0.bn1.running_var"] + EPS)
    np.testing.assert_allclose(loaded["layer2_0/norm1/scale"], scale, rtol=1e-6)
    bias = sd["layer2.0.downsample.1.bias"] - sd["layer2.0.downsample.1.running_mean"] * (
        sd["layer2.0.downsample.1.weight"] / np.sqrt(sd["layer2.0.downsample.1.running_var"] + EPS)
    )
    np.testing.assert_allclose(loaded["layer2_0/downsample_norm/bias"], bias, rtol=1e-5, atol=1e-7)
    # A file without a head (timm's num_classes=0) loads too, keeping the model's head.
    headless = _write(
        tmp_path, {k: v for k, v in sd.items() if not k.startswith("fc.")}, "headless.safetensors"
    )
    assert (
        _flat(load_resnet_pretrained(headless, traverse_util.unflatten_dict(init, sep="/")))["fc/kernel"]
        == init["fc/kernel"]
    ).all()


def test_mismatch_lists_every_key(tmp_path):
    sd = _timm_state_dict(18, "cifar")
    del sd["layer1.0.bn1.running_var"], sd["layer3.1.conv2.weight"]
    sd["layer2.0.conv1.weight"] = sd["layer2.0.conv1.weight"][:, :, :1, :1]
    sd["layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    path = _write(tmp_path, sd)
    model = ResNet(num_classes=CLASSES, depth=18, patch_size=4, width=WIDTH, stem="cifar", norm="affine")
    with pytest.raises(PretrainedMismatchError) as e:
        load_resnet_pretrained(path, _init(model, 16))
    message = str(e.value)
    assert "3 missing, 1 unexpected, 1 mismatched" in message
    for key in (
        "missing: layer1_0/norm1/scale (from layer1.0.bn1.running_var)",
        "missing: layer1_0/norm1/bias (from layer1.0.bn1.running_var)",
        "missing: layer3_1/conv2/kernel",
        "unexpected: layer5.0.conv1.weight",
        "mismatched: layer2_0/conv1/kernel: file (1, 1, 8, 16)",
    ):
        assert key in message
    # A ResNet-50 file into a ResNet-18: every difference at once, not the first one.
    r50 = _write(tmp_path, _timm_state_dict(50, "cifar"), "r50.safetensors")
    with pytest.raises(PretrainedMismatchError) as e:
        load_resnet_pretrained(r50, _init(model, 16))
    assert "unexpected: layer1.0.conv3.weight" in str(e.value)
    assert "unexpected: layer3.5.conv1.weight" in str(e.value)
    assert "mismatched: layer1_0/conv1/kernel" in str(e.value)


def test_read_architecture(tmp_path):
    config = {
        "architecture": "resnet50",
        "pretrained_cfg": {
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "input_size": [3, 224, 224],
        },
    }
    arch = read_resnet_architecture(
        _write(tmp_path, _timm_state_dict(50, "imagenet", width=16), config=config)
    )
    assert arch == {
        "model": {"depth": 50, "width": 16, "stem": "imagenet", "norm": "affine"},
        "normalization": "imagenet",
        "image_size": 224,
        "num_classes": CLASSES,
        "format": "timm resnet",
    }
    sd = _timm_state_dict(34, "cifar")
    assert read_resnet_architecture(_write(tmp_path, sd, "r34.safetensors"))["model"]["depth"] == 34
    # timm variants we do not have are refused by name.
    deep = {k: v for k, v in sd.items() if not k.startswith("conv1.")} | {
        "conv1.0.weight": np.zeros((4, 3, 3, 3), np.float32)
    }
    with pytest.raises(PretrainedMismatchError, match="deep stem"):
        read_resnet_architecture(_write(tmp_path, deep, "deep.safetensors"))
    with pytest.raises(PretrainedMismatchError, match="deep stem"):
        load_resnet_pretrained(str(tmp_path / "deep.safetensors"), {})
    fewer = {k: v for k, v in sd.items() if not k.startswith("layer3.5.")}
    with pytest.raises(PretrainedMismatchError, match=r"\(3, 4, 5, 3\)"):
        read_resnet_architecture(_write(tmp_path, fewer, "fewer.safetensors"))
    with pytest.raises(PretrainedMismatchError, match="not a timm ResNet"):
        read_resnet_architecture(
            _write(tmp_path, {"patch_embed.proj.weight": np.zeros(1, np.float32)}, "vit.safetensors")
        )


def test_a_stage_config_reads_a_timm_resnet_file_and_loads_it(tmp_path):
    """`--config.model.pretrained=<timm resnet>.safetensors` on a ViT preset: the stage's resolve makes
    the model that ResNet (architecture, depth, width, stem, folded norm), the ViT import is not tried,
    and `load_pretrained_into` fills it (the head kept for the dataset's classes)."""
    from tests.helpers import load
    from vitshap_jax.models import build_model, load_pretrained_into
    from vitshap_jax.stages import common

    sd = _timm_state_dict(18, "cifar")
    path = _write(
        tmp_path, sd, config={"pretrained_cfg": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
    )
    c = load("classifier", "digits")
    c.model.pretrained = path
    with c.unlocked():
        del c.dataset["class_names"]  # no data needed: resolve reads only the checkpoint here
    common.resolve(c)
    m = c.model
    assert (m.architecture, m.depth, m.hidden_size, m.stem, m.norm) == (
        "resnet",
        18,
        WIDTH,
        "cifar",
        "affine",
    )
    assert m.masking == "input"  # the ViT preset's default masking became the ResNet's
    assert c.dataset.normalization == "imagenet"
    model = build_model(c)
    params = load_pretrained_into(c, _init(model, 8))
    flat, stem_kernel = _flat(params), np.transpose(sd["conv1.weight"], (2, 3, 1, 0))
    np.testing.assert_allclose(flat["conv1/kernel"], stem_kernel, rtol=1e-6)
    assert flat["fc/kernel"].shape == (8 * WIDTH, 10)
