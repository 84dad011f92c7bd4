"""Per-block entry points of the contrastive kernels: the sweeps of one step of a device ring.

In a ring over P devices (``jaxbatch.losses._contrastive_ring``) each device keeps its shard x
[n, D] and meets every shard of y [n, D] once. One ring step sweeps the local x against one
travelling y block, with L = s·x·yᵀ + b:

- the *home* block (the y shard paired with x, ring step 0): its diagonal i == j holds the
  positive pairs; DCL leaves them out of both denominators and SigLIP gives them z = +1;
- an *off-home* block (every other step): every pair is a negative; DCL excludes nothing and
  SigLIP has z = −1 everywhere.

``home`` is a static Python bool: it selects the masks of the kernel bodies (tpu.py, gpu.py) at
trace time, so a ring compiles a home and an off-home variant of each kernel. The functions return
*partial* statistics of this block, which the ring merges in XLA:

  block_lse            (r_blk, c_blk): row LSE over this block's columns, column LSE over x's rows
  block_lse_grads      (G·y, Gᵀ·x) with G_ij = exp(L_ij − r_i) + exp(L_ij − c_j) − 2·δ_ij given
                       the global row LSE r and column LSE c: 2N·∂loss/∂L of the softmax losses
  block_sigmoid        Σ_j softplus(−z_ij·L_ij) per row
  block_sigmoid_grads  (G·y, Gᵀ·x, Σ_j G_ij) with G_ij = σ(L_ij) − δ_ij: N·∂loss/∂L of SigLIP

where δ marks the positive pairs (home only). Each is one kernel call per side, rows of L with
(a, b) = (x, y) and rows of Lᵀ = s·y·xᵀ + b with (a, b) = (y, x); block_sigmoid needs only the
row side. The −2·δ of the softmax gradient is subtracted inside the tile in f32, before G meets
(maybe 16-bit) embeddings. x and y are padded once by `pad` to the `block_plan` of the shard;
outputs are f32 with the padding rows still in them (−inf or garbage), for the caller to drop.

References:
  Cheng et al. 2024, "Breaking the Memory Barrier: Near Infinite Batch Size Scaling for Contrastive
    Loss" (Inf-CL), Sec. 3.3 (the ring over devices: tile partials merged across steps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxbatch.losses._contrastive_reference import KINDS
from pallas_kernels.contrastive import _common, gpu, tpu
from pallas_kernels.contrastive._common import BlockSizes, Plan
from pallas_kernels.contrastive.api import resolve_plan

_KERNELS = {"tpu": tpu, "gpu": gpu}
_LSE_KINDS = ("softmax", "decoupled")


def block_plan(
    kind: str,
    n: int,
    d: int,
    dtype,
    block_size: int | BlockSizes | None = None,
    *,
    backend: str | None = None,
    interpret: bool | None = None,
) -> Plan:
    """The static plan of the per-block sweeps of an [n, d] shard (x and every y block).

    Args:
      kind: 'softmax', 'sigmoid' or 'decoupled'.
      n, d: rows and width of the local shards; dtype: their dtype.
      block_size, backend, interpret: as in `contrastive_loss` (api.py).

    Raises:
      ValueError: unknown kind, n or d < 1, or a malformed block_size.
      NotImplementedError: a dtype, backend or tiling the kernels do not handle.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if n < 1 or d < 1:
        raise ValueError(f"the shards need n >= 1 and d >= 1, got [n, d] = [{n}, {d}]")
    dtype = jnp.dtype(dtype)
    _common.check_supported_dtype(dtype)
    return resolve_plan(kind, n, d, dtype, block_size, backend, interpret)


def pad(a: jax.Array, plan: Plan) -> jax.Array:
    """[n, d] shard -> [n_pad, d_pad] with zeros (zero rows are masked, zero features add 0)."""
    n, d = a.shape
    if n != plan.n or d > plan.d_pad:
        raise ValueError(
            f"shard of shape {a.shape} does not fit the plan (n={plan.n}, d_pad={plan.d_pad})"
        )
    return jnp.pad(a, ((0, plan.n_pad - n), (0, plan.d_pad - d)))


def block_lse(x, y, scale, bias, plan: Plan, *, home: bool) -> tuple[jax.Array, jax.Array]:
    """Row and column log-sum-exp of L = s·x·yᵀ + b over one block (softmax, decoupled).

    Args:
      x, y: [n_pad, d_pad] padded shards (`pad`); y is the travelling block.
      scale, bias: f32 scalars.
      plan: from `block_plan`, kind 'softmax' or 'decoupled'.
      home: y is the shard paired with x (DCL then leaves out the positive pairs).

    Returns:
      (r_blk, c_blk), each [n_pad] f32: lse_j L_ij over this block's columns and lse_i L_ij over
      x's rows; −inf where nothing is kept (padding).
    """
    _check(x, y, plan, home, _LSE_KINDS)
    kernels, scalars = _KERNELS[plan.backend], _scalars(scale, bias, 0.0)
    with jax.named_scope(f"contrastive_block_lse_home{int(home)}"):
        rows = kernels.row_stats(x, y, scalars, plan, home=home)
        cols = kernels.row_stats(y, x, scalars, plan, home=home)
    return rows, cols


