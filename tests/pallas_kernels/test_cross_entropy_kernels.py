"""Pallas cross-entropy kernels (interpret mode) against the [T, V] reference: value, dh and dw.

Both kernel families run here through the Pallas interpreter: the TPU (Mosaic) kernels with their
grid-sequential accumulators and the GPU (Triton) kernels with their in-program loops over
vocabulary tiles and feature chunks. The ragged cases have T and V that are not multiples of the
tiles (the tails are masked) and ignored tokens; the one-tile cases shrink the tiles to the
padded problem. The default backend and tiles (backend None: the TPU kernels interpreted on CPU)
are exercised through ``jaxbatch.losses.linear_cross_entropy`` in tests/losses.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.cross_entropy import (
    BlockSizes,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)

D = 24  # not a multiple of 128 (TPU: the block spans the full dim) nor of 16 (GPU: 2 chunks of 16)
IGNORE = -100

CASES = [
    # (family, T, V, blocks, dtype)
    ("tpu", 37, 300, BlockSizes(16, 128), "float32"),  # 3 token blocks × 3 vocab tiles, ragged
    ("tpu", 37, 300, BlockSizes(16, 128), "bfloat16"),
    ("gpu", 37, 300, BlockSizes(16, 64, 16), "float32"),  # 3 × 5 tiles, 2 feature chunks
    ("gpu", 37, 300, BlockSizes(16, 64, 16), "bfloat16"),
    ("gpu", 5, 20, None, "float32"),  # one 16 × 32 tile
]


def _inputs(t, v, dtype, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    h = jax.random.normal(k1, (t, D), jnp.float32).astype(dtype)
    w = (2.0 * jax.random.normal(k2, (D, v), jnp.float32) / np.sqrt(D)).astype(dtype)
    labels = jax.random.randint(k3, (t,), 0, v)
    # the last vocabulary id (in the masked tail tile) and ignored tokens in several blocks
    labels = labels.at[0].set(v - 1).at[jnp.array([3, t // 2, t - 1])].set(IGNORE)
    return h, w, labels


def _close(actual, expected, rtol, name):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    atol = rtol * float(np.max(np.abs(expected)))  # relative to the array's scale
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("family,t,v,blocks,dtype", CASES)
def test_kernels_match_reference(family, t, v, blocks, dtype):
    h, w, labels = _inputs(t, v, dtype)

    def kernel_loss(h, w, y):
        return linear_cross_entropy(
            h, w, y, ignore_index=IGNORE, block_sizes=blocks, backend=family, interpret=True
        )

    def reference_loss(h, w, y):
        return linear_cross_entropy_reference(h, w, y, ignore_index=IGNORE)

    kernel = jax.jit(jax.value_and_grad(kernel_loss, argnums=(0, 1)))
    value, (dh, dw) = kernel(h, w, labels)
    ref_value, (ref_dh, ref_dw) = jax.jit(jax.value_and_grad(reference_loss, argnums=(0, 1)))(
        h, w, labels
    )
    assert value.dtype == jnp.float32 and dh.dtype == h.dtype and dw.dtype == w.dtype
    # The forward multiplies the same (maybe 16-bit) values exactly with f32 accumulation, so the
    # value is tight for both dtypes. For bf16 the backward rounds G to bf16 before each matmul
    # and dh, dw are returned in bf16 (2^-9 relative rounding each): measured 2e-3 (dh) and
    # 4e-3 (dw) of the gradient's largest entry, asserted within 1e-2; f32 within 1e-5.
    _close(value, ref_value, 1e-5, "loss")
    grad_rtol = 1e-5 if dtype == "float32" else 1e-2
    _close(dh, ref_dh.astype(jnp.float32), grad_rtol, "dh")
    _close(dw, ref_dw.astype(jnp.float32), grad_rtol, "dw")
    # ignored tokens get no gradient; every other token does
    dh = np.asarray(dh, np.float32)
    ignored = np.asarray(labels) == IGNORE
    assert np.all(dh[ignored] == 0) and np.all(np.any(dh[~ignored] != 0, axis=1))
    # the same compiled program with no token counted: the empty mean is 0, the gradients 0
    value, (dh, dw) = kernel(h, w, jnp.full_like(labels, IGNORE))
    assert float(value) == 0.0 and not np.any(np.asarray(dh)) and not np.any(np.asarray(dw))
