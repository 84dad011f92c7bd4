"""Pallas Mosaic TPU kernels of the linear cross-entropy: the [T, V] logits never leave VMEM.

Three kernels over padded h [t_pad, d], w [d, v_pad] and labels [t_pad] (−1 = not counted):

- `forward`: grid (token blocks "parallel", vocabulary tiles "arbitrary"). The token block's
  running max m and sum l live in VMEM scratch across the vocabulary sweep (online log-sum-exp);
  the target logit accumulates in its resident output block. Writes lse [t_pad] and the target
  logit [t_pad] only.
- `grad_h`: same grid; recomputes each logits tile, forms G = g_lse·softmax + g_tgt·onehot
  (`_common.grad_tile`) and accumulates dh_blk += G·w_tileᵀ in its resident f32 output block.
- `grad_w`: grid (vocabulary tiles "parallel", token blocks "arbitrary"); the same G tile and
  dwᵀ_tile += Gᵀ·h_blk in its resident f32 [bv, d] output block (dwᵀ, so that the tile's
  lane dim is d as for dh; the caller transposes once in XLA).

The feature dim D is held whole in each block (no third grid axis); `_common.plan` refuses blocks
whose VMEM estimate exceeds the budget. 16-bit inputs go to the MXU as they are, with f32
accumulation; G is rounded to the input dtype before its two matmuls.

Residuals of the custom VJP (api.py): the padded inputs, labels and lse [t_pad]; the backward
recomputes the logits tile by tile (two more h·w sweeps), never storing them.

References:
  Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models" (cut cross-entropy:
    blockwise logits and log-sum-exp kept on chip, recomputing backward), Sec. 4.
  Dao et al. 2022, "FlashAttention", Algorithm 1 (the online softmax statistics).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.cross_entropy import _common
from pallas_kernels.cross_entropy._common import Plan

_SEMANTICS = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def _forward_kernel(labels_ref, h_ref, w_ref, lse_ref, tgt_ref, m_scratch, l_scratch, *, v):
    """lse and target logit of one token block, accumulated over the vocabulary tiles (axis 1)."""
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_scratch[...] = jnp.full(m_scratch.shape, _common.MASK_VALUE, jnp.float32)
        l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
        tgt_ref[...] = jnp.zeros(tgt_ref.shape, jnp.float32)

    logits = _common.tile_logits(h_ref[...], w_ref[...])  # [bt, bv]
    ids = _common.vocab_ids(j * w_ref.shape[1], logits.shape)  # [bt, bv]
    m_new, l_new = _common.online_lse_update(logits, ids < v, m_scratch[...], l_scratch[...])
    m_scratch[...] = m_new  # [bt, 1]
    l_scratch[...] = l_new  # [bt, 1]
    tgt_ref[...] += _common.target_part(logits, ids, labels_ref[...])  # [bt, 1]

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        lse_ref[...] = _common.lse_finish(m_scratch[...], l_scratch[...])


def _grad_h_kernel(labels_ref, lse_ref, g_lse_ref, g_tgt_ref, h_ref, w_ref, dh_ref, *, v):
    """dh_blk = Σ_tiles G·w_tileᵀ for one token block; the output block is the f32 accumulator."""
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        dh_ref[...] = jnp.zeros(dh_ref.shape, jnp.float32)

    w = w_ref[...]  # [d, bv]
    logits = _common.tile_logits(h_ref[...], w)  # [bt, bv]
    ids = _common.vocab_ids(j * w.shape[1], logits.shape)
    grad = _common.grad_tile(
        logits, ids, v, labels_ref[...], lse_ref[...], g_lse_ref[...], g_tgt_ref[...]
    )  # [bt, bv]
    dh_ref[...] += _common.grad_times_w(grad, w)  # [bt, d]


def _grad_w_kernel(labels_ref, lse_ref, g_lse_ref, g_tgt_ref, h_ref, w_ref, dwt_ref, *, v):
    """dwᵀ_tile = Σ_blocks Gᵀ·h_blk for one vocabulary tile (grid axis 0), over token blocks."""
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        dwt_ref[...] = jnp.zeros(dwt_ref.shape, jnp.float32)

    h = h_ref[...]  # [bt, d]
    logits = _common.tile_logits(h, w_ref[...])  # [bt, bv]
    ids = _common.vocab_ids(j * w_ref.shape[1], logits.shape)
    grad = _common.grad_tile(
        logits, ids, v, labels_ref[...], lse_ref[...], g_lse_ref[...], g_tgt_ref[...]
    )  # [bt, bv]
    dwt_ref[...] += _common.grad_t_times_h(grad, h)  # [bv, d]


def _cost(plan: Plan, d: int, itemsize: int, matmuls: int, tokens_outer: bool):
    """Cost of one sweep: ``matmuls`` [t, d]×[d, v] products; the inner operand is re-read once
    per block of the outer grid axis (w per token block, or h per vocabulary tile)."""
    nt, nv = plan.t_pad // plan.block_tokens, plan.v_pad // plan.block_vocab
    h_reads, w_reads = (1, nt) if tokens_outer else (nv, 1)
    return pl.CostEstimate(
        flops=2 * matmuls * plan.t_pad * plan.v_pad * d,
        transcendentals=plan.t_pad * plan.v_pad,
        bytes_accessed=(h_reads * plan.t_pad * d + w_reads * d * plan.v_pad) * itemsize,
    )


def forward(h: jax.Array, w: jax.Array, labels: jax.Array, plan: Plan):
    """(lse [t_pad], target logit [t_pad]) f32 of padded h [t_pad, d], w [d, v_pad].

    ``labels`` int32 [t_pad]; −1 matches no column (target 0). Padding columns (>= plan.v) are
    left out of the log-sum-exp.
    """
    t_pad, d = h.shape
    bt, bv = plan.block_tokens, plan.block_vocab
    grid = (t_pad // bt, plan.v_pad // bv)
    row = pl.BlockSpec((bt, 1), lambda i, j: (i, 0))

    def run(operands, axes):
        out = jax.ShapeDtypeStruct((t_pad, 1), jnp.float32, manual_axis_type=axes)
        return pl.pallas_call(
            functools.partial(_forward_kernel, v=plan.v),
            grid=grid,
            in_specs=[
                row,
                pl.BlockSpec((bt, d), lambda i, j: (i, 0)),
                pl.BlockSpec((d, bv), lambda i, j: (0, j)),
            ],
            out_specs=[row, row],
            out_shape=[out, out],
            scratch_shapes=[pltpu.VMEM((bt, 1), jnp.float32), pltpu.VMEM((bt, 1), jnp.float32)],
            compiler_params=_SEMANTICS,
            cost_estimate=_cost(plan, d, h.dtype.itemsize, 1, True),
            interpret=plan.interpret,
            name="linear_cross_entropy_fwd",
        )(*operands)

    with jax.named_scope(f"linear_cross_entropy_tpu_fwd_bt{bt}_bv{bv}"):
        lse, tgt = _common.call_kernel(plan, run, labels[:, None], h, w)
    return lse[:, 0], tgt[:, 0]


def _grad_call(kernel, what, h, w, labels, lse, g_lse, g_tgt, plan: Plan) -> jax.Array:
    """One backward kernel over the (token block i, vocabulary tile j) grid.

    ``what`` 'dh': grid (i, j), output dh [t_pad, d] resident per token block; 'dw': grid
    (j, i), output dwᵀ [v_pad, d] resident per vocabulary tile. The inputs are the same:
    labels, lse, g_lse, g_tgt as [bt, 1] rows, h [bt, d] and w [d, bv] blocks.
    """
    t_pad, d = h.shape
    bt, bv = plan.block_tokens, plan.block_vocab
    nt, nv = t_pad // bt, plan.v_pad // bv
    if what == "dh":
        grid, ij = (nt, nv), lambda a, b: (a, b)
        out_rows, out_block = t_pad, pl.BlockSpec((bt, d), lambda a, b: (a, 0))
    else:
        grid, ij = (nv, nt), lambda a, b: (b, a)
        out_rows, out_block = plan.v_pad, pl.BlockSpec((bv, d), lambda a, b: (a, 0))
    row = pl.BlockSpec((bt, 1), lambda a, b: (ij(a, b)[0], 0))

    def run(operands, axes):
        return pl.pallas_call(
            functools.partial(kernel, v=plan.v),
            grid=grid,
            in_specs=[
                row,
                row,
                row,
                row,
                pl.BlockSpec((bt, d), lambda a, b: (ij(a, b)[0], 0)),
                pl.BlockSpec((d, bv), lambda a, b: (0, ij(a, b)[1])),
            ],
            out_specs=out_block,
            out_shape=jax.ShapeDtypeStruct((out_rows, d), jnp.float32, manual_axis_type=axes),
            compiler_params=_SEMANTICS,
            cost_estimate=_cost(plan, d, h.dtype.itemsize, 2, what == "dh"),
            interpret=plan.interpret,
            name=f"linear_cross_entropy_bwd_{what}",
        )(*operands)

    rows = [labels[:, None], lse[:, None], g_lse[:, None], g_tgt[:, None]]
    with jax.named_scope(f"linear_cross_entropy_tpu_bwd_{what}_bt{bt}_bv{bv}"):
        return _common.call_kernel(plan, run, *rows, h, w)


def grad_h(h, w, labels, lse, g_lse, g_tgt, plan: Plan) -> jax.Array:
    """dh [t_pad, d] f32 = G·wᵀ with G = g_lse·softmax + g_tgt·onehot (rows [t_pad] f32)."""
    return _grad_call(_grad_h_kernel, "dh", h, w, labels, lse, g_lse, g_tgt, plan)


def grad_w(h, w, labels, lse, g_lse, g_tgt, plan: Plan) -> jax.Array:
    """dwᵀ [v_pad, d] f32 = Gᵀ·h, G as in `grad_h`; the caller transposes it to dw [d, v_pad]."""
    return _grad_call(_grad_w_kernel, "dw", h, w, labels, lse, g_lse, g_tgt, plan)
