"""The plain contrastive losses: the whole logit matrix in memory, the oracle for every other path.

logits = logit_scale·x·yᵀ + logit_bias, in float32 at Precision.HIGHEST whatever the input dtype.
Gradients come from JAX autodiff. Inside ``shard_map`` (``axis_name`` set) each device gathers x and
y over the axis and computes the loss terms of its own rows and columns against the whole batch
([N_local, N_global] logits), then the terms are summed with ``psum``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# The loss kinds every implementation (reference, XLA tiles, device ring, Pallas kernels) accepts;
# defined here, beside the oracle, and imported by every other module that needs them.
KINDS = ("softmax", "sigmoid", "decoupled")


def reference_loss(
    x: jax.Array,
    y: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array | None,
    *,
    kind: str,
    axis_name: str | None = None,
) -> jax.Array:
    """Contrastive loss with the full logit matrix; see ``contrastive_loss`` for the equations.

    Args:
      x: [n, D] embeddings of the first modality (rows).
      y: [n, D] embeddings of the second modality (columns).
      logit_scale: scalar multiplier of the logits.
      logit_bias: scalar added to the logits, or None.
      kind: 'softmax' (CLIP), 'sigmoid' (SigLIP) or 'decoupled' (DCL).
      axis_name: mesh axis the batch is sharded over inside ``shard_map``, or None.

    Returns:
      The scalar loss over the global batch, in x's dtype.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    hi = lax.Precision.HIGHEST
    f32 = jnp.float32
    n = x.shape[0]
    x32, y32 = x.astype(f32), y.astype(f32)
    scale = jnp.asarray(logit_scale, f32)
    bias = jnp.zeros((), f32) if logit_bias is None else jnp.asarray(logit_bias, f32)
    if axis_name is None:
        offset, n_global = 0, n
        rows = scale * jnp.dot(x32, y32.T, precision=hi) + bias  # [n, n]
        cols = rows
    else:
        offset = lax.axis_index(axis_name) * n
        n_global = n * lax.axis_size(axis_name)
        x_all = lax.all_gather(x32, axis_name, tiled=True)  # [N, D]
        y_all = lax.all_gather(y32, axis_name, tiled=True)  # [N, D]
        rows = scale * jnp.dot(x32, y_all.T, precision=hi) + bias  # [n, N]: local rows
        cols = scale * jnp.dot(x_all, y32.T, precision=hi) + bias  # [N, n]: local columns
    # Local row i is paired with local column i: global column offset + i.
    diag = scale * jnp.sum(x32 * y32, axis=1) + bias  # [n]

    def positive():  # [n, N]: built only for the kinds that mask the positive pairs
        return jnp.arange(n_global)[None, :] == offset + jnp.arange(n)[:, None]

    if kind == "softmax":
        row_ce = jax.nn.logsumexp(rows, axis=1) - diag
        col_ce = jax.nn.logsumexp(cols, axis=0) - diag
        local = (jnp.sum(row_ce) + jnp.sum(col_ce)) / (2 * n_global)
    elif kind == "decoupled":
        row_ce = jax.nn.logsumexp(jnp.where(positive(), -jnp.inf, rows), axis=1) - diag
        col_ce = jax.nn.logsumexp(jnp.where(positive().T, -jnp.inf, cols), axis=0) - diag
        local = (jnp.sum(row_ce) + jnp.sum(col_ce)) / (2 * n_global)
    elif kind == "sigmoid":
        z = jnp.where(positive(), 1.0, -1.0)
        local = -jnp.sum(jax.nn.log_sigmoid(z * rows)) / n_global
    else:
        raise AssertionError(kind)  # unreachable: checked above
    loss = local if axis_name is None else lax.psum(local, axis_name)
    return loss.astype(x.dtype)
