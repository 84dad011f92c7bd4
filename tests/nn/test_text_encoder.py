"""TextEncoder: padding is invisible, pooling matches a NumPy transcription, bad input fails."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch.nn import BYTE_VOCAB_SIZE, CLS_ID, PAD_ID, TextEncoder

SMALL = dict(width=8, depth=2, heads=2, mlp_dim=16, max_len=12)


def _encode(text: bytes, length: int) -> list[int]:
    """The data helper's token scheme: CLS first, byte b -> b + 1, PAD = 0 up to ``length``."""
    ids = [CLS_ID] + [b + 1 for b in text]
    return ids + [PAD_ID] * (length - len(ids))


def _batch(length):
    return jnp.array([_encode(b"def f", length), _encode(b"return 1", length)], jnp.int32)


def test_token_scheme_constants():
    assert (PAD_ID, CLS_ID, BYTE_VOCAB_SIZE) == (0, 257, 258)
    assert TextEncoder().vocab_size == 258


@pytest.mark.parametrize("pool", ["mean", "cls", "last"])
def test_appending_padding_does_not_change_the_embedding(pool, fast_jit):
    model = TextEncoder(**SMALL, pool=pool)
    short, long = _batch(9), _batch(12)
    variables = fast_jit(model.init)(jax.random.key(0), short)
    apply = fast_jit(model.apply)
    np.testing.assert_allclose(apply(variables, short), apply(variables, long), atol=2e-6)
    # A non-padding token does change it (the comparison above can fail).
    edited = short.at[0, 2].set(short[0, 2] + 1)
    assert np.abs(np.asarray(apply(variables, edited) - apply(variables, short))[0]).max() > 1e-4


@pytest.mark.parametrize("pool", ["mean", "cls", "last"])
def test_pooling_matches_numpy_over_the_final_hidden_states(pool, fast_jit):
    model = TextEncoder(**SMALL, pool=pool)
    tokens = _batch(11)
    variables = fast_jit(model.init)(jax.random.key(1), tokens)
    out, state = fast_jit(
        lambda v: model.apply(v, tokens, capture_intermediates=True, mutable=["intermediates"])
    )(variables)
    h = np.asarray(state["intermediates"]["encoder_norm"]["__call__"][0], np.float64)  # [B, L, D]
    valid = np.asarray(tokens) != PAD_ID
    if pool == "mean":
        ref = (h * valid[..., None]).sum(1) / valid.sum(1, keepdims=True)
    elif pool == "cls":
        ref = h[:, 0]
    else:
        last = [np.nonzero(row)[0][-1] for row in valid]
        ref = h[np.arange(len(last)), last]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_out_dim_projects_the_pooled_vector(fast_jit):
    model = TextEncoder(**SMALL, out_dim=5)
    tokens = _batch(10)
    variables = fast_jit(model.init)(jax.random.key(0), tokens)
    out = fast_jit(model.apply)(variables, tokens)
    pooled = fast_jit(TextEncoder(**SMALL).apply)(
        {"params": {k: v for k, v in variables["params"].items() if k != "out_proj"}}, tokens
    )
    proj = nn.meta.unbox(variables["params"]["out_proj"])
    np.testing.assert_allclose(out, pooled @ proj["kernel"] + proj["bias"], rtol=1e-5, atol=1e-6)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="unknown pool 'max'"):
        TextEncoder(**SMALL, pool="max")
    with pytest.raises(ValueError, match="pad_id=300 is outside the vocabulary"):
        TextEncoder(**SMALL, pad_id=300)
    with pytest.raises(ValueError, match="sequence length 13 exceeds max_len=12"):
        TextEncoder(**SMALL).init(jax.random.key(0), jnp.ones((1, 13), jnp.int32))
