"""Public entry of the Pallas linear cross-entropy kernels: validation, dispatch, custom_vjp.

For h [T, D], w [D, V], labels y [T] and the counted tokens M (label in [0, V), not ignored):

  loss = (1/|M|) Σ_{t∈M} [ lse_t − z_t ],   lse_t = log Σ_v exp(h_t·w_v),   z_t = h_t·w_{y_t}

The forward kernel (tpu.py / gpu.py) returns only the two O(T) vectors lse and z; the mean is
formed in XLA. Their custom VJP takes any cotangents (g_lse, g_z) [T] of the two vectors, so
that the mean, a sum, or a psum across devices around it all differentiate through one rule:

  G_tv = g_lse_t · softmax_tv + g_z_t · [v = y_t],   dh = G·wᵀ,   dw = hᵀ·G

(for the mean, g_lse = m/|M| and g_z = −m/|M|: G = (softmax − onehot)·m/|M|, 0 on rows not
counted). Two backward kernels recompute the logits tiles, one reducing over the vocabulary for
dh, one over the tokens for dwᵀ; both accumulate in f32 whatever the input dtype. Residuals:
the padded inputs, the labels and lse [T]; the [T, V] logits are never stored.

Custom calls per program: the value alone 1 kernel (forward); value and gradient 3 (forward,
dh, dw). Memory beyond inputs and gradients: O(T + the padding copies of h and w) in XLA, plus
one tile per program on chip.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxbatch.losses.linear_cross_entropy import check_inputs, label_mask
from pallas_kernels._common import kernel_family
from pallas_kernels.cross_entropy import _common, gpu, tpu
from pallas_kernels.cross_entropy._common import BlockSizes, Plan

_KERNELS = {"tpu": tpu, "gpu": gpu}


def linear_cross_entropy(
    h: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Mean cross-entropy of softmax(h·w) against ``labels`` with fused Pallas kernels.

    Same value, gradients and label rules as ``jaxbatch.losses.linear_cross_entropy``
    (concrete out-of-range labels raise; traced ones make the loss and gradients NaN), on one
    device; that function is the entry to use in a model (it also handles ``axis_name``).

    References:
      Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", Sec. 4
        (blockwise logits with the log-sum-exp kept on chip; recomputing backward).
      Dao et al. 2022, "FlashAttention", Algorithm 1 (online softmax statistics).

    Args:
      h: [T, D] hidden states (float32, bfloat16 or float16).
      w: [D, V] output kernel of the same dtype.
      labels: int [T] in [0, V), or ``ignore_index`` for tokens that do not count.
      ignore_index: label value of the tokens left out of the mean.
      block_sizes: a `BlockSizes`, or None for `BlockSizes.get_default`.
      backend: 'tpu', 'gpu' (also 'cuda'/'rocm') or 'cpu'; None means ``jax.default_backend()``.
        'cpu' runs the TPU kernels and requires interpret mode.
      interpret: run the kernels in the Pallas interpreter; None means True exactly when
        ``jax.default_backend()`` is 'cpu'. Pass False to lower for a TPU/GPU from a CPU host.

    Returns:
      The f32 scalar mean over counted tokens (0 if none counts); differentiable w.r.t. h and w
      (gradients in their dtypes, accumulated in f32).

    Raises:
      ValueError, TypeError: malformed input (as ``jaxbatch.losses.linear_cross_entropy``).
      NotImplementedError: input the kernels do not handle (dtype, backend, tiles that break the
        target's tiling rules or its VMEM budget); a dispatcher should fall back to XLA.
    """
    h, w, labels = check_inputs(h, w, labels, ignore_index)
    valid, poison = label_mask(labels, w.shape[1], ignore_index)
    t, d = h.shape
    shape_plan = resolve_plan(
        t,
        d,
        w.shape[1],
        h.dtype,
        block_sizes,
        backend=backend,
        interpret=interpret,
        w_dtype=w.dtype,
    )
    loss = masked_loss(h, w, labels, valid, shape_plan)
    return loss if poison is None else loss * poison.astype(loss.dtype)


