"""The masked ViT: masking strategies against oracles, and the public parameter counts."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from vitshap_jax.models import ViT, num_patches

IMAGE, PATCH = 16, 4  # 16 players
N = num_patches(IMAGE, PATCH)


def _model(masking="attention", **kw):
    shape = dict(hidden_size=32, depth=3, num_heads=4, mlp_dim=64)
    shape.update(kw)
    return ViT(num_classes=5, patch_size=PATCH, masking=masking, **shape)


def _random_params(model, key):
    """Initial params, with a random head (its default init is zero, which would hide every difference)."""
    images = jnp.zeros((1, IMAGE, IMAGE, 3))
    params = model.init(key, images)["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    leaves = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, leaves)


def _images(key, batch=6):
    return jax.random.normal(key, (batch, IMAGE, IMAGE, 3))


def _random_masks(key, batch):
    """Coalitions of every size between 0 and n over the batch."""
    sizes = jnp.linspace(0, N, batch).round().astype(int)
    order = jax.vmap(lambda k: jax.random.permutation(k, N))(jax.random.split(key, batch))
    ranks = jnp.argsort(order, axis=1)
    return ranks < sizes[:, None]


@pytest.fixture(scope="module")
def setup():
    key = jax.random.key(0)
    return _images(jax.random.key(1)), _random_masks(jax.random.key(2), 6), key


@pytest.mark.parametrize("masking", ["attention", "zero"])
def test_all_visible_mask_is_the_unmasked_model(setup, masking):
    images, _, key = setup
    model = _model(masking)
    params = _random_params(model, key)
    plain = model.apply({"params": params}, images)
    ones = model.apply({"params": params}, images, jnp.ones((6, N), bool))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(ones))
    assert float(jnp.abs(plain).max()) > 0.1  # a non-trivial output


def test_attention_masking_equals_running_the_visible_tokens_alone(setup):
    images, masks, key = setup
    model = _model("attention")
    params = _random_params(model, key)
    masked = model.apply({"params": params}, images, masks)
    for i in range(images.shape[0]):
        visible = np.flatnonzero(np.asarray(masks[i]))[None]
        alone = model.apply({"params": params}, images[i : i + 1], patch_indices=jnp.asarray(visible))
        np.testing.assert_allclose(np.asarray(masked[i]), np.asarray(alone[0]), atol=2e-5, rtol=1e-5)
    # The mask matters: the same images with every patch visible give other outputs.
    full = model.apply({"params": params}, images)
    assert float(jnp.abs(masked[1:-1] - full[1:-1]).min(axis=1).max()) > 1e-2


def test_a_coalition_and_its_complement_in_one_sequence_equal_two_masked_passes(setup):
    images, masks, key = setup  # coalitions of every size, the empty and the full one included
    model = _model("attention")
    params = _random_params(model, key)
    both = model.apply({"params": params}, images, masks, with_complement=True)
    assert both.shape == (6, 2, 5)
    np.testing.assert_allclose(
        both[:, 0], model.apply({"params": params}, images, masks), atol=2e-5, rtol=1e-5
    )
    np.testing.assert_allclose(
        both[:, 1], model.apply({"params": params}, images, ~masks), atol=2e-5, rtol=1e-5
    )
    # Random coalitions of random images, under jit and vmap over coalitions as the estimators use it.
    many = jax.random.bernoulli(jax.random.key(7), 0.5, (6, 8, N))
    fn = jax.jit(jax.vmap(lambda m: model.apply({"params": params}, images, m, with_complement=True), 1, 1))
    plain = jax.jit(jax.vmap(lambda m: model.apply({"params": params}, images, m), 1, 1))
    packed = fn(many)
    np.testing.assert_allclose(packed[:, :, 0], plain(many), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(packed[:, :, 1], plain(~many), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attention masking"):
        _model("zero").apply({"params": params}, images, masks, with_complement=True)


def test_patch_indices_keep_the_chosen_tokens_with_their_own_position_embeddings():
    """The oracle above must not share the masking code: with no blocks the encoder output is
    LayerNorm(embedding + position) row by row, so the kept rows equal those rows of the full run."""
    model = _model("attention", depth=0)
    params = _random_params(model, jax.random.key(3))
    images = _images(jax.random.key(4), 1)
    keep = jnp.array([[0, 5, 9]])
    kept = model.apply({"params": params}, images, method=ViT.encode, patch_indices=keep)
    full = model.apply({"params": params}, images, method=ViT.encode)
    assert kept.shape == (1, 4, 32)
    np.testing.assert_allclose(np.asarray(kept[0]), np.asarray(full[0, jnp.array([0, 1, 6, 10])]), atol=1e-6)


@pytest.mark.parametrize("masking", ["attention", "zero"])
def test_pixels_of_held_out_patches_do_not_change_the_output(setup, masking):
    images, masks, key = setup
    model = _model(masking)
    params = _random_params(model, key)
    pixel_mask = np.repeat(np.repeat(np.asarray(masks).reshape(6, 4, 4), PATCH, 1), PATCH, 2)[..., None]
    noise = jax.random.normal(jax.random.key(5), images.shape) * 10
    changed = jnp.where(pixel_mask, images, noise)
    a = model.apply({"params": params}, images, masks)
    b = model.apply({"params": params}, changed, masks)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-5)
    # ... while without the mask those pixels do change it.
    c = model.apply({"params": params}, changed)
    assert float(jnp.abs(c - model.apply({"params": params}, images)).max()) > 1e-2


def test_zero_masking_is_zeroing_the_pixels(setup):
    images, masks, key = setup
    model = _model("zero")
    params = _random_params(model, key)
    pixel_mask = np.repeat(np.repeat(np.asarray(masks).reshape(6, 4, 4), PATCH, 1), PATCH, 2)[..., None]
    masked = model.apply({"params": params}, images, masks)
    zeroed = model.apply({"params": params}, images * pixel_mask)
    np.testing.assert_allclose(np.asarray(masked), np.asarray(zeroed), atol=1e-6)


def test_float_masks_and_bool_masks_agree(setup):
    images, masks, key = setup
    model = _model("attention")
    params = _random_params(model, key)
    a = model.apply({"params": params}, images, masks)
    b = model.apply({"params": params}, images, masks.astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_mask_shape_is_a_clear_error(setup):
    images, _, key = setup
    model = _model()
    params = _random_params(model, key)
    with pytest.raises(ValueError, match=r"patch_mask has shape \(6, 15\); expected .* \(6, 16\)"):
        model.apply({"params": params}, images, jnp.ones((6, 15), bool))
    with pytest.raises(ValueError, match="masking='pixel'"):
        _model("pixel").init(key, images)


def test_jit_and_grad_through_the_masked_model(setup):
    images, masks, key = setup
    model = _model("attention", dropout_rate=0.1)
    params = _random_params(model, key)

    @jax.jit
    def loss(p, rng):
        out = model.apply({"params": p}, images, masks, train=True, rngs={"dropout": rng})
        return jnp.mean(out**2)

    grads = jax.grad(loss)(params, jax.random.key(7))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["embedding"]["kernel"]).sum()) > 0


# Public counts, e.g. timm's vit_{tiny,small,base,large}_patch16_224 (1000 classes, 224 px, patch 16).
PUBLIC_COUNTS = {"tiny": 5_717_416, "small": 22_050_664, "base": 86_567_656, "large": 304_326_632}


@pytest.mark.parametrize("variant", sorted(PUBLIC_COUNTS))
def test_parameter_count_matches_public_vit(variant):
    model = ViT(num_classes=1000, patch_size=16, **common.MODEL_VARIANTS[variant])
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == PUBLIC_COUNTS[variant]


# The architecture options of the families pretrained.py imports, on the same small shape. (Registers
# and the distillation token with its head are checked the same way on imported DINOv2-with-registers
# and DeiT-with-teacher models in test_pretrained_families.py.)
ARCHITECTURES = {
    # timm without a class token: average pooling, the final norm after pooling, one register.
    "avg_pool": dict(class_token=False, pool="avg", fc_norm=True, reg_tokens=1, pos_prefix=0),
    # timm without any prefix token: nothing but patches.
    "patches_only": dict(class_token=False, pool="avg"),
    # CLIP: a LayerNorm before the blocks, quick GELU, epsilon 1e-5.
    "clip": dict(pre_norm=True, act="quick_gelu", ln_eps=1e-5),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_masks_exactly_like_dropping_the_tokens(setup, arch):
    """Prefix tokens (class, distillation, registers) stay visible; avg pooling reads only the visible
    patches; the packed coalition + complement equals two masked passes, each half with its own prefix."""
    images, masks, key = setup
    model = _model("attention", **ARCHITECTURES[arch])
    params = _random_params(model, key)
    masked = model.apply({"params": params}, images, masks)
    assert np.isfinite(np.asarray(masked)).all()
    for i in (0, 2, 5):  # the empty coalition, a middle one, the full one (each size compiles anew)
        visible = np.flatnonzero(np.asarray(masks[i]))[None]
        alone = model.apply({"params": params}, images[i : i + 1], patch_indices=jnp.asarray(visible))
        np.testing.assert_allclose(np.asarray(masked[i]), np.asarray(alone[0]), atol=2e-5, rtol=1e-5)
    full = model.apply({"params": params}, images)
    assert float(jnp.abs(masked[1:-1] - full[1:-1]).min(axis=1).max()) > 1e-2
    both = model.apply({"params": params}, images, masks, with_complement=True)
    np.testing.assert_allclose(both[:, 0], masked, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(
        both[:, 1], model.apply({"params": params}, images, ~masks), atol=2e-5, rtol=1e-5
    )
    grads = jax.grad(lambda p: model.apply({"params": p}, images, masks, with_complement=True).sum())(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_architecture_options_create_their_parameters():
    names = lambda **kw: set(  # noqa: E731
        "/".join(k.key for k in path)
        for path, _ in jax.tree_util.tree_leaves_with_path(
            _model(**kw).init(jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)))["params"]
        )
    )
    plain = names()
    assert {"cls", "Transformer/posembed_input/pos_embedding", "Transformer/encoder_norm/scale"} <= plain
    dino = names(reg_tokens=2, pos_prefix=1, layer_scale=True)  # DINOv2 with registers
    assert {"reg", "Transformer/encoderblock_0/ls1", "Transformer/encoderblock_2/ls2"} <= dino
    avg = names(**ARCHITECTURES["avg_pool"])
    assert "cls" not in avg and "Transformer/encoder_norm/scale" not in avg and "norm_pooled/scale" in avg
    assert {"dist", "head_dist/kernel"} <= names(distill_token=True, distill_head=True)  # DeiT distilled
    assert "Transformer/norm_pre/scale" in names(**ARCHITECTURES["clip"])
    with pytest.raises(ValueError, match="class token"):
        names(class_token=False)


def test_remat_gives_the_same_values_and_gradients():
    """`remat=True` recomputes each block in the backward pass: same outputs and gradients (with a patch
    mask and dropout), same parameter tree."""
    kw = dict(num_classes=3, patch_size=2, hidden_size=16, depth=3, num_heads=2, mlp_dim=32, dropout_rate=0.1)
    plain, remat = ViT(**kw), ViT(**kw, remat=True)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    mask = jax.random.bernoulli(jax.random.key(1), 0.5, (2, 16))
    params = plain.init(jax.random.key(2), x)["params"]
    assert jax.tree.structure(remat.init(jax.random.key(2), x)["params"]) == jax.tree.structure(params)

    def loss(model):
        def f(p):
            out = model.apply({"params": p}, x, mask, train=True, rngs={"dropout": jax.random.key(3)})
            return (out**2).sum()

        return jax.jit(jax.value_and_grad(f))(params)

    (a, ga), (b, gb) = loss(plain), loss(remat)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kw", [{}, dict(distill_token=True, distill_head=True, fc_norm=True, reg_tokens=1)])
def test_class_token_pooling_runs_the_last_block_on_the_read_tokens_only(setup, kw):
    """With `pool="token"` the last block computes only the class (and distillation) tokens' outputs;
    the logits and gradients equal the head on the full encoder's output (the unpruned computation)."""
    images, masks, key = setup
    model = _model("attention", **kw)
    params = _random_params(model, key)

    def reference(p, m, with_complement=False):
        def full(mod, x):
            tokens = mod.encode(x, m, with_complement=with_complement)
            logits = mod.head(mod.pooled(tokens, m, with_complement=with_complement))
            if mod.distill_head:
                k = mod.num_prefix_tokens
                dist = tokens[:, jnp.array([1, k + 1])] if with_complement else tokens[:, 1]
                logits = (logits + mod.head_dist(mod.norm_pooled(dist) if mod.fc_norm else dist)) / 2
            return logits

        return model.apply({"params": p}, images, method=full)

    flops = []
    for packed in (False, True):
        compiled = [
            jax.jit(f).lower(params).compile()
            for f in (
                lambda p, packed=packed: model.apply({"params": p}, images, masks, with_complement=packed),
                lambda p, packed=packed: reference(p, masks, packed),
            )
        ]
        pruned, full = (c(params) for c in compiled)
        np.testing.assert_allclose(pruned, full, atol=2e-5, rtol=1e-5)
        costs = [c.cost_analysis() for c in compiled]
        flops.append([(c[0] if isinstance(c, list) else c)["flops"] for c in costs])
    # The pruned program does less work (XLA's count of its FLOPs).
    assert all(pruned < 0.9 * full for pruned, full in flops), flops
    ga = jax.jit(jax.grad(lambda p: model.apply({"params": p}, images, masks).sum()))(params)
    gb = jax.jit(jax.grad(lambda p: reference(p, masks).sum()))(params)
    for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)


