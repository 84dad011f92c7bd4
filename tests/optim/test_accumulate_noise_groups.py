"""Noise groups in ``optim.accumulate``: the small-batch gradients of the noise statistics from
groups of each micro-batch (the per-replica gradients of data parallelism), on linear regression
whose per-example gradient covariance is known in closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbatch import optim, stats
from jaxbatch.parallel import make_mesh

D, SIGMA = 8, 0.5


def _grad_fn(params, batch):
    """Least squares 0.5 (x·w − y)^2: per-example gradient x (x·w − y)."""
    loss = lambda w: 0.5 * jnp.mean((batch["x"] @ w - batch["y"]) ** 2)
    value, grads = jax.value_and_grad(loss)(params)
    return grads, {"loss": value}


def _batch(seed, n, w_star):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D)).astype(np.float32)
    y = x @ w_star + SIGMA * rng.standard_normal(n).astype(np.float32)
    return {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def _truth(delta):
    """|G|^2 and tr Sigma of the per-example gradient at w = w* + delta, x ~ N(0, I_D).

    G = E[x xᵀ] delta = delta; E|x xᵀ delta|^2 = (D + 2)|delta|^2 (Gaussian fourth moments) and
    E|x ε|^2 = D σ², so tr Sigma = (D + 1)|delta|^2 + D σ².
    """
    d2 = float(np.sum(delta**2))
    return d2, (D + 1) * d2 + D * SIGMA**2


def _noise(k, groups, params, batch, **kwargs):
    aux = {"loss": jax.ShapeDtypeStruct((), jnp.float32)}
    tx = optim.accumulate(optax.sgd(0.1), k, aux_shapes=aux, noise_groups=groups, **kwargs)
    updates, state = tx.update(None, tx.init(params), params, grad_fn=_grad_fn, batch=batch)
    return updates, state


def test_groups_give_the_statistics_of_the_same_examples_as_micro_batches():
    """k = 1, G = 4 on a batch ordered so that its contiguous blocks are the strided micro-batches
    of k = 4, G = 1: identical small gradients, hence identical statistics and update."""
    params = jnp.ones(D)
    batch = _batch(0, 32, np.zeros(D, np.float32))
    strided_to_blocks = np.arange(32).reshape(8, 4).T.reshape(-1)  # block j = rows j::4
    blocks = jax.tree.map(lambda x: x[strided_to_blocks], batch)
    u_groups, s_groups = jax.jit(lambda p, b: _noise(1, 4, p, b))(params, blocks)
    u_micro, s_micro = jax.jit(lambda p, b: _noise(4, 1, p, b))(params, batch)
    u_both, s_both = jax.jit(lambda p, b: _noise(2, 2, p, b))(params, batch)
    for noise in (s_groups.noise, s_both.noise):
        assert int(noise.b_small) == 8 and int(noise.b_big) == 32
    np.testing.assert_allclose(s_groups.noise.sq_norm_small, s_micro.noise.sq_norm_small, rtol=1e-6)
    np.testing.assert_allclose(s_groups.noise.sq_norm_big, s_micro.noise.sq_norm_big, rtol=1e-6)
    np.testing.assert_allclose(u_groups, u_micro, rtol=1e-6)
    np.testing.assert_allclose(u_both, u_micro, rtol=1e-6)  # the update is the full-batch one
    np.testing.assert_allclose(s_groups.aux["loss"], s_micro.aux["loss"], rtol=1e-6)
    # The mean of the squared norms, not the square of the mean norm (which is smaller).
    norms = [
        float(jnp.sum(_grad_fn(params, jax.tree.map(lambda x, j=j: x[j::4], batch))[0] ** 2))
        for j in range(4)
    ]
    np.testing.assert_allclose(float(s_groups.noise.sq_norm_small), np.mean(norms), rtol=1e-5)
    assert float(s_groups.noise.sq_norm_small) > np.mean(np.sqrt(norms)) ** 2 * (1 + 1e-4)


@pytest.mark.parametrize(
    "k, groups, sharded",
    [(4, 1, False), (1, 8, True), (2, 4, True)],
    ids=["micro_batches", "eight_devices", "both"],
)
def test_estimators_recover_the_known_gradient_noise(k, groups, sharded):
    """Averaged over 200 independent batches (fixed seeds), the two-batch estimators give |G|^2
    and tr Sigma of the closed form within 4 standard errors."""
    w_star = np.linspace(-1, 1, D).astype(np.float32)
    delta = np.full(D, 0.3, np.float32)
    params = jnp.asarray(w_star + delta)
    n, draws = 64, 200
    rng = np.random.default_rng(1)
    x = rng.standard_normal((draws, n, D)).astype(np.float32)
    y = x @ w_star + SIGMA * rng.standard_normal((draws, n)).astype(np.float32)
    batches = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    kwargs = {}
    if sharded:
        mesh = make_mesh(data=8)
        batches = jax.device_put(batches, NamedSharding(mesh, P(None, "data")))
        kwargs = dict(
            group_axis_name="data",
            constrain_group_grads=lambda g: jax.lax.with_sharding_constraint(
                g, NamedSharding(mesh, P("data"))
            ),
        )

    def estimates(batch):
        _, state = _noise(k, groups, params, batch, **kwargs)
        noise = state.noise
        b_small, b_big = noise.b_small.astype(jnp.float32), noise.b_big.astype(jnp.float32)
        return stats.noise_scale_from_two_batches(
            noise.sq_norm_small, noise.sq_norm_big, b_small, b_big
        )

    g2, trace = jax.jit(jax.vmap(estimates))(batches)
    want_g2, want_trace = _truth(delta)
    for got, want in ((np.asarray(g2), want_g2), (np.asarray(trace), want_trace)):
        stderr = got.std(ddof=1) / np.sqrt(draws)
        assert abs(got.mean() - want) < 4 * stderr, (got.mean(), want, stderr)
        assert stderr < 0.25 * want  # the test can tell a wrong estimator from a right one


def test_groups_must_divide_the_micro_batch():
    params, batch = jnp.ones(D), _batch(0, 24, np.zeros(D, np.float32))
    with pytest.raises(ValueError, match="micro-batch of 12 .* not divisible by noise_groups=5"):
        _noise(2, 5, params, batch)
    with pytest.raises(ValueError, match="noise_groups must be a positive int, got 0"):
        optim.accumulate(optax.sgd(0.1), 1, noise_groups=0)
