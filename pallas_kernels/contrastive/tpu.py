"""Pallas Mosaic TPU kernels for the tiled contrastive loss (Inf-CL style tile work).

Two kernels, each called twice by api.py: once with (a, b) = (x, y) for the row side and once with
(a, b) = (y, x) for the column side, because the column statistics of L = s·x·yᵀ + bias are the row
statistics of Lᵀ = s·y·xᵀ + bias. Neither kernel ever holds more than one [block_rows, block_cols]
tile of logits; everything stored across tiles is O(N) or O(N·D).

Both take a static ``home``: whether b is the block paired with a (the positive pairs on its
diagonal i == j), as in a single-device call or the first step of a device ring; off home every pair
is a negative (see tiles.py, the per-block entry points of the ring).

Tiling (both kernels): grid = (n_pad / block_rows, n_pad / block_cols); axis 0 ("parallel") picks
the row block of ``a``, axis 1 ("arbitrary", innermost, sequential) sweeps the column blocks of
``b`` while the row block's accumulators stay resident in VMEM. Scalars (s, bias, g) live in SMEM.

References:
  Cheng et al. 2024, "Breaking the Memory Barrier: Near Infinite Batch Size Scaling for Contrastive
    Loss" (Inf-CL), Sec. 3 (tile-wise forward with online LSE, recomputing backward).
  Dao et al., 2022, "FlashAttention", Algorithm 1 (online softmax statistics).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.contrastive import _common
from pallas_kernels.contrastive._common import Plan

_SEMANTICS = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def _forward_kernel(scalars_ref, a_ref, b_ref, out_ref, m_scratch, l_scratch, *, kind, n, home):
    """Row statistic of one row block, accumulated over the column blocks (grid axis 1).

    softmax/decoupled: out = lse_j L_ij (decoupled: j ≠ i), streamed with max m and sum l scratch.
    sigmoid: out = Σ_j softplus(−z_ij·L_ij), accumulated in l.
    """
    i, j = pl.program_id(0), pl.program_id(1)
    block_rows, block_cols = a_ref.shape[0], b_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        m_scratch[...] = jnp.full(m_scratch.shape, _common.MASK_VALUE, jnp.float32)
        l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)

    logits = _common.tile_logits(a_ref[...], b_ref[...], scalars_ref[0], scalars_ref[1])  # [bm, bn]
    valid, diag = _common.tile_masks(i * block_rows, j * block_cols, logits.shape, n, home)
    if kind == "sigmoid":
        l_scratch[...] += jnp.sum(_common.sigmoid_terms(logits, valid, diag), axis=1, keepdims=True)
    else:
        keep = _common.lse_keep(kind, valid, diag)
        m_new, l_new = _common.online_lse_update(logits, keep, m_scratch[...], l_scratch[...])
        m_scratch[...] = m_new  # [bm, 1]
        l_scratch[...] = l_new  # [bm, 1]

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        if kind == "sigmoid":
            out_ref[...] = l_scratch[...]
        else:
            out_ref[...] = _common.lse_finish(m_scratch[...], l_scratch[...])


def _backward_kernel(scalars_ref, a_ref, b_ref, *refs, kind, n, home, positive):
    """u_i = Σ_j G_ij·b_j and gsum_i = Σ_j G_ij for one row block; G = dLoss/dL, recomputed.

    softmax/decoupled: G_ij = g_i·exp(L_ij − lse_i) + h_j·exp(L_ij − lse'_j) on kept entries,
      minus ``positive`` on the positive pairs of a home block.
    sigmoid: G_ij = g·(σ(L_ij) − [i = j]) on valid entries.
    The outputs' blocks do not move along grid axis 1, so they are the f32 accumulators.
    """
    if kind == "sigmoid":
        u_ref, gsum_ref = refs
    else:
        lse_a_ref, g_a_ref, lse_b_ref, g_b_ref, u_ref, gsum_ref = refs
    i, j = pl.program_id(0), pl.program_id(1)
    block_rows, block_cols = a_ref.shape[0], b_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        u_ref[...] = jnp.zeros(u_ref.shape, jnp.float32)
        gsum_ref[...] = jnp.zeros(gsum_ref.shape, jnp.float32)

    b = b_ref[...]  # [bn, d]
    logits = _common.tile_logits(a_ref[...], b, scalars_ref[0], scalars_ref[1])  # [bm, bn]
    valid, diag = _common.tile_masks(i * block_rows, j * block_cols, logits.shape, n, home)
    if kind == "sigmoid":
        grad = _common.sigmoid_grad_tile(logits, valid, diag, scalars_ref[2])  # [bm, bn]
    else:
        keep = _common.lse_keep(kind, valid, diag)
        grad = _common.lse_grad_tile(
            logits, keep, lse_a_ref[...], g_a_ref[...], lse_b_ref[...], g_b_ref[...]
        )  # [bm, bn]
        grad = _common.subtract_positive(grad, valid, diag, positive)
    u_ref[...] += _common.tile_times(grad, b)  # [bm, d]
    gsum_ref[...] += jnp.sum(grad, axis=1, keepdims=True)  # [bm, 1]


def _specs(plan: Plan, d: int):
    """(grid, SMEM scalar spec, a-block spec, b-block spec) shared by both kernels."""
    bm, bn = plan.block_rows, plan.block_cols
    grid = (plan.n_pad // bm, plan.n_pad // bn)
    scalars = pl.BlockSpec(memory_space=pltpu.SMEM)
    a_spec = pl.BlockSpec((bm, d), lambda i, j: (i, 0))
    b_spec = pl.BlockSpec((bn, d), lambda i, j: (j, 0))
    return grid, scalars, a_spec, b_spec


def row_stats(
    a: jax.Array, b: jax.Array, scalars: jax.Array, plan: Plan, *, home: bool = True
) -> jax.Array:
    """Per-row statistic of L = s·a·bᵀ + bias for padded a, b: [n_pad, d] -> [n_pad] f32.

    ``home``: b is the block paired with a (positive pairs on the diagonal); False for a block
    of negatives only. Residuals: none kept inside; the caller saves the returned O(N) vector.
    """
    n_pad, d = a.shape
    grid, scalar_spec, a_spec, b_spec = _specs(plan, d)
    bm, bn = plan.block_rows, plan.block_cols
    kernel = functools.partial(_forward_kernel, kind=plan.kind, n=plan.n, home=home)
    suffix = "" if home else "_offhome"

    def run(operands, axes):
        return pl.pallas_call(
            kernel,
            grid=grid,
            in_specs=[scalar_spec, a_spec, b_spec],
            out_specs=pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
            out_shape=jax.ShapeDtypeStruct((n_pad, 1), jnp.float32, manual_axis_type=axes),
            scratch_shapes=[pltpu.VMEM((bm, 1), jnp.float32), pltpu.VMEM((bm, 1), jnp.float32)],
            compiler_params=_SEMANTICS,
            cost_estimate=pl.CostEstimate(
                flops=2 * n_pad * n_pad * d,
                transcendentals=n_pad * n_pad,
                bytes_accessed=(grid[0] + 1) * n_pad * d * a.dtype.itemsize,
            ),
            interpret=plan.interpret,
            name=f"contrastive_{plan.kind}_fwd{suffix}",
        )(*operands)

    with jax.named_scope(f"contrastive_{plan.kind}_tpu_fwd{suffix}_bm{bm}_bn{bn}"):
        out = _common.call_kernel(plan, run, scalars, a, b)
    return out[:, 0]  # [n_pad]


def row_grads(
    a: jax.Array,
    b: jax.Array,
    scalars: jax.Array,
    plan: Plan,
    stats: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None,
    *,
    home: bool = True,
    positive: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Recomputes the tiles and returns (u = G·b [n_pad, d] f32, Σ_j G_ij [n_pad] f32).

    Args:
      a, b: padded [n_pad, d] operands (rows of ``a`` are the reduced side).
      scalars: f32[4] = (s, bias, g, 0); g is the loss cotangent, used by kind='sigmoid'.
      plan: static shape plan.
      stats: for the LSE kinds, (lse_rows, g_rows, lse_cols, g_cols), each [n_pad] f32: the saved
        row/column LSEs of L and their cotangents. None for 'sigmoid'.
      home: b is the block paired with a (positive pairs on the diagonal); False for a block of
        negatives only.
      positive: static amount subtracted from G on the positive pairs of a home block (LSE kinds:
        the −L_ii terms of the loss); 0 when the caller differentiates those terms itself.
    """
    n_pad, d = a.shape
    grid, scalar_spec, a_spec, b_spec = _specs(plan, d)
    bm, bn = plan.block_rows, plan.block_cols
    in_specs = [scalar_spec, a_spec, b_spec]
    operands = [scalars, a, b]
    if plan.kind != "sigmoid":
        lse_rows, g_rows, lse_cols, g_cols = stats
        row_spec = pl.BlockSpec((bm, 1), lambda i, j: (i, 0))  # sublane-major [bm, 1]
        col_spec = pl.BlockSpec((1, bn), lambda i, j: (0, j))  # lane-major [1, bn]
        in_specs += [row_spec, row_spec, col_spec, col_spec]
        operands += [lse_rows[:, None], g_rows[:, None], lse_cols[None, :], g_cols[None, :]]
    kernel = functools.partial(
        _backward_kernel, kind=plan.kind, n=plan.n, home=home, positive=positive
    )
    suffix = "" if home else "_offhome"

    def run(operands, axes):
        return pl.pallas_call(
            kernel,
            grid=grid,
            in_specs=in_specs,
            out_specs=[
                pl.BlockSpec((bm, d), lambda i, j: (i, 0)),
                pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
            ],
            out_shape=[
                jax.ShapeDtypeStruct((n_pad, d), jnp.float32, manual_axis_type=axes),
                jax.ShapeDtypeStruct((n_pad, 1), jnp.float32, manual_axis_type=axes),
            ],
            compiler_params=_SEMANTICS,
            cost_estimate=pl.CostEstimate(
                flops=4 * n_pad * n_pad * d,
                transcendentals=2 * n_pad * n_pad,
                bytes_accessed=(grid[0] + 1) * n_pad * d * a.dtype.itemsize + 4 * n_pad * d,
            ),
            interpret=plan.interpret,
            name=f"contrastive_{plan.kind}_bwd{suffix}",
        )(*operands)

    with jax.named_scope(f"contrastive_{plan.kind}_tpu_bwd{suffix}_bm{bm}_bn{bn}"):
        u, gsum = _common.call_kernel(plan, run, *operands)
    return u, gsum[:, 0]
