"""lars against a NumPy transcription of You, Gitman, Ginsburg 2017, Algorithm 1."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbatch import optim


def np_lars(params, grads_seq, *, lr, momentum, wd, tc, eps, nesterov, wd_mask, tr_mask):
    """Runs LARS on dicts of float64 arrays; returns the list of per-step update dicts."""
    w = {k: np.asarray(v, np.float64) for k, v in params.items()}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    out = []
    for t, grads in enumerate(grads_seq):
        lr_t = lr(t) if callable(lr) else lr
        step = {}
        for k in w:
            g = np.asarray(grads[k], np.float64)
            beta = wd if wd_mask[k] else 0.0
            local = 1.0
            if tr_mask[k]:
                wn, gn = np.linalg.norm(w[k]), np.linalg.norm(g)
                local = 1.0 if wn == 0 or gn == 0 else tc * wn / (gn + beta * wn + eps)
            inc = lr_t * local * (g + beta * w[k])
            v[k] = momentum * v[k] + inc
            step[k] = -(momentum * v[k] + inc) if nesterov else -v[k]
            w[k] = w[k] + step[k]
        out.append(step)
    return out


def _problem(seed=0, steps=4):
    k = jax.random.split(jax.random.key(seed), 4)
    params = {
        "kernel": jax.random.normal(k[0], (5, 4)),
        "bias": 0.1 * jax.random.normal(k[1], (4,)),
        "zeros": jnp.zeros((3, 2)),
    }
    grads_seq = []
    for t in range(steps):
        kt = jax.random.split(jax.random.fold_in(k[2], t), 3)
        keys = dict(zip(params, kt, strict=True))
        grads_seq.append({n: jax.random.normal(keys[n], params[n].shape) for n in params})
    return params, grads_seq


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_numpy(nesterov, masked, run_optimizer):
    params, grads_seq = _problem()
    hp = dict(momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02, eps=1e-6)
    lr = optax.linear_schedule(0.5, 0.1, 3)
    wd_mask = {"kernel": True, "bias": not masked, "zeros": True}
    tr_mask = {"kernel": True, "bias": not masked, "zeros": not masked}
    tx = optim.lars(
        lr,
        nesterov=nesterov,
        weight_decay_mask=wd_mask if masked else None,
        trust_ratio_mask=tr_mask if masked else None,
        **hp,
    )
    outs, _ = run_optimizer(tx, params, grads_seq)
    expected = np_lars(
        params,
        grads_seq,
        lr=lambda t: float(lr(t)),
        momentum=hp["momentum"],
        wd=hp["weight_decay"],
        tc=hp["trust_coefficient"],
        eps=hp["eps"],
        nesterov=nesterov,
        wd_mask=wd_mask,
        tr_mask=tr_mask,
    )
    chex.assert_trees_all_close(outs, expected, rtol=2e-5, atol=1e-7)


def test_state_holds_local_learning_rates(run_optimizer):
    params, grads_seq = _problem()
    tx = optim.lars(1.0, weight_decay=0.1, trust_coefficient=0.01)
    _, state = run_optimizer(tx, params, grads_seq[:1])
    ratios = optax.tree.get(state, "ratios")
    w, g = params["kernel"], grads_seq[0]["kernel"]
    wn, gn = np.linalg.norm(w), np.linalg.norm(g)
    np.testing.assert_allclose(ratios["kernel"], 0.01 * wn / (gn + 0.1 * wn), rtol=1e-6)
    assert float(ratios["zeros"]) == 1.0  # ||w|| = 0


@pytest.mark.parametrize("nesterov", [False, True])
def test_equals_optax_lars_without_weight_decay(nesterov, run_optimizer):
    """With weight_decay = 0 the paper's denominator and optax's coincide."""
    params, grads_seq = _problem(1)
    mask = {"kernel": True, "bias": False, "zeros": True}
    hp = dict(momentum=0.8, trust_coefficient=0.05, nesterov=nesterov, trust_ratio_mask=mask)
    ours = optim.lars(0.3, **hp)
    theirs = optax.lars(0.3, **hp)
    a, _ = run_optimizer(ours, params, grads_seq)
    b, _ = run_optimizer(theirs, params, grads_seq)
    chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-8)


def test_differs_from_optax_lars_with_weight_decay_as_documented():
    """optax divides by ||g + wd·w||, the paper by ||g|| + wd·||w||."""
    params, grads_seq = _problem(2)
    params = {"kernel": params["kernel"]}
    g = {"kernel": grads_seq[0]["kernel"]}
    ours = optim.lars(1.0, weight_decay=0.5, trust_coefficient=0.1, momentum=0.0)
    theirs = optax.lars(1.0, weight_decay=0.5, trust_coefficient=0.1, momentum=0.0)
    a, _ = ours.update(g, ours.init(params), params)
    b, _ = theirs.update(g, theirs.init(params), params)
    w, gk = np.asarray(params["kernel"], np.float64), np.asarray(g["kernel"], np.float64)
    d = gk + 0.5 * w
    wn = np.linalg.norm(w)
    np.testing.assert_allclose(
        a["kernel"], -0.1 * wn / (np.linalg.norm(gk) + 0.5 * wn) * d, rtol=1e-5
    )
    np.testing.assert_allclose(b["kernel"], -0.1 * wn / np.linalg.norm(d) * d, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(learning_rate=-0.1), "learning_rate.*-0.1"),
        (dict(learning_rate=0.1, momentum=1.0), "momentum.*1.0"),
        (dict(learning_rate=0.1, momentum=-0.5), "momentum"),
        (dict(learning_rate=0.1, trust_coefficient=-1e-3), "trust_coefficient"),
        (dict(learning_rate=0.1, weight_decay=-1e-4), "weight_decay"),
        (dict(learning_rate=0.1, min_ratio=1.0, max_ratio=0.5), "min_ratio"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.lars(**kwargs)


def test_mask_mismatch_fails_at_init():
    params, _ = _problem()
    tx = optim.lars(0.1, weight_decay_mask={"kernel": True, "bias": False})
    with pytest.raises(ValueError, match=r"weight_decay_mask.*\n.*\['zeros'\]"):
        tx.init(params)
