"""Compilation of the contrastive kernels for real targets, lowered from this CPU-only machine.

``lower(lowering_platforms=...)`` runs the Mosaic TPU and Triton lowerings, so these tests fail if
a kernel does not lower or if the program silently falls back to XLA (no custom call, or an N×N
array in the XLA part of the program).
"""

import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.contrastive import KINDS, contrastive_loss, contrastive_loss_reference

TARGETS = [
    ("tpu", "tpu", "tpu_custom_call"),
    ("cuda", "gpu", "__gpu$xla.gpu.triton"),
]
# Default tiles pad N = 1200 to 1536 (TPU, 3 × 3 tiles of 512) and 1216 (GPU, 19 blocks of 64);
# N = 5, D = 24 is one tile, the feature block spanning the whole (TPU) or zero-padded (GPU) dim.
SQUARE = re.compile(r"tensor<(1200|1216|1536)x(1200|1216|1536)x")


def _lowered_text(fn, platform, n, d, dtype):
    emb = jax.ShapeDtypeStruct((n, d), jnp.dtype(dtype))
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    traced = jax.jit(fn).trace(emb, emb, scalar, scalar)
    return traced.lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("n,d", [(1200, 256), (5, 24)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("platform,backend,custom_call", TARGETS)
def test_forward_and_gradient_lower_to_kernels(platform, backend, custom_call, kind, dtype, n, d):
    def loss(x, y, s, b):
        return contrastive_loss(x, y, s, b, kind=kind, backend=backend, interpret=False)

    forward = _lowered_text(loss, platform, n, d, dtype)
    gradient = _lowered_text(jax.grad(loss, argnums=(0, 1, 2, 3)), platform, n, d, dtype)
    call = re.compile(rf"custom_call @{re.escape(custom_call)}\(")
    # Forward: a row-statistics kernel for rows, and one for columns unless the loss is sigmoid.
    n_forward = 1 if kind == "sigmoid" else 2
    assert len(call.findall(forward)) == n_forward
    # Gradient: the forward kernels again plus one backward kernel per side.
    assert len(call.findall(gradient)) == n_forward + 2
    if n == 1200:
        assert not SQUARE.search(forward) and not SQUARE.search(gradient), "an N×N array in XLA"


def test_square_pattern_detects_the_reference():
    # Guards the N×N check above: the materialising reference must trip it.
    text = _lowered_text(contrastive_loss_reference, "tpu", 1200, 256, "float32")
    assert SQUARE.search(text)
