"""vrgd and accumulate_with_moments against a NumPy transcription of VRGD (Jiang et al. 2023)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbatch import optim

K, N, D, O, L = 4, 32, 3, 2, 4  # micro-batches, examples, inputs, outputs, stacked layers
COUPLING = np.random.default_rng(7).normal(size=(L, O)).astype(np.float32)


def _params():
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(D, O)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(O,)), jnp.float32),
        "stacked": jnp.asarray(0.3 * rng.normal(size=(L, D)), jnp.float32),
    }


def _loss(params, batch):
    pred = batch["x"] @ params["w"] + params["b"]
    pred = pred + (batch["x"] @ params["stacked"].T) @ COUPLING
    return 0.5 * jnp.mean(jnp.sum((pred - batch["y"]) ** 2, axis=-1))


def _grad_fn(params, batch):
    loss, grads = jax.value_and_grad(_loss)(params, batch)
    return grads, {"loss": loss}


def _batch(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype(np.float32)
    y = (x @ rng.normal(size=(D, O)) + 0.5 * rng.normal(size=(N, O))).astype(np.float32)
    return {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def _numpy_grads(params, batch):
    """The gradient of ``_loss`` written out: e = pred - y, dw = x^T e / n, db = mean e,
    dstacked = C e^T x / n."""
    x, y = (np.asarray(batch[k], np.float64) for k in ("x", "y"))
    w, b, s = (np.asarray(params[k], np.float64) for k in ("w", "b", "stacked"))
    e = x @ w + b + (x @ s.T) @ COUPLING - y
    return {"w": x.T @ e / len(x), "b": e.mean(0), "stacked": COUPLING @ e.T @ x / len(x)}


def _micro_grads(params, batch):
    """The k micro-batch gradients, micro-batch j = examples j, j + k, ... (accumulate's split)."""
    return [
        _numpy_grads(params, {f: np.asarray(a)[j::K] for f, a in batch.items()}) for j in range(K)
    ]


def _numpy_vrgd(grads_list, *, scope, lo, hi, layer_axes=None, mask=None, eps=1e-30):
    """VRGD's scaled gradient, transcribed: GSNR over the k gradients, normalised, bounded."""
    names = sorted(grads_list[0])
    layer_axes = layer_axes or {}
    mask = mask or {}
    mean = {n: np.mean([g[n] for g in grads_list], axis=0) for n in names}
    var = {n: np.var([g[n] for g in grads_list], axis=0) for n in names}
    r = {n: np.minimum(mean[n] ** 2 / (var[n] + eps), 1e20) for n in names}
    on = [n for n in names if mask.get(n, True)]
    global_mean = np.concatenate([r[n].ravel() for n in on]).mean()
    out = {}
    for n in names:
        if not mask.get(n, True):
            out[n] = mean[n]
            continue
        if scope == "global":
            scale = global_mean
        elif layer_axes.get(n) is not None:  # one mean per slice along the layer axis
            a = layer_axes[n]
            scale = np.expand_dims(
                np.mean(np.moveaxis(r[n], a, 0).reshape(r[n].shape[a], -1), 1),
                tuple(i for i in range(r[n].ndim) if i != a),
            )
        else:
            scale = r[n].mean()
        out[n] = np.clip(r[n] / scale, lo, hi) * mean[n]
    return out


@pytest.mark.parametrize(
    "scope, bounds, layer_axes",
    [
        ("layer", None, {"w": None, "b": None, "stacked": 0}),
        ("global", (0.5, 1.5), None),
    ],
)
def test_accumulated_sgd_momentum_matches_numpy(scope, bounds, layer_axes):
    """Two jitted steps of accumulate_with_moments(vrgd(sgd with momentum)) over K micro-batches
    against NumPy: per-micro-batch gradients, VRGD, then v <- 0.9 v + g', w <- w - lr v."""
    lr, mom = 0.05, 0.9
    kwargs = {} if bounds is None else dict(min_ratio=bounds[0], max_ratio=bounds[1])
    lo, hi = (0.9, 1.1) if bounds is None else bounds
    tx = optim.accumulate_with_moments(
        optim.vrgd(optax.sgd(lr, momentum=mom), scope=scope, layer_axes=layer_axes, **kwargs),
        K,
        aux_shapes={"loss": jnp.zeros(())},
    )
    params = _params()
    state = tx.init(params)

    @jax.jit
    def step(params, state, batch):
        updates, state = tx.update(None, state, params, grad_fn=_grad_fn, batch=batch)
        return optax.apply_updates(params, updates), state

    want = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
    velocity = jax.tree.map(np.zeros_like, want)
    for t in range(2):
        batch = _batch(t)
        micro = _micro_grads(want, batch)
        scaled = _numpy_vrgd(micro, scope=scope, lo=lo, hi=hi, layer_axes=layer_axes)
        velocity = {n: mom * velocity[n] + scaled[n] for n in want}
        want = {n: want[n] - lr * velocity[n] for n in want}
        params, state = step(params, state, batch)
        for n in want:
            np.testing.assert_allclose(params[n], want[n], rtol=2e-5, atol=2e-6, err_msg=n)
    # the scaling did something: some element sits at a bound
    fractions = jax.device_get(state.inner_state.clipped_fraction)
    assert max(fractions.values()) > 0


def test_state_keeps_the_accumulate_contract():
    """accumulate_with_moments keeps accumulate's state: the loss aux and the noise statistics."""
    aux = {"loss": jnp.zeros(())}
    params, batch = _params(), _batch(0)
    txs = [
        optim.accumulate_with_moments(optim.vrgd(optax.sgd(0.1)), K, aux_shapes=aux),
        optim.accumulate(optax.sgd(0.1), K, aux_shapes=aux),
    ]

    @jax.jit
    def states(params, batch):
        return [
            tx.update(None, tx.init(params), params, grad_fn=_grad_fn, batch=batch)[1] for tx in txs
        ]

    got, want = states(params, batch)
    assert isinstance(got, optim.AccumulateState)
    np.testing.assert_allclose(got.aux["loss"], want.aux["loss"], rtol=1e-6)
    for field in ("sq_norm_small", "sq_norm_big", "b_small", "b_big"):
        np.testing.assert_allclose(getattr(got.noise, field), getattr(want.noise, field), rtol=1e-5)


def _moments(seed):
    """A mean gradient and a mean of squares of 8 per-device gradients, as a data-parallel
    step would pass them (no micro-batches), plus the 8 gradients."""
    rng = np.random.default_rng(seed)
    shapes = {"w": (D, O), "b": (O,), "stacked": (L, D)}
    per_device = [
        {n: rng.normal(loc=rng.uniform(-1, 1, size=s), size=s) for n, s in shapes.items()}
        for _ in range(8)
    ]
    mean = {n: np.mean([g[n] for g in per_device], 0) for n in shapes}
    sq = {n: np.mean([g[n] ** 2 for g in per_device], 0) for n in shapes}
    to_jax = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
    return to_jax(mean), to_jax(sq), per_device


@pytest.mark.parametrize(
    "make",
    [
        lambda: optax.sgd(0.1),
        lambda: optax.adam(1e-2),
        lambda: optim.lars(0.1, weight_decay=1e-3, trust_coefficient=0.01),
        lambda: optim.lamb(1e-2, weight_decay=1e-2),
    ],
    ids=["sgd", "adam", "lars", "lamb"],
)
def test_any_inner_optimizer_sees_the_scaled_gradient(make):
    """vrgd(inner) given per-device moments equals inner applied to the NumPy-scaled gradient."""
    params = _params()
    tx, ref = optim.vrgd(make(), gamma=0.3), make()
    state, ref_state = tx.init(params), ref.init(params)
    update = jax.jit(lambda g, s, p, m2: tx.update(g, s, p, grad_sq_mean=m2))
    for t in range(2):
        mean, sq, per_device = _moments(t)
        scaled = _numpy_vrgd(per_device, scope="layer", lo=0.7, hi=1.3)
        got, state = update(mean, state, params, sq)
        want, ref_state = ref.update(jax.tree.map(jnp.float32, scaled), ref_state, params)
        for n in params:
            np.testing.assert_allclose(got[n], want[n], rtol=1e-4, atol=1e-7, err_msg=n)
        params = optax.apply_updates(params, got)


def test_mask_leaves_pass_unscaled_and_bf16_keeps_its_dtype():
    mean, sq, per_device = _moments(3)
    mask = {"w": True, "b": False, "stacked": True}
    mean = {**mean, "w": mean["w"].astype(jnp.bfloat16)}
    tx = optim.vrgd(optax.identity(), min_ratio=0.0, max_ratio=3.0, mask=mask)
    params = jax.tree.map(jnp.zeros_like, mean)
    out, state = jax.jit(lambda m, s: tx.update(m, tx.init(params), params, grad_sq_mean=s))(
        mean, sq
    )
    np.testing.assert_array_equal(out["b"], mean["b"])
    assert out["w"].dtype == jnp.bfloat16
    want = _numpy_vrgd(per_device, scope="layer", lo=0.0, hi=3.0, mask=mask)
    np.testing.assert_allclose(out["stacked"], want["stacked"], rtol=1e-5)
    np.testing.assert_allclose(np.float32(out["w"]), want["w"], rtol=2e-2, atol=1e-2)
    assert float(state.clipped_fraction["b"]) == 0.0


def test_zero_variance_and_zero_gradient_stay_finite():
    g = {"a": jnp.array([1.0, 2.0, 0.0]), "z": jnp.zeros(4)}
    sq = {"a": jnp.array([1.0, 4.0, 0.0]), "z": jnp.zeros(4)}  # no variance at all
    tx = optim.vrgd(optax.identity())
    out, _ = jax.jit(lambda g, s: tx.update(g, tx.init(g), g, grad_sq_mean=s))(g, sq)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
    np.testing.assert_array_equal(out["z"], 0.0)
    np.testing.assert_allclose(out["a"], [1.1, 2.2, 0.0])  # infinite GSNR: the upper bound


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: optim.vrgd(optax.sgd(0.1), scope="model"), "scope must be one of"),
        (lambda: optim.vrgd(optax.sgd(0.1), min_ratio=2.0, max_ratio=1.0), "min_ratio must be <="),
        (lambda: optim.vrgd(optax.sgd(0.1), gamma=-0.1), "gamma must be >= 0"),
        (lambda: optim.vrgd(optax.sgd(0.1), scope="global", layer_axes={"w": 0}), "layer_axes"),
        (lambda: optim.vrgd("sgd"), "inner must be an optax.GradientTransformation"),
        (
            lambda: optim.accumulate_with_moments(optim.vrgd(optax.sgd(0.1)), 1),
            "micro_batches x noise_groups >= 2",
        ),
        (lambda: optim.vrgd(optax.sgd(0.1), mask={"nope": True}).init(_params()), "mask does not"),
    ],
)
def test_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_missing_moments_is_a_clear_error():
    tx = optim.vrgd(optax.sgd(0.1))
    params = _params()
    with pytest.raises(ValueError, match="vrgd needs grad_sq_mean=.*accumulate_with_moments"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match="grad_sq_mean has structure"):
        tx.update(params, tx.init(params), params, grad_sq_mean={"w": params["w"]})
