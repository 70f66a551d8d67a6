"""Loading public ViT checkpoints: files in each format are written here, no download."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import traverse_util
from safetensors.numpy import save_file

from tests.helpers import perturbed
from vitshap_jax.models import PretrainedMismatchError, ViT, load_pretrained

D, DEPTH, HEADS, MLP, PATCH, IMAGE, CLASSES = 32, 2, 4, 64, 4, 16, 5


def _model(num_classes=CLASSES, hidden=D):
    return ViT(
        num_classes=num_classes,
        patch_size=PATCH,
        hidden_size=hidden,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_dim=MLP,
    )


def _init(model, image=IMAGE, seed=0):
    return model.init(jax.random.key(seed), jnp.zeros((1, image, image, 3)))["params"]


def _random_like(params, seed):
    return perturbed(jax.tree.map(jnp.zeros_like, params), 0.3, seed)


def _flat(params):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _assert_trees_equal(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.fixture(scope="module")
def source():
    """Random parameters in our (= google-research/vision_transformer) naming."""
    return _random_like(_init(_model()), seed=1)


@pytest.mark.parametrize("prefix", ["", "opt/target/"])
def test_vision_transformer_npz_loads_by_name(tmp_path, source, prefix):
    """Plain names, and the flax-optimizer layout of the original ViT checkpoints, whose keys read
    `opt/target/Transformer/encoderblock_0/LayerNorm_0/scale`, `opt/target/embedding/kernel`, ..."""
    path = tmp_path / "vit.npz"
    np.savez(path, **{prefix + k: v for k, v in _flat(source).items()})
    loaded = load_pretrained(path, _init(_model(), seed=7))
    _assert_trees_equal(loaded, source)


def _big_vision_names(flat, scanned):
    renames = {
        "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
        "LayerNorm_2": "LayerNorm_1",
        "MlpBlock_3": "MlpBlock_0",
    }
    out, stacked = {}, {}
    for key, value in flat.items():
        if key == "Transformer/posembed_input/pos_embedding":
            out["params/pos_embedding"] = value
            continue
        parts = key.split("/")
        if len(parts) > 2 and parts[1].startswith("encoderblock_"):
            parts[2] = renames.get(parts[2], parts[2])
            if scanned:
                index = int(parts[1].split("_")[1])
                stacked.setdefault("/".join(["Transformer", "encoderblock", *parts[2:]]), {})[index] = value
                continue
        out["params/" + "/".join(parts)] = value
    for key, blocks in stacked.items():
        out["params/" + key] = np.stack([blocks[i] for i in sorted(blocks)])
    return out


@pytest.mark.parametrize("scanned", [False, True])
def test_big_vision_npz_loads(tmp_path, source, scanned):
    path = tmp_path / "bv.npz"
    np.savez(path, **_big_vision_names(_flat(source), scanned))
    _assert_trees_equal(load_pretrained(path, _init(_model(), seed=7)), source)


# ---- timm: random weights in timm's layout, checked against a NumPy forward pass written from timm's code.


def _timm_state(seed, num_classes=CLASSES, grid=IMAGE // PATCH):
    rng = np.random.default_rng(seed)

    def r(*shape):
        return (0.3 * rng.standard_normal(shape)).astype(np.float32)

    sd = {
        "cls_token": r(1, 1, D),
        "pos_embed": r(1, 1 + grid * grid, D),
        "patch_embed.proj.weight": r(D, 3, PATCH, PATCH),
        "patch_embed.proj.bias": r(D),
        "norm.weight": 1 + r(D),
        "norm.bias": r(D),
        "head.weight": r(num_classes, D),
        "head.bias": r(num_classes),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd |= {
            b + "norm1.weight": 1 + r(D),
            b + "norm1.bias": r(D),
            b + "attn.qkv.weight": r(3 * D, D),
            b + "attn.qkv.bias": r(3 * D),
            b + "attn.proj.weight": r(D, D),
            b + "attn.proj.bias": r(D),
            b + "norm2.weight": 1 + r(D),
            b + "norm2.bias": r(D),
            b + "mlp.fc1.weight": r(MLP, D),
            b + "mlp.fc1.bias": r(MLP),
            b + "mlp.fc2.weight": r(D, MLP),
            b + "mlp.fc2.bias": r(D),
        }
    return sd


def _ln(x, w, b):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * w + b


def _timm_forward(sd, images):
    """timm VisionTransformer.forward on NHWC images, float64."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    x = images.transpose(0, 3, 1, 2).astype(np.float64)  # NCHW
    bsz, c, h, w = x.shape
    g = h // PATCH
    patches = x.reshape(bsz, c, g, PATCH, g, PATCH).transpose(0, 2, 4, 1, 3, 5).reshape(bsz, g * g, -1)
    x = patches @ sd["patch_embed.proj.weight"].reshape(D, -1).T + sd["patch_embed.proj.bias"]
    x = np.concatenate([np.broadcast_to(sd["cls_token"], (bsz, 1, D)), x], 1) + sd["pos_embed"]
    hd = D // HEADS
    for i in range(DEPTH):
        b = f"blocks.{i}."
        y = _ln(x, sd[b + "norm1.weight"], sd[b + "norm1.bias"])
        qkv = (y @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"]).reshape(bsz, -1, 3, HEADS, hd)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)
        a = scipy.special.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd), axis=-1)
        y = (a @ v).transpose(0, 2, 1, 3).reshape(bsz, -1, D)
        x = x + y @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        y = (
            _ln(x, sd[b + "norm2.weight"], sd[b + "norm2.bias"]) @ sd[b + "mlp.fc1.weight"].T
            + sd[b + "mlp.fc1.bias"]
        )
        y = 0.5 * y * (1 + scipy.special.erf(y / np.sqrt(2)))
        x = x + y @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
    x = _ln(x, sd["norm.weight"], sd["norm.bias"])
    return x[:, 0] @ sd["head.weight"].T + sd["head.bias"]


