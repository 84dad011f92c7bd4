"""scale_by_trust_ratio against a NumPy transcription of the LARS/LAMB ratio."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbatch import optim


def np_ratio(u, w, *, tc=1.0, eps=0.0, wd=0.0, lo=None, hi=None, axis=None):
    """ratio = tc·||w|| / (||u|| + wd·||w|| + eps), 1 where a norm is 0, clipped; float64."""
    u, w = np.asarray(u, np.float64), np.asarray(w, np.float64)
    if axis is None:
        wn, un = np.linalg.norm(w), np.linalg.norm(u)
    else:
        other = tuple(a for a in range(u.ndim) if a != axis)
        wn = np.sqrt(np.sum(w * w, axis=other))
        un = np.sqrt(np.sum(u * u, axis=other))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = tc * wn / (un + wd * wn + eps)
    r = np.where((wn == 0) | (un == 0), 1.0, r)
    if lo is not None or hi is not None:
        r = np.clip(r, lo, hi)
    return r


def np_apply(u, w, r, *, wd=0.0, axis=None):
    u, w = np.asarray(u, np.float64), np.asarray(w, np.float64)
    if axis is not None:
        shape = [1] * u.ndim
        shape[axis] = -1
        r = np.reshape(r, shape)
    return r * (u + wd * w)


def _tree(seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    params = {
        "dense": {"kernel": jax.random.normal(k[0], (6, 4)), "bias": jax.random.normal(k[1], (4,))},
        "emb": jax.random.normal(k[2], (5, 3)),
    }
    updates = {
        "dense": {
            "kernel": 0.1 * jax.random.normal(k[3], (6, 4)),
            "bias": jax.random.normal(k[4], (4,)),
        },
        "emb": 3.0 * jax.random.normal(k[5], (5, 3)),
    }
    return params, updates


@pytest.mark.parametrize(
    "hp",
    [
        dict(),
        dict(trust_coefficient=0.02, eps=1e-3),
        dict(trust_coefficient=0.5, weight_decay=0.1),
        dict(min_ratio=0.5, max_ratio=2.0),
    ],
)
def test_matches_numpy(hp):
    params, updates = _tree()
    tx = optim.scale_by_trust_ratio(**hp)
    out, state = tx.update(updates, tx.init(params), params)
    kw = dict(
        tc=hp.get("trust_coefficient", 1.0),
        eps=hp.get("eps", 0.0),
        wd=hp.get("weight_decay", 0.0),
        lo=hp.get("min_ratio"),
        hi=hp.get("max_ratio"),
    )
    ratios = jax.tree.map(lambda u, w: np_ratio(u, w, **kw), updates, params)
    expected = jax.tree.map(lambda u, w, r: np_apply(u, w, r, wd=kw["wd"]), updates, params, ratios)
    chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(state.ratios, ratios, rtol=1e-5)


def test_clipping_binds_on_both_sides():
    params = {"small": jnp.ones(4), "big": jnp.ones(4)}
    updates = {"small": jnp.full(4, 100.0), "big": jnp.full(4, 1e-3)}  # ratios 0.01 and 1000
    tx = optim.scale_by_trust_ratio(min_ratio=0.1, max_ratio=10.0)
    out, state = tx.update(updates, tx.init(params), params)
    np.testing.assert_allclose(state.ratios["small"], 0.1, rtol=1e-6)
    np.testing.assert_allclose(state.ratios["big"], 10.0, rtol=1e-6)
    np.testing.assert_allclose(out["small"], 10.0, rtol=1e-6)
    np.testing.assert_allclose(out["big"], 1e-2, rtol=1e-6)


def test_zero_norms_give_ratio_one():
    params = {"zero_w": jnp.zeros(3), "zero_u": jnp.ones(3), "both": jnp.ones(3)}
    updates = {"zero_w": jnp.array([1.0, 2.0, 3.0]), "zero_u": jnp.zeros(3), "both": jnp.ones(3)}
    tx = optim.scale_by_trust_ratio(trust_coefficient=0.1)
    out, state = tx.update(updates, tx.init(params), params)
    np.testing.assert_array_equal(state.ratios["zero_w"], 1.0)
    np.testing.assert_array_equal(state.ratios["zero_u"], 1.0)
    np.testing.assert_allclose(state.ratios["both"], 0.1, rtol=1e-6)
    np.testing.assert_array_equal(out["zero_w"], updates["zero_w"])


def test_mask_passes_leaves_through_and_logs_one():
    params, updates = _tree()
    mask = {"dense": {"kernel": True, "bias": False}, "emb": False}
    tx = optim.scale_by_trust_ratio(mask=mask, weight_decay=0.1)
    out, state = tx.update(updates, tx.init(params), params)
    np.testing.assert_array_equal(out["dense"]["bias"], updates["dense"]["bias"])
    np.testing.assert_array_equal(out["emb"], updates["emb"])
    assert float(state.ratios["emb"]) == 1.0
    w, u = params["dense"]["kernel"], updates["dense"]["kernel"]
    r = np_ratio(u, w, wd=0.1)
    np.testing.assert_allclose(out["dense"]["kernel"], np_apply(u, w, r, wd=0.1), rtol=1e-5)


def test_separate_weight_decay_mask():
    """Outside the trust mask but inside the decay mask: u + wd·w with ratio 1 (LARS)."""
    params, updates = _tree()
    tx = optim.scale_by_trust_ratio(
        weight_decay=0.3, mask={"dense": True, "emb": False}, weight_decay_mask=True
    )
    out, _ = tx.update(updates, tx.init(params), params)
    np.testing.assert_allclose(out["emb"], updates["emb"] + 0.3 * params["emb"], rtol=1e-6)
    w, u = params["dense"]["bias"], updates["dense"]["bias"]
    np.testing.assert_allclose(
        out["dense"]["bias"], np_apply(u, w, np_ratio(u, w, wd=0.3), wd=0.3), rtol=1e-5, atol=1e-6
    )


def test_prefix_and_callable_masks_agree_with_full_mask():
    params, updates = _tree()
    full = {"dense": {"kernel": True, "bias": True}, "emb": False}
    prefix = {"dense": True, "emb": False}
    outs = []
    for mask in (full, prefix, lambda p: full):
        tx = optim.scale_by_trust_ratio(mask=mask)
        outs.append(tx.update(updates, tx.init(params), params)[0])
    chex.assert_trees_all_equal(outs[0], outs[1])
    chex.assert_trees_all_equal(outs[0], outs[2])


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_layer_ratios_equal_unstacked_leaves(axis):
    k1, k2 = jax.random.split(jax.random.key(3))
    w = jax.random.normal(k1, (4, 5, 6))
    u = jax.random.normal(k2, (4, 5, 6)) * jnp.arange(1.0, 6.0)[None, :, None]
    n = w.shape[axis]
    slices = lambda x: {str(i): jnp.take(x, i, axis=axis) for i in range(n)}
    hp = dict(trust_coefficient=0.7, max_ratio=1.5)
    stacked = optim.scale_by_trust_ratio(layer_axes={"w": axis}, **hp)
    out, state = stacked.update({"w": u}, stacked.init({"w": w}), {"w": w})
    flat = optim.scale_by_trust_ratio(**hp)
    out_flat, state_flat = flat.update(slices(u), flat.init(slices(w)), slices(w))
    assert state.ratios["w"].shape == (n,)
    np.testing.assert_allclose(
        state.ratios["w"], [state_flat.ratios[str(i)] for i in range(n)], rtol=1e-6
    )
    chex.assert_trees_all_close(slices(out["w"]), out_flat, rtol=1e-6)


def test_bf16_leaves_use_f32_norms_and_keep_dtype():
    k1, k2 = jax.random.split(jax.random.key(4))
    # 4096 entries: a bf16 sum of squares would be off by far more than the tolerance below.
    w = (1.0 + 0.01 * jax.random.normal(k1, (64, 64))).astype(jnp.bfloat16)
    u = jax.random.normal(k2, (64, 64)).astype(jnp.bfloat16)
    tx = optim.scale_by_trust_ratio()
    out, state = tx.update({"w": u}, tx.init({"w": w}), {"w": w})
    assert out["w"].dtype == jnp.bfloat16
    assert state.ratios["w"].dtype == jnp.float32
    expected = np_ratio(np.asarray(u, np.float32), np.asarray(w, np.float32))
    np.testing.assert_allclose(state.ratios["w"], expected, rtol=1e-5)


def test_equals_optax_scale_by_trust_ratio():
    params, updates = _tree()
    ours = optim.scale_by_trust_ratio(trust_coefficient=0.3, eps=1e-4)
    theirs = optax.scale_by_trust_ratio(trust_coefficient=0.3, eps=1e-4)
    a, _ = ours.update(updates, ours.init(params), params)
    b, _ = theirs.update(updates, theirs.init(params), params)
    chex.assert_trees_all_close(a, b, rtol=1e-6)


def test_mismatched_mask_names_the_paths():
    params, _ = _tree()
    tx = optim.scale_by_trust_ratio(mask={"dense": {"kernel": True}, "emb": True, "extra": False})
    with pytest.raises(ValueError, match=r"\['dense'\]\['bias'\].*\n.*\['extra'\]"):
        tx.init(params)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(trust_coefficient=-1.0), "trust_coefficient.*-1.0"),
        (dict(eps=-1e-3), "eps"),
        (dict(weight_decay=-0.1), "weight_decay.*-0.1"),
        (dict(min_ratio=2.0, max_ratio=1.0), "min_ratio.*<= max_ratio"),
        (dict(min_ratio=-1.0), "min_ratio"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.scale_by_trust_ratio(**kwargs)


def test_bad_leaf_options():
    params, updates = _tree()
    with pytest.raises(ValueError, match=r"Python bools.*\['emb'\]"):
        optim.scale_by_trust_ratio(mask={"dense": True, "emb": jnp.array(True)}).init(params)
    with pytest.raises(ValueError, match=r"out of range.*\(5, 3\)"):
        optim.scale_by_trust_ratio(layer_axes={"dense": None, "emb": 2}).init(params)
    tx = optim.scale_by_trust_ratio()
    with pytest.raises(ValueError, match="params"):
        tx.update(updates, tx.init(params), None)