def block_lse_grads(
    x, y, scale, bias, row_lse, col_lse, plan: Plan, *, home: bool
) -> tuple[jax.Array, jax.Array]:
    """(G·y, Gᵀ·x) of one block for the softmax losses, given the global LSE statistics.

    G_ij = exp(L_ij − r_i) + exp(L_ij − c_j) − 2·δ_ij on the kept entries (the diagonal of a home
    block is dropped from both exps for DCL, its −2 stays): 2N times ∂loss/∂L_ij of CLIP / DCL.

    Args:
      x, y, scale, bias, plan, home: as in `block_lse`.
      row_lse: [n_pad] f32 global row LSE r of x's rows (over all columns of the ring).
      col_lse: [n_pad] f32 global column LSE c of y's columns (over all rows of the ring).

    Returns:
      (u_x = G·y, u_y = Gᵀ·x), each [n_pad, d_pad] f32.
    """
    _check(x, y, plan, home, _LSE_KINDS)
    kernels, scalars = _KERNELS[plan.backend], _scalars(scale, bias, 0.0)
    # A padded row's LSE is −inf; its entries are masked, a finite stand-in keeps exp() finite.
    r = jnp.where(jnp.isfinite(row_lse), row_lse, 0.0).astype(jnp.float32)
    c = jnp.where(jnp.isfinite(col_lse), col_lse, 0.0).astype(jnp.float32)
    ones = jnp.ones_like(r)
    with jax.named_scope(f"contrastive_block_lse_grads_home{int(home)}"):
        u_x, _ = kernels.row_grads(x, y, scalars, plan, (r, ones, c, ones), home=home, positive=2.0)
        u_y, _ = kernels.row_grads(y, x, scalars, plan, (c, ones, r, ones), home=home, positive=2.0)
    return u_x, u_y


def block_sigmoid(x, y, scale, bias, plan: Plan, *, home: bool) -> jax.Array:
    """Σ_j softplus(−z_ij·L_ij) of each row over one block (SigLIP); z = +1 only on a home diagonal.

    Args: as in `block_lse`, with a 'sigmoid' plan.

    Returns:
      [n_pad] f32 row sums (0 on padding rows).
    """
    _check(x, y, plan, home, ("sigmoid",))
    scalars = _scalars(scale, bias, 0.0)
    with jax.named_scope(f"contrastive_block_sigmoid_home{int(home)}"):
        return _KERNELS[plan.backend].row_stats(x, y, scalars, plan, home=home)


def block_sigmoid_grads(
    x, y, scale, bias, plan: Plan, *, home: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(G·y, Gᵀ·x, Σ_j G_ij) of one block for SigLIP, G_ij = σ(L_ij) − δ_ij (N·∂loss/∂L_ij).

    Args: as in `block_lse`, with a 'sigmoid' plan.

    Returns:
      u_x [n_pad, d_pad], u_y [n_pad, d_pad] and the row sums of G [n_pad], all f32.
    """
    _check(x, y, plan, home, ("sigmoid",))
    kernels, scalars = _KERNELS[plan.backend], _scalars(scale, bias, 1.0)
    with jax.named_scope(f"contrastive_block_sigmoid_grads_home{int(home)}"):
        u_x, gsum = kernels.row_grads(x, y, scalars, plan, home=home)
        u_y, _ = kernels.row_grads(y, x, scalars, plan, home=home)
    return u_x, u_y, gsum


def _scalars(scale, bias, g: float) -> jax.Array:
    """f32[4] = (s, bias, g, 0), the kernels' scalar operand."""
    parts = (scale, bias, g, 0.0)
    return jnp.stack([jnp.asarray(v, jnp.float32) for v in parts])


def _check(x, y, plan: Plan, home, kinds: tuple[str, ...]) -> None:
    if not isinstance(home, bool):
        raise TypeError(f"home must be a static Python bool, got {home!r}")
    if plan.kind not in kinds:
        raise ValueError(f"this sweep needs a plan of kind {kinds}, got kind={plan.kind!r}")
    want = (plan.n_pad, plan.d_pad)
    if x.shape != want or y.shape != want:
        raise ValueError(
            f"x and y must be padded shards of shape {want} (see pad), got {x.shape} and {y.shape}"
        )
    if x.dtype != y.dtype:
        raise TypeError(f"x and y must share a dtype, got {x.dtype} and {y.dtype}")