def test_gelu_and_softmax_are_the_library_functions_with_their_gradients():
    """The ViT's own exact GELU (the erf form) and softmax (an explicit backward pass), written for
    XLA:CPU's speed, against `nn.gelu(approximate=False)` and `jax.nn.softmax`: values and gradients,
    the softmax also on masked logits (the -1e30 bias: weight exactly 0, finite gradients)."""
    import flax.linen as nn

    from vitshap_jax.models import vit

    x = jnp.linspace(-12.0, 12.0, 4001)
    np.testing.assert_allclose(vit.gelu(x), nn.gelu(x, approximate=False), atol=2e-6)
    gelu_grads = [jax.vmap(jax.grad(f))(x) for f in (vit.gelu, lambda x: nn.gelu(x, approximate=False))]
    np.testing.assert_allclose(*gelu_grads, atol=2e-6)

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    logits = 4 * jax.random.normal(k1, (3, 2, 5, 7))
    logits = logits + jnp.where(jax.random.bernoulli(k2, 0.4, (3, 1, 1, 7)), 0.0, -1e30)
    logits = logits.at[..., 0].set(1.0)  # every row keeps a key
    w = jax.random.normal(k3, logits.shape)
    ours, reference = vit.softmax(logits), jax.nn.softmax(logits, axis=-1)
    np.testing.assert_allclose(ours, reference, atol=1e-7)
    assert np.all(np.asarray(ours)[np.asarray(logits) < -1e29] == 0)
    grads = [jax.grad(lambda z, f=f: (f(z) * w).sum() ** 2)(logits) for f in (vit.softmax, jax.nn.softmax)]
    assert np.all(np.isfinite(grads[0]))
    np.testing.assert_allclose(*grads, rtol=1e-5, atol=1e-6)


