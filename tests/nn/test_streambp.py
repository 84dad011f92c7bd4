"""jaxbatch.nn.streambp: one chunked-backprop layer equals the block it decomposes (value, parameter
and input gradients), with packed sequences and a chunk that does not divide T; bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch.nn import layers, streambp

HEADS, WIDTH, MLP = 2, 8, 16
B, T = 2, 11


def _setup(fast_jit):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, T, WIDTH)), jnp.float32)
    block = layers.TransformerBlock(HEADS, MLP)
    init = fast_jit(block.init)
    params = nn.meta.unbox(init(jax.random.key(1), x, layers.causal_mask(T))["params"])
    segments = jnp.array([[0] * 4 + [1] * 7, [3] * 9 + [5] * 2], jnp.int32)
    cotangent = jnp.asarray(rng.normal(size=(B, T, WIDTH)), jnp.float32)
    return block, params, x, segments, cotangent


def _close(got, want, scale_tree):
    """allclose with atol a small fraction of the largest entry of the whole gradient (a key bias
    has a gradient of exactly 0 in exact arithmetic, i.e. pure rounding)."""
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(scale_tree))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale), got, want
    )


@pytest.mark.parametrize("key_block", [512, 2])
def test_chunked_layer_equals_the_block_in_value_and_gradients(key_block, fast_jit):
    # key_block 512: the fused walk's key blocks are the chunk; 2: two key blocks per chunk.
    chunk = 4  # does not divide T = 11
    block, params, x, segments, cot = _setup(fast_jit)
    mask = layers.causal_mask(T) & (segments[:, None, :, None] == segments[:, None, None, :])
    pre_fn, chunk_fn = streambp.pre_ln_block_fns(
        num_heads=HEADS, mlp_dim=MLP, attention_chunk_size=key_block
    )
    assert isinstance(chunk_fn, streambp.AttentionChunk)  # the fused backward walk is used

    def reference(p, z):
        return jnp.vdot(block.apply({"params": p}, z, mask), cot)

    def chunked(p, z):
        y = streambp.streambp_layer(pre_fn, chunk_fn, p, z, segments, chunk_size=chunk)
        return jnp.vdot(y, cot)

    want, want_g = fast_jit(jax.value_and_grad(reference, argnums=(0, 1)))(params, x)
    got, got_g = fast_jit(jax.value_and_grad(chunked, argnums=(0, 1)))(params, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    _close(got_g, want_g, want_g)
    # The packing matters: without the segments the block's output differs.
    plain = fast_jit(lambda p, z: block.apply({"params": p}, z, layers.causal_mask(T)))
    assert (
        float(
            jnp.max(jnp.abs(plain(params, x) - fast_jit(block.apply)({"params": params}, x, mask)))
        )
        > 1e-3
    )


def test_scanned_and_unrolled_stacks_agree(fast_jit):
    _, params, x, segments, cot = _setup(fast_jit)
    stacked = jax.tree.map(lambda a: jnp.stack([a, 1.1 * a]), params)
    unrolled = [params, jax.tree.map(lambda a: 1.1 * a, params)]
    pre_fn, chunk_fn = streambp.pre_ln_block_fns(num_heads=HEADS, mlp_dim=MLP)

    def loss(p, scanned):
        y = streambp.streambp_stack(pre_fn, chunk_fn, p, x, segments, chunk_size=3, scanned=scanned)
        return jnp.vdot(y, cot)

    a, ga = fast_jit(jax.value_and_grad(lambda p: loss(p, True)))(stacked)
    b, gb = fast_jit(jax.value_and_grad(lambda p: loss(p, False)))(unrolled)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    _close([jax.tree.map(lambda g, i=i: g[i], ga) for i in range(2)], gb, gb)


def test_layer_groups_give_the_same_value_and_gradients(fast_jit):
    # Four layers in two checkpointed groups of two (and the unrolled twin): recomputation only.
    _, params, x, segments, cot = _setup(fast_jit)
    scales = (1.0, 1.1, 0.9, 1.05)
    stacked = jax.tree.map(lambda a: jnp.stack([s * a for s in scales]), params)
    unrolled = [jax.tree.map(lambda a, s=s: s * a, params) for s in scales]
    pre_fn, chunk_fn = streambp.pre_ln_block_fns(num_heads=HEADS, mlp_dim=MLP)

    def loss(p, scanned, groups):
        y = streambp.streambp_stack(
            pre_fn, chunk_fn, p, x, segments, chunk_size=3, scanned=scanned, layer_groups=groups
        )
        return jnp.vdot(y, cot)

    want, want_g = fast_jit(jax.value_and_grad(lambda p: loss(p, True, 1)))(stacked)
    got, got_g = fast_jit(jax.value_and_grad(lambda p: loss(p, True, 2)))(stacked)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    _close(got_g, want_g, want_g)
    got_u, got_ug = fast_jit(jax.value_and_grad(lambda p: loss(p, False, 2)))(unrolled)
    np.testing.assert_allclose(got_u, want, rtol=1e-5)
    _close(got_ug, [jax.tree.map(lambda g, i=i: g[i], want_g) for i in range(4)], want_g)
    for bad, match in ((3, "layer_groups=3 must divide the number of layers 4"),
                       (0, "layer_groups must be a positive int, got 0")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            loss(stacked, True, bad)


def test_bf16_layer_is_close_to_the_f32_block(fast_jit):
    # bf16 compute: the chunked layer in bf16 against the f32 block, within bf16 rounding.
    block, params, x, segments, cot = _setup(fast_jit)
    mask = layers.causal_mask(T) & (segments[:, None, :, None] == segments[:, None, None, :])
    pre_fn, chunk_fn = streambp.pre_ln_block_fns(num_heads=HEADS, mlp_dim=MLP, dtype=jnp.bfloat16)

    def chunked(p, z):
        y = streambp.streambp_layer(pre_fn, chunk_fn, p, z.astype(jnp.bfloat16), segments,
                                    chunk_size=4)  # fmt: skip
        return jnp.vdot(y.astype(jnp.float32), cot)

    def reference(p, z):
        return jnp.vdot(block.apply({"params": p}, z, mask), cot)

    want, want_g = fast_jit(jax.value_and_grad(reference, argnums=(0, 1)))(params, x)
    got, got_g = fast_jit(jax.value_and_grad(chunked, argnums=(0, 1)))(params, x)
    assert got_g[1].dtype == jnp.float32 and got_g[0]["mlp"]["wi"]["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=5e-2, atol=5e-2 * abs(float(want)))
    flat = [jnp.concatenate([g.ravel() for g in jax.tree.leaves(t)]) for t in (got_g, want_g)]
    rel = float(jnp.linalg.norm(flat[0] - flat[1]) / jnp.linalg.norm(flat[1]))
    assert rel < 5e-2, rel


def test_bad_input_raises_before_compiling(fast_jit):
    _, params, x, segments, _ = _setup(fast_jit)
    pre_fn, chunk_fn = streambp.pre_ln_block_fns(num_heads=HEADS, mlp_dim=MLP)
    for bad in (0, -1, T + 1):
        with pytest.raises(ValueError, match=rf"chunk_size={bad} must be in \[1, sequence length"):
            streambp.streambp_layer(pre_fn, chunk_fn, params, x, chunk_size=bad)
    with pytest.raises(ValueError, match="chunk_size must be an int, got 2.0"):
        streambp.streambp_layer(pre_fn, chunk_fn, params, x, chunk_size=2.0)
    with pytest.raises(ValueError, match=r"auxiliary array of shape \(2, 10\)"):
        streambp.streambp_layer(pre_fn, chunk_fn, params, x, segments[:, :10], chunk_size=4)