def test_timm_safetensors_gives_timms_outputs(tmp_path):
    sd = _timm_state(seed=2)
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    model = _model()
    params = load_pretrained(path, _init(model))
    images = np.random.default_rng(3).standard_normal((3, IMAGE, IMAGE, 3)).astype(np.float32)
    ours = model.apply({"params": params}, jnp.asarray(images))
    np.testing.assert_allclose(np.asarray(ours), _timm_forward(sd, images), rtol=1e-4, atol=1e-4)


def test_timm_bfloat16_file_is_cast_to_float32(tmp_path):
    import ml_dtypes

    sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in _timm_state(seed=2).items()}
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    params = load_pretrained(path, _init(_model()))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    np.testing.assert_array_equal(np.asarray(params["cls"]), sd["cls_token"].astype(np.float32))


@pytest.mark.parametrize("drop_head", [False, True])
def test_head_is_reinitialized_when_the_class_count_differs(tmp_path, drop_head):
    sd = _timm_state(seed=4, num_classes=1000)
    if drop_head:
        del sd["head.weight"], sd["head.bias"]
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    init = _init(_model())
    params = load_pretrained(path, init)
    _assert_trees_equal(params["head"], init["head"])
    np.testing.assert_array_equal(np.asarray(params["cls"]), sd["cls_token"])


def test_position_embedding_is_resized_to_a_new_grid(tmp_path):
    sd = _timm_state(seed=5)  # 4x4 grid
    per_channel = np.linspace(-1, 1, D, dtype=np.float32)
    sd["pos_embed"][0, 1:] = per_channel  # a field constant over the grid stays constant
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    model = _model()
    params = load_pretrained(path, _init(model, image=24))  # 6x6 grid
    pos = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
    assert pos.shape == (1, 37, D)
    np.testing.assert_array_equal(pos[0, 0], sd["pos_embed"][0, 0])
    np.testing.assert_allclose(pos[0, 1:], np.broadcast_to(per_channel, (36, D)), atol=1e-6)
    assert model.apply({"params": params}, jnp.zeros((1, 24, 24, 3))).shape == (1, CLASSES)


