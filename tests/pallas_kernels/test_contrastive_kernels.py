"""Pallas contrastive kernels (interpret mode) against the N×N reference: value and every gradient.

Both kernel families run here through the Pallas interpreter: the TPU (Mosaic) kernels with their
grid-sequential accumulators and the GPU (Triton) kernels with their in-program column loop. Each
runs with N = 1, N below one block, N not a multiple of the block, and non-square tiles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbatch.losses._contrastive_specs import noisy_unit_pair
from pallas_kernels.contrastive import (
    KINDS,
    BlockSizes,
    contrastive_loss,
    contrastive_loss_reference,
)

D = 24  # not a multiple of 128 (TPU: the block spans the full dim) nor a power of two (GPU: padded)

# (kernel backend, N, block_size): the TPU family needs multi-block tiles in multiples of 128, the
# GPU family powers of two >= 16.
SQUARE_TILES = [
    ("tpu", 1, 128),
    ("tpu", 5, 128),  # one tile of 8 (f32) / 16 (bf16) padded rows
    ("tpu", 300, 128),  # 3 × 3 tiles, the last row and column ragged
    ("gpu", 1, 16),
    ("gpu", 5, 16),
    ("gpu", 40, 16),  # 3 × 3 tiles, ragged
]
# Rectangular tiles only change the grid, not the per-dtype tile math: float32 alone.
RECTANGULAR_TILES = [
    ("tpu", 300, BlockSizes(128, 256), "float32"),  # N padded to 512
    ("gpu", 40, BlockSizes(32, 16), "float32"),
]
CASES = [(*case, dtype) for case in SQUARE_TILES for dtype in ("float32", "bfloat16")]
CASES += RECTANGULAR_TILES


def _value_and_grads(loss_fn, args):
    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3)))(*args)


def _assert_close(actual, expected, rtol, name):
    actual = np.asarray(actual, np.float32)
    expected = np.asarray(expected, np.float32)
    atol = rtol * max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("backend,n,block_size,dtype", CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_matches_reference(kind, backend, n, block_size, dtype):
    args = noisy_unit_pair(kind, n, D, dtype)

    def kernel_loss(x, y, s, b):
        return contrastive_loss(
            x, y, s, b, kind=kind, block_size=block_size, backend=backend, interpret=True
        )

    value, grads = _value_and_grads(kernel_loss, args)
    ref_value, ref_grads = _value_and_grads(
        lambda x, y, s, b: contrastive_loss_reference(x, y, s, b, kind=kind), args
    )
    if kind == "decoupled" and n == 1:
        # No negatives: log of an empty sum. The reference's gradients are NaN here.
        assert float(value) == float(ref_value) == -np.inf
        return
    # The forward multiplies the same 16-bit values exactly with f32 accumulation, so the value is
    # tight for both dtypes. For bf16 the backward rounds G to bf16 before the MXU and dx, dy are
    # returned in bf16 (2^-9 relative rounding each): 5e-3 of the gradient's scale.
    _assert_close(value, ref_value, 1e-5, "loss")
    grad_rtol = 1e-5 if dtype == "float32" else 5e-3
    for name, got, want in zip(["dx", "dy", "dscale", "dbias"], grads, ref_grads, strict=True):
        assert got.dtype == want.dtype, name
        _assert_close(got, want, grad_rtol, name)


def test_default_backend_and_blocks_run_interpreted_on_cpu():
    # backend=None resolves to 'cpu' here, which selects the TPU kernels with interpret=True.
    args = noisy_unit_pair("softmax", 9, D, "float32")
    got = jax.jit(contrastive_loss)(*args)
    np.testing.assert_allclose(float(got), float(contrastive_loss_reference(*args)), rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_matches_finite_differences(kind):
    # A directional derivative <grad, v> against the central difference of the kernel loss itself.
    args = noisy_unit_pair(kind, 6, D, "float32", seed=3)
    loss = jax.jit(lambda *a: contrastive_loss(*a, kind=kind, block_size=16, backend="gpu"))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)
    keys = jax.random.split(jax.random.PRNGKey(7), 4)
    direction = [jax.random.normal(k, jnp.shape(a)) for k, a in zip(keys, args, strict=True)]
    eps = 1e-3
    plus = loss(*[a + eps * v for a, v in zip(args, direction, strict=True)])
    minus = loss(*[a - eps * v for a, v in zip(args, direction, strict=True)])
    numeric = (float(plus) - float(minus)) / (2 * eps)
    analytic = sum(float(jnp.sum(g * v)) for g, v in zip(grads, direction, strict=True))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-2, atol=1e-3)
