"""lamb against optax.lamb and a NumPy transcription of You et al. 2019, Algorithm 2."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbatch import optim


def np_lamb(params, grads_seq, *, lr, b1, b2, eps, eps_root, wd, wd_mask, tr_mask, lo, hi, axes):
    """LAMB on dicts of float64 arrays with masks, ratio clipping and per-layer axes."""
    w = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(x) for k, x in w.items()}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    out = []
    for t, grads in enumerate(grads_seq, start=1):
        step = {}
        for k in w:
            g = np.asarray(grads[k], np.float64)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            r = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t) + eps_root) + eps)
            u = r + (wd * w[k] if wd_mask[k] else 0.0)
            if tr_mask[k]:
                if axes[k] is None:
                    wn, un = np.linalg.norm(w[k]), np.linalg.norm(u)
                else:
                    other = tuple(a for a in range(u.ndim) if a != axes[k])
                    wn = np.sqrt(np.sum(w[k] ** 2, axis=other, keepdims=True))
                    un = np.sqrt(np.sum(u**2, axis=other, keepdims=True))
                ratio = np.where((wn == 0) | (un == 0), 1.0, wn / np.where(un == 0, 1.0, un))
                u = np.clip(ratio, lo, hi) * u
            step[k] = -lr * u
            w[k] = w[k] + step[k]
        out.append(step)
    return out


def _problem(seed=0, steps=5):
    k = jax.random.split(jax.random.key(seed), 4)
    params = {
        "stacked": jax.random.normal(k[0], (3, 4, 5)),
        "kernel": jax.random.normal(k[1], (6, 4)),
        "bias": 0.1 * jax.random.normal(k[2], (4,)),
    }
    grads_seq = []
    for t in range(steps):
        kt = jax.random.split(jax.random.fold_in(k[3], t), len(params))
        grads_seq.append(
            {
                n: jax.random.normal(kk, x.shape)
                for (n, x), kk in zip(params.items(), kt, strict=True)
            }
        )
    return params, grads_seq


@pytest.mark.parametrize("optax_mask", [None, {"stacked": True, "kernel": True, "bias": False}])
def test_equals_optax_lamb(optax_mask, run_optimizer):
    """optax.lamb's ``mask`` is a weight-decay mask; ours is ``weight_decay_mask``."""
    params, grads_seq = _problem()
    hp = dict(b1=0.8, b2=0.99, eps=1e-5, weight_decay=0.1)
    ours, _ = run_optimizer(optim.lamb(1e-2, weight_decay_mask=optax_mask, **hp), params, grads_seq)
    theirs, _ = run_optimizer(optax.lamb(1e-2, mask=optax_mask, **hp), params, grads_seq)
    chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=1e-9)


def test_matches_numpy_with_masks_clipping_and_layer_axes(run_optimizer):
    params, grads_seq = _problem(1)
    wd_mask = {"stacked": True, "kernel": True, "bias": False}
    tr_mask = {"stacked": True, "kernel": False, "bias": True}
    axes = {"stacked": 0, "kernel": None, "bias": None}
    hp = dict(b1=0.9, b2=0.999, eps=1e-6, eps_root=1e-8, weight_decay=0.05)
    tx = optim.lamb(
        3e-2,
        weight_decay_mask=wd_mask,
        trust_ratio_mask=tr_mask,
        min_ratio=0.5,
        max_ratio=2.0,
        layer_axes=axes,
        **hp,
    )
    outs, state = run_optimizer(tx, params, grads_seq)
    expected = np_lamb(
        params,
        grads_seq,
        lr=3e-2,
        wd=hp["weight_decay"],
        b1=hp["b1"],
        b2=hp["b2"],
        eps=hp["eps"],
        eps_root=hp["eps_root"],
        wd_mask=wd_mask,
        tr_mask=tr_mask,
        lo=0.5,
        hi=2.0,
        axes=axes,
    )
    chex.assert_trees_all_close(outs, expected, rtol=2e-5, atol=1e-6)
    ratios = optax.tree.get(state, "ratios")
    assert ratios["stacked"].shape == (3,)
    assert float(ratios["kernel"]) == 1.0
    assert np.all((ratios["stacked"] >= 0.5) & (ratios["stacked"] <= 2.0))


@pytest.mark.parametrize("mu_dtype", [None, jnp.float32])
def test_mu_dtype_and_bf16_updates(mu_dtype):
    """As in optax: the update takes the Adam direction's dtype, promoted by mu_dtype."""
    params = {"w": jnp.ones((8, 8), jnp.bfloat16)}
    grads = {"w": jnp.full((8, 8), 0.5, jnp.bfloat16)}
    tx = optim.lamb(1e-2, mu_dtype=mu_dtype)
    state = tx.init(params)
    u, new_state = jax.jit(tx.update)(grads, state, params)
    assert u["w"].dtype == (mu_dtype or jnp.bfloat16)
    assert new_state[0].mu["w"].dtype == (mu_dtype or jnp.bfloat16)
    chex.assert_trees_all_equal_dtypes(new_state, state)
    # First step: r = g/|g| elementwise = 1, ||w|| / ||r|| = 1, so the update is -lr.
    np.testing.assert_allclose(np.asarray(u["w"], np.float32), -1e-2, rtol=1e-2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(learning_rate=-1e-3), "learning_rate"),
        (dict(learning_rate=1e-3, b1=1.0), "b1.*1.0"),
        (dict(learning_rate=1e-3, b2=-0.1), "b2"),
        (dict(learning_rate=1e-3, eps=-1.0), "eps"),
        (dict(learning_rate=1e-3, weight_decay=-0.1), "weight_decay"),
        (dict(learning_rate=1e-3, min_ratio=3.0, max_ratio=2.0), "min_ratio"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.lamb(**kwargs)


def test_mask_mismatch_fails_at_init():
    params, _ = _problem()
    with pytest.raises(ValueError, match=r"weight_decay_mask.*\n.*\['bias'\]"):
        optim.lamb(1e-3, weight_decay_mask={"stacked": True, "kernel": False}).init(params)
    with pytest.raises(ValueError, match=r"trust_ratio_mask.*\n.*\['other'\]"):
        mask = {"stacked": True, "kernel": False, "bias": False, "other": True}
        optim.lamb(1e-3, trust_ratio_mask=mask).init(params)
