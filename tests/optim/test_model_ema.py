"""model_ema: the EMA scaling rule (Busbridge et al. 2023), half-life, warm-up, optax.ema."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbatch import optim, scaling


def np_ema(init, targets, rho, warmup_steps=0):
    """ema_t = rho_t·ema + (1 - rho_t)·x_t, rho_t = rho·min(1, t / warmup) (t from 0), float64."""
    ema = np.asarray(init, np.float64)
    out = []
    for t, x in enumerate(targets):
        rho_t = rho * min(1.0, t / warmup_steps) if warmup_steps else rho
        ema = rho_t * ema + (1 - rho_t) * np.asarray(x, np.float64)
        out.append(ema)
    return out


def _targets(n, shape=(3, 4), seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    return [{"w": jax.random.normal(k, shape)} for k in keys]


def _track(ema, init, targets):
    state = ema.init(init)
    update = jax.jit(ema.update)
    seen = []
    for x in targets:
        returned, state = update(x, state)
        chex.assert_trees_all_equal(returned, x)  # the tracked tree comes back unchanged
        seen.append(state.ema)
    return seen, state


@pytest.mark.parametrize("decay, b, b_ref", [(0.999, 4096, 256), (0.9, 128, 512), (0.5, 64, 64)])
def test_decay_scaling_rule(decay, b, b_ref):
    rho = optim.ema_decay(decay, batch_size=b, reference_batch_size=b_ref)
    np.testing.assert_allclose(rho, np.power(decay, b / b_ref), rtol=1e-12)
    assert optim.ema_decay(decay, batch_size=b) == decay  # reference defaults to batch: kappa = 1


@pytest.mark.parametrize("decay, b, b_ref", [(0.999, 4096, 256), (0.9, 128, 512), (0.5, 64, 64)])
def test_decay_is_the_scaling_rule_of_jaxbatch_scaling(decay, b, b_ref):
    """optim.ema_decay and scaling.ema_decay are one rule: the same number, to the last bit."""
    got = optim.ema_decay(decay, batch_size=b, reference_batch_size=b_ref)
    assert got == scaling.ema_decay(decay, b_ref, b)
    half_life = optim.ema_decay(half_life_samples=10 * b_ref, batch_size=b)
    assert half_life == scaling.ema_decay(0.5, 10 * b_ref, b)
    # Traced values (optax.inject_hyperparams) go through the same rule.
    traced = jax.jit(lambda d: optim.ema_decay(d, batch_size=b, reference_batch_size=b_ref))
    np.testing.assert_allclose(traced(jnp.float32(decay)), got, rtol=1e-6)


@pytest.mark.parametrize("batch", [32, 1024, 65536])
def test_half_life_halves_the_weight_after_that_many_samples(batch):
    half_life = 100_000
    rho = optim.ema_decay(half_life_samples=half_life, batch_size=batch)
    np.testing.assert_allclose(rho ** (half_life / batch), 0.5, rtol=1e-12)


@pytest.mark.parametrize("kappa", [2, 4, 8])
def test_kappa_steps_at_b_equal_one_step_at_kappa_b(kappa):
    """Constant target: kappa updates at B with rho equal one update at kappa·B with rho^kappa."""
    init = {"w": jnp.zeros((5,))}
    target = {"w": jnp.linspace(-1.0, 2.0, 5)}
    small = optim.model_ema(0.99, batch_size=256, reference_batch_size=256)
    big = optim.model_ema(0.99, batch_size=256 * kappa, reference_batch_size=256)
    small_seen, _ = _track(small, init, [target] * kappa)
    big_seen, state = _track(big, init, [target])
    chex.assert_trees_all_close(small_seen[-1], big_seen[-1], rtol=1e-6)
    np.testing.assert_allclose(big_seen[-1]["w"], (1 - 0.99**kappa) * target["w"], rtol=1e-6)
    assert int(state.count) == 1


@pytest.mark.parametrize("warmup_steps", [0, 3])
def test_matches_numpy_with_warmup(warmup_steps):
    init = {"w": jnp.full((3, 4), 5.0)}
    targets = _targets(6)
    ema = optim.model_ema(0.8, batch_size=512, reference_batch_size=256, warmup_steps=warmup_steps)
    seen, state = _track(ema, init, targets)
    expected = np_ema(init["w"], [t["w"] for t in targets], 0.8**2, warmup_steps)
    chex.assert_trees_all_close([s["w"] for s in seen], expected, rtol=1e-5, atol=1e-7)
    assert int(state.count) == len(targets)
    if warmup_steps:  # the ramp starts at decay 0: the first update copies the target
        np.testing.assert_allclose(seen[0]["w"], targets[0]["w"], rtol=1e-6)


def test_equals_optax_ema_without_debias_from_zeros():
    init = {"w": jnp.zeros((3, 4))}
    targets = _targets(5, seed=1)
    seen, _ = _track(optim.model_ema(0.7, batch_size=8), init, targets)
    ref = optax.ema(0.7, debias=False)
    state = ref.init(init)
    for x, ours in zip(targets, seen, strict=True):
        theirs, state = ref.update(x, state)
        chex.assert_trees_all_close(ours, theirs, rtol=1e-6)


def test_zero_decay_tracks_the_latest_value():
    seen, _ = _track(optim.model_ema(0.0, batch_size=1), {"w": jnp.ones((3, 4))}, _targets(2))
    chex.assert_trees_all_close(seen[-1], _targets(2)[-1], rtol=0)


def test_f32_average_of_bf16_params_and_batch_stats():
    tree = {
        "params": {"w": jnp.ones((4,), jnp.bfloat16)},
        "batch_stats": {"mean": jnp.zeros((4,), jnp.float32)},
    }
    ema = optim.model_ema(0.999, batch_size=1, ema_dtype=jnp.float32)
    state = ema.init(tree)
    assert state.ema["params"]["w"].dtype == jnp.float32
    new = {
        "params": {"w": jnp.full((4,), 1.0078125, jnp.bfloat16)},  # 1 + one bf16 ulp
        "batch_stats": {"mean": jnp.full((4,), 2.0)},
    }
    _, state = jax.jit(ema.update)(new, state)
    # 0.999·1 + 0.001·1.0078125: representable in f32, lost entirely in bf16.
    np.testing.assert_allclose(state.ema["params"]["w"], 1.0000078125, rtol=1e-7)
    np.testing.assert_allclose(state.ema["batch_stats"]["mean"], 0.002, rtol=1e-6)


def test_chain_form_equals_manual_form():
    params = {"w": jnp.linspace(0.0, 1.0, 6).reshape(2, 3)}
    grads = _targets(4, shape=(2, 3), seed=2)
    opt = optax.sgd(0.1)
    chained = optax.chain(opt, optim.model_ema_of_params(0.9, batch_size=64))
    manual_ema = optim.model_ema(0.9, batch_size=64)
    p1, s1 = params, chained.init(params)
    p2, s2, e2 = params, opt.init(params), manual_ema.init(params)
    for g in grads:
        u1, s1 = chained.update(g, s1, p1)
        p1 = optax.apply_updates(p1, u1)
        u2, s2 = opt.update(g, s2, p2)
        p2 = optax.apply_updates(p2, u2)
        _, e2 = manual_ema.update(p2, e2)
    chex.assert_trees_all_close(optax.tree.get(s1, "ema"), e2.ema, rtol=1e-6)
    chex.assert_trees_all_close(p1, p2, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(decay=1.0, batch_size=8), r"decay must be in \[0, 1\), got 1.0"),
        (dict(decay=-0.1, batch_size=8), "decay"),
        (dict(batch_size=8), "exactly one of decay and half_life_samples"),
        (dict(decay=0.9, half_life_samples=10, batch_size=8), "exactly one"),
        (dict(decay=0.9, batch_size=0), "batch_size.*0"),
        (dict(decay=0.9, batch_size=8, reference_batch_size=-4), "reference_batch_size"),
        (dict(half_life_samples=0.0, batch_size=8), "half_life_samples"),
        (dict(decay=0.9, batch_size=8, warmup_steps=-1), "warmup_steps"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.model_ema(**kwargs)
