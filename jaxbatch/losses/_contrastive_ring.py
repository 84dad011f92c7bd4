"""Tiled contrastive loss with a custom VJP, on one device or around a ring of devices.

Each device keeps its x shard; y shards travel around the ring (device d sends to d + 1) so that at
step k device d sweeps the tiles of its x against the y shard of device d - k. A single device is a
ring of one. Step 0 sweeps the *home* block (y's shard paired with x: the positive pairs on its
diagonal), every later step an *off-home* block of negatives only.

The sweeps of one step come from a tiles object, chosen by the caller's implementation:

- ``XlaTiles``: the plain-XLA tile scans of ``_contrastive_tiled`` (home may be traced, so the
  ring is one ``fori_loop``).
- ``PallasTiles``: the Pallas TPU (Mosaic) / GPU (Triton) per-block kernels of
  ``pallas_kernels.contrastive.tiles`` (the Pallas interpreter on CPU), shards zero-padded once to
  the kernels' tiles. Their ``home`` is static, so the ring runs step 0 with the home kernels and
  the loop over the remaining steps with the off-home ones.

Both return partial statistics of the block (row and column LSE partials, gradient products) that
the ring merges in XLA. What travels with y (``lax.ppermute``):

- forward, softmax/decoupled: the column log-sum-exp partials of the travelling block; each device
  adds its sweep and passes them on, and after P steps (one more hop than y makes) they arrive home.
- backward, softmax/decoupled: y, its global column LSE and the dy accumulator; dy arrives home
  after a full revolution.
- sigmoid: the gradient needs no global statistic, so the VJP's forward sweep also accumulates the
  gradients with dy travelling (XLA tiles: 3 matmuls per tile instead of 1 + 3; Pallas: the loss
  kernel and a row- and a column-side gradient kernel); the backward only scales them.

Overlap: the next y is sent before the sweep on the current one, and what a sweep adds to a
travelling accumulator is added to the *received* value only after the sweep, so every transfer
runs while a sweep computes. y is not sent after the last step.

Residuals: x, y, scale, bias and O(n) statistics (row LSE of local rows, column LSE of local
columns) for softmax/decoupled; the float32 gradients of x and y for sigmoid. Per device the memory
is O(n_local·D + B²), never O(n_local·N): about 7 float32 [n_local, D] buffers at the peak of the
ring backward (y and the next y, dy received and sent, dx, residuals).

References:
  Cheng et al. 2024, "Breaking the Memory Barrier: Near Infinite Batch Size Scaling for Contrastive
    Loss" (Inf-CL), section 3: the ring over devices, tile statistics merged across its steps.
"""

from __future__ import annotations

import dataclasses
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


def _run(ring: _Ring, step, carry, *, static_home: bool):
    """Runs step(carry, send=, home=) for ring steps k = 0..P-1 (home: k == 0); the last step
    does not send y. With static_home, step 0 runs outside the loop with home=True."""
    size = ring.size
    if static_home:
        carry = step(carry, send=size > 1, home=True)
        if size > 2:
            off = functools.partial(step, send=True, home=False)
            carry = lax.fori_loop(1, size - 1, lambda k, c: off(c), carry)
        return carry if size == 1 else step(carry, send=False, home=False)
    if size > 1:
        carry = lax.fori_loop(0, size - 1, lambda k, c: step(c, send=True, home=k == 0), carry)
    return step(carry, send=False, home=size == 1)


def _flat(a: jax.Array, n: int) -> jax.Array:
    return a.reshape(-1)[:n]


def _diag(x, y, scale, bias):
    """Logits of the positive pairs, [n]: scale·x_i·y_i + bias."""
    return scale * jnp.sum(x.astype(_F32) * y.astype(_F32), axis=1) + bias


