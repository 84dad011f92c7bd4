"""Argument specs for ``contrastive_loss``, shared by tests and benchmarks (not public API).

One place defines the shapes, dtypes and value ranges every implementation (reference, tiled XLA,
device ring, Pallas kernels) is checked on, so a new implementation joins the test suite and the
benchmark by reading these specs rather than inventing its own inputs.

Embeddings are unit-norm rows (as in CLIP and SigLIP), and ``y`` is a noisy copy of ``x`` so that
the positive pairs on the diagonal carry real signal: the loss is neither at its random-guess value
nor saturated, which keeps every term of the gradient visible to the comparisons.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxbatch.losses._contrastive_reference import KINDS


@dataclasses.dataclass(frozen=True)
class ContrastiveSpec:
    """Inputs of one ``contrastive_loss`` call.

    Attributes:
      n: batch size (rows of x and y).
      d: embedding width.
      dtype: dtype of x and y ('float32' or 'bfloat16').
      logit_scale: the multiplier applied to x·yᵀ (already exponentiated).
      logit_bias: additive bias, or None for no bias argument.
      noise: std of the Gaussian noise that makes y from x before normalisation.
      seed: seed of the NumPy generator that draws the embeddings.
    """

    n: int
    d: int
    dtype: str = "float32"
    logit_scale: float = 10.0
    logit_bias: float | None = None
    noise: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.n < 1 or self.d < 1:
            raise ValueError(f"n and d must be positive, got n={self.n}, d={self.d}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

    def make_args(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
        """Returns (x, y, logit_scale, logit_bias) as concrete arrays."""
        rng = np.random.default_rng(self.seed)
        x = rng.standard_normal((self.n, self.d)).astype(np.float32)
        y = x + self.noise * rng.standard_normal((self.n, self.d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        y /= np.linalg.norm(y, axis=1, keepdims=True)
        dtype = jnp.dtype(self.dtype)
        scale = jnp.asarray(self.logit_scale, jnp.float32)
        bias = None if self.logit_bias is None else jnp.asarray(self.logit_bias, jnp.float32)
        return jnp.asarray(x, dtype), jnp.asarray(y, dtype), scale, bias

    def shape_dtypes(self) -> tuple[jax.ShapeDtypeStruct, ...]:
        """Returns ShapeDtypeStructs of (x, y, logit_scale[, logit_bias]) for compile-only use."""
        emb = jax.ShapeDtypeStruct((self.n, self.d), jnp.dtype(self.dtype))
        scalar = jax.ShapeDtypeStruct((), jnp.float32)
        return (emb, emb, scalar) if self.logit_bias is None else (emb, emb, scalar, scalar)


def default_spec(kind: str, n: int, d: int, dtype: str = "float32", seed: int = 0):
    """The spec each kind is usually run with: CLIP's scale for softmax/decoupled (no bias) and
    SigLIP's initialisation for sigmoid (scale 10, bias -10; Zhai et al. 2023, section 3.3)."""
    if kind == "sigmoid":
        return ContrastiveSpec(n, d, dtype, logit_scale=10.0, logit_bias=-10.0, seed=seed)
    return ContrastiveSpec(n, d, dtype, logit_scale=10.0, logit_bias=None, seed=seed)


# (n, block_size) pairs for correctness tests: n a multiple of the block, n not a multiple, n
# smaller than one block, and n = 1.
TEST_SHAPES = ((64, 16), (37, 16), (5, 16), (1, 16))
TEST_DIM = 16

# Benchmark shapes (D = 256): reference vs xla at BENCH_SIZES, xla alone at BENCH_XLA_ONLY, the
# ring compiled (not run) on 8 simulated devices at the BENCH_RING_GLOBAL global batch sizes.
BENCH_DIM = 256
# Decoupled runs the softmax sweeps with the diagonal masked: the same cost, so not benchmarked.
BENCH_KINDS = tuple(k for k in KINDS if k != "decoupled")
BENCH_SIZES = (2048, 4096, 8192, 16384)
BENCH_XLA_ONLY = 65536
BENCH_RING_GLOBAL = (1 << 20, 1 << 22)


def noisy_unit_pair(kind: str, n: int, d: int, dtype, seed: int = 0):
    """Kernel-test inputs: unit rows, y = normalised (x + N(0, 1)), generator seeded by seed + n;
    scale 10 with bias −10 (SigLIP's init) for 'sigmoid', else bias 0.3.

    Returns:
      (x [n, d], y [n, d]) in ``dtype`` and float32 scalars (scale, bias).
    """
    rng = np.random.default_rng(seed + n)
    x = rng.standard_normal((n, d))
    y = x + rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    scale, bias = (10.0, -10.0) if kind == "sigmoid" else (10.0, 0.3)
    return jnp.asarray(x, dtype), jnp.asarray(y, dtype), jnp.float32(scale), jnp.float32(bias)


def ring_value_and_grads(mesh, local, axis: str, x, y, scale, bias):
    """Value and gradients (x, y, scale, bias) of ``local(x, y, scale, bias)`` run in
    ``jax.shard_map`` with x and y sharded by rows over ``axis`` (the device-ring tests)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    loss = jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(axis), P(), P()), out_specs=P())
    rows = NamedSharding(mesh, P(axis))
    x, y = jax.device_put(x, rows), jax.device_put(y, rows)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(x, y, scale, bias)


def reference_value_and_grads(x, y, scale, bias, kind: str):
    """The oracle of the ring tests: the single-device float32 reference on the global batch."""
    from jaxbatch.losses.contrastive import contrastive_loss

    def loss(x, y, s, b):
        return contrastive_loss(x, y, s, b, kind=kind, implementation="reference")

    x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(x32, y32, scale, bias)
