"""Pallas GPU (Triton) kernels for the tiled contrastive loss (Inf-CL style tile work).

Same contract as tpu.py: each kernel is called once with (a, b) = (x, y) for the row side and once
with (a, b) = (y, x) for the column side (Lᵀ = s·y·xᵀ + bias). Only one [block_rows, block_cols]
logit tile is live per program. Both kernels take the same static ``home`` as tpu.py's: whether b is
the block paired with a (positive pairs on its diagonal) or a block of negatives only.

Tiling (both kernels): grid = (n_pad / block_rows,); each program owns one [block_rows, d_pad] row
block of ``a`` and walks the column blocks of ``b`` with a ``fori_loop`` (Triton programs run
concurrently, so the column sweep is a loop inside the program, not a sequential grid axis). Its
accumulators (running max/sum, or the [block_rows, d_pad] f32 gradient block) live in registers.
All block dims are powers of two (d is zero-padded by the caller).

References:
  Cheng et al. 2024, "Breaking the Memory Barrier: Near Infinite Batch Size Scaling for Contrastive
    Loss" (Inf-CL), Sec. 3 (tile-wise forward with online LSE, recomputing backward).
  Dao et al., 2022, "FlashAttention", Algorithm 1 (online softmax statistics).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.contrastive import _common
from pallas_kernels.contrastive._common import Plan


def _compiler_params(plan: Plan) -> pltriton.CompilerParams:
    warps = 4 if plan.block_rows * plan.block_cols <= 64 * 64 else 8
    return pltriton.CompilerParams(num_warps=warps, num_stages=2)


def _forward_kernel(scalars_ref, a_ref, b_ref, out_ref, *, kind, n, block_cols, home):
    """Row statistic of one row block: lse_j L_ij (decoupled: j ≠ i) or Σ_j softplus(−z_ij·L_ij)."""
    i = pl.program_id(0)
    block_rows = a_ref.shape[0]
    a = a_ref[...]  # [bm, d]
    scale, bias = scalars_ref[0], scalars_ref[1]

    def body(j, carry):
        m, l = carry  # [bm, 1] each
        b = b_ref[pl.ds(j * block_cols, block_cols), :]  # [bn, d]
        logits = _common.tile_logits(a, b, scale, bias)  # [bm, bn]
        valid, diag = _common.tile_masks(i * block_rows, j * block_cols, logits.shape, n, home)
        if kind == "sigmoid":
            terms = _common.sigmoid_terms(logits, valid, diag)
            return m, l + jnp.sum(terms, axis=1, keepdims=True)
        return _common.online_lse_update(logits, _common.lse_keep(kind, valid, diag), m, l)

    init = (
        jnp.full((block_rows, 1), _common.MASK_VALUE, jnp.float32),
        jnp.zeros((block_rows, 1), jnp.float32),
    )
    m, l = lax.fori_loop(0, b_ref.shape[0] // block_cols, body, init)
    out = l if kind == "sigmoid" else _common.lse_finish(m, l)
    out_ref[...] = out[:, 0]


def _backward_kernel(scalars_ref, a_ref, b_ref, *refs, kind, n, block_cols, home, positive):
    """u_i = Σ_j G_ij·b_j and gsum_i = Σ_j G_ij for one row block; G = dLoss/dL, recomputed.

    softmax/decoupled: G_ij = g_i·exp(L_ij − lse_i) + h_j·exp(L_ij − lse'_j) on kept entries,
      minus ``positive`` on the positive pairs of a home block.
    sigmoid: G_ij = g·(σ(L_ij) − [i = j]) on valid entries.
    """
    if kind == "sigmoid":
        u_ref, gsum_ref = refs
    else:
        lse_a_ref, g_a_ref, lse_b_ref, g_b_ref, u_ref, gsum_ref = refs
    i = pl.program_id(0)
    block_rows = a_ref.shape[0]
    a = a_ref[...]  # [bm, d]
    scale, bias, g = scalars_ref[0], scalars_ref[1], scalars_ref[2]
    if kind != "sigmoid":
        lse_a = lse_a_ref[...][:, None]  # [bm, 1]
        g_a = g_a_ref[...][:, None]  # [bm, 1]

    def body(j, carry):
        u, gsum = carry  # [bm, d] f32, [bm, 1] f32
        cols = pl.ds(j * block_cols, block_cols)
        b = b_ref[cols, :]  # [bn, d]
        logits = _common.tile_logits(a, b, scale, bias)  # [bm, bn]
        valid, diag = _common.tile_masks(i * block_rows, j * block_cols, logits.shape, n, home)
        if kind == "sigmoid":
            grad = _common.sigmoid_grad_tile(logits, valid, diag, g)
        else:
            keep = _common.lse_keep(kind, valid, diag)
            lse_b = lse_b_ref[cols][None, :]  # [1, bn]
            g_b = g_b_ref[cols][None, :]  # [1, bn]
            grad = _common.lse_grad_tile(logits, keep, lse_a, g_a, lse_b, g_b)  # [bm, bn]
            grad = _common.subtract_positive(grad, valid, diag, positive)
        return u + _common.tile_times(grad, b), gsum + jnp.sum(grad, axis=1, keepdims=True)

    init = (
        jnp.zeros((block_rows, a.shape[1]), jnp.float32),
        jnp.zeros((block_rows, 1), jnp.float32),
    )
    u, gsum = lax.fori_loop(0, b_ref.shape[0] // block_cols, body, init)
    u_ref[...] = u
    gsum_ref[...] = gsum[:, 0]


def row_stats(
    a: jax.Array, b: jax.Array, scalars: jax.Array, plan: Plan, *, home: bool = True
) -> jax.Array:
    """Per-row statistic of L = s·a·bᵀ + bias for padded a, b: [n_pad, d_pad] -> [n_pad] f32.

    ``home``: b is the block paired with a (positive pairs on the diagonal); False for a block
    of negatives only. Residuals: none kept inside; the caller saves the returned O(N) vector.
    """
    n_pad, d = a.shape
    bm, bn = plan.block_rows, plan.block_cols
    kernel = functools.partial(_forward_kernel, kind=plan.kind, n=plan.n, block_cols=bn, home=home)
    suffix = "" if home else "_offhome"

    def run(operands, axes):
        return pl.pallas_call(
            kernel,
            grid=(n_pad // bm,),
            in_specs=[
                pl.BlockSpec((4,), lambda i: (0,)),
                pl.BlockSpec((bm, d), lambda i: (i, 0)),
                pl.BlockSpec((n_pad, d), lambda i: (0, 0)),
            ],
            out_specs=pl.BlockSpec((bm,), lambda i: (i,)),
            out_shape=jax.ShapeDtypeStruct((n_pad,), jnp.float32, manual_axis_type=axes),
            compiler_params=_compiler_params(plan),
            interpret=plan.interpret,
            name=f"contrastive_{plan.kind}_fwd{suffix}",
        )(*operands)

    with jax.named_scope(f"contrastive_{plan.kind}_gpu_fwd{suffix}_bm{bm}_bn{bn}"):
        return _common.call_kernel(plan, run, scalars, a, b)


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
    """Recomputes the tiles and returns (u = G·b [n_pad, d_pad] f32, Σ_j G_ij [n_pad] f32).

    Args:
      a, b: padded [n_pad, d_pad] operands (rows of ``a`` are the reduced side).
      scalars: f32[4] = (s, bias, g, 0); g is the loss cotangent, used by kind='sigmoid'.
      plan: static shape plan.
      stats: for the LSE kinds, (lse_rows, g_rows, lse_cols, g_cols), each [n_pad] f32. None for
        'sigmoid'.
      home, positive: as in tpu.row_grads.
    """
    n_pad, d = a.shape
    bm, bn = plan.block_rows, plan.block_cols
    in_specs = [
        pl.BlockSpec((4,), lambda i: (0,)),
        pl.BlockSpec((bm, d), lambda i: (i, 0)),
        pl.BlockSpec((n_pad, d), lambda i: (0, 0)),
    ]
    operands = [scalars, a, b]
    if plan.kind != "sigmoid":
        row_spec = pl.BlockSpec((bm,), lambda i: (i,))
        all_spec = pl.BlockSpec((n_pad,), lambda i: (0,))
        in_specs += [row_spec, row_spec, all_spec, all_spec]
        operands += list(stats)
    kernel = functools.partial(
        _backward_kernel, kind=plan.kind, n=plan.n, block_cols=bn, home=home, positive=positive
    )
    suffix = "" if home else "_offhome"

    def run(operands, axes):
        return pl.pallas_call(
            kernel,
            grid=(n_pad // bm,),
            in_specs=in_specs,
            out_specs=[
                pl.BlockSpec((bm, d), lambda i: (i, 0)),
                pl.BlockSpec((bm,), lambda i: (i,)),
            ],
            out_shape=[
                jax.ShapeDtypeStruct((n_pad, d), jnp.float32, manual_axis_type=axes),
                jax.ShapeDtypeStruct((n_pad,), jnp.float32, manual_axis_type=axes),
            ],
            compiler_params=_compiler_params(plan),
            interpret=plan.interpret,
            name=f"contrastive_{plan.kind}_bwd{suffix}",
        )(*operands)

    with jax.named_scope(f"contrastive_{plan.kind}_gpu_bwd{suffix}_bm{bm}_bn{bn}"):
        return tuple(_common.call_kernel(plan, run, *operands))
