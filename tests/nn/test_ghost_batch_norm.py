"""GhostBatchNorm against flax BatchNorm and a NumPy transcription of Hoffer et al. (2017)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxbatch.nn import GhostBatchNorm

MOMENTUM = 0.9
EPS = 1e-5


def _variables(x, key=1):
    """BatchNorm-shaped variables with random scale/bias and non-trivial running statistics."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(key), 4)
    c = x.shape[-1]
    return {
        "params": {
            "scale": 1.0 + 0.3 * jax.random.normal(k1, (c,)),
            "bias": 0.3 * jax.random.normal(k2, (c,)),
        },
        "batch_stats": {
            "mean": 0.5 * jax.random.normal(k3, (c,)),
            "var": jnp.exp(0.5 * jax.random.normal(k4, (c,))),
        },
    }


def _ghost_reference(x, variables, vbs):
    """NumPy: normalise each ghost batch with its own statistics; EMA of the mean ghost stats."""
    x = np.asarray(x, np.float64)
    scale = np.asarray(variables["params"]["scale"], np.float64)
    bias = np.asarray(variables["params"]["bias"], np.float64)
    axes = tuple(range(x.ndim - 1))
    ys, mus, vars_ = [], [], []
    for start in range(0, x.shape[0], vbs):
        chunk = x[start : start + vbs]
        mu = chunk.mean(axis=axes)
        var = ((chunk - mu) ** 2).mean(axis=axes)
        ys.append((chunk - mu) / np.sqrt(var + EPS) * scale + bias)
        mus.append(mu)
        vars_.append(var)
    old_mean = np.asarray(variables["batch_stats"]["mean"], np.float64)
    old_var = np.asarray(variables["batch_stats"]["var"], np.float64)
    new_mean = MOMENTUM * old_mean + (1 - MOMENTUM) * np.mean(mus, axis=0)
    new_var = MOMENTUM * old_var + (1 - MOMENTUM) * np.mean(vars_, axis=0)
    return np.concatenate(ys), new_mean, new_var


@pytest.fixture(params=[(16, 5), (8, 3, 3, 4)], ids=["2d", "4d"])
def x(request):
    return 2.0 + 3.0 * jax.random.normal(jax.random.key(42), request.param)


@pytest.mark.parametrize("vbs", [None, "full"])
def test_full_virtual_batch_equals_flax_batch_norm(x, vbs):
    vbs = x.shape[0] if vbs == "full" else vbs
    ghost = GhostBatchNorm(virtual_batch_size=vbs, momentum=MOMENTUM, epsilon=EPS)
    bn = nn.BatchNorm(momentum=MOMENTUM, epsilon=EPS)
    init_ghost = ghost.init(jax.random.key(0), x, use_running_average=False)
    init_bn = bn.init(jax.random.key(0), x, use_running_average=False)
    chex.assert_trees_all_equal(nn.meta.unbox(init_ghost), init_bn)  # same names, shapes, values
    variables = _variables(x)
    y, upd = ghost.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    y_bn, upd_bn = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    chex.assert_trees_all_close(y, y_bn, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(upd, upd_bn, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("vbs", [2, 4])
def test_ghost_batches_match_numpy_reference(x, vbs):
    if x.shape[0] % vbs:
        pytest.skip("batch not divisible")
    ghost = GhostBatchNorm(virtual_batch_size=vbs, momentum=MOMENTUM, epsilon=EPS)
    variables = _variables(x)
    y, upd = ghost.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    y_ref, mean_ref, var_ref = _ghost_reference(x, variables, vbs)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], var_ref, rtol=1e-5, atol=1e-6)
    # Ghost statistics really differ from full-batch ones on this input.
    y_full = GhostBatchNorm(momentum=MOMENTUM, epsilon=EPS).apply(
        variables, x, use_running_average=False, mutable=["batch_stats"]
    )[0]
    assert not np.allclose(y, y_full, atol=1e-3)


