"""Block sizes, padding plan and tile math shared by the TPU and GPU cross-entropy kernels.

Every kernel works on one tile of the logits at a time,

  logits_tile = h_blk · w_tile          # [block_tokens, block_vocab], f32 accumulation

for a block of token rows h_blk [bt, D] and a vocabulary tile w_tile [D, bv] of the output kernel.
The functions here are pure ``jnp``, so they run inside Mosaic TPU, Triton and interpret-mode
kernels alike. Tokens are padded to whole token blocks (zero rows, label −1, cotangent 0) and the
vocabulary to whole tiles (zero columns of w, masked by their index ``>= V`` in every tile).

The generic pieces (the finite −∞ stand-in, the online log-sum-exp step, dot precision and the
``shard_map``-aware ``call_kernel``) are the contrastive kernels' own, imported rather than copied.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.contrastive._common import (
    GPU_MIN_BLOCK,
    MASK_VALUE,
    SUPPORTED_DTYPES,
    TPU_LANES,
    TPU_SUBLANES,
    call_kernel,
    dot_precision,
    lse_finish,
    online_lse_update,
)

__all__ = [
    "MASK_VALUE",
    "BlockSizes",
    "Plan",
    "call_kernel",
    "check_supported_dtype",
    "grad_tile",
    "lse_finish",
    "online_lse_update",
    "plan",
]

# TPU: the blocks of one kernel (inputs and outputs double-buffered, f32 tiles) must stay within
# this much of the scoped VMEM (16 MiB by default on v4/v5e, 32 MiB on v6e): D is never tiled, so
# even 128 × 128 tiles refuse D above about 3,900 (f32) / 5,900 (bf16).
TPU_VMEM_BUDGET = 12 << 20

_NN_DIMS = (((1,), (0,)), ((), ()))  # a · b
_NT_DIMS = (((1,), (1,)), ((), ()))  # a · bᵀ


def check_supported_dtype(dtype) -> None:
    """Raises NotImplementedError (so 'auto' falls back to XLA) for a dtype without kernels."""
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        raise NotImplementedError(
            f"cross-entropy Pallas kernels support {[str(t) for t in SUPPORTED_DTYPES]}, "
            f"got {jnp.dtype(dtype)}"
        )


def _is_power_of_two(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _next_power_of_two(v: int) -> int:
    return 1 << (max(v, 1) - 1).bit_length()


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the cross-entropy kernels.

    Attributes:
      block_tokens: token rows per block (bt).
      block_vocab: vocabulary columns per tile (bv).
      block_d: GPU only: the feature dim is contracted ``block_d`` columns at a time (the TPU
        kernels hold the whole feature dim of a block in VMEM and ignore it).
    """

    block_tokens: int
    block_vocab: int
    block_d: int = 64

    def __post_init__(self):
        for name in ("block_tokens", "block_vocab", "block_d"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")

    @classmethod
    def get_default(cls, backend: str, t: int, d: int, v: int, dtype) -> BlockSizes:
        """Default tiles for ``backend`` ('tpu' or 'gpu') and a [t, d] × [d, v] problem.

        TPU: the largest of bt ∈ (256, 128), bv ∈ (512, 256, 128) (bv first: the lane dim of
        the MXU) whose VMEM estimate (`tpu_vmem_bytes`) fits ``TPU_VMEM_BUDGET``; the smallest
        pair when none fits (then `plan` refuses the problem). GPU (Triton): 64 × 64 logit tiles
        and 64-wide feature chunks, so a program holds O(64·64) f32 values in registers whatever
        D. Not tuned on hardware (none was available). ``t`` and ``v`` are accepted for future
        tuning; small problems are handled by `plan`, which shrinks the tiles to the padded dims.
        """
        del t, v
        if backend == "tpu":
            itemsize = jnp.dtype(dtype).itemsize
            for bt in (256, 128):
                for bv in (512, 256, 128):
                    if tpu_vmem_bytes(bt, bv, d, itemsize) <= TPU_VMEM_BUDGET:
                        return cls(bt, bv)
            return cls(128, 128)
        if backend == "gpu":
            return cls(64, 64, 64)
        raise ValueError(f"backend must be 'tpu' or 'gpu', got {backend!r}")


def tpu_vmem_bytes(bt: int, bv: int, d: int, itemsize: int) -> int:
    """Upper estimate of the VMEM of the largest TPU kernel (the backward ones) for these tiles.

    Double-buffered h [bt, d] and w [d, bv] blocks, a double-buffered f32 gradient block of
    [bt, d] (dh) or [bv, d] (dwᵀ), and six 32-bit [bt, bv] tiles for the intermediates (logits,
    vocabulary ids, exp, G and temporaries the compiler may keep in VMEM).
    """
    inputs = 2 * (bt * d + d * bv) * itemsize
    output = 2 * max(bt, bv) * d * 4
    return inputs + output + 6 * bt * bv * 4


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static shape plan of one call: true and padded sizes, effective tiles, how to run.

    Attributes:
      t, v: true tokens and vocabulary; rows >= t and columns >= v are padding.
      t_pad, v_pad, d_pad: padded sizes (multiples of the tiles; d_pad = d on TPU).
      block_tokens, block_vocab, block_d: effective tiles (block_d = d_pad on TPU).
      backend: 'tpu' or 'gpu' kernel family.
      interpret: run the kernels in the Pallas interpreter.
    """

    t: int
    v: int
    t_pad: int
    v_pad: int
    d_pad: int
    block_tokens: int
    block_vocab: int
    block_d: int
    backend: str
    interpret: bool


def _tpu_tile(size: int, blocks: BlockSizes, name: str, multiple: int, why: str = "") -> int:
    """The TPU tile of a dim: one tile of the dim rounded up to ``multiple`` when it fits in
    ``blocks.<name>``, else that block, which must then be a multiple of ``multiple``."""
    block = getattr(blocks, name)
    if size <= block:
        return _round_up(size, multiple)
    if block % multiple:
        what = "token blocks" if name == "block_tokens" else "vocabulary tiles"
        raise ValueError(f"TPU {what} must be multiples of {multiple}{why}, got {name}={block}")
    return block


def plan(t: int, d: int, v: int, dtype, blocks: BlockSizes, backend: str, interpret: bool) -> Plan:
    """Pads the problem to whole tiles that satisfy ``backend``'s tiling rules.

    A dimension smaller than its tile gets a single tile equal to the padded dimension (both
    targets accept a block that spans the whole array without their multi-block alignment rules).

    Raises:
      ValueError: tiles that break the target's rules, or (TPU) blocks beyond the VMEM budget.
    """
    if backend == "tpu":
        sublanes = TPU_SUBLANES[jnp.dtype(dtype).itemsize]
        bt = _tpu_tile(t, blocks, "block_tokens", sublanes, f" for {jnp.dtype(dtype)}")
        bv = _tpu_tile(v, blocks, "block_vocab", TPU_LANES)
        need = tpu_vmem_bytes(bt, bv, d, jnp.dtype(dtype).itemsize)
        if need > TPU_VMEM_BUDGET:
            raise ValueError(
                f"TPU blocks bt={bt}, bv={bv} with the whole feature dim D={d} need about "
                f"{need / 2**20:.1f} MiB of VMEM, over the {TPU_VMEM_BUDGET >> 20} MiB budget; "
                "expected smaller blocks or D (the TPU kernels do not tile D)"
            )
        bd, d_pad = d, d
    elif backend == "gpu":
        for name in ("block_tokens", "block_vocab", "block_d"):
            value = getattr(blocks, name)
            if not _is_power_of_two(value) or value < GPU_MIN_BLOCK:
                raise ValueError(
                    f"GPU (Triton) blocks must be powers of two >= {GPU_MIN_BLOCK}, "
                    f"got {name}={value}"
                )
        bt = min(blocks.block_tokens, max(GPU_MIN_BLOCK, _next_power_of_two(t)))
        bv = min(blocks.block_vocab, max(GPU_MIN_BLOCK, _next_power_of_two(v)))
        bd = min(blocks.block_d, max(GPU_MIN_BLOCK, _next_power_of_two(d)))
        d_pad = _round_up(d, bd)
    else:
        raise ValueError(f"backend must be 'tpu' or 'gpu', got {backend!r}")
    return Plan(t, v, _round_up(t, bt), _round_up(v, bv), d_pad, bt, bv, bd, backend, interpret)


def tile_logits(h: jax.Array, w: jax.Array) -> jax.Array:
    """h [bt, d] · w [d, bv] with f32 accumulation -> [bt, bv] f32."""
    return lax.dot_general(
        h, w, _NN_DIMS, precision=dot_precision(h.dtype), preferred_element_type=jnp.float32
    )


def grad_times_w(grad: jax.Array, w: jax.Array) -> jax.Array:
    """G [bt, bv] (f32) · w [d, bv]ᵀ -> [bt, d] f32; G is rounded to w's dtype for the MXU."""
    return lax.dot_general(
        grad.astype(w.dtype),
        w,
        _NT_DIMS,
        precision=dot_precision(w.dtype),
        preferred_element_type=jnp.float32,
    )


def grad_t_times_h(grad: jax.Array, h: jax.Array) -> jax.Array:
    """G [bt, bv]ᵀ · h [bt, d] -> [bv, d] f32 (a column block of dwᵀ); G rounded to h's dtype.

    G is transposed in f32 and then cast, and the product is a plain a·b: the form of the dV
    product in JAX's Pallas TPU flash-attention backward, rather than a contraction over both
    operands' leading dims.
    """
    return lax.dot_general(
        grad.T.astype(h.dtype),
        h,
        _NN_DIMS,
        precision=dot_precision(h.dtype),
        preferred_element_type=jnp.float32,
    )


def vocab_ids(col0, shape: tuple[int, int]) -> jax.Array:
    """Vocabulary id of every entry of the tile whose first column is ``col0``: int32 [bt, bv]."""
    return col0 + lax.broadcasted_iota(jnp.int32, shape, 1)


def target_part(logits: jax.Array, ids: jax.Array, labels: jax.Array) -> jax.Array:
    """Σ_v [v = y_t]·logits_tv over this tile -> [bt, 1]: the target logit if y_t is in the tile.

    ``labels`` [bt, 1] int32; a label −1 (ignored or padding token) matches no column.
    """
    return jnp.sum(jnp.where(ids == labels, logits, 0.0), axis=1, keepdims=True)


def grad_tile(logits, ids, v: int, labels, lse, g_lse, g_tgt) -> jax.Array:
    """∂/∂logits of Σ_t g_lse_t·lse_t + g_tgt_t·logit_{t,y_t} over one tile -> [bt, bv] f32.

    G_tv = g_lse_t · exp(logits_tv − lse_t) + g_tgt_t · [v = y_t] on real columns (v < V), 0 on
    padding columns. For the mean loss g_lse = m_t·c/|M| and g_tgt = −g_lse (c the cotangent, m
    the counted-token mask), which is the (softmax − onehot)·c/|M| of the loss; the per-row
    vectors are [bt, 1] f32, ``labels`` [bt, 1] int32.
    """
    p = jnp.exp(logits - lse)
    grad = g_lse * p + jnp.where(ids == labels, g_tgt, 0.0)
    return jnp.where(ids < v, grad, 0.0)
