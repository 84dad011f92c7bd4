"""Contrastive losses at any batch size: CLIP softmax, SigLIP sigmoid and decoupled (DCL).

The public entry validates its arguments and dispatches to an implementation:

- 'reference': the whole logit matrix in memory (``_contrastive_reference``), the test oracle.
- 'xla': tiles with online log-sum-exp and a custom VJP that recomputes the tiles
  (``_contrastive_tiled``), never holding the N×N matrix; with ``axis_name`` a ``ppermute`` ring
  over the devices of a mesh axis (``_contrastive_ring``) that sweeps these XLA tiles per step.
- 'pallas': the fused kernels of ``pallas_kernels.contrastive`` (TPU Mosaic, GPU Triton; the
  interpreter on CPU): on one device its ``contrastive_loss``; with ``axis_name`` the same ring,
  each step sweeping the local x against the travelling y block with the per-block Pallas kernels
  of ``pallas_kernels.contrastive.tiles`` (home block at step 0, off-home blocks after).
- 'auto': tries ('pallas', 'xla') on TPU and GPU and 'xla' elsewhere (CPU), with or without
  ``axis_name``, moving on when an implementation raises NotImplementedError for the given inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxbatch.losses import _contrastive_tiled
from jaxbatch.losses._contrastive_reference import KINDS, reference_loss
from jaxbatch.losses._contrastive_ring import PallasTiles, XlaTiles, tiled_loss

IMPLEMENTATIONS = ("auto", "reference", "xla", "pallas")

# Tile size B of the 'xla' implementation when block_size is None. CPU: from
# `scripts/bench_contrastive.py --sweep-blocks` (one-device process, N = 8192, D = 256, median of 5
# repetitions, 2-core AMD EPYC; table in README): 512 was the fastest of 256…2048 for softmax and
# needs the least memory of the fast ones; sigmoid measured 1024 faster in one run (0.67 against
# 0.89 of the reference), within the ±0.1 the same run shows between repeated timings.
# TPU/GPU (not measured here): larger tiles keep the matrix units busy and amortise the per-tile
# loop overhead; a 2048² float32 tile is 16 MiB.
DEFAULT_BLOCK_SIZE = {"cpu": 512, "gpu": 2048, "tpu": 2048}
_ALIGN = 8  # tiles are rounded to a multiple of 8 rows when the batch is smaller than one block


def contrastive_loss(
    x: jax.Array,
    y: jax.Array,
    logit_scale: jax.Array | float,
    logit_bias: jax.Array | float | None = None,
    *,
    kind: str = "softmax",
    axis_name: str | None = None,
    block_size: int | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """Contrastive loss of paired embeddings over the (global) batch.

    With logits L = logit_scale·x·yᵀ + logit_bias ([N, N] over the global batch; the positive pairs
    are its diagonal):

      softmax:   loss = 1/(2N) Σ_i [lse_j L_ij - L_ii] + 1/(2N) Σ_j [lse_i L_ij - L_jj]
      sigmoid:   loss = -1/N Σ_i Σ_j log σ(z_ij·L_ij),  z_ij = +1 if i = j else -1
      decoupled: loss = 1/(2N) Σ_i [lse_{j≠i} L_ij - L_ii] + 1/(2N) Σ_j [lse_{i≠j} L_ij - L_jj]

    where lse is log-sum-exp. The loss does not normalise x and y. ``logit_bias`` is accepted for
    every kind; softmax and decoupled are invariant to it (its gradient is exactly 0 there).
    Gradients flow to x, y, logit_scale and logit_bias.

    Inside ``jax.shard_map`` with ``axis_name``, x and y are the local shards of a batch split over
    that mesh axis (local row i of device d pairs with local row i of y on device d) and the result,
    replicated on every device, equals the single-device loss on the concatenated batch. The 'xla'
    and 'pallas' implementations then rotate y around a ring of ``ppermute``s, holding
    O(N_local·D + B²) per device; each ring step sweeps the local x against the visiting y shard
    with XLA tiles ('xla') or with the per-block Pallas kernels ('pallas').

    References:
      Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
        Supervision" (CLIP), Figure 3: the symmetric cross-entropy.
      Zhai, Mustafa, Kolesnikov, Beyer 2023, "Sigmoid Loss for Language Image Pre-Training"
        (SigLIP), section 3.2: the pairwise sigmoid loss with z_ij.
      Yeh et al. 2022, "Decoupled Contrastive Learning", section 3: the positive pair removed from
        the denominator.
      Cheng et al. 2024, "Breaking the Memory Barrier: Near Infinite Batch Size Scaling for
        Contrastive Loss" (Inf-CL), section 3: tile-wise log-sum-exp, recomputed tiles in the
        backward pass, and the ring over devices.

    Examples:
      >>> x = jnp.eye(4, 8)
      >>> loss = contrastive_loss(x, x, 10.0)
      >>> float(loss) < 1e-3
      True

    Args:
      x: [N_local, D] float embeddings of the first modality (rows of L).
      y: [N_local, D] float embeddings of the second modality (columns of L); same shape and
        dtype as x.
      logit_scale: scalar multiplier of the logits (already exponentiated, e.g. exp(t)).
      logit_bias: scalar added to the logits, or None (SigLIP learns one).
      kind: 'softmax' (CLIP), 'sigmoid' (SigLIP) or 'decoupled' (DCL).
      axis_name: mesh axis the batch is sharded over, inside ``jax.shard_map``; None for one device.
      block_size: tile size B of 'xla' and 'pallas' (rows and columns); None for the backend's
        default ('xla': ``DEFAULT_BLOCK_SIZE``; 'pallas': ``pallas_kernels.contrastive.BlockSizes``
        defaults), clipped to the (local) batch.
      implementation: 'auto', 'reference', 'xla' or 'pallas'.

    Returns:
      The scalar loss, in x's dtype (accumulated in float32).
    """
    x, y = _check_embeddings(x, y)
    scale = _check_scalar("logit_scale", logit_scale)
    bias = None if logit_bias is None else _check_scalar("logit_bias", logit_bias)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if block_size is not None and (
        isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1
    ):
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
    n_global = x.shape[0] * _axis_size(axis_name)
    _check_sharded_along(x, y, axis_name)
    if kind == "decoupled" and n_global < 2:
        raise ValueError(
            f"kind='decoupled' needs a global batch of at least 2 (a row needs a negative), "
            f"got {n_global}"
        )

    for impl in _candidates(implementation, axis_name):
        try:
            return _IMPLS[impl](x, y, scale, bias, kind, axis_name, block_size)
        except NotImplementedError:
            if implementation != "auto":
                raise
    raise NotImplementedError(f"no implementation of contrastive_loss for kind={kind!r}")


def _reference(x, y, scale, bias, kind, axis_name, block_size):
    del block_size
    return reference_loss(x, y, scale, bias, kind=kind, axis_name=axis_name)


def _xla(x, y, scale, bias, kind, axis_name, block_size):
    block = block_size or DEFAULT_BLOCK_SIZE.get(jax.default_backend(), 512)
    block = min(block, -(-x.shape[0] // _ALIGN) * _ALIGN)
    bias = jnp.zeros((), jnp.float32) if bias is None else bias
    tiles = XlaTiles(_contrastive_tiled.Layout(x.shape[0], block), kind == "decoupled")
    return tiled_loss(x, y, scale, bias, kind, tiles, axis_name).astype(x.dtype)


def _pallas(x, y, scale, bias, kind, axis_name, block_size):
    # Imported here so that jaxbatch.losses imports without the kernels package.
    from pallas_kernels.contrastive import api
    from pallas_kernels.contrastive import tiles as pallas_tiles

    if axis_name is None:
        loss = api.contrastive_loss(x, y, scale, bias, kind=kind, block_size=block_size)
        return loss.astype(x.dtype)
    # Raises NotImplementedError (dtype, backend, tiling) before anything is traced, so that
    # 'auto' can fall back to the XLA tiles.
    n, d = x.shape
    plan = pallas_tiles.block_plan(kind, n, d, x.dtype, block_size)
    bias = jnp.zeros((), jnp.float32) if bias is None else bias
    tiles = PallasTiles(plan, d)
    return tiled_loss(x, y, scale, bias, kind, tiles, axis_name).astype(x.dtype)


_IMPLS = {"reference": _reference, "xla": _xla, "pallas": _pallas}


def _candidates(implementation: str, axis_name: str | None) -> Sequence[str]:
    if implementation != "auto":
        return (implementation,)
    del axis_name  # the ring runs either implementation's tiles
    if jax.default_backend() in ("tpu", "gpu"):
        return ("pallas", "xla")
    return ("xla",)


def _check_sharded_along(x, y, axis_name) -> None:
    """x and y must vary along the ring's axes, as ``shard_map`` types a batch-sharded input.

    Two ways to get this wrong both gave a silently wrong gradient (dx and dy 1/P of the true
    value on P devices), so both are refused: ``shard_map(..., check_vma=False)``, where JAX
    drops the types the custom VJP relies on, and embeddings replicated over the axis (then the
    "global batch" would be P copies of one batch).
    """
    if axis_name is None:
        return
    names = set(axis_name) if isinstance(axis_name, tuple | list) else {axis_name}
    for label, a in (("x", x), ("y", y)):
        varying = set(jax.typeof(a).manual_axis_type.varying)
        if not names <= varying:
            raise ValueError(
                f"contrastive_loss(axis_name={axis_name!r}): {label} does not vary along "
                f"{sorted(names - varying)}; call it inside jax.shard_map with the batch sharded "
                "over those axes (in_specs P(axis, None)) and check_vma=True (the default)"
            )


def _axis_size(axis_name: str | None) -> int:
    if axis_name is None:
        return 1
    try:
        return lax.axis_size(axis_name)
    except NameError as e:
        raise ValueError(
            f"axis_name={axis_name!r} is not a bound mesh axis: call contrastive_loss inside "
            "jax.shard_map over that axis, or pass axis_name=None"
        ) from e


def _check_embeddings(x, y) -> tuple[jax.Array, jax.Array]:
    x, y = jnp.asarray(x), jnp.asarray(y)
    for name, a in (("x", x), ("y", y)):
        if a.ndim != 2:
            raise ValueError(f"{name} must be rank 2 [N, D], got shape {a.shape}")
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name} must have a floating dtype, got {a.dtype}")
    if x.shape != y.shape:
        raise ValueError(
            f"x and y must have the same shape [N, D] (row i of x pairs with row i of y), "
            f"got x {x.shape} and y {y.shape}"
        )
    if x.dtype != y.dtype:
        raise TypeError(f"x and y must have the same dtype, got {x.dtype} and {y.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"the batch is empty: x has shape {x.shape}")
    return x, y


def _check_scalar(name: str, value) -> jax.Array:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float scalar, got {value!r}")
    if isinstance(value, int | float):
        return jnp.asarray(value, jnp.float32)
    value = jnp.asarray(value)
    if value.ndim != 0:
        raise ValueError(f"{name} must be a scalar (shape ()), got shape {value.shape}")
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {value.dtype}")
    return value
