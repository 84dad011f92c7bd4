"""Pallas GPU (Triton) kernels of the linear cross-entropy: the [T, V] logits never reach HBM.

Same contract as tpu.py, over padded h [t_pad, d_pad], w [d_pad, v_pad] and labels [t_pad]
(−1 = not counted). Triton programs run concurrently, so each sequential sweep is a
``fori_loop`` inside a program rather than a grid axis, and the feature dim is contracted
``block_d`` columns at a time so that a program's registers hold O(bt·bv) values whatever D:

- `forward`: grid (token blocks,); a program walks the vocabulary tiles with the running max m
  and sum l of its token block in registers (online log-sum-exp) and writes lse and the target
  logit of its rows.
- `grad_h`: grid (token blocks,); per vocabulary tile it recomputes the logits, forms
  G = g_lse·softmax + g_tgt·onehot (`_common.grad_tile`) and adds G·w_tileᵀ into its f32
  dh block one feature chunk at a time.
- `grad_w`: grid (vocabulary tiles,); walks the token blocks and adds Gᵀ·h_blk into its f32
  dwᵀ block [bv, d_pad] one feature chunk at a time.

The gradient blocks are accumulated in the kernels' output buffers (read, add, write back by the
same program, one feature chunk at a time), not in registers. All block dims are powers of two.

References:
  Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models" (cut cross-entropy:
    blockwise logits and log-sum-exp kept on chip, recomputing backward), Sec. 4.
  Dao et al. 2022, "FlashAttention", Algorithm 1 (the online softmax statistics).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.cross_entropy import _common
from pallas_kernels.cross_entropy._common import Plan


def _compiler_params(plan: Plan) -> pltriton.CompilerParams:
    warps = 4 if plan.block_tokens * plan.block_vocab <= 64 * 64 else 8
    return pltriton.CompilerParams(num_warps=warps, num_stages=2)


def _logits(h_ref, rows, w_ref, cols, plan: Plan) -> jax.Array:
    """h[rows] · w[:, cols] -> [bt, bv] f32, contracted ``block_d`` features at a time."""
    bd = plan.block_d

    def body(k, acc):
        feats = pl.ds(k * bd, bd)
        return acc + _common.tile_logits(h_ref[rows, feats], w_ref[feats, cols])

    init = jnp.zeros((plan.block_tokens, plan.block_vocab), jnp.float32)
    return lax.fori_loop(0, plan.d_pad // bd, body, init)


def _each_feature_chunk(update, plan: Plan) -> None:
    """``update(feats)`` for the feature chunks pl.ds(k·bd, bd), k = 0 .. d_pad / bd − 1, in a
    loop (a program's registers then hold one [rows, bd] chunk of its output block)."""
    bd = plan.block_d

    def body(k, carry):
        update(pl.ds(k * bd, bd))
        return carry

    lax.fori_loop(0, plan.d_pad // bd, body, 0)


def _zero(ref, plan: Plan) -> None:
    """Zeroes a [rows, d_pad] f32 output block, one feature chunk at a time."""

    def update(feats):
        ref[:, feats] = jnp.zeros((ref.shape[0], plan.block_d), jnp.float32)

    _each_feature_chunk(update, plan)


def _forward_kernel(labels_ref, h_ref, w_ref, lse_ref, tgt_ref, *, plan: Plan):
    """lse and target logit of one token block, streamed over the vocabulary tiles."""
    bt, bv = plan.block_tokens, plan.block_vocab
    labels = labels_ref[...][:, None]  # [bt, 1]
    rows = pl.ds(0, bt)

    def body(j, carry):
        m, l, tgt = carry  # [bt, 1] each
        logits = _logits(h_ref, rows, w_ref, pl.ds(j * bv, bv), plan)  # [bt, bv]
        ids = _common.vocab_ids(j * bv, logits.shape)
        m, l = _common.online_lse_update(logits, ids < plan.v, m, l)
        return m, l, tgt + _common.target_part(logits, ids, labels)

    init = (
        jnp.full((bt, 1), _common.MASK_VALUE, jnp.float32),
        jnp.zeros((bt, 1), jnp.float32),
        jnp.zeros((bt, 1), jnp.float32),
    )
    m, l, tgt = lax.fori_loop(0, plan.v_pad // bv, body, init)
    lse_ref[...] = _common.lse_finish(m, l)[:, 0]
    tgt_ref[...] = tgt[:, 0]


def _grad_h_kernel(labels_ref, lse_ref, g_lse_ref, g_tgt_ref, h_ref, w_ref, dh_ref, *, plan):
    """dh_blk = Σ_tiles G·w_tileᵀ for one token block, added chunk by chunk into dh_ref."""
    bt, bv = plan.block_tokens, plan.block_vocab
    rows = pl.ds(0, bt)
    labels, lse = labels_ref[...][:, None], lse_ref[...][:, None]  # [bt, 1]
    g_lse, g_tgt = g_lse_ref[...][:, None], g_tgt_ref[...][:, None]  # [bt, 1]
    _zero(dh_ref, plan)

    def tile(j, carry):
        cols = pl.ds(j * bv, bv)
        logits = _logits(h_ref, rows, w_ref, cols, plan)  # [bt, bv]
        ids = _common.vocab_ids(j * bv, logits.shape)
        grad = _common.grad_tile(logits, ids, plan.v, labels, lse, g_lse, g_tgt)

        def update(feats):
            dh_ref[:, feats] += _common.grad_times_w(grad, w_ref[feats, cols])  # [bt, bd]

        _each_feature_chunk(update, plan)
        return carry

    lax.fori_loop(0, plan.v_pad // bv, tile, 0)


def _grad_w_kernel(labels_ref, lse_ref, g_lse_ref, g_tgt_ref, h_ref, w_ref, dwt_ref, *, plan):
    """dwᵀ_tile = Σ_blocks Gᵀ·h_blk for one vocabulary tile, added chunk by chunk into dwt_ref."""
    j = pl.program_id(0)
    bt, bv = plan.block_tokens, plan.block_vocab
    cols = pl.ds(0, bv)
    _zero(dwt_ref, plan)

    def block(i, carry):
        rows = pl.ds(i * bt, bt)
        logits = _logits(h_ref, rows, w_ref, cols, plan)  # [bt, bv]
        ids = _common.vocab_ids(j * bv, logits.shape)
        grad = _common.grad_tile(
            logits,
            ids,
            plan.v,
            labels_ref[rows][:, None],
            lse_ref[rows][:, None],
            g_lse_ref[rows][:, None],
            g_tgt_ref[rows][:, None],
        )  # [bt, bv]

        def update(feats):
            dwt_ref[:, feats] += _common.grad_t_times_h(grad, h_ref[rows, feats])  # [bv, bd]

        _each_feature_chunk(update, plan)
        return carry

    lax.fori_loop(0, plan.t_pad // bt, block, 0)


def forward(h: jax.Array, w: jax.Array, labels: jax.Array, plan: Plan):
    """(lse [t_pad], target logit [t_pad]) f32 of padded h [t_pad, d_pad], w [d_pad, v_pad]."""
    t_pad, d = h.shape
    bt = plan.block_tokens

    def run(operands, axes):
        out = jax.ShapeDtypeStruct((t_pad,), jnp.float32, manual_axis_type=axes)
        return pl.pallas_call(
            functools.partial(_forward_kernel, plan=plan),
            grid=(t_pad // bt,),
            in_specs=[
                pl.BlockSpec((bt,), lambda i: (i,)),
                pl.BlockSpec((bt, d), lambda i: (i, 0)),
                pl.BlockSpec((d, plan.v_pad), lambda i: (0, 0)),
            ],
            out_specs=[pl.BlockSpec((bt,), lambda i: (i,)), pl.BlockSpec((bt,), lambda i: (i,))],
            out_shape=[out, out],
            compiler_params=_compiler_params(plan),
            interpret=plan.interpret,
            name="linear_cross_entropy_fwd",
        )(*operands)

    with jax.named_scope(f"linear_cross_entropy_gpu_fwd_bt{bt}_bv{plan.block_vocab}"):
        lse, tgt = _common.call_kernel(plan, run, labels, h, w)
    return lse, tgt


def _grad_call(kernel, what, grid, specs, out_rows, h, w, rows, plan: Plan) -> jax.Array:
    """One backward kernel: ``specs`` = (row, h block, w block, output block) BlockSpecs over
    ``grid``; output [out_rows, d_pad] f32; ``rows`` = (labels, lse, g_lse, g_tgt) [t_pad]."""
    row, h_spec, w_spec, out_spec = specs
    d = h.shape[1]

    def run(operands, axes):
        return pl.pallas_call(
            functools.partial(kernel, plan=plan),
            grid=grid,
            in_specs=[row, row, row, row, h_spec, w_spec],
            out_specs=out_spec,
            out_shape=jax.ShapeDtypeStruct((out_rows, d), jnp.float32, manual_axis_type=axes),
            compiler_params=_compiler_params(plan),
            interpret=plan.interpret,
            name=f"linear_cross_entropy_bwd_{what}",
        )(*operands)

    scope = f"linear_cross_entropy_gpu_bwd_{what}_bt{plan.block_tokens}_bv{plan.block_vocab}"
    with jax.named_scope(scope):
        return _common.call_kernel(plan, run, *rows, h, w)


def grad_h(h, w, labels, lse, g_lse, g_tgt, plan: Plan) -> jax.Array:
    """dh [t_pad, d_pad] f32 = G·wᵀ with G = g_lse·softmax + g_tgt·onehot (rows [t_pad] f32)."""
    t_pad, d = h.shape
    bt = plan.block_tokens
    specs = (
        pl.BlockSpec((bt,), lambda i: (i,)),
        pl.BlockSpec((bt, d), lambda i: (i, 0)),
        pl.BlockSpec((d, plan.v_pad), lambda i: (0, 0)),
        pl.BlockSpec((bt, d), lambda i: (i, 0)),
    )
    rows = (labels, lse, g_lse, g_tgt)
    return _grad_call(_grad_h_kernel, "dh", (t_pad // bt,), specs, t_pad, h, w, rows, plan)


def grad_w(h, w, labels, lse, g_lse, g_tgt, plan: Plan) -> jax.Array:
    """dwᵀ [v_pad, d_pad] f32 = Gᵀ·h, G as in `grad_h`; the caller transposes it."""
    t_pad, d = h.shape
    bv = plan.block_vocab
    specs = (
        pl.BlockSpec((t_pad,), lambda j: (0,)),
        pl.BlockSpec((t_pad, d), lambda j: (0, 0)),
        pl.BlockSpec((d, bv), lambda j: (0, j)),
        pl.BlockSpec((bv, d), lambda j: (j, 0)),
    )
    rows = (labels, lse, g_lse, g_tgt)
    grid = (plan.v_pad // bv,)
    return _grad_call(_grad_w_kernel, "dw", grid, specs, plan.v_pad, h, w, rows, plan)