def resolve_plan(
    t: int,
    d: int,
    v: int,
    dtype,
    block_sizes: BlockSizes | None = None,
    *,
    backend: str | None = None,
    interpret: bool | None = None,
    w_dtype=None,
) -> Plan:
    """The static plan of a [t, d] × [d, v] problem: kernel family, interpret mode, legal tiles.

    Args as in `linear_cross_entropy`; ``dtype`` is h's, ``w_dtype`` w's (default: the same).

    Raises:
      ValueError: block_sizes that is not a BlockSizes.
      NotImplementedError: a dtype or backend without kernels, 'cpu' without interpret mode,
        tiles that break the target's tiling rules or exceed its VMEM budget.
    """
    dtype = jnp.dtype(dtype)
    w_dtype = dtype if w_dtype is None else jnp.dtype(w_dtype)
    _common.check_supported_dtype(dtype)
    if w_dtype != dtype:
        raise NotImplementedError(f"h and w must share a dtype, got {dtype} and {w_dtype}")
    family, interpret = kernel_family("cross-entropy", backend, interpret)
    if block_sizes is None:
        block_sizes = BlockSizes.get_default(family, t, d, v, dtype)
    elif not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a BlockSizes or None, got {block_sizes!r}")
    try:
        return _common.plan(t, d, v, dtype, block_sizes, family, bool(interpret))
    except ValueError as err:
        raise NotImplementedError(str(err)) from err


@functools.partial(jax.jit, static_argnames=("plan",))
def masked_loss(h, w, labels, valid, plan: Plan) -> jax.Array:
    """Mean of lse − z over ``valid`` tokens (validated inputs; ``labels`` in range where valid).

    Args:
      h: [T, D]; w: [D, V] (same dtype); labels: int [T]; valid: bool [T], the counted tokens.
      plan: from `resolve_plan` for these shapes.
    """
    t, d = h.shape
    v = w.shape[1]
    if (t, v) != (plan.t, plan.v) or d > plan.d_pad:
        raise ValueError(f"h {h.shape}, w {w.shape} do not fit the plan {plan}")
    h_pad = jnp.pad(h, ((0, plan.t_pad - t), (0, plan.d_pad - d)))  # [t_pad, d_pad]
    w_pad = jnp.pad(w, ((0, plan.d_pad - d), (0, plan.v_pad - v)))  # [d_pad, v_pad]
    y = jnp.where(valid, labels, -1).astype(jnp.int32)  # −1 matches no vocabulary column
    y_pad = jnp.pad(y, (0, plan.t_pad - t), constant_values=-1)  # [t_pad]
    lse, target = _lse_and_target(plan, h_pad, w_pad, y_pad)  # [t_pad] each
    per_token = jnp.where(valid, lse[:t] - target[:t], 0.0)
    return jnp.sum(per_token) / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lse_and_target(plan, h, w, labels):
    """(lse_t, z_t = logit of y_t; 0 where y_t = −1), each [t_pad] f32, for padded inputs."""
    return _KERNELS[plan.backend].forward(h, w, labels, plan)


def _lse_and_target_fwd(plan, h, w, labels):
    lse, target = _KERNELS[plan.backend].forward(h, w, labels, plan)
    return (lse, target), (h, w, labels, lse)


def _lse_and_target_bwd(plan, residuals, cotangents):
    h, w, labels, lse = residuals
    g_lse, g_target = (c.astype(jnp.float32) for c in cotangents)  # [t_pad] each
    kernels = _KERNELS[plan.backend]
    dh = kernels.grad_h(h, w, labels, lse, g_lse, g_target, plan)  # [t_pad, d_pad] f32
    dwt = kernels.grad_w(h, w, labels, lse, g_lse, g_target, plan)  # [v_pad, d_pad] f32
    return dh.astype(h.dtype), dwt.T.astype(w.dtype), None


_lse_and_target.defvjp(_lse_and_target_fwd, _lse_and_target_bwd)
