"""agvm and accumulate_halves against a NumPy transcription of AGVM (Xue et al. 2022)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbatch import optim

GROUPS = {"backbone": r"backbone/.*", "neck": r"neck/.*", "head": r".*"}
SHAPES = {"backbone": {"w": (4, 3), "b": (3,)}, "neck": {"w": (3, 3)}, "head": {"w": (3, 2)}}
ORDER = ["backbone", "neck", "head"]


def as32(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _tree(fn):
    return {g: {n: fn(s) for n, s in leaves.items()} for g, leaves in SHAPES.items()}


def _numpy_phi(g_a, g_b):
    """Phi_i = 1 - cos of the group's concatenated half-batch gradients."""
    out = []
    for group in ORDER:
        a = np.concatenate([np.ravel(x) for x in g_a[group].values()])
        b = np.concatenate([np.ravel(x) for x in g_b[group].values()])
        out.append(1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return np.array(out)


def test_sgd_momentum_over_steps_matches_numpy():
    """Eight steps of agvm(sgd with momentum): mu measured every 2 steps from step 2 to 6, with
    momentum on mu, scaling each group's step while active (NumPy transcription of the hook)."""
    lr, mom, mu_mom, n, start, stop = 0.1, 0.9, 0.6, 2, 2, 6
    tx = optim.agvm(
        optax.sgd(lr, momentum=mom),
        GROUPS,
        momentum=mu_mom,
        interval=n,
        start_step=start,
        stop_step=stop,
    )
    params = _tree(lambda s: jnp.zeros(s, jnp.float32))
    state = tx.init(params)
    update = jax.jit(lambda g, s, p, a, b: tx.update(g, s, p, half_grads=(a, b)))
    rng = np.random.default_rng(0)
    noise = {"backbone": 0.5, "neck": 0.7, "head": 3.0}  # the head's halves disagree most
    want = {g: {k: np.zeros(s) for k, s in v.items()} for g, v in SHAPES.items()}
    velocity = {g: {k: np.zeros(s) for k, s in v.items()} for g, v in SHAPES.items()}
    mu = np.ones(3)
    for t in range(8):
        signal = _tree(lambda s: rng.normal(size=s))
        g_a = {
            g: {k: x + noise[g] * rng.normal(size=x.shape) for k, x in v.items()}
            for g, v in signal.items()
        }
        g_b = {
            g: {k: x + noise[g] * rng.normal(size=x.shape) for k, x in v.items()}
            for g, v in signal.items()
        }
        g = {gr: {k: (g_a[gr][k] + g_b[gr][k]) / 2 for k in v} for gr, v in g_a.items()}
        active = start <= t <= stop
        if active and t % n == 0:
            phi = _numpy_phi(g_a, g_b)
            fresh = np.sqrt(np.clip((phi[0] + 1e-6) / (phi + 1e-6), 0.5, 10.0))
            mu = mu_mom * mu + (1 - mu_mom) * fresh
        scale = mu if active else np.ones(3)
        for i, gr in enumerate(ORDER):
            for k in want[gr]:
                velocity[gr][k] = mom * velocity[gr][k] + g[gr][k]
                want[gr][k] = want[gr][k] - lr * scale[i] * velocity[gr][k]

        updates, state = update(as32(g), state, params, as32(g_a), as32(g_b))
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(state.mu, mu, rtol=1e-5)
        jax.tree.map(
            lambda p, w: np.testing.assert_allclose(p, w, rtol=1e-4, atol=1e-6), params, want
        )
    # the reference keeps its rate; noisier groups get smaller steps, the noisiest the smallest
    assert mu[0] == pytest.approx(1.0) and mu[2] < mu[1] < 1.0
    assert int(state.count) == 8


def _loss(params, batch):
    h = jnp.tanh(batch["x"] @ params["backbone"]["w"] + params["backbone"]["b"])
    h = jnp.tanh(h @ params["neck"]["w"])
    return 0.5 * jnp.mean((h @ params["head"]["w"] - batch["y"]) ** 2)


def _grad_fn(params, batch):
    loss, grads = jax.value_and_grad(_loss)(params, batch)
    return grads, {"loss": loss}


@pytest.mark.parametrize("k", [1, 4])
def test_accumulate_halves_feeds_the_two_half_gradients(k):
    """Through accumulate_halves on a real loss: Phi from the halves of the micro-batches of
    optim.accumulate (NumPy: the mean of each half's micro-batch gradients), the update the full
    mean scaled by mu (momentum 0, measured at step 0), and accumulate's loss aux."""
    rng = np.random.default_rng(1)
    params = _tree(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32))
    batch = {
        "x": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(16, 2)), jnp.float32),
    }
    aux = {"loss": jnp.zeros(())}
    tx = optim.accumulate_halves(
        optim.agvm(optax.identity(), GROUPS, momentum=0.0, interval=1), k, aux_shapes=aux
    )
    plain = optim.accumulate(optax.identity(), k, aux_shapes=aux)

    parts = 2 if k == 1 else k

    @jax.jit
    def run(params, batch):
        out = tx.update(None, tx.init(params), params, grad_fn=_grad_fn, batch=batch)
        ref = plain.update(None, plain.init(params), params, grad_fn=_grad_fn, batch=batch)
        micro = [
            jax.grad(_loss)(params, {f: a[j::parts] for f, a in batch.items()})
            for j in range(parts)
        ]
        return out, ref, micro

    (updates, state), (full, ref_state), micro = run(params, batch)
    mean_of = lambda gs: jax.tree.map(lambda *x: np.mean(np.asarray(x, np.float64), 0), *gs)
    phi = _numpy_phi(mean_of(micro[: parts // 2]), mean_of(micro[parts // 2 :]))
    np.testing.assert_allclose(state.inner_state.phi, phi, rtol=1e-4, atol=1e-6)
    mu = np.sqrt(np.clip((phi[0] + 1e-6) / (phi + 1e-6), 0.5, 10.0))
    for i, group in enumerate(ORDER):
        for name in SHAPES[group]:
            np.testing.assert_allclose(
                updates[group][name], mu[i] * np.asarray(full[group][name]), rtol=1e-4, atol=1e-6
            )
    np.testing.assert_allclose(state.aux["loss"], ref_state.aux["loss"], rtol=1e-6)
    np.testing.assert_allclose(state.noise.sq_norm_big, ref_state.noise.sq_norm_big, rtol=1e-4)
    assert int(state.noise.b_big) == 16 and int(state.noise.b_small) == 16 // parts


@pytest.mark.parametrize(
    "groups, match",
    [
        (
            {"backbone": r"backbone/.*", "decoder": r"decoder/.*", "rest": r".*"},
            r"agvm groups \['decoder'\] match no parameter",
        ),
        ({"backbone": r"backbone/.*"}, r"parameters \['head/w', 'neck/w'\] match no agvm group"),
        ({"backbone": r"("}, "is not a regex"),
    ],
)
def test_groups_that_do_not_cover_the_params_are_named(groups, match):
    params = _tree(jnp.zeros)
    with pytest.raises(ValueError, match=match):
        optim.agvm(optax.sgd(0.1), groups).init(params)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: optim.agvm(optax.sgd(0.1), GROUPS, reference="neckk"), "reference='neckk'"),
        (lambda: optim.agvm(optax.sgd(0.1), GROUPS, momentum=1.0), "momentum must be"),
        (lambda: optim.agvm(optax.sgd(0.1), GROUPS, interval=0), "interval must be an int >= 1"),
        (lambda: optim.agvm(optax.sgd(0.1), GROUPS, start_step=5, stop_step=2), "stop_step"),
        (lambda: optim.agvm(optax.sgd(0.1), {}), "at least one group"),
        (lambda: optim.accumulate_halves(optax.sgd(0.1), 3), "1 or an even number"),
    ],
)
def test_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_missing_half_gradients_is_a_clear_error():
    tx = optim.agvm(optax.sgd(0.1), GROUPS)
    params = _tree(jnp.zeros)
    with pytest.raises(ValueError, match="agvm needs half_grads=.*accumulate_halves"):
        tx.update(params, tx.init(params), params)