@dataclasses.dataclass(frozen=True)
class XlaTiles:
    """Ring sweeps from ``_contrastive_tiled``: shards as [nb, B, D] blocks, statistics [nb, B],
    column (dy) accumulators transposed [nb, D, B]. Sigmoid row sums treat every pair as a
    negative (the ring turns the positives around)."""

    layout: tiled.Layout
    mask_diagonal: bool  # decoupled: the positive pairs of the home block leave the LSEs

    static_home = False
    rows_count_positives = False

    def prepare(self, a):
        return tiled.to_blocks(a, self.layout)

    def stat_full(self, value, ref):
        return tiled.varying_full(value, (self.layout.num_blocks, self.layout.block), ref)

    def stat_rows(self, v):
        return _flat(v, self.layout.n)

    def dx_zeros(self, xs):
        return tiled.varying_full(0.0, xs.shape, xs)

    def dy_zeros(self, ys):
        return tiled.column_zeros(ys)

    def dx_rows(self, acc):
        return tiled.from_blocks(acc, self.layout)

    def dy_rows(self, acc):
        return tiled.from_blocks(tiled.columns_to_rows(acc), self.layout)

    def lse(self, xs, ys, scale, bias, home):
        mask = self.mask_diagonal
        return tiled.lse_sweep(xs, ys, scale, bias, self.layout, mask_diagonal=mask, home=home)

    def softmax_grad(self, xs, ys, scale, bias, row_lse, col_lse, home, dx_acc):
        return tiled.softmax_grad_sweep(
            xs, ys, scale, bias, row_lse, col_lse, self.layout,
            mask_diagonal=self.mask_diagonal, home=home, dx_init=dx_acc,
        )  # fmt: skip

    def sigmoid(self, xs, ys, scale, bias, home, with_grad, dx_acc):
        return tiled.sigmoid_sweep(
            xs, ys, scale, bias, self.layout, with_grad=with_grad, home=home, dx_init=dx_acc
        )


@dataclasses.dataclass(frozen=True)
class PallasTiles:
    """Ring sweeps from the Pallas per-block kernels (``pallas_kernels.contrastive.tiles``):
    shards zero-padded once to [n_pad, d_pad], statistics [n_pad]. Sigmoid row sums give the
    positives of the home block z = +1 themselves."""

    plan: object  # pallas_kernels.contrastive Plan (kind, padded sizes, tiles, backend)
    d: int  # the shards' true width

    static_home = True
    rows_count_positives = True

    def prepare(self, a):
        return _kernels().pad(a, self.plan)

    def stat_full(self, value, ref):
        return tiled.varying_full(value, (self.plan.n_pad,), ref)

    def stat_rows(self, v):
        return v[: self.plan.n]

    def dx_zeros(self, xs):
        return tiled.varying_full(0.0, xs.shape, xs)

    dy_zeros = dx_zeros

    def dx_rows(self, acc):
        return acc[: self.plan.n, : self.d]

    dy_rows = dx_rows

    def lse(self, xs, ys, scale, bias, home):
        return _kernels().block_lse(xs, ys, scale, bias, self.plan, home=home)

    def softmax_grad(self, xs, ys, scale, bias, row_lse, col_lse, home, dx_acc):
        u_x, u_y = _kernels().block_lse_grads(
            xs, ys, scale, bias, row_lse, col_lse, self.plan, home=home
        )
        return dx_acc + u_x, u_y

    def sigmoid(self, xs, ys, scale, bias, home, with_grad, dx_acc):
        kernels = _kernels()
        rows = kernels.block_sigmoid(xs, ys, scale, bias, self.plan, home=home)
        if not with_grad:
            return tiled.SigmoidSweep(rows, None, None, None)
        u_x, u_y, gsum = kernels.block_sigmoid_grads(xs, ys, scale, bias, self.plan, home=home)
        return tiled.SigmoidSweep(rows, dx_acc + u_x, u_y, gsum)


def _kernels():
    # Imported here so that jaxbatch.losses imports without the kernels package.
    from pallas_kernels.contrastive import tiles

    return tiles


def _softmax_stats(x, y, scale, bias, tiles, ring):
    """Forward ring: (loss, row_lse, col_lse) for softmax/decoupled, statistics in tiles' layout."""
    n = x.shape[0]
    xs, ys = tiles.prepare(x), tiles.prepare(y)

    def step(carry, send, home):
        y_cur, col_in, row_lse = carry
        y_next = ring.shift(y_cur) if send else y_cur
        r, c = tiles.lse(xs, y_cur, scale, bias, home)
        # col_in was sent during the previous step; it is needed only now, after the sweep.
        return y_next, ring.shift(jnp.logaddexp(col_in, c)), jnp.logaddexp(row_lse, r)

    empty = tiles.stat_full(-jnp.inf, xs)
    _, col_lse, row_lse = _run(ring, step, (ys, empty, empty), static_home=tiles.static_home)
    n_global = n * ring.size
    total = jnp.sum(tiles.stat_rows(row_lse)) + jnp.sum(tiles.stat_rows(col_lse))
    local = total / (2 * n_global) - jnp.sum(_diag(x, y, scale, bias)) / n_global
    return ring.sum(local), row_lse, col_lse


