"""Tests of contrastive_loss inside shard_map on 8 simulated devices (the ``axis_name`` ring).

Oracle: the single-device float32 Precision.HIGHEST reference on the global (concatenated) batch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbatch.losses import contrastive_loss
from jaxbatch.losses._contrastive_specs import (
    KINDS,
    default_spec,
    reference_value_and_grads,
    ring_value_and_grads,
)

AXIS = "data"
NAMES = ("dx", "dy", "dlogit_scale", "dlogit_bias")


def _sharded_value_and_grads(mesh, x, y, scale, bias, **kwargs):
    def local(x, y, s, b):
        return contrastive_loss(x, y, s, b, axis_name=AXIS, **kwargs)

    return ring_value_and_grads(mesh, local, AXIS, x, y, scale, bias)


def _assert_close(got, want, rtol, what, floor=1e-2):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    atol = rtol * max(float(np.max(np.abs(want))), floor)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


@pytest.fixture(scope="module")
def mesh(eight_devices):
    del eight_devices
    return jax.make_mesh((8,), (AXIS,))


# (global n, block, implementation, dtype): 8 rows per device = one block; 5 rows per device with
# blocks of 4 (not a multiple); 1 row per device; the gathering reference; bfloat16.
CASES = [
    (64, 8, "xla", "float32"),
    (40, 4, "xla", "float32"),
    (8, 16, "xla", "float32"),
    (40, 4, "reference", "float32"),
    (40, 4, "xla", "bfloat16"),
]


@pytest.mark.parametrize(("n", "block", "implementation", "dtype"), CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_ring_matches_single_device_loss(mesh, kind, n, block, implementation, dtype):
    x, y, scale, bias = default_spec(kind, n, 16, dtype, seed=3).make_args()
    bias = jnp.float32(0.5) if bias is None else bias
    want_loss, want_grads = reference_value_and_grads(x, y, scale, bias, kind)
    loss, grads = _sharded_value_and_grads(
        mesh, x, y, scale, bias, kind=kind, block_size=block, implementation=implementation
    )
    rtol = 2e-5 if dtype == "float32" else 2e-2
    _assert_close(loss, want_loss, rtol, "loss", floor=1.0)
    for got, want, name in zip(grads, want_grads, NAMES, strict=True):
        # Scalar gradients are sums over the batch of size ~1; dlogit_bias is 0 for softmax.
        _assert_close(got, want, rtol, name, floor=1.0 if got.ndim == 0 else 1e-2)


def test_ring_without_bias_matches(mesh):
    # logit_bias=None inside shard_map: only x, y, scale are differentiated.
    x, y, scale, _ = default_spec("softmax", 24, 8, seed=4).make_args()

    def local(x, y, s):
        return contrastive_loss(x, y, s, axis_name=AXIS, block_size=2)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P()), out_specs=P())
    rows = NamedSharding(mesh, P(AXIS))
    got = jax.jit(jax.grad(sharded, argnums=2))(
        jax.device_put(x, rows), jax.device_put(y, rows), scale
    )
    want = jax.grad(
        lambda s: contrastive_loss(x, y, s, implementation="reference", kind="softmax")
    )(scale)
    np.testing.assert_allclose(float(got), float(want), rtol=2e-5)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_ring_memory_is_per_shard(mesh, kind):
    # Compile only: global N = 8 × 16384, D = 256. A device holds its shards (2 × 16 MiB) and
    # their gradients, never its [N_local, N_global] slice of the logits (8 GiB).
    n_local, d = 16384, 256
    spec = default_spec(kind, 8 * n_local, d)
    x, y, s = spec.shape_dtypes()[:3]
    rows = NamedSharding(mesh, P(AXIS))
    x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows)
    y = jax.ShapeDtypeStruct(y.shape, y.dtype, sharding=rows)

    def local(x, y, s, b):
        return contrastive_loss(x, y, s, b, kind=kind, axis_name=AXIS, implementation="xla")

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P(), P()), out_specs=P())
    compiled = (
        jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3))).lower(x, y, s, s).compile()
    )
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 16 * n_local * d * 4  # far below n_local · N_global · 4 = 8 GiB
    assert "collective-permute" in compiled.as_text()


def test_pallas_runs_the_ring(mesh):
    # implementation='pallas' with axis_name: the ring sweeps Pallas tiles (interpreted here);
    # tests/losses/test_contrastive_ring_pallas.py checks it in depth.
    x, y, scale, _ = default_spec("softmax", 16, 8).make_args()

    def local(x, y, s):
        return contrastive_loss(x, y, s, axis_name=AXIS, implementation="pallas")

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P()), out_specs=P())
    rows = NamedSharding(mesh, P(AXIS))
    got = jax.jit(sharded)(jax.device_put(x, rows), jax.device_put(y, rows), scale)
    want = contrastive_loss(x, y, scale, implementation="reference")
    np.testing.assert_allclose(float(got), float(want), rtol=2e-5)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_unchecked_or_replicated_inputs_are_refused(mesh, implementation):
    """Both used to give dx, dy of 1/P the true value silently; now they name the problem."""
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 4))

    def local(x, y):
        return contrastive_loss(x, y, 1.0, axis_name=AXIS, implementation=implementation)

    rows = NamedSharding(mesh, P(AXIS))
    unchecked = jax.shard_map(
        local, mesh=mesh, in_specs=(P(AXIS), P(AXIS)), out_specs=P(), check_vma=False
    )
    with pytest.raises(ValueError, match=r"x does not vary along \['data'\].*check_vma=True"):
        jax.jit(unchecked)(jax.device_put(x, rows), jax.device_put(x, rows))
    replicated = jax.shard_map(local, mesh=mesh, in_specs=(P(), P()), out_specs=P())
    with pytest.raises(ValueError, match="x does not vary along"):
        jax.jit(replicated)(x, x)