def test_ghost_batches_equal_per_chunk_flax_batch_norm(x):
    vbs = 4 if x.shape[0] % 4 == 0 else 2
    ghost = GhostBatchNorm(virtual_batch_size=vbs, epsilon=EPS)
    variables = _variables(x)
    y = ghost.apply(variables, x, use_running_average=False, mutable=["batch_stats"])[0]
    bn = nn.BatchNorm(epsilon=EPS, use_running_average=False)
    chunks = [
        bn.apply(variables, x[i : i + vbs], mutable=["batch_stats"])[0]
        for i in range(0, x.shape[0], vbs)
    ]
    chex.assert_trees_all_close(y, jnp.concatenate(chunks), rtol=1e-5, atol=1e-5)


def test_running_average_mode_uses_stored_statistics(x):
    ghost = GhostBatchNorm(virtual_batch_size=2, use_running_average=True, epsilon=EPS)
    variables = _variables(x)
    y, upd = ghost.apply(variables, x, mutable=["batch_stats"])
    stats, params = variables["batch_stats"], variables["params"]
    y_ref = (np.asarray(x) - np.asarray(stats["mean"])) / np.sqrt(
        np.asarray(stats["var"]) + EPS
    ) * np.asarray(params["scale"]) + np.asarray(params["bias"])
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_equal(upd["batch_stats"], stats)
    y_bn = nn.BatchNorm(use_running_average=True, epsilon=EPS).apply(variables, x)
    chex.assert_trees_all_close(y, y_bn, rtol=1e-6, atol=1e-6)


def test_init_does_not_update_running_statistics():
    x = jax.random.normal(jax.random.key(0), (8, 3)) + 5.0
    variables = GhostBatchNorm(virtual_batch_size=2, use_running_average=False).init(
        jax.random.key(0), x
    )
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(3))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(3))


def test_params_carry_norm_axis_name():
    x = jnp.ones((4, 3))
    params = GhostBatchNorm(use_running_average=False).init(jax.random.key(0), x)["params"]
    assert params["scale"].names == ("norm",)
    assert params["bias"].names == ("norm",)


def test_batch_not_divisible_raises():
    ghost = GhostBatchNorm(virtual_batch_size=3, use_running_average=False)
    with pytest.raises(ValueError, match=r"batch size 8 .* not divisible by virtual_batch_size=3"):
        ghost.init(jax.random.key(0), jnp.ones((8, 2)))


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_bad_virtual_batch_size_raises_at_construction(bad):
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
        GhostBatchNorm(virtual_batch_size=bad)


def test_batch_axis_as_feature_axis_raises():
    with pytest.raises(ValueError, match="axis 0, the batch axis"):
        GhostBatchNorm(axis=0, use_running_average=False).init(jax.random.key(0), jnp.ones((4, 2)))


def _sharded_apply(module, variables, x, devices):
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))

    def step(v, xb):
        return module.apply(v, xb, use_running_average=False, mutable=["batch_stats"])

    return jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P()))(
        variables, x
    )


def test_axis_name_without_virtual_batch_is_synchronised_batch_norm(eight_devices):
    x = 1.0 + 2.0 * jax.random.normal(jax.random.key(3), (32, 4))
    ghost = GhostBatchNorm(axis_name="data", momentum=MOMENTUM, epsilon=EPS)
    variables = _variables(x)
    y, upd = _sharded_apply(ghost, variables, x, eight_devices)
    y_ref, mean_ref, var_ref = _ghost_reference(x, variables, x.shape[0])
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], var_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vbs", [2, 4])  # 4 examples per device: 2 ghost batches, or 1
def test_ghost_batches_are_per_device_and_running_stats_averaged(eight_devices, vbs):
    x = 1.0 + 2.0 * jax.random.normal(jax.random.key(4), (32, 4))
    ghost = GhostBatchNorm(virtual_batch_size=vbs, axis_name="data", momentum=MOMENTUM, epsilon=EPS)
    variables = _variables(x)
    y, upd = _sharded_apply(ghost, variables, x, eight_devices)
    # Ghost batches never straddle devices, so the global reference with the same V applies;
    # the running statistics are the average of the per-device updates = the global mean.
    y_ref, mean_ref, var_ref = _ghost_reference(x, variables, vbs)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], var_ref, rtol=1e-5, atol=1e-5)