def test_bfloat16_matmuls_round_the_operands_and_sum_in_float32():
    """`mixed_einsum`: the einsum of the operands rounded to bfloat16, summed in float32 (checked against
    numpy in float64 on the rounded operands); its gradients the same products with the cotangent rounded
    too. And it does round: the result differs from the float32 einsum (by bfloat16's ~3 digits)."""
    from vitshap_jax.models import vit

    def rounded(x):
        return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    for spec, sa, sb in (
        ("ijk,kl->ijl", (3, 5, 40), (40, 6)),  # Dense
        ("abhd,hdk->abk", (2, 5, 4, 8), (4, 8, 16)),  # the attention's output projection
        ("bhij,bhjk->bhik", (2, 3, 5, 16), (2, 3, 16, 7)),  # attention products
    ):
        a, b = jax.random.normal(k1, sa), jax.random.normal(k2, sb)
        out = vit.mixed_einsum(spec, a, b, jnp.bfloat16)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(out, np.einsum(spec, rounded(a), rounded(b)), rtol=1e-5, atol=1e-5)
        assert float(jnp.abs(out - jnp.einsum(spec, a, b)).max()) > 1e-4  # not float32 matmuls
        g = jax.random.normal(k3, out.shape)
        ga, gb = jax.grad(
            lambda a, b, s=spec, g=g: (vit.mixed_einsum(s, a, b, jnp.bfloat16) * g).sum(), (0, 1)
        )(a, b)
        ins, res = spec.split("->")
        ia, ib = ins.split(",")
        np.testing.assert_allclose(
            ga, np.einsum(f"{res},{ib}->{ia}", rounded(g), rounded(b)), rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            gb, np.einsum(f"{ia},{res}->{ib}", rounded(a), rounded(g)), rtol=1e-5, atol=1e-5
        )


