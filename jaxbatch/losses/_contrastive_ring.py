"""Tiled contrastive loss with a custom VJP, on one device or around a ring of devices.

Each device keeps its x shard; y shards travel around the ring (device d sends to d + 1) so that at
step k device d sweeps the tiles of its x against the y shard of device d - k. A single device is a
ring of one. What travels with y (``lax.ppermute``):

- forward, softmax/decoupled: the column log-sum-exp partials of the travelling block; each device
  adds its sweep and passes them on, and after P steps (one more hop than y makes) they arrive home.
- backward, softmax/decoupled: y, its global column LSE and the dy accumulator; dy arrives home
  after a full revolution.
- sigmoid: the gradient needs no global statistic, so the VJP's forward sweep also accumulates the
  gradients (3 matmuls per tile instead of 1 + 3) with dy travelling; the backward only scales them.

Overlap: the next y is sent before the sweep on the current one, and what a sweep adds to a
travelling accumulator is added to the *received* value only after the sweep, so every transfer
runs while a sweep computes. y is not sent after the last step.

Residuals: x, y, scale, bias and O(n) statistics (row LSE of local rows, column LSE of local
columns) for softmax/decoupled; the float32 gradients of x and y for sigmoid. Per device the memory
is O(n_local·D + B²), never O(n_local·N): about 7 float32 [n_local, D] buffers at the peak of the
ring backward (y and the next y, dy received and sent, dx, residuals).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbatch.losses import _contrastive_tiled as tiled

_F32 = jnp.float32


class _Ring(NamedTuple):
    """The mesh axis the batch is sharded over; axis_name None is a ring of one device."""

    axis_name: str | None

    @property
    def size(self) -> int:
        return 1 if self.axis_name is None else lax.axis_size(self.axis_name)

    def shift(self, tree):
        """Sends every leaf from device d to device d + 1."""
        if self.axis_name is None:
            return tree
        perm = [(d, (d + 1) % self.size) for d in range(self.size)]
        return lax.ppermute(tree, self.axis_name, perm)

    def sum(self, v):
        return v if self.axis_name is None else lax.psum(v, self.axis_name)

    def reduce_like(self, v, primal):
        """Cotangent of a scalar used by every device: summed unless it varies over the axis."""
        if self.axis_name is None or self.axis_name in jax.typeof(primal).manual_axis_type.varying:
            return v
        return lax.psum(v, self.axis_name)


def _run(ring: _Ring, step, carry):
    """Runs step(k, carry, send) for k = 0..P-1; the last step does not send y."""
    size = ring.size
    if size > 1:
        carry = lax.fori_loop(0, size - 1, functools.partial(step, send=True), carry)
    return step(size - 1, carry, send=False)


def _flat(a: jax.Array, n: int) -> jax.Array:
    return a.reshape(-1)[:n]


def _diag(x, y, scale, bias):
    """Logits of the positive pairs, [n]: scale·x_i·y_i + bias."""
    return scale * jnp.sum(x.astype(_F32) * y.astype(_F32), axis=1) + bias


def _softmax_stats(x, y, scale, bias, kind, block, ring):
    """Forward ring: (loss, row_lse [nb, B], col_lse [nb, B]) for softmax/decoupled."""
    n = x.shape[0]
    layout = tiled.Layout(n, block)
    xb, yb = tiled.to_blocks(x, layout), tiled.to_blocks(y, layout)
    mask = kind == "decoupled"

    def step(k, carry, send):
        y_cur, col_in, row_lse = carry
        y_next = ring.shift(y_cur) if send else y_cur
        r, c = tiled.lse_sweep(xb, y_cur, scale, bias, layout, mask_diagonal=mask, home=k == 0)
        # col_in was sent during the previous step; it is needed only now, after the sweep.
        return y_next, ring.shift(jnp.logaddexp(col_in, c)), jnp.logaddexp(row_lse, r)

    empty = tiled.varying_full(-jnp.inf, (layout.num_blocks, block), xb)
    _, col_lse, row_lse = _run(ring, step, (yb, empty, empty))
    n_global = n * ring.size
    total = jnp.sum(_flat(row_lse, n)) + jnp.sum(_flat(col_lse, n))
    local = total / (2 * n_global) - jnp.sum(_diag(x, y, scale, bias)) / n_global
    return ring.sum(local), row_lse, col_lse


def _softmax_grads(x, y, scale, bias, row_lse, col_lse, kind, block, ring):
    """Backward ring for softmax/decoupled: (dx_raw, dy_raw, ds) with G = ∂loss/∂logits and
    dx_raw = G·y, dy_raw = Gᵀ·x (without the scale), ds = Σ G_ij x_i·y_j."""
    n = x.shape[0]
    layout = tiled.Layout(n, block)
    xb, yb = tiled.to_blocks(x, layout), tiled.to_blocks(y, layout)
    mask = kind == "decoupled"

    def step(k, carry, send):
        y_cur, c_cur, dy_in, dx_acc = carry
        y_next, c_next = ring.shift((y_cur, c_cur)) if send else (y_cur, c_cur)
        dx_acc, dy_acc = tiled.softmax_grad_sweep(
            xb, y_cur, scale, bias, row_lse, c_cur, layout,
            mask_diagonal=mask, home=k == 0, dx_init=dx_acc,
        )  # fmt: skip
        return y_next, c_next, ring.shift(dy_in + dy_acc), dx_acc

    zeros = tiled.varying_full(0.0, xb.shape, xb)
    init = (yb, col_lse, tiled.column_zeros(yb), zeros)
    _, _, dy_acc_t, dx_acc = _run(ring, step, init)
    dy_acc = tiled.columns_to_rows(dy_acc_t)
    n_global = n * ring.size
    # G_ij = (P_ij + Q_ij - 2·δ_ij) / 2N.
    dx_raw = tiled.from_blocks(dx_acc, layout) / (2 * n_global)
    dy_raw = tiled.from_blocks(dy_acc, layout) / (2 * n_global)
    ds = jnp.sum(x.astype(_F32) * dx_raw)
    return dx_raw, dy_raw, ds


def _sigmoid(x, y, scale, bias, block, ring, *, with_grad):
    """Sigmoid ring: loss, and with_grad (dx_raw, dy_raw, ds, db) with G_ij = (σ(S_ij) - δ_ij)/N."""
    n = x.shape[0]
    layout = tiled.Layout(n, block)
    xb, yb = tiled.to_blocks(x, layout), tiled.to_blocks(y, layout)

    def step(k, carry, send):
        y_cur, dy_in, rows, dx_acc, sig = carry
        y_next = ring.shift(y_cur) if send else y_cur
        sw = tiled.sigmoid_sweep(
            xb, y_cur, scale, bias, layout, with_grad=with_grad, home=k == 0, dx_init=dx_acc
        )
        if not with_grad:
            return y_next, None, rows + sw.row_loss, None, None
        return (
            y_next,
            ring.shift(dy_in + sw.dy_acc_t),
            rows + sw.row_loss,
            sw.dx_acc,
            sig + sw.sigma_sum,
        )

    rows0 = tiled.varying_full(0.0, (layout.num_blocks, block), xb)
    carry = (yb, None, rows0, None, None)
    if with_grad:
        carry = (yb, tiled.column_zeros(yb), rows0, tiled.varying_full(0.0, xb.shape, xb), rows0)
    _, dy_acc_t, rows, dx_acc, sig = _run(ring, step, carry)
    n_global = n * ring.size
    # softplus(-S_ii) = softplus(S_ii) - S_ii turns the sweep's negative-pair term into a positive.
    loss = ring.sum((jnp.sum(_flat(rows, n)) - jnp.sum(_diag(x, y, scale, bias))) / n_global)
    if not with_grad:
        return loss, None
    dx_raw = tiled.from_blocks(dx_acc, layout) / n_global
    dy_raw = tiled.from_blocks(tiled.columns_to_rows(dy_acc_t), layout) / n_global
    ds = jnp.sum(x.astype(_F32) * dx_raw)
    db = jnp.sum(_flat(sig, n)) / n_global
    return loss, (dx_raw, dy_raw, ds, db)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def tiled_loss(x, y, scale, bias, kind, block, axis_name):
    """Tiled contrastive loss (float32 scalar); see ``contrastive_loss`` for the equations.

    Args:
      x, y: [n, D] local shards (the whole batch without axis_name).
      scale, bias: float32 scalars (bias 0 when the caller has none).
      kind: 'softmax', 'sigmoid' or 'decoupled'.
      block: tile size B (rows and columns).
      axis_name: mesh axis of the ring inside ``shard_map``, or None.

    Returns:
      The loss over the global batch, float32.
    """
    ring = _Ring(axis_name)
    if kind == "sigmoid":
        return _sigmoid(x, y, scale, bias, block, ring, with_grad=False)[0]
    return _softmax_stats(x, y, scale, bias, kind, block, ring)[0]


def _tiled_loss_fwd(x, y, scale, bias, kind, block, axis_name):
    ring = _Ring(axis_name)
    if kind == "sigmoid":
        loss, grads = _sigmoid(x, y, scale, bias, block, ring, with_grad=True)
        return loss, (x, y, scale, bias, grads)
    loss, row_lse, col_lse = _softmax_stats(x, y, scale, bias, kind, block, ring)
    return loss, (x, y, scale, bias, (row_lse, col_lse))


def _tiled_loss_bwd(kind, block, axis_name, res, g):
    ring = _Ring(axis_name)
    x, y, scale, bias, saved = res
    if kind == "sigmoid":
        dx_raw, dy_raw, ds, db = saved
    else:
        dx_raw, dy_raw, ds = _softmax_grads(x, y, scale, bias, *saved, kind, block, ring)
        db = jnp.zeros((), _F32)  # Σ_ij G_ij = 1/2 + 1/2 - 1 = 0: softmax is shift-invariant.
    g = g.astype(_F32)
    gs = g * scale.astype(_F32)
    return (
        (gs * dx_raw).astype(x.dtype),
        (gs * dy_raw).astype(y.dtype),
        ring.reduce_like(g * ds, scale).astype(scale.dtype),
        ring.reduce_like(g * db, bias).astype(bias.dtype),
    )


tiled_loss.defvjp(_tiled_loss_fwd, _tiled_loss_bwd)
