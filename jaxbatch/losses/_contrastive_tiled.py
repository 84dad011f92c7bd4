"""Tile sweeps of the contrastive loss over one (x shard, y shard) pair, never holding n×n logits.

x and y ([n, D]) are zero-padded to nb·B rows and viewed as blocks [nb, B, D]. A sweep visits
the nb×nb tiles with an outer ``lax.scan`` over row blocks of x and an inner one over column blocks
of y; each tile recomputes its logits

    S = logit_scale·x_i·y_jᵀ + logit_bias   # [B, B], float32 whatever the input dtype

and folds them into O(n) statistics or into gradient accumulators. Padded rows and columns get
an additive -inf, so they drop out of every exp, softplus and sigmoid. With ``home`` set (the y
shard is the one paired with this x shard) and ``mask_diagonal`` (decoupled loss), the positive
pairs of the diagonal tiles are set to -inf too.

Sweeps (the device ring of ``_contrastive_ring`` calls them once per ring step):

- ``lse_sweep``: row and column log-sum-exp, online over tiles (softmax, decoupled forward).
- ``softmax_grad_sweep``: Σ_j g_ij·y_j and Σ_i g_ij·x_i with g = exp(S - row_lse) +
  exp(S - col_lse) - 2δ (softmax, decoupled backward; δ marks the positive pairs).
- ``sigmoid_sweep``: Σ_j softplus(S_ij) per row and optionally the same sums with g = σ(S) - δ
  (SigLIP forward, and its gradient, which needs no global statistic).

Per tile the sweeps run 1 (statistics, loss) or 3 (gradients) [B, D]×[D, B]-sized matmuls and
hold O(B²) floats; the accumulators are O(n·D).

Why softmax takes 1 + 3 matmuls per tile pair and sigmoid 3: the sigmoid gradient g_ij = σ(S_ij) -
δ_ij needs no global statistic, so one sweep gives the loss and both gradient sums. The softmax
gradient 2N·∂loss/∂S = P + Q - 2δ has four products, P·Y and Q·Y for dx, Pᵀ·X and Qᵀ·X for dy.
P·Y (row softmax, summed over j for fixed i) and Qᵀ·X (column softmax, summed over i for fixed j)
could be accumulated online in the LSE sweep, flash-attention style, but Q·Y needs every column's
final normaliser for every row, and Pᵀ·X every row's for every column; with the logits never
stored, those two need a second visit of every tile after the first one has finished (its logits
matmul) and two products there, and the products P·Y and Qᵀ·X are then cheaper in that visit as
part of (P + Q - 2δ)·Y and its transpose. So 1 (LSE) + 3 (logits, dx, dy) is the fewest matmuls
for exact softmax gradients in O(n·D + B²) memory. Each sweep runs inside a ``jax.named_scope`` that
names it and its block size, so it can be found in profiles.

References:
  Cheng et al. 2024, "Breaking the Memory Barrier: Near Infinite Batch Size Scaling for Contrastive
    Loss" (Inf-CL), section 3: tile-wise log-sum-exp and tiles recomputed in the backward pass.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32
_ROWS_BY_COLS = (((1,), (1,)), ((), ()))  # a [B, D] · b [B, D]ᵀ -> [B, B]
_MATMUL = (((1,), (0,)), ((), ()))  # g [B, B] · b [B, D] -> [B, D]
_COLS_T = (((0,), (0,)), ((), ()))  # a [B, D]ᵀ · g [B, B] -> [D, B]


class Layout(NamedTuple):
    """How n rows are cut into nb blocks of B rows (the last one padded)."""

    n: int
    block: int

    @property
    def num_blocks(self) -> int:
        return -(-self.n // self.block)

    @property
    def padded(self) -> bool:
        return self.num_blocks * self.block != self.n


def to_blocks(a: jax.Array, layout: Layout) -> jax.Array:
    """[n, ...] -> [nb, B, ...], zero-padded."""
    pad = layout.num_blocks * layout.block - layout.n
    if pad:
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    return a.reshape(layout.num_blocks, layout.block, *a.shape[1:])


def from_blocks(a: jax.Array, layout: Layout) -> jax.Array:
    """[nb, B, ...] -> [n, ...], dropping the padding."""
    return a.reshape(layout.num_blocks * layout.block, *a.shape[2:])[: layout.n]


def varying_full(value: float, shape: tuple[int, ...], ref: jax.Array) -> jax.Array:
    """A float32 constant with ref's varying mesh axes (scan carries inside shard_map need them)."""
    out = jnp.full(shape, value, _F32)
    axes = tuple(jax.typeof(ref).manual_axis_type.varying)
    return lax.pcast(out, axes, to="varying") if axes else out


