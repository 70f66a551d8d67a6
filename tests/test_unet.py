"""The UNet explainer (FastSHAP's): the ViT explainer's output contract, exact patch averaging,
efficiency after normalization, bfloat16 compute and gradients reaching every parameter.

Parameters come from `model.init` once (with an "rbg" key: the default threefry key makes XLA compile
each initializer for seconds on CPU); the other tests fill `jax.eval_shape`'s shapes with random values.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitshap_jax.models.unet import UNetExplainer, unet_levels
from vitshap_jax.shapley import additive_efficient_normalization


def _images(size, batch=2, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def _random_params(model, size, seed=0):
    """Random parameters of `model` for `size` px images: He-scaled kernels, norm scales near 1."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
    rng = np.random.default_rng(seed)

    def fill(path, s):
        if len(s.shape) > 1:  # [kh, kw, in, out]
            return jnp.asarray(rng.normal(size=s.shape) * np.sqrt(2 / np.prod(s.shape[:-1])), jnp.float32)
        base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
        return jnp.asarray(base + 0.1 * rng.normal(size=s.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, images):
    return model.apply({"params": params}, images)


SMALL = UNetExplainer(num_classes=3, patch_size=2, width=4)  # 8 px images, 16 patches


def test_init_gives_one_float32_value_per_patch_and_class_on_8px_images():
    params = jax.jit(SMALL.init)(jax.random.key(0, impl="rbg"), _images(8)[:1])["params"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    phi = _apply(SMALL, params, _images(8))
    assert phi.shape == (2, 16, 3) and phi.dtype == jnp.float32
    assert np.isfinite(np.asarray(phi)).all() and float(jnp.abs(phi).max()) < 1
    # 8 -> 4 -> 2: the third down-sampling step is clipped.
    assert sorted(k for k in params if k.startswith("down_")) == ["down_1", "down_2"]


@pytest.mark.parametrize("size, patch, norm", [(32, 4, "group"), (224, 16, "none")])
def test_output_shapes_at_other_sizes(size, patch, norm):
    model = UNetExplainer(num_classes=3, patch_size=patch, width=2, norm=norm)
    params = _random_params(model, size)
    assert sorted(k for k in params if k.startswith("down_")) == ["down_1", "down_2", "down_3"]
    phi = _apply(model, params, _images(size, batch=1))
    assert phi.shape == (1, (size // patch) ** 2, 3) and phi.dtype == jnp.float32
    assert np.isfinite(np.asarray(phi)).all()


def test_levels_are_clipped_to_the_image():
    assert unet_levels(8, 8, 3) == 2  # 8 -> 4 -> 2
    assert unet_levels(4, 4, 3) == 1
    assert unet_levels(30, 30, 3) == 1  # 30 -> 15, odd
    assert unet_levels(224, 224, 5) == 5  # 224 -> 7
    assert unet_levels(224, 224, 6) == 5
    assert unet_levels(7, 7, 3) == 0


def test_bfloat16_compute_gives_float32_output_close_to_float32():
    params = _random_params(SMALL, 8)
    out = _apply(SMALL.clone(dtype=jnp.bfloat16), params, _images(8))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, _apply(SMALL, params, _images(8)), atol=5e-2)


def test_patch_values_are_the_mean_of_the_pixel_values():
    params, images = _random_params(SMALL, 8), _images(8)
    pixels = jax.jit(lambda p, x: SMALL.apply({"params": p}, x, method=UNetExplainer.pixel_values))(
        params, images
    )
    assert pixels.shape == (2, 8, 8, 3) and pixels.dtype == jnp.float32
    pixels, phi = np.asarray(pixels), np.asarray(_apply(SMALL, params, images))
    for row in range(4):
        for col in range(4):
            patch = pixels[:, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2].mean(axis=(1, 2))
            np.testing.assert_allclose(phi[:, 4 * row + col], patch, rtol=1e-6, atol=1e-7)


def test_efficiency_holds_after_normalization():
    phi_raw = _apply(SMALL, _random_params(SMALL, 8), _images(8))
    total = jax.random.uniform(jax.random.key(5), (2, 3), minval=-1, maxval=1)  # v(all) - v(empty)
    phi = additive_efficient_normalization(phi_raw, total)
    assert phi.dtype == jnp.float32
    np.testing.assert_allclose(phi.sum(axis=1), total, rtol=0, atol=16 * np.finfo(np.float32).eps)


def test_gradients_reach_every_parameter_and_train_mode_runs():
    model = SMALL.clone(dropout_rate=0.2)
    params, images = _random_params(model, 8), _images(8)
    target = jax.random.normal(jax.random.key(7), (2, 16, 3))

    @jax.jit
    def loss_and_grads(p):
        def loss(p):
            phi = model.apply(
                {"params": p}, images, train=True, rngs={"dropout": jax.random.key(3, impl="rbg")}
            )
            return jnp.mean((phi - target) ** 2), phi

        return jax.value_and_grad(loss, has_aux=True)(p)

    (_, phi), grads = loss_and_grads(params)
    assert len(jax.tree.leaves(grads)) == len(jax.tree.leaves(params))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)
    assert not np.allclose(phi, _apply(model, params, images))  # dropout acts only with train=True


def test_bad_patch_size_or_norm_is_an_error():
    with pytest.raises(ValueError, match="not a multiple of patch_size 3"):
        jax.eval_shape(
            UNetExplainer(num_classes=2, patch_size=3).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3))
        )
    with pytest.raises(ValueError, match="norm='batch'"):
        jax.eval_shape(SMALL.clone(norm="batch").init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
