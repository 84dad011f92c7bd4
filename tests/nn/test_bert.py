"""BertMLM's attention: key padding as a key_mask, every implementation equal to the reference."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch.nn import BertMLM

L = 12


def _bert(**kw):
    base = dict(vocab_size=40, width=16, depth=2, heads=2, mlp_dim=32, max_len=256, dropout=0.0)
    return BertMLM(**{**base, **kw})


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 40, size=(2, L)).astype(np.int32)
    ids[0, 9:] = 0  # padding (pad_id 0)
    positions = np.array([[1, 4, 8], [0, 6, 11]], np.int32)
    labels = rng.integers(0, 40, size=(2, 3)).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(labels)


def test_chunked_attention_equals_reference_in_loss_and_gradients():
    scan_layers = True  # the nn.scan stack (the unrolled blocks are the same BertBlock)
    ids, positions, labels = _batch()
    params = _bert(attention="reference", scan_layers=scan_layers).init(
        jax.random.key(0), ids, positions
    )

    def loss(params, attention):
        model = _bert(attention=attention, attention_chunk_size=5, scan_layers=scan_layers)
        logits = model.apply(params, ids, positions)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))

    step = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (l_ref, g_ref), (l_chk, g_chk) = step(params, "reference"), step(params, "chunked")
    np.testing.assert_allclose(l_chk, l_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_chk), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_default_attention_builds_no_length_by_length_array():
    length = 256
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    positions = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    square = re.compile(rf"tensor<(\d+x)*{length}x{length}x")

    def text(model):
        params = jax.eval_shape(model.init, jax.random.key(0), ids, positions)
        return jax.jit(model.apply).lower(params, ids, positions).as_text()

    assert _bert().attention == "auto"
    assert not square.search(text(_bert(attention_chunk_size=64)))
    assert square.search(text(_bert(attention="reference")))  # the check can fail


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(attention="flash"), "unknown attention 'flash'"),
        (dict(attention_chunk_size=0), "attention_chunk_size must be a positive int, got 0"),
    ],
)
def test_bad_attention_options_fail_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        _bert(**kw)


def test_compressed_activations_keep_the_forward_and_bound_the_gradient():
    # Every block-level name (int8 GELU, layer-norm inputs and attention probabilities):
    # the same loss, the parameter gradient within 5 % (relative, whole tree).
    ids, positions, labels = _batch()
    names = ("mlp_input", "layer_norm_input", "softmax")
    params = _bert(attention="reference").init(jax.random.key(0), ids, positions)

    def loss(params, compress):
        model = _bert(attention="reference", compress_activations=compress)
        logp = jax.nn.log_softmax(model.apply(params, ids, positions))
        return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))

    fast = {"xla_backend_optimization_level": 0}
    step = jax.jit(jax.value_and_grad(loss), static_argnums=1, compiler_options=fast)
    (want, want_g), (got, got_g) = step(params, ()), step(params, names)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    flat = [jnp.concatenate([g.ravel() for g in jax.tree.leaves(t)]) for t in (want_g, got_g)]
    rel = float(jnp.linalg.norm(flat[1] - flat[0]) / jnp.linalg.norm(flat[0]))
    assert 0 < rel < 0.05, rel
    with pytest.raises(ValueError, match="only attention='reference' stores"):
        _bert(compress_activations=("softmax",))
    with pytest.raises(ValueError, match=r"unknown activation name\(s\) \['gelu'\]"):
        _bert(compress_activations=("gelu",))