def _dot(g: jax.Array, b: jax.Array) -> jax.Array:
    """g [B, B] · b [B, D] in b's dtype with float32 accumulation (as flash attention does)."""
    return lax.dot_general(g.astype(b.dtype), b, _MATMUL, preferred_element_type=_F32)


def _dot_t(g: jax.Array, a: jax.Array) -> jax.Array:
    """(g [B, B]ᵀ · a [B, D])ᵀ = aᵀ·g, [D, B], in a's dtype with float32 accumulation.

    The column sums are accumulated transposed: on CPU, contracting g's leading axis as the left
    operand runs at ~60% of the speed of this form (measured, N = 8192, B = 1024, D = 256).
    """
    return lax.dot_general(a, g.astype(a.dtype), _COLS_T, preferred_element_type=_F32)


def column_zeros(yb: jax.Array) -> jax.Array:
    """Zeros [nb, D, B]: the layout of the column (dy) accumulators, transposed blocks of y."""
    nb, bsz, d = yb.shape
    return varying_full(0.0, (nb, d, bsz), yb)


def columns_to_rows(acc_t: jax.Array) -> jax.Array:
    """[nb, D, B] column accumulators -> [nb, B, D] blocks."""
    return jnp.swapaxes(acc_t, 1, 2)


def _finite_or_zero(m: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(m), m, 0.0)


class _Tiles(NamedTuple):
    """What every sweep needs to rebuild the logits of tile (i, j)."""

    block: int
    scale: jax.Array
    bias: jax.Array
    penalty: jax.Array | None  # [nb, B]: 0 for real rows, -inf for padding; None if no padding
    mask_diagonal: bool
    home: jax.Array | bool

    def positive(self, i, j):
        """[B, B] bool: the positive pairs (the global diagonal) inside tile (i, j)."""
        shape = (self.block, self.block)
        on_diagonal = lax.broadcasted_iota(jnp.int32, shape, 0) == lax.broadcasted_iota(
            jnp.int32, shape, 1
        )
        return jnp.logical_and(jnp.logical_and(self.home, i == j), on_diagonal)

    def minus_positive(self, g, amount, i, j):
        """g - amount·δ on tile (i, j), δ the positive pairs, as arithmetic on a float identity.

        A ``where`` over a [B, B] comparison runs several times slower than a multiply-add in XLA
        on CPU (measured: 120 ms against 30 ms for a 4096² float32 array), so the gradient tiles
        subtract a scalar-weighted identity instead; the subtraction stays in float32.
        """
        on_tile = jnp.logical_and(self.home, i == j).astype(_F32)
        eye = jnp.eye(self.block, dtype=_F32)
        return g - (amount * on_tile) * eye

    def logits(self, xi, yj, i, j):
        s = lax.dot_general(xi, yj, _ROWS_BY_COLS, preferred_element_type=_F32)  # [B, B]
        s = self.scale * s + self.bias
        if self.penalty is not None:
            s = s + self.penalty[i][:, None] + self.penalty[j][None, :]
        if self.mask_diagonal:
            s = jnp.where(self.positive(i, j), -jnp.inf, s)
        return s


def _tiles(layout, scale, bias, *, mask_diagonal, home) -> _Tiles:
    penalty = None
    if layout.padded:
        valid = jnp.arange(layout.num_blocks * layout.block) < layout.n
        penalty = jnp.where(valid, 0.0, -jnp.inf).astype(_F32).reshape(layout.num_blocks, -1)
    scale, bias = scale.astype(_F32), bias.astype(_F32)
    return _Tiles(layout.block, scale, bias, penalty, mask_diagonal, home)


def lse_sweep(xb, yb, scale, bias, layout, *, mask_diagonal=False, home=True):
    """Row and column log-sum-exp of the pair's logits, online over tiles.

    Per tile, for rows (columns likewise with axis 0):
      m' = max(m, max_j S_ij);  l' = l·exp(m - m') + Σ_j exp(S_ij - m')
    and at the end lse = m + log l.

    Args:
      xb: [nb, B, D] x blocks.
      yb: [nb, B, D] y blocks.
      scale, bias: float32 scalars.
      layout: the block layout of both x and y.
      mask_diagonal: exclude the positive pairs (decoupled loss) when ``home``.
      home: whether yb is the shard paired with xb (may be traced).

    Returns:
      (row_lse, col_lse), each [nb, B] float32; -inf where a row/column has no unmasked entry.
    """
    with jax.named_scope(f"contrastive_lse_sweep_B{layout.block}"):
        return _lse_sweep(xb, yb, scale, bias, layout, mask_diagonal, home)


