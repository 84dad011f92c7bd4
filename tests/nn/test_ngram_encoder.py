"""NgramBagEncoder and the shared-tower DualEncoder."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch import data as jdata
from jaxbatch import nn as jnn


def _tokens(texts, length=48):
    return jnp.asarray(jdata.encode_batch(texts, length))


_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1)


def _np_ngram_counts(text: str, orders, buckets):
    """Independent transcription of the hashed, lower-cased n-gram counts of one text."""
    ids = [b + 1 for b in text.lower().encode()]
    counts = np.zeros(buckets)
    for n in orders:
        for t in range(len(ids) - n + 1):
            h = (n * 0x01000193) % 2**32
            for j in range(n):
                h = ((h ^ ids[t + j]) * _MULTIPLIERS[j]) % 2**32
                h ^= h >> 15
            counts[h % buckets] += 1
    return counts


def test_ngram_ids_count_every_window_once_and_skip_padding():
    text = "read_file(path)"
    tokens = _tokens([text], length=32)
    ids, valid = jnn.ngram_ids(tokens, (3, 4), 4096, lowercase=True)
    assert ids.shape == (1, (32 - 2) + (32 - 3))
    got = np.bincount(np.asarray(ids[0])[np.asarray(valid[0])], minlength=4096)
    np.testing.assert_array_equal(got, _np_ngram_counts(text, (3, 4), 4096))


def test_lowercase_folds_ascii_letters_only():
    a, _ = jnn.ngram_ids(_tokens(["ReadFile"]), (3,), 1 << 16, lowercase=True)
    b, _ = jnn.ngram_ids(_tokens(["readfile"]), (3,), 1 << 16, lowercase=True)
    c, _ = jnn.ngram_ids(_tokens(["ReadFile"]), (3,), 1 << 16, lowercase=False)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.asarray(a[0, :6]), np.asarray(c[0, :6]))


def test_encoder_is_the_weighted_mean_of_ngram_embeddings():
    enc = jnn.NgramBagEncoder(width=8, buckets=512, orders=(3,))
    texts = ["open the file", "close it"]
    tokens = _tokens(texts, length=24)
    variables = nn.meta.unbox(jax.jit(enc.init)(jax.random.PRNGKey(0), tokens))
    params = variables["params"]
    salience = jax.random.normal(jax.random.PRNGKey(1), params["salience"].shape)
    params = {**params, "salience": salience}
    out = jax.jit(enc.apply)({"params": params}, tokens)
    table = np.asarray(params["embedding"])
    soft = np.log1p(np.exp(np.asarray(salience)))
    for row, text in enumerate(texts):
        w = np.log1p(_np_ngram_counts(text, (3,), 512)) * soft
        h = w @ table / w.sum()
        h = (h - h.mean()) / np.sqrt(h.var() + 1e-6)  # LayerNorm with scale 1, bias 0
        np.testing.assert_allclose(out[row], h, rtol=1e-4, atol=1e-4)


def test_padding_does_not_change_the_encoding():
    enc = jnn.NgramBagEncoder(width=8, buckets=512)
    short, long = _tokens(["def f(x): return x"], 24), _tokens(["def f(x): return x"], 64)
    variables = jax.jit(enc.init)(jax.random.PRNGKey(0), short)
    apply = jax.jit(enc.apply)
    np.testing.assert_allclose(apply(variables, short), apply(variables, long), atol=1e-5)


def test_ngram_dropout_needs_train_and_changes_the_output():
    enc = jnn.NgramBagEncoder(width=8, buckets=512, ngram_dropout=0.5)
    tokens = _tokens(["some words in a docstring"], 32)
    variables = jax.jit(enc.init)(jax.random.PRNGKey(0), tokens)
    apply = jax.jit(enc.apply, static_argnames="train")
    eval_a = apply(variables, tokens)
    eval_b = apply(variables, tokens, train=False)
    trained = apply(variables, tokens, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(trained, eval_a)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(width=0), "width"),
        (dict(ngram_dropout=1.0), "ngram_dropout"),
        (dict(orders=()), "orders"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jnn.NgramBagEncoder(**kwargs)


def test_shared_towers_encode_equal_inputs_equally():
    enc = jnn.NgramBagEncoder(width=16, buckets=1024)
    model = jnn.DualEncoder(x_encoder=enc, y_encoder=None, embed_dim=8, share_towers=True)
    tokens = _tokens(["parse the header", "write bytes"], 32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), tokens, tokens)
    zx, zy, scale, bias = jax.jit(model.apply)(variables, tokens, tokens)
    np.testing.assert_allclose(zx, zy, atol=1e-6)
    assert bias is None and float(scale) == pytest.approx(1 / 0.07, rel=1e-5)
    assert "y_proj" not in variables["params"] and "y_encoder" not in variables["params"]


def test_share_towers_requires_no_y_encoder():
    enc = jnn.NgramBagEncoder(width=16, buckets=1024)
    with pytest.raises(ValueError, match="y_encoder=None exactly when share_towers=True"):
        jnn.DualEncoder(x_encoder=enc, y_encoder=enc, embed_dim=8, share_towers=True)
    with pytest.raises(ValueError, match="share_towers=False"):
        jnn.DualEncoder(x_encoder=enc, y_encoder=None, embed_dim=8)
