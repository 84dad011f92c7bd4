"""Public entry of the Pallas contrastive-loss kernels: validation, backend dispatch, custom_vjp.

The kernels (tpu.py, gpu.py) produce O(N) per-row statistics of L = s·x·yᵀ + b tile by tile; this
module turns them into the loss and wires the recomputing backward pass:

  softmax/decoupled: forward saves lse_rows [N] and lse_cols [N]; the loss
    ½·mean(lse_rows − diag) + ½·mean(lse_cols − diag) is formed in XLA from O(N) vectors, so any
    cotangent (g_rows, g_cols) of the two LSE vectors is handled by one VJP:
      G_ij = g_i·exp(L_ij − lse_rows_i) + h_j·exp(L_ij − lse_cols_j)
  sigmoid: forward returns Σ_ij softplus(−z_ij·L_ij); its VJP has G_ij = g·(σ(L_ij) − [i = j]).

Then dx = s·G·y, dy = s·Gᵀ·x, ds = Σ_ij G_ij·(x_i·y_j) = Σ_i x_i·(G·y)_i, db = Σ_ij G_ij. The
kernels return u = G·y (and Gᵀ·x from the swapped call) in f32, never G itself.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxbatch.losses._contrastive_reference import KINDS
from pallas_kernels._common import kernel_family
from pallas_kernels.contrastive import _common, gpu, tpu
from pallas_kernels.contrastive._common import BlockSizes, Plan

_KERNELS = {"tpu": tpu, "gpu": gpu}


def contrastive_loss(
    x: jax.Array,
    y: jax.Array,
    logit_scale: jax.Array | float,
    logit_bias: jax.Array | float | None = None,
    *,
    kind: str = "softmax",
    block_size: int | BlockSizes | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Contrastive loss of paired embeddings with fused Pallas tile kernels, never forming N×N.

    L = s · x · yᵀ + b with s = ``logit_scale`` (already exponentiated), b = ``logit_bias``.

      softmax:   ½ (1/N) Σ_i [lse_j L_ij − L_ii] + ½ (1/N) Σ_j [lse_i L_ij − L_jj]     (CLIP)
      sigmoid:   −(1/N) Σ_ij log σ(z_ij · L_ij),  z_ij = +1 if i = j else −1          (SigLIP)
      decoupled: softmax with the positive pair left out of both denominators         (DCL)

    Forward: two tile sweeps (rows of L, then rows of Lᵀ) with online log-sum-exp; residuals are the
    inputs plus two f32 vectors of length N. Backward: two recomputing sweeps giving G·y and Gᵀ·x.
    Memory beyond inputs and gradients is O(N·D); 16-bit inputs are multiplied on the MXU / tensor
    cores with f32 accumulation.

    References:
      Cheng et al. 2024, "Breaking the Memory Barrier: Near Infinite Batch Size Scaling for
        Contrastive Loss" (Inf-CL), Sec. 3 (tile-wise LSE and recomputing backward).
      Radford et al., 2021, "Learning Transferable Visual Models From Natural Language
        Supervision" (CLIP), Figure 3.
      Zhai et al., 2023, "Sigmoid Loss for Language Image Pre-Training" (SigLIP), Eq. 1.
      Yeh et al., 2022, "Decoupled Contrastive Learning", Sec. 3 (the DCL loss L_DC).

    Args:
      x: [N, D] embeddings (f32, bf16 or f16), not normalised here.
      y: [N, D] embeddings of the same dtype; row i of x and y is a positive pair.
      logit_scale: scalar multiplier of the similarities.
      logit_bias: optional scalar added to every logit.
      kind: 'softmax', 'sigmoid' or 'decoupled'.
      block_size: an int (square tiles), a `BlockSizes`, or None for `BlockSizes.get_default`.
      backend: 'tpu', 'gpu' (also 'cuda'/'rocm') or 'cpu'; None means ``jax.default_backend()``.
        'cpu' runs the TPU kernels and requires interpret mode.
      interpret: run the kernels in the Pallas interpreter; None means True exactly when
        ``jax.default_backend()`` is 'cpu'. Pass False to lower for a TPU/GPU from a CPU host.

    Returns:
      The scalar loss in f32. Differentiable w.r.t. x, y, logit_scale and logit_bias.

    Raises:
      ValueError: malformed input (shapes, non-scalar scale/bias, unknown kind, block <= 0).
      NotImplementedError: input the kernels do not handle (dtype, backend, tiles that break the
        target's tiling rules); a dispatcher should fall back to another implementation.
    """
    x_arr, y_arr = jnp.asarray(x), jnp.asarray(y)
    _check_inputs(x_arr, y_arr, logit_scale, logit_bias, kind)
    n, d = x_arr.shape
    shape_plan = resolve_plan(kind, n, d, x_arr.dtype, block_size, backend, interpret)
    scale = jnp.asarray(logit_scale, jnp.float32)
    bias = (
        jnp.zeros((), jnp.float32) if logit_bias is None else jnp.asarray(logit_bias, jnp.float32)
    )
    return _loss(x_arr, y_arr, scale, bias, shape_plan)