def _softmax_grads(x, y, scale, bias, row_lse, col_lse, tiles, ring):
    """Backward ring for softmax/decoupled: (dx_raw, dy_raw, ds) with G = ∂loss/∂logits and
    dx_raw = G·y, dy_raw = Gᵀ·x (without the scale), ds = Σ G_ij x_i·y_j."""
    n = x.shape[0]
    xs, ys = tiles.prepare(x), tiles.prepare(y)

    def step(carry, send, home):
        y_cur, c_cur, dy_in, dx_acc = carry
        y_next, c_next = ring.shift((y_cur, c_cur)) if send else (y_cur, c_cur)
        dx_acc, dy_acc = tiles.softmax_grad(xs, y_cur, scale, bias, row_lse, c_cur, home, dx_acc)
        return y_next, c_next, ring.shift(dy_in + dy_acc), dx_acc

    init = (ys, col_lse, tiles.dy_zeros(ys), tiles.dx_zeros(xs))
    _, _, dy_acc, dx_acc = _run(ring, step, init, static_home=tiles.static_home)
    n_global = n * ring.size
    # G_ij = (P_ij + Q_ij - 2·δ_ij) / 2N.
    dx_raw = tiles.dx_rows(dx_acc) / (2 * n_global)
    dy_raw = tiles.dy_rows(dy_acc) / (2 * n_global)
    ds = jnp.sum(x.astype(_F32) * dx_raw)
    return dx_raw, dy_raw, ds


def _sigmoid(x, y, scale, bias, tiles, ring, *, with_grad):
    """Sigmoid ring: loss, and with_grad (dx_raw, dy_raw, ds, db) with G_ij = (σ(S_ij) - δ_ij)/N."""
    n = x.shape[0]
    xs, ys = tiles.prepare(x), tiles.prepare(y)

    def step(carry, send, home):
        y_cur, dy_in, rows, dx_acc, sig = carry
        y_next = ring.shift(y_cur) if send else y_cur
        sw = tiles.sigmoid(xs, y_cur, scale, bias, home, with_grad, dx_acc)
        if not with_grad:
            return y_next, None, rows + sw.row_loss, None, None
        return (
            y_next,
            ring.shift(dy_in + sw.dy_acc_t),
            rows + sw.row_loss,
            sw.dx_acc,
            sig + sw.sigma_sum,
        )

    rows0 = tiles.stat_full(0.0, xs)
    carry = (ys, None, rows0, None, None)
    if with_grad:
        carry = (ys, tiles.dy_zeros(ys), rows0, tiles.dx_zeros(xs), rows0)
    _, dy_acc, rows, dx_acc, sig = _run(ring, step, carry, static_home=tiles.static_home)
    n_global = n * ring.size
    total = jnp.sum(tiles.stat_rows(rows))
    if not tiles.rows_count_positives:
        # softplus(-S_ii) = softplus(S_ii) - S_ii turns the sweep's negative-pair term around.
        total = total - jnp.sum(_diag(x, y, scale, bias))
    loss = ring.sum(total / n_global)
    if not with_grad:
        return loss, None
    dx_raw = tiles.dx_rows(dx_acc) / n_global
    dy_raw = tiles.dy_rows(dy_acc) / n_global
    ds = jnp.sum(x.astype(_F32) * dx_raw)
    db = jnp.sum(tiles.stat_rows(sig)) / n_global
    return loss, (dx_raw, dy_raw, ds, db)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def tiled_loss(x, y, scale, bias, kind, tiles, axis_name):
    """Tiled contrastive loss (float32 scalar); see ``contrastive_loss`` for the equations.

    Args:
      x, y: [n, D] local shards (the whole batch without axis_name).
      scale, bias: float32 scalars (bias 0 when the caller has none).
      kind: 'softmax', 'sigmoid' or 'decoupled'.
      tiles: the per-step sweeps, ``XlaTiles`` or ``PallasTiles`` (hashable, static).
      axis_name: mesh axis of the ring inside ``shard_map``, or None.

    Returns:
      The loss over the global batch, float32.
    """
    ring = _Ring(axis_name)
    if kind == "sigmoid":
        return _sigmoid(x, y, scale, bias, tiles, ring, with_grad=False)[0]
    return _softmax_stats(x, y, scale, bias, tiles, ring)[0]


def _tiled_loss_fwd(x, y, scale, bias, kind, tiles, axis_name):
    ring = _Ring(axis_name)
    if kind == "sigmoid":
        loss, grads = _sigmoid(x, y, scale, bias, tiles, ring, with_grad=True)
        return loss, (x, y, scale, bias, grads)
    loss, row_lse, col_lse = _softmax_stats(x, y, scale, bias, tiles, ring)
    return loss, (x, y, scale, bias, (row_lse, col_lse))


def _tiled_loss_bwd(kind, tiles, axis_name, res, g):
    ring = _Ring(axis_name)
    x, y, scale, bias, saved = res
    if kind == "sigmoid":
        dx_raw, dy_raw, ds, db = saved
    else:
        dx_raw, dy_raw, ds = _softmax_grads(x, y, scale, bias, *saved, tiles, ring)
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
