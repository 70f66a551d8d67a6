"""Checkpoints of the ViT families people fine-tune: Hugging Face `transformers` directories (ViT, DeiT,
DINOv2 with and without registers, CLIP vision) and timm state dicts with their options (registers,
layer scale, pre-norm, no class token with average pooling, distillation head, patch 14).

Each test writes a tiny random checkpoint in the library's on-disk naming, reads its architecture the
way a run does (`read_architecture`), loads it, and compares our outputs with a NumPy float64 forward
pass written from that library's documented architecture, on the library's own parameter names.
(`benchmarks/check_checkpoints.py` compares against the libraries themselves, outside CI.)
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from safetensors.numpy import save_file

from tests.helpers import FAMILY_CLASSES as CLASSES
from tests.helpers import FAMILY_D as D
from tests.helpers import FAMILY_DEPTH as DEPTH
from tests.helpers import FAMILY_HEADS as HEADS
from tests.helpers import FAMILY_MLP as MLP
from tests.helpers import HF_CASES, _timm_state, _write_hf
from vitshap_jax.models import ViT, load_pretrained, read_architecture
from vitshap_jax.models.pretrained import PretrainedMismatchError


def _ln(x, w, b, eps):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


ACTS = {
    "gelu": lambda y: 0.5 * y * (1 + scipy.special.erf(y / np.sqrt(2))),
    "quick_gelu": lambda y: y * scipy.special.expit(1.702 * y),
}


def _attention(x, q, k, v):
    b, t, _ = x.shape
    hd = D // HEADS
    q, k, v = (y.reshape(b, t, HEADS, hd).transpose(0, 2, 1, 3) for y in (q, k, v))
    a = scipy.special.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd), axis=-1)
    return (a @ v).transpose(0, 2, 1, 3).reshape(b, t, D)


def _patches(images, weight, bias, patch):
    """PyTorch Conv2d(kernel = stride = patch) on NHWC images: [B, n, D], row-major patches."""
    x = images.transpose(0, 3, 1, 2)
    b, c, h, w = x.shape
    g = h // patch
    p = x.reshape(b, c, g, patch, g, patch).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)
    out = p @ weight.reshape(weight.shape[0], -1).T
    return out if bias is None else out + bias


# ---------------------------------------------------------------------------------------- transformers


def _hf_forward(family, sd, images, *, eps, act, patch=4, head=None):
    """transformers' forward (modeling_vit / deit / dinov2 / clip) in float64: logits with a head,
    else the pooled class-token feature (CLIPVisionModel's pooler_output, last_hidden_state[:, 0])."""
    sd = {
        k.removeprefix("vit.").removeprefix("deit.").removeprefix("vision_model."): v.astype(np.float64)
        for k, v in sd.items()
    }
    images = images.astype(np.float64)
    bsz = images.shape[0]
    if family == "clip":
        x = _patches(images, sd["embeddings.patch_embedding.weight"], None, patch)
        cls = np.broadcast_to(sd["embeddings.class_embedding"], (bsz, 1, D))
        x = np.concatenate([cls, x], 1) + sd["embeddings.position_embedding.weight"][None]
        x = _ln(x, sd["pre_layrnorm.weight"], sd["pre_layrnorm.bias"], eps)
        for i in range(DEPTH):
            b = f"encoder.layers.{i}."
            lin = lambda y, n, b=b: y @ sd[f"{b}{n}.weight"].T + sd[f"{b}{n}.bias"]  # noqa: E731
            y = _ln(x, sd[b + "layer_norm1.weight"], sd[b + "layer_norm1.bias"], eps)
            x = x + lin(
                _attention(
                    y, lin(y, "self_attn.q_proj"), lin(y, "self_attn.k_proj"), lin(y, "self_attn.v_proj")
                ),
                "self_attn.out_proj",
            )
            y = _ln(x, sd[b + "layer_norm2.weight"], sd[b + "layer_norm2.bias"], eps)
            x = x + lin(ACTS[act](lin(y, "mlp.fc1")), "mlp.fc2")
        return _ln(x[:, 0], sd["post_layernorm.weight"], sd["post_layernorm.bias"], eps)
    x = _patches(
        images,
        sd["embeddings.patch_embeddings.projection.weight"],
        sd["embeddings.patch_embeddings.projection.bias"],
        patch,
    )
    tokens = [np.broadcast_to(sd["embeddings.cls_token"], (bsz, 1, D))]
    if family == "deit":
        tokens.append(np.broadcast_to(sd["embeddings.distillation_token"], (bsz, 1, D)))
    x = np.concatenate(tokens + [x], 1) + sd["embeddings.position_embeddings"]
    if "embeddings.register_tokens" in sd:  # after the position embeddings, behind the class token
        regs = np.broadcast_to(
            sd["embeddings.register_tokens"], (bsz, *sd["embeddings.register_tokens"].shape[1:])
        )
        x = np.concatenate([x[:, :1], regs, x[:, 1:]], 1)
    for i in range(DEPTH):
        b = f"encoder.layer.{i}."
        lin = lambda y, n, b=b: y @ sd[f"{b}{n}.weight"].T + sd[f"{b}{n}.bias"]  # noqa: E731
        n1, n2 = ("norm1", "norm2") if family == "dinov2" else ("layernorm_before", "layernorm_after")
        y = _ln(x, sd[f"{b}{n1}.weight"], sd[f"{b}{n1}.bias"], eps)
        att = lin(
            _attention(y, *(lin(y, f"attention.attention.{n}") for n in ("query", "key", "value"))),
            "attention.output.dense",
        )
        x = x + (att * sd[f"{b}layer_scale1.lambda1"] if family == "dinov2" else att)
        y = _ln(x, sd[f"{b}{n2}.weight"], sd[f"{b}{n2}.bias"], eps)
        if family == "dinov2":
            x = x + lin(ACTS[act](lin(y, "mlp.fc1")), "mlp.fc2") * sd[f"{b}layer_scale2.lambda1"]
        else:
            x = x + lin(ACTS[act](lin(y, "intermediate.dense")), "output.dense")
    x = _ln(x, sd["layernorm.weight"], sd["layernorm.bias"], eps)
    if head == "classifier":
        return x[:, 0] @ sd["classifier.weight"].T + sd["classifier.bias"]
    if head == "teacher":
        cls = x[:, 0] @ sd["cls_classifier.weight"].T + sd["cls_classifier.bias"]
        dist = x[:, 1] @ sd["distillation_classifier.weight"].T + sd["distillation_classifier.bias"]
        return (cls + dist) / 2
    return x[:, 0]


def _our_model(arch, num_classes=CLASSES):
    fields = {k: v for k, v in arch["model"].items() if k != "patch_size"}
    return ViT(num_classes=num_classes, patch_size=arch["model"]["patch_size"], **fields)


def _load(path, arch, image=16, num_classes=CLASSES):
    model = _our_model(arch, num_classes)
    params = model.init(jax.random.key(0), jnp.zeros((1, image, image, 3)))["params"]
    prefix = int(model.class_token) + int(model.distill_token) + model.reg_tokens
    pos_prefix = prefix if model.pos_prefix < 0 else model.pos_prefix
    return model, load_pretrained(path, params, pos_prefix=pos_prefix)


def _features(model, params, images):
    """Logits, or for a checkpoint without head the pooled feature."""
    return model.apply({"params": params}, images, method=lambda m, x: m.pooled(m.encode(x)))


IMAGES = np.random.default_rng(9).standard_normal((2, 16, 16, 3)).astype(np.float32)


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_transformers_directory_gives_the_librarys_outputs(tmp_path, case):
    model_type, _, family, head, registers, act, eps = HF_CASES[case]
    folder, sd = _write_hf(tmp_path, case)
    arch = read_architecture(folder)
    m = arch["model"]
    assert (m["hidden_size"], m["depth"], m["num_heads"], m["mlp_dim"], m["patch_size"]) == (
        D,
        DEPTH,
        HEADS,
        MLP,
        4,
    )
    assert m["reg_tokens"] == registers and m["distill_token"] == (family == "deit")
    assert m["ln_eps"] == eps and m["act"] == act
    model, params = _load(folder, arch)
    expected = _hf_forward(family, sd, IMAGES, eps=eps, act=act, head=head)
    if head:
        ours = model.apply({"params": params}, jnp.asarray(IMAGES))
    else:
        ours = _features(model, params, jnp.asarray(IMAGES))
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)


