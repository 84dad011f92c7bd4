"""One suite every jaxbatch.optim transform must pass: jit, chain, inject_hyperparams, dtypes,
sharded params. A new transform joins with one ``Case`` line in ``CASES``."""

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbatch import optim

# Every leaf has a leading dim of 8 so it can be sharded over the 8 simulated devices.
MASK = {"stacked": True, "kernel": True, "bias": False}
LAYER_AXES = {"stacked": 0, "kernel": None, "bias": None}


class Case(NamedTuple):
    name: str
    factory: Any
    kwargs: dict
    hyperparam: str  # a numeric hyper-parameter to change through inject_hyperparams
    new_value: float
    f32_state: str  # a state field that must stay f32 for the bf16 'kernel' leaf
    keeps_update_dtype: bool  # the update of each leaf has the dtype of its gradient


CASES = [
    Case(
        "scale_by_trust_ratio",
        optim.scale_by_trust_ratio,
        dict(trust_coefficient=0.5, max_ratio=5.0, mask=MASK, layer_axes=LAYER_AXES),
        "trust_coefficient",
        0.2,
        "ratios",
        True,
    ),
    Case(
        "lars",
        optim.lars,
        dict(
            learning_rate=0.1,
            weight_decay=1e-3,
            nesterov=True,
            trust_ratio_mask=MASK,
            weight_decay_mask=MASK,
            layer_axes=LAYER_AXES,
            momentum_dtype=jnp.float32,
        ),
        "learning_rate",
        0.05,
        "trace",
        False,
    ),
    Case(
        "lamb",
        optim.lamb,
        dict(
            learning_rate=1e-2,
            weight_decay=1e-2,
            trust_ratio_mask=MASK,
            weight_decay_mask=MASK,
            min_ratio=0.1,
            max_ratio=10.0,
            layer_axes=LAYER_AXES,
            mu_dtype=jnp.float32,
        ),
        "learning_rate",
        3e-2,
        "mu",
        False,
    ),
    Case(
        "model_ema_of_params",
        optim.model_ema_of_params,
        dict(decay=0.9, batch_size=64, warmup_steps=2, ema_dtype=jnp.float32),
        "decay",
        0.5,
        "ema",
        True,
    ),
]
IDS = [c.name for c in CASES]


def _params_and_grads(seed=0, steps=3):
    k = jax.random.split(jax.random.key(seed), 3)
    params = {
        "stacked": jax.random.normal(k[0], (8, 4, 3)),
        "kernel": jax.random.normal(k[1], (8, 6)).astype(jnp.bfloat16),
        "bias": jax.random.normal(k[2], (8,)),
    }
    grads = []
    for t in range(steps):
        kt = jax.random.split(jax.random.fold_in(k[0], 100 + t), 3)
        keys = dict(zip(params, kt, strict=True))
        grads.append({n: jax.random.normal(keys[n], x.shape, x.dtype) for n, x in params.items()})
    return params, grads


def _assert_close(a, b):
    """Leafwise closeness; the bf16 'kernel' leaf and all derived from it get a bf16 tolerance."""

    def check(path, x, y):
        x, y = jnp.asarray(x), jnp.asarray(y)
        assert x.dtype == y.dtype, (jax.tree_util.keystr(path), x.dtype, y.dtype)
        rtol = 2e-2 if "kernel" in jax.tree_util.keystr(path) else 1e-5
        np.testing.assert_allclose(
            np.asarray(x, np.float32),
            np.asarray(y, np.float32),
            rtol=rtol,
            atol=rtol * 1e-2,
            err_msg=jax.tree_util.keystr(path),
        )

    jax.tree_util.tree_map_with_path(check, a, b)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jit_matches_eager(case, run_optimizer):
    params, grads = _params_and_grads()
    tx = case.factory(**case.kwargs)
    eager, eager_state = run_optimizer(tx, params, grads, jit=False)
    jitted, jit_state = run_optimizer(tx, params, grads, jit=True)
    _assert_close(jitted, eager)
    _assert_close(jit_state, eager_state)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_composes_in_chain(case, run_optimizer):
    """chain(scale(0.5), tx) sees exactly the halved gradients."""
    params, grads = _params_and_grads(1)
    chained, chained_state = run_optimizer(
        optax.chain(optax.scale(0.5), case.factory(**case.kwargs)), params, grads
    )
    halved = [jax.tree.map(lambda g: 0.5 * g, g) for g in grads]
    direct, direct_state = run_optimizer(case.factory(**case.kwargs), params, halved)
    _assert_close(chained, direct)
    _assert_close(chained_state[1], direct_state)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_inject_hyperparams(case, run_optimizer):
    """Under inject_hyperparams the transform equals its plain form, also after a change."""
    params, grads = _params_and_grads(2)
    static = [k for k, v in case.kwargs.items() if isinstance(v, dict) or k.endswith("dtype")]
    injected = optax.inject_hyperparams(case.factory, static_args=static)(**case.kwargs)
    state = injected.init(params)
    state.hyperparams[case.hyperparam] = jnp.asarray(case.new_value, jnp.float32)
    outs, state = run_optimizer(injected, params, grads, state=state)
    plain, plain_state = run_optimizer(
        case.factory(**{**case.kwargs, case.hyperparam: case.new_value}), params, grads
    )
    _assert_close(outs, plain)
    _assert_close(state.inner_state, plain_state)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dtypes(case):
    params, grads = _params_and_grads(3)
    tx = case.factory(**case.kwargs)
    state = tx.init(params)
    updates, new_state = jax.jit(tx.update)(grads[0], state, params)
    chex.assert_trees_all_equal_dtypes(new_state, state)  # a jitted loop can carry the state
    chex.assert_trees_all_equal_shapes(new_state, state)
    assert optax.tree.get(state, case.f32_state)["kernel"].dtype == jnp.float32
    new_params = optax.apply_updates(params, updates)
    chex.assert_trees_all_equal_dtypes(new_params, params)
    if case.keeps_update_dtype:
        chex.assert_trees_all_equal_dtypes(updates, grads[0])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sharded_params(case, eight_devices, run_optimizer):
    """Params sharded P('x') on the leading dim: same numbers, sharding kept, no host transfer.

    The first step runs outside the transfer guard: it moves the freshly initialised scalars
    (step counts) onto the mesh. From then on the state is a fixed point of the jitted update.
    """
    mesh = Mesh(np.array(eight_devices), ("x",))
    sharding = NamedSharding(mesh, P("x"))
    params, grads = _params_and_grads(4, steps=3)
    tx = case.factory(**case.kwargs)
    expected, _ = run_optimizer(tx, params, grads)
    p = jax.device_put(params, sharding)
    state = jax.jit(tx.init)(p)
    update = jax.jit(tx.update)
    apply = jax.jit(optax.apply_updates)
    for step, (g, want) in enumerate(zip(grads, expected, strict=True)):
        g = jax.device_put(g, sharding)
        with jax.transfer_guard("disallow" if step else "allow"):
            u, state = update(g, state, p)
            p = apply(p, u)
        for leaf in jax.tree.leaves(u):
            assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), leaf.sharding
        _assert_close(jax.device_get(u), want)