def _lse_sweep(xb, yb, scale, bias, layout, mask_diagonal, home):
    tiles = _tiles(layout, scale, bias, mask_diagonal=mask_diagonal, home=home)
    nb, bsz = layout.num_blocks, layout.block
    idx = jnp.arange(nb)

    def row_block(col_stats, row_in):
        xi, i = row_in

        def col_block(row_stats, col_in):
            (m_r, l_r), (yj, j, m_c, l_c) = row_stats, col_in
            s = tiles.logits(xi, yj, i, j)  # [B, B]
            m_r2 = jnp.maximum(m_r, jnp.max(s, axis=1))
            safe_r = _finite_or_zero(m_r2)
            l_r2 = l_r * jnp.exp(m_r - safe_r) + jnp.sum(jnp.exp(s - safe_r[:, None]), axis=1)
            m_c2 = jnp.maximum(m_c, jnp.max(s, axis=0))
            safe_c = _finite_or_zero(m_c2)
            l_c2 = l_c * jnp.exp(m_c - safe_c) + jnp.sum(jnp.exp(s - safe_c[None, :]), axis=0)
            return (m_r2, l_r2), (m_c2, l_c2)

        init = (varying_full(-jnp.inf, (bsz,), xi), varying_full(0.0, (bsz,), xi))
        (m_r, l_r), col_stats = lax.scan(col_block, init, (yb, idx, *col_stats))
        return col_stats, (m_r, l_r)

    init = (varying_full(-jnp.inf, (nb, bsz), yb), varying_full(0.0, (nb, bsz), yb))
    (m_c, l_c), (m_r, l_r) = lax.scan(row_block, init, (xb, idx))
    return m_r + jnp.log(l_r), m_c + jnp.log(l_c)


def softmax_grad_sweep(
    xb, yb, scale, bias, row_lse, col_lse, layout, *, mask_diagonal, home, dx_init=None
):
    """Gradient accumulators of the softmax losses over the pair's tiles.

    With P_ij = exp(S_ij - row_lse_i), Q_ij = exp(S_ij - col_lse_j) (both 0 on masked entries) and
    g_ij = P_ij + Q_ij - 2·δ_ij (δ: the positive pairs; 2N·∂loss/∂S_ij):
      dx_acc_i = dx_init_i + Σ_j g_ij·y_j,   dy_acc_j = Σ_i g_ij·x_i   (stored transposed).
    The -2·δ is subtracted in float32 before g meets the (maybe bfloat16) embeddings: for a
    confident positive P + Q ≈ 2 and the difference would be lost to rounding.

    Args:
      xb, yb: [nb, B, D] blocks; scale, bias: float32 scalars; layout: their block layout.
      row_lse: [nb, B] global log-sum-exp of the rows of xb.
      col_lse: [nb, B] global log-sum-exp of the columns of yb.
      mask_diagonal, home: as in ``lse_sweep``.
      dx_init: [nb, B, D] float32 to accumulate dx into (earlier ring steps), or None for zeros.

    Returns:
      (dx_acc [nb, B, D], dy_acc_t [nb, D, B]), float32; ``columns_to_rows`` turns dy_acc_t into
      blocks of y's layout (once, after the last ring step).
    """
    with jax.named_scope(f"contrastive_softmax_grad_sweep_B{layout.block}"):
        return _softmax_grad_sweep(
            xb, yb, scale, bias, row_lse, col_lse, layout, mask_diagonal, home, dx_init
        )


def _softmax_grad_sweep(
    xb, yb, scale, bias, row_lse, col_lse, layout, mask_diagonal, home, dx_init
):
    tiles = _tiles(layout, scale, bias, mask_diagonal=mask_diagonal, home=home)
    # A padded row has lse -inf and logits -inf; any finite lse makes its exp 0 rather than nan.
    row_lse, col_lse = _finite_or_zero(row_lse), _finite_or_zero(col_lse)
    idx = jnp.arange(xb.shape[0])
    if dx_init is None:
        dx_init = varying_full(0.0, xb.shape, xb)

    def row_block(dy_acc, row_in):
        xi, i, r_i, dx_i = row_in

        def col_block(dx_i, col_in):
            yj, j, c_j, dy_j = col_in
            s = tiles.logits(xi, yj, i, j)  # [B, B]
            g = jnp.exp(s - r_i[:, None]) + jnp.exp(s - c_j[None, :])
            g = tiles.minus_positive(g, 2.0, i, j)  # [B, B]
            return dx_i + _dot(g, yj), dy_j + _dot_t(g, xi)

        dx_i, dy_acc = lax.scan(col_block, dx_i, (yb, idx, col_lse, dy_acc))
        return dy_acc, dx_i

    dy_acc_t, dx_acc = lax.scan(row_block, column_zeros(yb), (xb, idx, row_lse, dx_init))
    return dx_acc, dy_acc_t