def test_registers_and_distillation_token_stay_visible_and_pack_exactly(tmp_path):
    """On imported DINOv2-with-registers and DeiT-with-teacher models: attention masking equals running
    the visible patches alone (token dropping), and the packed n + 2P pair equals two masked passes."""
    # The empty coalition (only prefix tokens left), a random one, and a random one for the other image.
    masks = jnp.asarray(np.random.default_rng(1).random((2, 16)) < 0.4).at[0].set(False)
    for case in ("Dinov2WithRegistersModel", "DeiTForImageClassificationWithTeacher"):
        folder, _ = _write_hf(tmp_path, case)
        model, params = _load(folder, read_architecture(folder))
        images = jnp.asarray(IMAGES)
        masked = model.apply({"params": params}, images, masks)
        both = model.apply({"params": params}, images, masks, with_complement=True)
        assert np.isfinite(np.asarray(masked)).all()
        for i in range(2):
            keep = jnp.asarray(np.flatnonzero(np.asarray(masks[i]))[None])
            alone = model.apply({"params": params}, images[i : i + 1], patch_indices=keep)
            np.testing.assert_allclose(masked[i], alone[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(both[:, 0], masked, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            both[:, 1], model.apply({"params": params}, images, ~masks), rtol=1e-5, atol=1e-5
        )


def test_a_full_clip_model_directory_loads_its_vision_tower(tmp_path):
    folder, sd = _write_hf(tmp_path, "CLIPVisionModel")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({"model_type": "clip", "architectures": ["CLIPModel"], "vision_config": cfg})
    )
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
            }
        )
    )
    arch = read_architecture(folder)
    assert arch["normalization"] == "clip" and arch["model"]["pre_norm"]
    model, params = _load(folder, arch)
    np.testing.assert_allclose(
        np.asarray(_features(model, params, jnp.asarray(IMAGES))),
        _hf_forward("clip", sd, IMAGES, eps=1e-5, act="quick_gelu"),
        rtol=1e-5,
        atol=1e-5,
    )


