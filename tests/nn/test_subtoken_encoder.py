"""SubtokenBagEncoder: the weighted mean it documents, padding, dropout, gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch import nn as jnn

_IDS = np.array([[7, 3, 7, 7 + 16, 0, 0], [5, 0, 0, 0, 0, 0]], np.int32)  # 7 and 23 share bucket 7


def _init(enc, ids):
    params = nn.meta.unbox(enc.init(jax.random.PRNGKey(0), ids))["params"]
    salience = jax.random.normal(jax.random.PRNGKey(1), params["salience"].shape)
    return {**params, "salience": salience}


def _np_encode(ids, params, buckets):
    """Independent dense transcription: counts per bucket, log(1 + c) · softplus(s), LN."""
    out = []
    for row in ids:
        counts = np.bincount(row[row != 0] % buckets, minlength=buckets).astype(np.float64)
        w = np.log1p(counts) * np.log1p(np.exp(np.asarray(params["salience"], np.float64)))
        h = w @ np.asarray(params["embedding"], np.float64) / w.sum()
        h = (h - h.mean()) / np.sqrt(h.var() + 1e-6)
        out.append(h * np.asarray(params["LayerNorm_0"]["scale"]) + params["LayerNorm_0"]["bias"])
    return np.stack(out)


def test_encoder_is_the_documented_weighted_mean():
    enc = jnn.SubtokenBagEncoder(width=8, buckets=16)
    params = _init(enc, _IDS)
    out = jax.jit(enc.apply)({"params": params}, jnp.asarray(_IDS))
    assert out.shape == (2, 8)
    np.testing.assert_allclose(out, _np_encode(_IDS, params, 16), rtol=1e-4, atol=1e-4)


def test_bucket_weights_sum_to_log1p_count_per_bucket():
    ids = jnp.asarray(_IDS)
    j, tf = jnn.bucket_weights(ids, ids != 0, 16)
    np.testing.assert_array_equal(j, _IDS % 16)
    row = np.asarray(tf[0])
    np.testing.assert_allclose(row[[0, 2, 3]].sum(), np.log1p(3), rtol=1e-6)
    np.testing.assert_allclose(row[1], np.log1p(1), rtol=1e-6)
    np.testing.assert_array_equal(row[4:], 0)


def test_padding_changes_nothing():
    enc = jnn.SubtokenBagEncoder(width=8, buckets=16)
    params = _init(enc, _IDS)
    short = enc.apply({"params": params}, jnp.asarray(_IDS[:, :4]))
    long = enc.apply({"params": params}, jnp.asarray(np.pad(_IDS, ((0, 0), (0, 10)))))
    np.testing.assert_allclose(short, long, rtol=1e-5, atol=1e-6)


def test_token_dropout_resamples_in_training_only():
    enc = jnn.SubtokenBagEncoder(width=8, buckets=64, token_dropout=0.5)
    ids = jnp.asarray(np.arange(1, 41, dtype=np.int32)[None].repeat(2, 0))
    params = _init(enc, ids)
    train = lambda k: enc.apply({"params": params}, ids, train=True, rngs={"dropout": k})  # noqa: E731
    a, b = train(jax.random.PRNGKey(2)), train(jax.random.PRNGKey(3))
    assert not np.allclose(a, b)
    np.testing.assert_allclose(
        enc.apply({"params": params}, ids), enc.apply({"params": params}, ids)
    )


def test_gradients_reach_only_the_rows_used():
    enc = jnn.SubtokenBagEncoder(width=8, buckets=16)
    params = _init(enc, _IDS)
    target = jax.random.normal(jax.random.PRNGKey(4), (2, 8))
    loss = lambda p: jnp.sum((enc.apply({"params": p}, jnp.asarray(_IDS)) - target) ** 2)  # noqa: E731
    g = jax.grad(loss)(params)
    used = np.zeros(16, bool)
    used[[7, 3, 5]] = True
    norms = np.linalg.norm(np.asarray(g["embedding"]), axis=1)
    assert np.all(norms[used] > 0) and np.all(norms[~used] == 0)
    assert np.all(np.asarray(g["salience"])[[7, 3]] != 0) and np.all(g["salience"][~used] == 0)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="token_dropout must be in \\[0, 1\\), got 1.0"):
        jnn.SubtokenBagEncoder(token_dropout=1.0)
    enc = jnn.SubtokenBagEncoder(width=4, buckets=8)
    with pytest.raises(ValueError, match="expected ids \\[B, L\\], got shape \\(3,\\)"):
        enc.init(jax.random.PRNGKey(0), jnp.ones((3,), jnp.int32))