class SigmoidSweep(NamedTuple):
    """Per-row loss sums and (optionally) gradient accumulators of the sigmoid loss."""

    row_loss: jax.Array  # [nb, B]: Σ_j softplus(S_ij)
    dx_acc: jax.Array | None  # [nb, B, D]: Σ_j (σ(S_ij) - δ_ij)·y_j
    dy_acc_t: jax.Array | None  # [nb, D, B]: Σ_i (σ(S_ij) - δ_ij)·x_i, transposed
    sigma_sum: jax.Array | None  # [nb, B]: Σ_j (σ(S_ij) - δ_ij)


def sigmoid_sweep(
    xb, yb, scale, bias, layout, *, with_grad: bool, home=True, dx_init=None
) -> SigmoidSweep:
    """Sigmoid-loss sums over the pair's tiles, treating every pair as a negative.

    softplus(S) = -log σ(-S) is the loss of a negative pair; the caller turns the positives around
    with softplus(-S_ii) = softplus(S_ii) - S_ii. softplus(S) = max(S, 0) + log1p(exp(-|S|)), and σ
    is ``lax.logistic`` (as accurate as e/(1 + e) with e = exp(-|S|) chosen by the sign of S, and
    on CPU about 4x faster than that select-and-divide form, which cost about as much per tile as a
    matmul).
    The gradient N·∂loss/∂S_ij = σ(S_ij) - δ_ij takes its -δ in float32 inside the tile.

    Args:
      xb, yb: [nb, B, D] blocks; scale, bias: float32 scalars; layout: their block layout.
      with_grad: also accumulate the gradient sums (which need no global statistic).
      home: whether yb is the shard paired with xb (may be traced).
      dx_init: [nb, B, D] float32 to accumulate Σ σ·y into (earlier ring steps), or None for zeros.

    Returns:
      A ``SigmoidSweep``; its gradient fields are None without ``with_grad``.
    """
    with jax.named_scope(f"contrastive_sigmoid_sweep_B{layout.block}"):
        return _sigmoid_sweep(xb, yb, scale, bias, layout, with_grad, home, dx_init)


def _sigmoid_sweep(xb, yb, scale, bias, layout, with_grad, home, dx_init):
    tiles = _tiles(layout, scale, bias, mask_diagonal=False, home=home)
    idx = jnp.arange(xb.shape[0])
    bsz = layout.block

    def tile_loss(xi, yj, i, j):
        s = tiles.logits(xi, yj, i, j)  # [B, B]
        e = jnp.exp(-jnp.abs(s))
        return s, e, jnp.sum(jnp.maximum(s, 0.0) + jnp.log1p(e), axis=1)

    def row_block(dy_acc, row_in):
        xi, i, dx_i = row_in

        def col_block_loss(loss_i, col_in):
            yj, j = col_in
            return loss_i + tile_loss(xi, yj, i, j)[2], None

        def col_block_grad(carry, col_in):
            loss_i, dx_i, sig_i = carry
            yj, j, dy_j = col_in
            s, _, loss_ij = tile_loss(xi, yj, i, j)
            sig = tiles.minus_positive(lax.logistic(s), 1.0, i, j)  # [B, B]
            dx_i = dx_i + _dot(sig, yj)
            dy_j = dy_j + _dot_t(sig, xi)
            return (loss_i + loss_ij, dx_i, sig_i + jnp.sum(sig, axis=1)), dy_j

        zeros_b = varying_full(0.0, (bsz,), xi)
        if not with_grad:
            loss_i, _ = lax.scan(col_block_loss, zeros_b, (yb, idx))
            return dy_acc, (loss_i, None, None)
        init = (zeros_b, dx_i, zeros_b)
        carry, dy_acc = lax.scan(col_block_grad, init, (yb, idx, dy_acc))
        return dy_acc, carry

    dy_init, dx_blocks = None, None
    if with_grad:
        dy_init = column_zeros(yb)
        dx_blocks = varying_full(0.0, xb.shape, xb) if dx_init is None else dx_init
    dy_acc_t, (row_loss, dx_acc, sigma_sum) = lax.scan(row_block, dy_init, (xb, idx, dx_blocks))
    return SigmoidSweep(row_loss, dx_acc, dy_acc_t, sigma_sum)
