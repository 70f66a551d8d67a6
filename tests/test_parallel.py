"""The mesh: 8 fake CPU devices, replicated parameters, batches split over "data"."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import perturbed
from vitshap_jax import parallel
from vitshap_jax.models import ViT


def test_mesh_spans_all_devices_with_auto_axes():
    mesh = parallel.make_mesh()
    assert jax.device_count() == 8  # tests/conftest.py
    assert mesh.axis_names == ("data",) and mesh.devices.size == 8
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_global_batch_is_split_over_devices():
    mesh = parallel.make_mesh()
    assert parallel.process_batch_slice(16, mesh) == slice(0, 16)  # one process holds everything
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    batch = parallel.global_batch({"x": x}, mesh)["x"]
    assert batch.sharding == parallel.batch_sharding(mesh)
    shards = sorted(batch.addressable_shards, key=lambda s: s.index[0].start)
    assert len(shards) == 8 and {s.data.shape for s in shards} == {(2, 3)}
    np.testing.assert_array_equal(np.concatenate([np.asarray(s.data) for s in shards]), x)


def test_batch_size_must_split_over_devices():
    with pytest.raises(ValueError, match="batch_size=12 does not split over 8 devices"):
        parallel.check_batch_size(12, parallel.make_mesh())


def _grad_step(mesh, model, params, images, masks):
    """Gradient of a masked-model loss, jitted with the mesh's shardings."""

    def loss(p, x, m):
        return jnp.mean(model.apply({"params": p}, x, m) ** 2)

    rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    step = jax.jit(jax.value_and_grad(loss), in_shardings=(rep, data, data), out_shardings=(rep, rep))
    params = jax.device_put(params, rep)
    return step(params, *parallel.global_batch((images, masks), mesh))


def test_sharded_gradient_equals_single_device():
    model = ViT(num_classes=3, patch_size=4, hidden_size=32, depth=2, num_heads=4, mlp_dim=64)
    images = jax.random.normal(jax.random.key(0), (16, 16, 16, 3))
    masks = jax.random.bernoulli(jax.random.key(1), 0.5, (16, 16))
    params = perturbed(model.init(jax.random.key(2), images[:1])["params"], 0.1, 3)
    one_loss, one_grads = _grad_step(parallel.make_mesh(jax.devices()[:1]), model, params, images, masks)
    all_loss, all_grads = _grad_step(parallel.make_mesh(), model, params, images, masks)
    assert all_grads["head"]["kernel"].sharding.mesh.devices.size == 8
    np.testing.assert_allclose(float(all_loss), float(one_loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(all_grads), jax.tree.leaves(one_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