def resolve_plan(
    kind: str,
    n: int,
    d: int,
    dtype,
    block_size: int | BlockSizes | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> Plan:
    """The static plan of an [n, d] problem: kernel family, interpret mode, padded legal tiles.

    Args and defaults as in `contrastive_loss` (n, d, dtype describe x and y).

    Raises:
      ValueError: a malformed block_size.
      NotImplementedError: a backend without kernels, 'cpu' without interpret mode, or tiles that
        break the target's tiling rules.
    """
    family, interpret = kernel_family("contrastive", backend, interpret)
    blocks = _block_sizes(block_size, family, n, d, dtype)
    try:
        return _common.plan(kind, n, d, dtype, blocks, family, interpret)
    except ValueError as err:
        raise NotImplementedError(str(err)) from err


def _check_inputs(x, y, logit_scale, logit_bias, kind) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"x and y must be [N, D] arrays, got shapes {x.shape} and {y.shape}")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same [N, D] shape, got {x.shape} and {y.shape}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"x and y need N >= 1 and D >= 1, got shape {x.shape}")
    if np.ndim(logit_scale) != 0:
        raise ValueError(f"logit_scale must be a scalar, got shape {np.shape(logit_scale)}")
    if logit_bias is not None and np.ndim(logit_bias) != 0:
        raise ValueError(f"logit_bias must be a scalar or None, got shape {np.shape(logit_bias)}")
    if x.dtype != y.dtype:
        raise NotImplementedError(f"x and y must share a dtype, got {x.dtype} and {y.dtype}")
    _common.check_supported_dtype(x.dtype)


def _block_sizes(block_size, family: str, n: int, d: int, dtype) -> BlockSizes:
    if block_size is None:
        return BlockSizes.get_default(family, n, d, dtype)
    if isinstance(block_size, BlockSizes):
        return block_size
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer):
        raise ValueError(
            f"block_size must be a positive int, a BlockSizes or None, got {block_size!r}"
        )
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return BlockSizes(int(block_size), int(block_size))


@functools.partial(jax.jit, static_argnames=("plan",))
def _loss(x, y, scale, bias, plan: Plan):
    n, d = x.shape
    pad = ((0, plan.n_pad - n), (0, plan.d_pad - d))
    x_pad, y_pad = jnp.pad(x, pad), jnp.pad(y, pad)  # [n_pad, d_pad]
    if plan.kind == "sigmoid":
        return _sigmoid_total(plan, x_pad, y_pad, scale, bias) / n
    lse_rows, lse_cols = _lse_pair(plan, x_pad, y_pad, scale, bias)  # [n_pad] each
    x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
    diag = scale * jnp.sum(x32 * y32, axis=1) + bias  # [N]: the positive logits L_ii
    return 0.5 * (jnp.mean(lse_rows[:n] - diag) + jnp.mean(lse_cols[:n] - diag))


def _scalars(scale, bias, g=0.0):
    """f32[4] = (s, bias, g, 0), the kernels' scalar operand (Triton blocks are powers of two)."""
    zero = jnp.zeros((), jnp.float32)
    return jnp.stack([scale, bias, jnp.asarray(g, jnp.float32), zero])


def _param_grads(x, y, scale, u_x, u_y, gsum):
    """(dx, dy, ds, db) from u_x = G·y, u_y = Gᵀ·x and the row sums of G."""
    dx = (scale * u_x).astype(x.dtype)
    dy = (scale * u_y).astype(y.dtype)
    dscale = jnp.sum(x.astype(jnp.float32) * u_x)
    return dx, dy, dscale, jnp.sum(gsum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lse_pair(plan, x, y, scale, bias):
    """(lse_j L_ij, lse_i L_ij) over the kept entries, each [n_pad] f32 (padding rows: garbage)."""
    return _lse_pair_fwd(plan, x, y, scale, bias)[0]


def _lse_pair_fwd(plan, x, y, scale, bias):
    kernels = _KERNELS[plan.backend]
    scalars = _scalars(scale, bias)
    lse_rows = kernels.row_stats(x, y, scalars, plan)  # [n_pad]
    lse_cols = kernels.row_stats(y, x, scalars, plan)  # [n_pad]: rows of Lᵀ
    return (lse_rows, lse_cols), (x, y, scale, bias, lse_rows, lse_cols)


def _lse_pair_bwd(plan, residuals, cotangents):
    x, y, scale, bias, lse_rows, lse_cols = residuals
    g_rows, g_cols = cotangents  # [n_pad] each
    kernels = _KERNELS[plan.backend]
    scalars = _scalars(scale, bias)
    u_x, gsum = kernels.row_grads(x, y, scalars, plan, (lse_rows, g_rows, lse_cols, g_cols))
    u_y, _ = kernels.row_grads(y, x, scalars, plan, (lse_cols, g_cols, lse_rows, g_rows))
    return _param_grads(x, y, scale, u_x, u_y, gsum)


_lse_pair.defvjp(_lse_pair_fwd, _lse_pair_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sigmoid_total(plan, x, y, scale, bias):
    """Σ_ij softplus(−z_ij·L_ij) over the valid N×N entries, a f32 scalar."""
    return _sigmoid_total_fwd(plan, x, y, scale, bias)[0]


def _sigmoid_total_fwd(plan, x, y, scale, bias):
    rows = _KERNELS[plan.backend].row_stats(x, y, _scalars(scale, bias), plan)  # [n_pad]
    return jnp.sum(rows), (x, y, scale, bias)


def _sigmoid_total_bwd(plan, residuals, g):
    x, y, scale, bias = residuals
    kernels = _KERNELS[plan.backend]
    scalars = _scalars(scale, bias, g)
    u_x, gsum = kernels.row_grads(x, y, scalars, plan)
    u_y, _ = kernels.row_grads(y, x, scalars, plan)
    return _param_grads(x, y, scale, u_x, u_y, gsum)


_sigmoid_total.defvjp(_sigmoid_total_fwd, _sigmoid_total_bwd)
