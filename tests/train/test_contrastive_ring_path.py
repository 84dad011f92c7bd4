"""The trainer's contrastive path: a batch sharded over data×fsdp uses the device ring."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbatch import losses, parallel
from jaxbatch.train import tasks


def _loss_cfg(kind):
    return ml_collections.ConfigDict(
        dict(kind=kind, block_size=4, implementation="auto", label_smoothing=0.0)
    )


@pytest.mark.parametrize("kind, bias", [("softmax", None), ("sigmoid", -3.0)])
def test_sharded_batch_uses_the_ring_and_matches_the_global_loss(eight_devices, kind, bias):
    mesh = parallel.make_mesh(data=2, fsdp=4)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    zx, zy = (jax.random.normal(k, (32, 8)) for k in keys)
    zx, zy = (
        zx / jnp.linalg.norm(zx, axis=1, keepdims=True),
        zy / jnp.linalg.norm(zy, axis=1, keepdims=True),
    )
    bias = None if bias is None else jnp.float32(bias)
    loss_fn = tasks.contrastive_loss_fn(_loss_cfg(kind), mesh)
    rows = NamedSharding(mesh, P(parallel.BATCH_AXES))
    fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2)))
    value, grads = fn(jax.device_put(zx, rows), jax.device_put(zy, rows), jnp.float32(7.0), bias)
    ref_fn = jax.value_and_grad(
        lambda a, b, s: losses.contrastive_loss(
            a, b, s, bias, kind=kind, implementation="reference"
        ),
        argnums=(0, 1, 2),
    )
    ref_value, ref_grads = ref_fn(zx, zy, jnp.float32(7.0))
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    hlo = fn.lower(jax.device_put(zx, rows), jax.device_put(zy, rows), jnp.float32(7.0), bias)
    assert "collective_permute" in hlo.as_text() or "collective-permute" in hlo.compile().as_text()


def test_one_device_batch_calls_the_plain_loss():
    loss_fn = tasks.contrastive_loss_fn(_loss_cfg("softmax"), None)
    x = jnp.eye(4)
    assert float(loss_fn(x, x, 10.0, None)) == pytest.approx(
        float(losses.contrastive_loss(x, x, 10.0, implementation="reference")), rel=1e-5
    )