def test_the_einsum_of_a_dot_general_is_the_dot_general():
    """`dot_general_in`'s translation of flax's dimension numbers (contracting and batch axes) into an
    einsum spec: float32 results equal `lax.dot_general`'s."""
    from vitshap_jax.models import vit

    a = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
    b = jax.random.normal(jax.random.key(1), (2, 5, 4, 6))
    for dims in (
        (((3,), (1,)), ((), ())),
        (((2, 3), (2, 1)), ((), ())),
        (((3,), (1,)), ((0,), (0,))),
        (((3,), (1,)), ((0, 2), (0, 2))),
    ):
        spec = vit._einsum_spec(dims, a.ndim, b.ndim)
        np.testing.assert_allclose(
            jnp.einsum(spec, a, b), jax.lax.dot_general(a, b, dims), rtol=1e-5, atol=1e-5, err_msg=spec
        )


def test_a_vit_with_bfloat16_matmuls_still_masks_exactly():
    """`dot_dtype="bfloat16"` (config.model.matmul_precision): the same parameters, outputs within
    bfloat16's precision of the float32 model's, held-out patches still never read (their pixels change
    nothing, bit for bit), a coalition with its complement in one sequence still two masked passes, the
    dense layers' matmuls in the compiled program bfloat16 (the attention products float32), and
    gradients that match the float32 model's closely."""
    kw = dict(num_classes=5, patch_size=PATCH, hidden_size=32, depth=3, num_heads=4, mlp_dim=64)
    f32, bf16 = ViT(**kw), ViT(**kw, dot_dtype="bfloat16")
    images, masks = _images(jax.random.key(1)), _random_masks(jax.random.key(2), 6)
    params = _random_params(f32, jax.random.key(0))
    assert jax.tree.structure(bf16.init(jax.random.key(0), images[:1])["params"]) == jax.tree.structure(
        params
    )
    # jitted: op by op the pieces below take half a minute
    apply = jax.jit(
        lambda p, x, m, model, both=False: model.apply({"params": p}, x, m, with_complement=both),
        static_argnums=(3, 4),
    )
    out = apply(params, images, masks, bf16)
    reference = apply(params, images, masks, f32)
    assert out.dtype == jnp.float32
    scale = float(jnp.abs(reference).max())
    error = float(jnp.abs(out - reference).max())
    assert 1e-5 * scale < error < 3e-2 * scale, (error, scale)
    noise = jax.random.normal(jax.random.key(3), images.shape)
    pixels = jnp.asarray(
        np.kron(np.asarray(masks).reshape(6, IMAGE // PATCH, IMAGE // PATCH), np.ones((PATCH, PATCH)))
    )
    other = images + noise * (1 - pixels)[..., None]  # only held-out pixels change
    np.testing.assert_array_equal(out, apply(params, other, masks, bf16))
    both = apply(params, images, masks, bf16, True)
    np.testing.assert_allclose(both[:, 0], out, atol=2e-3 * scale)
    np.testing.assert_allclose(both[:, 1], apply(params, images, ~masks, bf16), atol=2e-3 * scale)
    hlo = jax.jit(lambda p: bf16.apply({"params": p}, images, masks)).lower(params).as_text()
    dots = re.findall(r"stablehlo.dot_general .*: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)", hlo)
    assert sum(d == ("bf16", "bf16") for d in dots) == 6 * 3, dots  # q, k, v, out, 2 MLP; 3 blocks
    assert sum(d == ("f32", "f32") for d in dots) == 2 * 3 + 1, dots  # the attention products, the head
    grads = [
        jax.jit(jax.grad(lambda p, m=m: (m.apply({"params": p}, images, masks) ** 2).sum()))(params)
        for m in (f32, bf16)
    ]
    gscale = max(float(jnp.abs(u).max()) for u in jax.tree.leaves(grads[0]))
    for u, v in zip(*(jax.tree.leaves(g) for g in grads), strict=True):  # within 2% of the largest
        np.testing.assert_allclose(v, u, rtol=0.05, atol=0.02 * gscale)


def test_the_library_attention_core_is_the_same_masked_model(setup):
    """`attention_impl="xla"` (`jax.nn.dot_product_attention`; "cudnn" is the same call on a GPU): the
    same parameters, the outputs and gradients of the default "matmul" core for masked passes, packed
    pairs and the class-token-only last block; held-out patches never read (bit for bit); and like
    dropping the tokens. The explainer head's blocks take the same core; an unknown core is an error."""
    from vitshap_jax.models import ExplainerHead

    images, masks, key = setup
    matmul, library = _model("attention", depth=2), _model("attention", depth=2, attention_impl="xla")
    params = _random_params(matmul, key)
    assert jax.tree.structure(library.init(key, images[:1])["params"]) == jax.tree.structure(params)
    apply = jax.jit(
        lambda p, x, m, model, both=False: model.apply({"params": p}, x, m, with_complement=both),
        static_argnums=(3, 4),
    )
    for both in (False, True):
        ours, theirs = (apply(params, images, masks, model, both) for model in (matmul, library))
        np.testing.assert_allclose(theirs, ours, atol=2e-5, rtol=1e-5)
        assert float(jnp.abs(ours).max()) > 0.1
    pixels = jnp.asarray(
        np.kron(np.asarray(masks).reshape(6, IMAGE // PATCH, IMAGE // PATCH), np.ones((PATCH, PATCH)))
    )
    other = images + jax.random.normal(jax.random.key(3), images.shape) * (1 - pixels)[..., None]
    # Only held-out pixels change (for a pair, those the complement reads: its half may change).
    np.testing.assert_array_equal(apply(params, images, masks, library), apply(params, other, masks, library))
    pair, changed = (apply(params, x, masks, library, True) for x in (images, other))
    np.testing.assert_array_equal(pair[:, 0], changed[:, 0])
    masked = apply(params, images, masks, library)
    for i in (2,):  # a middle coalition (the other sizes: the tests above, for the same masking)
        visible = np.flatnonzero(np.asarray(masks[i]))[None]
        alone = matmul.apply({"params": params}, images[i : i + 1], patch_indices=jnp.asarray(visible))
        np.testing.assert_allclose(np.asarray(masked[i]), np.asarray(alone[0]), atol=2e-5, rtol=1e-5)
    grads = [
        jax.jit(
            jax.grad(lambda p, m=m: (m.apply({"params": p}, images, masks, with_complement=True) ** 2).sum())
        )(params)
        for m in (matmul, library)
    ]
    for u, v in zip(*(jax.tree.leaves(g) for g in grads), strict=True):
        np.testing.assert_allclose(v, u, rtol=1e-4, atol=1e-5)
    tokens = jax.random.normal(key, (2, N + 1, 32))
    heads = [ExplainerHead(5, 4, 64, attention_impl=impl) for impl in ("matmul", "xla")]
    head_params = heads[0].init(key, tokens)["params"]
    head_params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(key, a.shape), head_params)
    np.testing.assert_allclose(*(h.apply({"params": head_params}, tokens) for h in heads), atol=1e-5)
    # "cudnn" runs the matmul core on sequences of odd length (here 17 tokens): no cuDNN call on this CPU.
    cudnn = _model("attention", depth=2, attention_impl="cudnn")
    np.testing.assert_array_equal(apply(params, images, masks, cudnn), apply(params, images, masks, matmul))
    with pytest.raises(ValueError, match="attention impl='flash': must be one of matmul, xla, cudnn"):
        _model("attention", attention_impl="flash").init(key, images[:1])