def test_a_16_bit_transformers_checkpoint_loads(tmp_path):
    folder, sd = _write_hf(tmp_path, "ViTForImageClassification", dtype=np.float16)
    model, params = _load(folder, read_architecture(folder))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    np.testing.assert_array_equal(
        np.asarray(params["cls"]), sd["vit.embeddings.cls_token"].astype(np.float32)
    )


def test_unsupported_or_incomplete_transformers_directories_are_clear_errors(tmp_path):
    folder, _ = _write_hf(tmp_path, "ViTModel")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"model_type": "swin"}))
    with pytest.raises(PretrainedMismatchError, match="model_type 'swin' is not supported"):
        read_architecture(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").unlink()
    with pytest.raises(PretrainedMismatchError, match="needs model.safetensors"):
        read_architecture(folder)
    # An array the model does not have is never dropped silently.
    folder, sd = _write_hf(tmp_path, "Dinov2Model", seed=1)
    save_file(
        sd | {"encoder.layer.0.extra.weight": np.zeros(3, np.float32)}, str(folder / "model.safetensors")
    )
    with pytest.raises(PretrainedMismatchError, match="unexpected: encoder.layer.0.extra.weight"):
        _load(folder, read_architecture(folder))
    # Dinov2ForImageClassification's head reads [class token; patch mean] (2D wide): not silently dropped.
    save_file(
        sd
        | {
            "classifier.weight": np.zeros((CLASSES, 2 * D), np.float32),
            "classifier.bias": np.zeros(CLASSES, np.float32),
        },
        str(folder / "model.safetensors"),
    )
    with pytest.raises(
        PretrainedMismatchError, match="head reads a 64-wide feature, this ViT's a 32-wide one"
    ):
        _load(folder, read_architecture(folder))


# ---------------------------------------------------------------------------------------------- timm


TIMM_CASES = {
    # name: (architecture name for config.json, options of the state dict)
    "dinov2_registers_patch14": (
        "vit_small_patch14_reg4_dinov2",
        dict(patch=14, regs=2, no_embed_class=True, layer_scale=True),
    ),
    "avg_pool_no_class_token": ("vit_little_patch4_gap", dict(class_token=False, fc_norm=True)),
    "clip_quickgelu_pre_norm": ("vit_base_patch4_clip_quickgelu_16", dict(pre_norm=True)),
    "deit_distilled": ("deit_tiny_distilled_patch4", dict(distilled=True)),
}


def _timm_forward(sd, images, *, patch, eps, act, no_embed_class=False, fc_norm=False):
    """timm VisionTransformer.forward (and VisionTransformerDistilled's inference) in float64."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    images = images.astype(np.float64)
    bsz = images.shape[0]
    x = _patches(images, sd["patch_embed.proj.weight"], sd.get("patch_embed.proj.bias"), patch)
    prefix = [
        np.broadcast_to(sd[k], (bsz, *sd[k].shape[1:]))
        for k in ("cls_token", "dist_token", "reg_token")
        if k in sd
    ]
    if no_embed_class:  # _pos_embed: position embeddings on the patches, then the prefix tokens
        x = np.concatenate(prefix + [x + sd["pos_embed"]], 1)
    else:
        x = np.concatenate(prefix + [x], 1) + sd["pos_embed"]
    if "norm_pre.weight" in sd:
        x = _ln(x, sd["norm_pre.weight"], sd["norm_pre.bias"], eps)
    for i in range(DEPTH):
        b = f"blocks.{i}."
        y = _ln(x, sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps)
        q, k, v = np.split(y @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"], 3, axis=-1)
        y = _attention(y, q, k, v) @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        x = x + y * sd.get(b + "ls1.gamma", 1.0)
        y = _ln(x, sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps)
        y = (
            ACTS[act](y @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"]) @ sd[b + "mlp.fc2.weight"].T
            + sd[b + "mlp.fc2.bias"]
        )
        x = x + y * sd.get(b + "ls2.gamma", 1.0)
    n_prefix = len(prefix) and sum(p.shape[1] for p in prefix)
    if fc_norm:  # global_pool="avg": mean over the patch tokens, then fc_norm
        pooled = _ln(x[:, n_prefix:].mean(1), sd["fc_norm.weight"], sd["fc_norm.bias"], eps)
        return pooled @ sd["head.weight"].T + sd["head.bias"]
    x = _ln(x, sd["norm.weight"], sd["norm.bias"], eps)
    logits = x[:, 0] @ sd["head.weight"].T + sd["head.bias"]
    if "head_dist.weight" in sd:
        logits = (logits + x[:, 1] @ sd["head_dist.weight"].T + sd["head_dist.bias"]) / 2
    return logits


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_timm_options_give_timms_outputs(tmp_path, case):
    name, opts = TIMM_CASES[case]
    patch = opts.get("patch", 4)
    sd = _timm_state(3, **opts)
    (tmp_path / "model.safetensors").write_bytes(b"")
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(
        json.dumps({"architecture": name, "num_classes": CLASSES, "model_args": {"num_heads": HEADS}})
    )
    arch = read_architecture(tmp_path / "model.safetensors")
    m = arch["model"]
    assert m["patch_size"] == patch and m["num_heads"] == HEADS and m["reg_tokens"] == opts.get("regs", 0)
    eps = 1e-5 if "clip" in name else 1e-6
    act = "quick_gelu" if "quickgelu" in name else "gelu"
    assert (m["ln_eps"], m["act"], m["pre_norm"], m["layer_scale"]) == (
        eps,
        act,
        opts.get("pre_norm", False),
        opts.get("layer_scale", False),
    )
    image = 4 * patch
    model, params = _load(tmp_path / "model.safetensors", arch, image=image)
    images = np.random.default_rng(4).standard_normal((2, image, image, 3)).astype(np.float32)
    expected = _timm_forward(
        sd,
        images,
        patch=patch,
        eps=eps,
        act=act,
        no_embed_class=opts.get("no_embed_class", False),
        fc_norm=opts.get("fc_norm", False),
    )
    np.testing.assert_allclose(
        np.asarray(model.apply({"params": params}, jnp.asarray(images))), expected, rtol=1e-5, atol=1e-5
    )


def test_timm_heads_come_from_model_args_then_the_name_then_64_channels(tmp_path):
    save_file(_timm_state(5), str(tmp_path / "model.safetensors"))
    path = tmp_path / "model.safetensors"
    assert read_architecture(path)["model"]["num_heads"] == 1  # 32 channels: one head of 64 or fewer
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_huge_patch4_224"}))
    assert read_architecture(path)["model"]["num_heads"] == 16  # ViT-H: 16 heads of 80 channels
    (tmp_path / "config.json").write_text(
        json.dumps({"architecture": "vit_huge_patch4_224", "model_args": {"num_heads": 8}})
    )
    assert read_architecture(path)["model"]["num_heads"] == 8


# ----------------------------------------------------------------------------------------------- MAE


def _mae_decoder(r, names: str):
    """A few arrays of an MAE decoder (width 16) in `names`: "transformers" (ViTMAEForPreTraining's
    `decoder.*`) or "mae" (the MAE repository's, timm-style, top-level `decoder_*` and `mask_token`)."""
    if names == "transformers":
        return {
            "decoder.decoder_embed.weight": r(16, D),
            "decoder.decoder_embed.bias": r(16),
            "decoder.decoder_pos_embed": r(1, 17, 16),
            "decoder.mask_token": r(1, 1, 16),
            "decoder.decoder_layers.0.layernorm_before.weight": r(16),
            "decoder.decoder_norm.weight": r(16),
            "decoder.decoder_pred.weight": r(48, 16),
        }
    return {
        "mask_token": r(1, 1, 16),
        "decoder_embed.weight": r(16, D),
        "decoder_pos_embed": r(1, 17, 16),
        "decoder_blocks.0.norm1.weight": r(16),
        "decoder_blocks.0.attn.qkv.weight": r(48, 16),
        "decoder_norm.weight": r(16),
        "decoder_pred.weight": r(48, 16),
    }


@pytest.mark.parametrize("architecture", ["ViTMAEModel", "ViTMAEForPreTraining"])
def test_transformers_vit_mae_loads_its_encoder_and_drops_the_decoder(tmp_path, architecture, caplog):
    from tests.helpers import _hf_state, _rng

    # ViTMAE saves ViT's names; no pooler; the fixed sin-cos position embedding is in the file, with a
    # zero row for the class token.
    sd = {k: v for k, v in _hf_state("vit", 0).items() if not k.startswith("pooler.")}
    sd["embeddings.position_embeddings"][:, 0] = 0
    if architecture == "ViTMAEForPreTraining":
        sd = {f"vit.{k}": v for k, v in sd.items()} | _mae_decoder(_rng(1), "transformers")
    save_file(sd, str(tmp_path / "model.safetensors"))
    cfg = dict(
        model_type="vit_mae",
        architectures=[architecture],
        hidden_size=D,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
        patch_size=4,
        image_size=16,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        qkv_bias=True,
        mask_ratio=0.75,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    arch = read_architecture(tmp_path)
    m = arch["model"]
    assert (m["hidden_size"], m["depth"], m["num_heads"], m["mlp_dim"], m["patch_size"]) == (
        D,
        DEPTH,
        HEADS,
        MLP,
        4,
    )
    assert (m["pool"], m["class_token"], m["ln_eps"]) == ("token", True, 1e-12)
    assert arch["normalization"] == "imagenet" and arch["num_classes"] is None
    caplog.set_level("INFO", logger="absl")
    model, params = _load(tmp_path, arch)
    decoder = sorted(k for k in sd if k.startswith("decoder."))
    assert bool(decoder) == (architecture == "ViTMAEForPreTraining")
    assert all(k in caplog.text for k in decoder) and "head is re-initialized" in caplog.text
    np.testing.assert_array_equal(params["head"]["kernel"], 0)  # MAE has no head: a new one
    plain = {k.removeprefix("vit."): v for k, v in sd.items() if not k.startswith("decoder.")}
    np.testing.assert_allclose(
        np.asarray(_features(model, params, jnp.asarray(IMAGES))),
        _hf_forward("vit", plain, IMAGES, eps=1e-12, act="gelu"),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("layout", ["timm hub", "mae pretraining"])
def test_timm_mae_loads_its_encoder_and_drops_the_decoder(tmp_path, layout, caplog):
    from tests.helpers import _rng

    # timm's vit_*_224.mae: a plain VisionTransformer without head (num_classes=0), class-token pooling
    # after the final norm. The MAE repository's pretraining state dict adds the decoder and mask token.
    sd = {k: v for k, v in _timm_state(2).items() if not k.startswith("head.")}
    sd["pos_embed"][:, 0] = 0
    if layout == "timm hub":
        (tmp_path / "config.json").write_text(
            json.dumps(
                {
                    "architecture": "vit_base_patch16_224",
                    "num_classes": 0,
                    "global_pool": "token",
                    "model_args": {"num_heads": HEADS},
                    "pretrained_cfg": {
                        "tag": "mae",
                        "mean": [0.485, 0.456, 0.406],
                        "std": [0.229, 0.224, 0.225],
                        "num_classes": 0,
                        "input_size": [3, 16, 16],
                    },
                }
            )
        )
        extra = {}
    else:  # no statement of the normalization; the heads as the config a user adds would give them
        (tmp_path / "config.json").write_text(json.dumps({"model_args": {"num_heads": HEADS}}))
        extra = _mae_decoder(_rng(3), "mae")
    save_file(sd | extra, str(tmp_path / "model.safetensors"))
    arch = read_architecture(tmp_path / "model.safetensors")
    m = arch["model"]
    assert (m["pool"], m["fc_norm"], m["class_token"], m["pos_prefix"], m["depth"]) == (
        "token",
        False,
        True,
        1,
        DEPTH,
    )
    assert arch["normalization"] == "imagenet" and arch["num_classes"] is None
    caplog.set_level("INFO", logger="absl")
    model, params = _load(tmp_path / "model.safetensors", arch)
    assert all(k in caplog.text for k in extra) and "head is re-initialized" in caplog.text
    # timm's forward with an identity head gives the pooled feature.
    identity = {"head.weight": np.eye(D, dtype=np.float32), "head.bias": np.zeros(D, np.float32)}
    np.testing.assert_allclose(
        np.asarray(_features(model, params, jnp.asarray(IMAGES))),
        _timm_forward(sd | identity, IMAGES, patch=4, eps=1e-6, act="gelu"),
        rtol=1e-5,
        atol=1e-5,
    )


def test_a_1280_wide_timm_state_dict_without_config_gets_vit_h_heads(tmp_path):
    # MAE's ViT-H/14 pretraining state dict comes without config.json: 16 heads of 80, not 20 of 64.
    z = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    arrays = {"patch_embed.proj.weight": z(1280, 3, 2, 2), "blocks.0.mlp.fc1.weight": z(8, 1280)}
    save_file(
        arrays | {"cls_token": z(1, 1, 1280), "pos_embed": z(1, 5, 1280)}, str(tmp_path / "m.safetensors")
    )
    assert read_architecture(tmp_path / "m.safetensors")["model"]["num_heads"] == 16
