"""accumulate: equals the full-batch optimizer, noise statistics vs NumPy, chain, sharding."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbatch.optim.accumulate import (
    AccumulateState,
    GradNoiseStats,
    accumulate,
    micro_batch_rng,
)
from jaxbatch.stats import noise_scale_from_two_batches

AUX = {"loss": jax.ShapeDtypeStruct((), jnp.float32)}


def _mlp(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def _loss(params, batch):
    return jnp.mean(jnp.sum((_mlp(params, batch["x"]) - batch["y"]) ** 2, axis=-1))


def _grad_fn(params, batch):
    loss, grads = jax.value_and_grad(_loss)(params, batch)
    return grads, {"loss": loss}


def _setup(batch_size=32, seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "w1": jnp.asarray(rng.normal(size=(6, 8)) / 3, jnp.float32),
        "b1": jnp.zeros(8, jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(8, 3)) / 3, jnp.float32),
    }
    batch = {
        "x": jnp.asarray(rng.normal(size=(batch_size, 6)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(batch_size, 3)), jnp.float32),
    }
    return params, batch


def _acc_step(acc):
    @jax.jit
    def step(params, state, batch):
        updates, state = acc.update(None, state, params, grad_fn=_grad_fn, batch=batch)
        return optax.apply_updates(params, updates), state

    return step


def _ref_step(opt):
    @jax.jit
    def step(params, state, batch):
        updates, state = opt.update(jax.grad(_loss)(params, batch), state, params)
        return optax.apply_updates(params, updates), state

    return step


@pytest.mark.parametrize("micro_batches", [1, 4, 8])
def test_equals_adam_on_the_full_batch(micro_batches):
    params, batch = _setup()
    acc = accumulate(optax.adam(1e-2), micro_batches, aux_shapes=AUX)
    ref = optax.adam(1e-2)
    p_acc, s_acc = params, acc.init(params)
    p_ref, s_ref = params, ref.init(params)
    acc_step, ref_step = _acc_step(acc), _ref_step(ref)
    with jax.transfer_guard("disallow"):  # the step moves nothing between host and device
        for _ in range(3):
            loss_before = _loss(p_acc, batch)
            p_acc, s_acc = acc_step(p_acc, s_acc, batch)
            p_ref, s_ref = ref_step(p_ref, s_ref, batch)
            chex.assert_trees_all_close(s_acc.aux["loss"], loss_before, rtol=1e-5)
    chex.assert_trees_all_close(p_acc, p_ref, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(s_acc.inner_state, s_ref, rtol=1e-5, atol=1e-7)
    assert isinstance(s_acc, AccumulateState) and isinstance(s_acc.noise, GradNoiseStats)


def test_noise_stats_match_numpy_per_micro_batch():
    k, batch_size = 4, 32
    params, batch = _setup(batch_size, seed=1)
    acc = accumulate(optax.sgd(0.1), k, aux_shapes=AUX)
    _, state = _acc_step(acc)(params, acc.init(params), batch)

    # Micro-batch j holds examples j, j + k, j + 2k, ... (the documented strided split).
    value_and_grad = jax.jit(jax.value_and_grad(_loss))
    flat = []
    losses = []
    for j in range(k):
        micro = jax.tree.map(lambda x, j=j: np.asarray(x)[j::k], batch)
        loss, grads = value_and_grad(params, micro)
        flat.append(
            np.concatenate([np.asarray(g, np.float64).ravel() for g in jax.tree.leaves(grads)])
        )
        losses.append(float(loss))
    flat = np.stack(flat)
    want_small = np.mean(np.sum(flat**2, axis=1))
    want_big = np.sum(flat.mean(axis=0) ** 2)
    np.testing.assert_allclose(state.noise.sq_norm_small, want_small, rtol=1e-5)
    np.testing.assert_allclose(state.noise.sq_norm_big, want_big, rtol=1e-5)
    assert (int(state.noise.b_small), int(state.noise.b_big)) == (batch_size // k, batch_size)
    assert state.noise.sq_norm_small.dtype == jnp.float32
    np.testing.assert_allclose(state.aux["loss"], np.mean(losses), rtol=1e-5)
    # The state feeds the noise-scale estimators as is.
    g2, trace = jax.jit(lambda n: noise_scale_from_two_batches(*n))(state.noise)
    b_small, b_big = batch_size // k, batch_size
    want_trace = (want_small - want_big) / (1 / b_small - 1 / b_big)
    np.testing.assert_allclose(trace, want_trace, rtol=1e-4)
    np.testing.assert_allclose(g2, want_big - want_trace / b_big, rtol=1e-4, atol=1e-6)


def test_k1_noise_stats_coincide():
    params, batch = _setup(16)
    acc = accumulate(optax.sgd(0.1), 1, aux_shapes=AUX)
    _, state = _acc_step(acc)(params, acc.init(params), batch)
    np.testing.assert_allclose(state.noise.sq_norm_small, state.noise.sq_norm_big, rtol=1e-6)
    assert int(state.noise.b_small) == int(state.noise.b_big) == 16


def test_in_chain_with_grad_fn_equals_adam():
    params, batch = _setup()
    chained = optax.chain(accumulate(optax.scale_by_adam(), 4, aux_shapes=AUX), optax.scale(-3e-3))
    p_acc, s_acc = params, chained.init(params)
    p_ref, s_ref = params, optax.adam(3e-3).init(params)
    acc_step, ref_step = _acc_step(chained), _ref_step(optax.adam(3e-3))
    for _ in range(2):
        p_acc, s_acc = acc_step(p_acc, s_acc, batch)
        p_ref, s_ref = ref_step(p_ref, s_ref, batch)
    chex.assert_trees_all_close(p_acc, p_ref, rtol=1e-5, atol=1e-6)
    assert float(s_acc[0].noise.sq_norm_small) > 0


def test_without_grad_fn_passes_gradients_to_inner():
    params, batch = _setup()
    grads = jax.grad(_loss)(params, batch)
    chained = optax.chain(optax.clip_by_global_norm(0.5), accumulate(optax.adam(1e-2), 4))
    ref = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2))
    state = chained.init(params)
    got, new_state = jax.jit(chained.update)(grads, state, params)
    want, _ = jax.jit(ref.update)(grads, ref.init(params), params)
    chex.assert_trees_all_close(got, want, rtol=1e-6)
    chex.assert_trees_all_equal(new_state[1].noise, state[1].noise)  # left as they were
    assert new_state[1].aux is None


def test_f32_accumulator_avoids_bf16_summation_error():
    """Eight bf16 micro-gradients [1, 2^-8, ..., 2^-8]: a bf16 sum rounds every 2^-8 away."""
    values = np.array([1.0] + [2.0**-8] * 7, np.float32)
    batch = {"v": jnp.asarray(values[:, None], jnp.bfloat16)}
    params = jnp.zeros((1,), jnp.bfloat16)
    grad_fn = lambda p, b: (jnp.mean(b["v"], axis=0), None)

    def mean_grad(dtype):
        acc = accumulate(optax.identity(), 8, accumulator_dtype=dtype)
        updates, _ = acc.update(None, acc.init(params), params, grad_fn=grad_fn, batch=batch)
        return updates

    exact = jnp.asarray(values.astype(np.float64).mean(keepdims=True), jnp.bfloat16)
    got = mean_grad(jnp.float32)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(exact, np.float32))
    assert float(mean_grad(jnp.bfloat16)[0]) != float(exact[0])


def test_sharded_batch_gives_unsharded_numbers(eight_devices):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    params, batch = _setup(batch_size=64, seed=2)
    acc = accumulate(optax.adam(1e-2), 4, aux_shapes=AUX)
    step = _acc_step(acc)
    want_params, want_state = step(params, acc.init(params), batch)

    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    replicated = jax.device_put(params, NamedSharding(mesh, P()))
    state = jax.device_put(acc.init(params), NamedSharding(mesh, P()))
    got_params, got_state = step(replicated, state, sharded)
    chex.assert_trees_all_close(got_params, want_params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(got_state.noise, want_state.noise, rtol=1e-5)
    chex.assert_trees_all_close(got_state.aux, want_state.aux, rtol=1e-5)

    # The strided split keeps each device's rows local: no gathers of the batch, only the
    # gradient all-reduces.
    hlo = step.lower(replicated, state, sharded).compile().as_text()
    assert not re.search(r"all-gather|all-to-all|collective-permute", hlo)
    assert re.search(r"all-reduce", hlo)


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "4"])
def test_micro_batches_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match=f"micro_batches must be a positive int, got {bad!r}"):
        accumulate(optax.sgd(0.1), bad)


def test_construction_errors():
    with pytest.raises(ValueError, match="accumulator_dtype must be a floating dtype"):
        accumulate(optax.sgd(0.1), 2, accumulator_dtype=jnp.int32)
    with pytest.raises(ValueError, match="inner must be an optax.GradientTransformation"):
        accumulate(lambda g: g, 2)


@pytest.mark.parametrize(
    "batch, aux_shapes, match",
    [
        ({"x": np.zeros((30, 6)), "y": np.zeros((30, 3))}, AUX,
         r"batch\['x'\] has shape \(30, 6\): .* 30 is not divisible by micro_batches=4"),
        ({"x": np.zeros((32, 6)), "y": np.zeros((16, 3))}, AUX, "disagree on the batch size"),
        ({"x": np.zeros((32, 6)), "y": np.zeros((32, 3)), "n": np.float32(1)}, AUX,
         r"batch\['n'\] is a scalar"),
        ({"x": np.zeros((32, 6)), "y": np.zeros((32, 3))}, None,
         "grad_fn returned aux with shapes .*'loss'.* declared None"),
    ],
)  # fmt: skip
def test_update_errors_at_trace_time(batch, aux_shapes, match):
    params, _ = _setup()
    acc = accumulate(optax.sgd(0.1), 4, aux_shapes=aux_shapes)
    with pytest.raises(ValueError, match=match):
        _acc_step(acc)(params, acc.init(params), batch)


def test_update_argument_errors():
    params, batch = _setup()
    acc = accumulate(optax.sgd(0.1), 4, aux_shapes=AUX)
    state = acc.init(params)
    with pytest.raises(ValueError, match="pass updates=None"):
        acc.update(params, state, params, grad_fn=_grad_fn, batch=batch)
    with pytest.raises(ValueError, match="batch= without grad_fn="):
        acc.update(params, state, params, batch=batch)
    with pytest.raises(ValueError, match="rng= without grad_fn="):
        acc.update(params, state, params, rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="needs gradients"):
        acc.update(None, state, params)


def test_rng_gives_each_micro_batch_its_own_key():
    """With rng=, grad_fn(params, m_j, fold_in(rng, j)): dropout-style noise per micro-batch."""
    params, batch = _setup()
    k, key = 4, jax.random.PRNGKey(5)

    def noisy_grad_fn(params, micro_batch, rng):
        keep = jax.random.bernoulli(rng, 0.5, micro_batch["x"].shape).astype(jnp.float32)
        dropped = {**micro_batch, "x": micro_batch["x"] * keep * 2.0}
        grads, aux = _grad_fn(params, dropped)
        return grads, {**aux, "kept": keep.mean()}

    aux = {**AUX, "kept": jax.ShapeDtypeStruct((), jnp.float32)}
    acc = accumulate(optax.identity(), k, aux_shapes=aux)
    got, _ = jax.jit(
        lambda p, b: acc.update(None, acc.init(p), p, grad_fn=noisy_grad_fn, batch=b, rng=key)
    )(params, batch)

    micro = [jax.tree.map(lambda x, j=j: x[j::k], batch) for j in range(k)]
    keys = [micro_batch_rng(key, j) for j in range(k)]
    per_micro = [noisy_grad_fn(params, m, r)[0] for m, r in zip(micro, keys, strict=True)]
    want = jax.tree.map(lambda *g: sum(g) / k, *per_micro)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
    shared = [noisy_grad_fn(params, m, key)[0] for m in micro]  # one key for all: another mean
    shared = jax.tree.map(lambda *g: sum(g) / k, *shared)
    assert float(optax.tree.norm(jax.tree.map(jnp.subtract, got, shared))) > 1e-3