def test_position_embedding_resize_keeps_rows_as_rows(tmp_path):
    """Channel 0 a ramp down the rows, channel 1 a ramp across the columns of the 4x4 grid (patches
    row-major): after resizing to 6x6 each ramp still runs along its own axis (a transposed grid fails)
    and spans the same range, increasing."""
    sd = _timm_state(seed=6)
    rows, cols = np.meshgrid(np.arange(4.0), np.arange(4.0), indexing="ij")
    sd["pos_embed"][0, 1:, 0] = rows.ravel()
    sd["pos_embed"][0, 1:, 1] = cols.ravel()
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    pos = np.asarray(
        load_pretrained(path, _init(_model(), image=24))["Transformer"]["posembed_input"]["pos_embedding"]
    )
    grid = pos[0, 1:].reshape(6, 6, D)
    down, across = grid[..., 0], grid[..., 1]
    np.testing.assert_allclose(down, down[:, :1].repeat(6, 1), atol=1e-6)  # constant along a row
    np.testing.assert_allclose(across, across[:1].repeat(6, 0), atol=1e-6)  # constant down a column
    assert (np.diff(down[:, 0]) > 0).all() and (np.diff(across[0]) > 0).all()
    np.testing.assert_allclose([down.min(), down.max()], [0, 3], atol=1e-6)
    np.testing.assert_allclose(down[:, 0], across[0], atol=1e-6)  # the same ramp, transposed


def test_mismatch_names_every_missing_and_unexpected_key(tmp_path):
    sd = _timm_state(seed=6)
    del sd["blocks.1.norm1.weight"], sd["blocks.0.attn.qkv.bias"]
    sd["blocks.0.ls1.gamma"] = np.ones(D, np.float32)
    sd["reg_token"] = np.ones((1, 4, D), np.float32)
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    with pytest.raises(PretrainedMismatchError) as err:
        load_pretrained(path, _init(_model()))
    text = str(err.value)
    assert "4 missing, 2 unexpected, 0 mismatched" in text  # qkv.bias feeds query, key and value
    for name in (
        "blocks.1.norm1.weight",
        "blocks.0.attn.qkv.bias",
        "blocks.0.ls1.gamma",
        "reg_token",
        "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/value/bias",
    ):
        assert name in text


def test_a_different_width_is_reported_key_by_key(tmp_path):
    wide = _random_like(_init(_model(hidden=48)), seed=8)
    path = tmp_path / "wide.npz"
    np.savez(path, **_flat(wide))
    with pytest.raises(
        PretrainedMismatchError, match=r"embedding/kernel: file \(4, 4, 3, 48\).*model \(4, 4, 3, 32\)"
    ):
        load_pretrained(path, _init(_model()))


def test_pre_logits_needs_a_new_head(tmp_path, source):
    flat = _flat(source) | {
        "pre_logits/kernel": np.ones((D, D), np.float32),
        "pre_logits/bias": np.ones(D, np.float32),
    }
    path = tmp_path / "i21k.npz"
    np.savez(path, **flat)
    with pytest.raises(PretrainedMismatchError, match="pre_logits"):
        load_pretrained(path, _init(_model()))
    init = _init(_model(num_classes=3))
    params = load_pretrained(path, init)  # a new head: pre_logits goes with the old one
    _assert_trees_equal(params["head"], init["head"])


def test_bad_files_are_clear_errors(tmp_path):
    params = _init(_model())
    with pytest.raises(FileNotFoundError, match="do not exist.*vision_transformer.*timm"):
        load_pretrained(tmp_path / "nope.npz", params)
    (tmp_path / "w.pth").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown pretrained format"):
        load_pretrained(tmp_path / "w.pth", params)
    np.savez(tmp_path / "other.npz", weights=np.ones(3))
    with pytest.raises(PretrainedMismatchError, match="not a ViT checkpoint.*weights"):
        load_pretrained(tmp_path / "other.npz", params)
    (tmp_path / "html.npz").write_text("<html>a login page saved as the checkpoint</html>")
    with pytest.raises(PretrainedMismatchError, match="html.npz: not a readable .npz of arrays"):
        load_pretrained(tmp_path / "html.npz", params)
    (tmp_path / "model.safetensors").write_bytes(b"PK\x03\x04 a zip, not safetensors")
    with pytest.raises(PretrainedMismatchError, match="model.safetensors: not a readable safetensors file"):
        load_pretrained(tmp_path / "model.safetensors", params)
