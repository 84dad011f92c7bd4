"""Block sizes, padding plan and tile math shared by the TPU and GPU contrastive kernels.

Both kernel families work on one tile of the logit matrix at a time,

  L_tile = s · a_blk · b_blkᵀ + bias          # [block_rows, block_cols], f32

where ``a`` holds the embeddings whose rows are reduced over (x for row statistics, y for column
statistics: the column pass is the row pass on the swapped pair, since Lᵀ = s·y·xᵀ + bias) and ``b``
the other side. The tile functions here are pure ``jnp``, so they run inside Mosaic TPU, Triton
and interpret-mode kernels alike. A static ``home`` flag (``tile_masks``) says whether b's block
holds the positive pairs on its diagonal (a single-device call, the first step of a device ring)
or only negatives (the other ring steps). ``call_kernel`` runs a kernel inside or outside
``jax.shard_map``, typing its operands and outputs.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

# Finite stand-in for -inf in masked logits: keeps the online max update free of inf - inf.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

# TPU (Mosaic) tiling: a block's last dim is a multiple of 128 lanes, its second-to-last a multiple
# of the sublane count for the dtype, or the block equals the whole (padded) array dim.
TPU_LANES = 128
TPU_SUBLANES = {4: 8, 2: 16}  # bytes per element -> sublane multiple
# Triton: every block dim a power of two, and tl.dot needs at least 16 along each dim.
GPU_MIN_BLOCK = 16

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def check_supported_dtype(dtype) -> None:
    """Raises NotImplementedError (so 'auto' can fall back to XLA) for a dtype without kernels."""
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        raise NotImplementedError(
            f"contrastive Pallas kernels support {[str(t) for t in SUPPORTED_DTYPES]}, got {dtype}"
        )


_NT_DIMS = (((1,), (1,)), ((), ()))  # contract the feature dim of both operands: a · bᵀ
_NN_DIMS = (((1,), (0,)), ((), ()))  # plain a · b


def _is_power_of_two(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the contrastive kernels.

    Attributes:
      block_rows: rows of the logit tile (rows of ``x`` in the row pass, of ``y`` in the column
        pass).
      block_cols: columns of the logit tile.
    """

    block_rows: int
    block_cols: int

    def __post_init__(self):
        for name in ("block_rows", "block_cols"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")

    @classmethod
    def get_default(cls, backend: str, n: int, d: int, dtype) -> BlockSizes:
        """Default tiles for ``backend`` ('tpu' or 'gpu') and an [n, d] problem of ``dtype``.

        TPU: 512×512 tiles (multiples of the 128-lane MXU) while the [block, d] operand blocks and
        the [block_rows, d] f32 gradient accumulator stay well inside the 16 MiB scoped VMEM; 256
        once a row exceeds 2 KiB. GPU (Triton): 64×64 tiles, 64 rows of d-wide f32 accumulators in
        registers; 32 once d exceeds 256 to limit spills. ``n`` is accepted for future tuning;
        small batches are handled by `plan`, which shrinks the tile to the padded batch.
        """
        del n
        itemsize = jnp.dtype(dtype).itemsize
        if backend == "tpu":
            block = 512 if d * itemsize <= 2048 else 256
            return cls(block, block)
        if backend == "gpu":
            block = 64 if d <= 256 else 32
            return cls(block, block)
        raise ValueError(f"backend must be 'tpu' or 'gpu', got {backend!r}")

    def check_for(self, backend: str) -> None:
        """Raises ValueError if the tiles break ``backend``'s tiling rules for multi-block grids."""
        for name in ("block_rows", "block_cols"):
            value = getattr(self, name)
            if backend == "tpu" and value % TPU_LANES:
                raise ValueError(
                    f"TPU blocks must be multiples of {TPU_LANES} (row and column blocks swap "
                    f"roles between the row and column passes), got {name}={value}"
                )
            if backend == "gpu" and (not _is_power_of_two(value) or value < GPU_MIN_BLOCK):
                raise ValueError(
                    f"GPU (Triton) blocks must be powers of two >= {GPU_MIN_BLOCK}, "
                    f"got {name}={value}"
                )


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static shape plan of one call: true and padded sizes, effective tiles, how to run.

    Attributes:
      kind: 'softmax', 'sigmoid' or 'decoupled'.
      n: true batch size; rows/columns >= n are padding and masked in every tile.
      n_pad: padded batch, a multiple of both blocks.
      d_pad: padded feature dim (zero padding leaves every dot product unchanged).
      block_rows, block_cols: effective tiles (shrunk to one block when n is small).
      backend: 'tpu' or 'gpu' kernel family.
      interpret: run the kernels in the Pallas interpreter.
    """

    kind: str
    n: int
    n_pad: int
    d_pad: int
    block_rows: int
    block_cols: int
    backend: str
    interpret: bool


def plan(
    kind: str, n: int, d: int, dtype, blocks: BlockSizes, backend: str, interpret: bool
) -> Plan:
    """Pads the problem to whole tiles that satisfy ``backend``'s tiling rules."""
    if n <= min(blocks.block_rows, blocks.block_cols):
        # One tile covers the batch: the block equals the full padded dim, which both targets
        # accept without their multi-block alignment rules.
        if backend == "tpu":
            sublanes = TPU_SUBLANES[jnp.dtype(dtype).itemsize]
            block = -(-n // sublanes) * sublanes
        else:
            block = max(GPU_MIN_BLOCK, 1 << (n - 1).bit_length())
        block_rows = block_cols = n_pad = block
    else:
        blocks.check_for(backend)
        block_rows, block_cols = blocks.block_rows, blocks.block_cols
        step = math.lcm(block_rows, block_cols)
        n_pad = -(-n // step) * step
    if backend == "gpu":
        d_pad = max(GPU_MIN_BLOCK, 1 << (d - 1).bit_length())
    else:
        d_pad = d
    return Plan(kind, n, n_pad, d_pad, block_rows, block_cols, backend, interpret)


def dot_precision(dtype) -> lax.Precision:
    """f32 operands get full f32 products (no bf16/tf32 passes); 16-bit ones the native MXU path."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def tile_logits(a: jax.Array, b: jax.Array, scale, bias) -> jax.Array:
    """s · a · bᵀ + bias for a [bm, d] and b [bn, d] block, accumulated in f32 -> [bm, bn]."""
    ab = lax.dot_general(
        a, b, _NT_DIMS, precision=dot_precision(a.dtype), preferred_element_type=jnp.float32
    )
    return scale * ab + bias


def tile_times(grad: jax.Array, b: jax.Array) -> jax.Array:
    """grad [bm, bn] (f32) · b [bn, d] -> [bm, d] f32; grad is cast to b's dtype for the MXU."""
    return lax.dot_general(
        grad.astype(b.dtype),
        b,
        _NN_DIMS,
        precision=dot_precision(b.dtype),
        preferred_element_type=jnp.float32,
    )


def tile_masks(
    row0, col0, shape: tuple[int, int], n: int, home: bool = True
) -> tuple[jax.Array, jax.Array | None]:
    """(valid, diagonal) boolean masks of the tile whose top-left entry is (row0, col0).

    ``home`` (static) says whether the b side is the block paired with the a side, so that its
    diagonal i == j holds the positive pairs. Off home there is no positive pair: the diagonal
    mask is None and every consumer below treats every valid entry as a negative.
    """
    rows = row0 + lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = col0 + lax.broadcasted_iota(jnp.int32, shape, 1)
    valid = (rows < n) & (cols < n)
    return valid, (rows == cols if home else None)


def softplus(t: jax.Array) -> jax.Array:
    """log(1 + exp(t)) without overflow: max(t, 0) + log1p(exp(-|t|))."""
    return jnp.maximum(t, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(t)))


def sigmoid_terms(logits: jax.Array, valid: jax.Array, diag: jax.Array | None) -> jax.Array:
    """−log σ(z·L) = softplus(−z·L) with z = +1 on the diagonal, −1 elsewhere; 0 where padded.

    diag None (an off-home block): z = −1 everywhere.
    """
    signed = logits if diag is None else jnp.where(diag, -logits, logits)
    return jnp.where(valid, softplus(signed), 0.0)


def lse_keep(kind: str, valid: jax.Array, diag: jax.Array | None) -> jax.Array:
    """Entries that enter the log-sum-exp: all valid ones, minus the positive pair for DCL."""
    return valid & ~diag if kind == "decoupled" and diag is not None else valid


def online_lse_update(logits, keep, m_prev, l_prev):
    """One step of the streaming log-sum-exp along axis 1 (running max m, running sum l).

    m_new = max(m_prev, max_j L_ij),  l_new = l_prev · exp(m_prev − m_new) + Σ_j exp(L_ij − m_new),
    with dropped entries contributing exactly 0 (not exp(MASK_VALUE − m)).
    """
    masked = jnp.where(keep, logits, MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(masked, axis=1, keepdims=True))
    p = jnp.where(keep, jnp.exp(masked - m_new), 0.0)
    l_new = l_prev * jnp.exp(m_prev - m_new) + jnp.sum(p, axis=1, keepdims=True)
    return m_new, l_new


def lse_finish(m, l):
    """log-sum-exp from (max, sum); −inf for a row with nothing kept (DCL with N = 1)."""
    return jnp.where(l > 0.0, m + jnp.log(l), -jnp.inf)


def lse_grad_tile(logits, keep, lse_rows, g_rows, lse_cols, g_cols):
    """dLoss/dL of a tile for row and column LSEs with cotangents g_rows [bm, 1], g_cols [1, bn].

    G_ij = g_i · exp(L_ij − lse_i) + h_j · exp(L_ij − lse'_j) on kept entries, 0 elsewhere.
    """
    grad = g_rows * jnp.exp(logits - lse_rows) + g_cols * jnp.exp(logits - lse_cols)
    return jnp.where(keep, grad, 0.0)


def sigmoid_grad_tile(logits, valid, diag, g):
    """d/dL of g · Σ softplus(−z·L): g · (σ(L) − [i = j]) on valid entries, 0 elsewhere.

    diag None (an off-home block): g · σ(L), every pair a negative.
    """
    grad = jax.nn.sigmoid(logits)
    if diag is not None:
        grad = grad - jnp.where(diag, 1.0, 0.0)
    return jnp.where(valid, g * grad, 0.0)


def subtract_positive(grad, valid, diag, positive: float):
    """grad − ``positive`` on the valid positive pairs: the −L_ii terms of a softmax-type loss.

    ``positive`` is static; 0 (the caller differentiates the −L_ii terms itself) or an off-home
    tile (diag None) leaves grad unchanged. Subtracted in f32, before grad is rounded to the
    embeddings' dtype: for a confident positive the two LSE terms sum to ≈ ``positive``.
    """
    if not positive or diag is None:
        return grad
    return jnp.where(valid & diag, grad - positive, grad)


def call_kernel(plan: Plan, run, *operands: jax.Array):
    """Runs ``run(operands, axes)`` (a ``pallas_call``) inside or outside ``jax.shard_map``.

    A ``pallas_call`` must state how its outputs vary over the manual mesh axes: like its
    operands. ``axes`` is the ``manual_axis_type`` that ``run`` gives its output
    ``ShapeDtypeStruct``s. Compiled kernels get every operand cast to the union of the operands'
    varying axes (``lax.pcast``) and outputs typed alike.

    The HLO interpreter (``interpret=True``) cannot run on varying operands: it evaluates the
    kernel's jaxpr, traced without mesh axes, on the varying blocks and fails the varying-axes
    type checks (ValueError "requires varying manual axes to match"). For it the kernel runs in a
    nested ``jax.shard_map`` over no mesh axes with ``check_vma=False``, where the operands are
    retyped as invariant (an identity add), and its outputs are cast back to varying: values are
    per-device either way, only the static type changes, and nothing differentiates or reduces
    across devices in between.

    Returns:
      The outputs of ``run`` (a pytree), typed as varying over the operands' axes.
    """
    varying = [frozenset(jax.typeof(a).manual_axis_type.varying) for a in operands]
    axes = frozenset().union(*varying)
    if not axes:
        return run(list(operands), jax.typeof(operands[0]).manual_axis_type)
    if not plan.interpret:
        cast = [
            lax.pcast(a, tuple(sorted(axes - v)), to="varying") if axes - v else a
            for a, v in zip(operands, varying, strict=True)
        ]
        return run(cast, jax.typeof(cast[0]).manual_axis_type)

    def unchecked(*ops):
        # Traced with check_vma off: the add gives invariant-typed copies of the operands.
        ops = [a + jnp.zeros((), a.dtype) for a in ops]
        return run(ops, jax.typeof(ops[0]).manual_axis_type)

    inner = jax.shard_map(
        unchecked,
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=tuple(P() for _ in operands),
        out_specs=P(),
        axis_names=frozenset(),
        check_vma=False,
    )
    names = tuple(sorted(axes))
    return jax.tree.map(lambda o: lax.pcast(o, names, to="varying"), inner(*operands))
