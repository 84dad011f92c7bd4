"""Context parallelism: the attention of one long sequence split over the mesh axis 'context'.

Every device holds T / P positions of q, k, v ([B, T / P, H, D] inside ``jax.shard_map`` over
'context', P devices) and gets the attention output of its own queries over *all* T keys. Three
strategies, all exact (they differ only in summation order):

| strategy     | communication per call                  | per-device memory (beyond q, o)     |
|--------------|-----------------------------------------|-------------------------------------|
| 'all_gather' | all-gather K, V (backward: reduce-scatter)| full K, V [B, T, H, D]            |
| 'ring'       | P − 1 K/V hops (backward: P dK/dV hops)  | two K/V shards [B, T / P, H, D]     |
| 'ulysses'    | 3 all-to-alls in, 1 out                  | q, k, v [B, T, H / P, D]            |

- 'all_gather': queries stay local, keys/values (and their masks) are gathered; the baseline.
- 'ring' (Li et al. 2021; Liu et al. 2023): K/V shards travel around the ring of devices (device
  d sends to d + 1) while each device folds the block of its queries against the shard it holds
  into a running online softmax (m, l, acc merged through the block's log-sum-exp). The next shard
  is sent (``lax.ppermute``) before the current block is computed, so the transfer overlaps the
  compute. The custom VJP is the FlashAttention-2 backward per block with the *global* o and lse:
  dq accumulates locally, while dK/dV accumulators travel with their shard and arrive home after
  one more hop than K/V make. Per block the math is ``jaxbatch.nn.attention``'s chunked XLA
  attention (its forward returning the block's lse, its backward with the global lse).
- 'ulysses' (Jacobs et al. 2023): ``lax.all_to_all`` turns sequence sharding into head sharding
  ([B, T / P, H, D] → [B, T, H / P, D]) for q, k, v, runs full-sequence attention locally with
  any implementation of ``jaxbatch.nn.attention`` (cuDNN, splash, chunked), and turns the output
  back. Needs H divisible by P (per device, after tensor parallelism).

Masks are those of ``jaxbatch.nn.attention`` (causal, ``segment_ids`` for packed sequences,
``key_mask`` for padding; a query that sees no key gives 0), computed from the *original* token
positions of the layout:

- 'contiguous': device d holds positions [d·T/P, (d+1)·T/P);
- 'zigzag' (causal load balancing; Brandon et al. 2023, "Striped Attention", and the dual-chunk
  order of Llama 3 context parallelism): the sequence is cut into 2P chunks of C = T / 2P and
  device d holds chunks d and 2P − 1 − d, so every device has the same number of unmasked causal
  (query, key) pairs. :func:`zigzag_shard_batch` applies this order once to the input batch
  (tokens, targets, positions, segment ids, loss mask); :func:`unzigzag` undoes it.

Fully masked blocks are skipped without a ``lax.cond``: each ring block runs the chunked
attention with its *relative* offset (query start − key start, traced from ``lax.axis_index``),
whose tile loops end at the last key tile a query tile can see, so a block wholly in the causal
future runs zero tiles (no matmul), forward and backward. In the zig-zag order the pair (early
query chunk, late key chunk) is never visible and is left out statically, and the pair (late
query chunk, early key chunk) is always visible and runs without the causal mask. Blocks that only
segment ids or padding hide are computed and masked (finding them needs a data-dependent test).

Inside a user's own ``shard_map``, pass ``check_vma=False``: the chunked attention's loop carries
are not typed as varying over mesh axes (:func:`sharded_context_parallel_attention` does this).

References:
  Li, Xue, Baranwal, Li, You 2021, "Sequence Parallelism: Long Sequence Training from System
    Perspective" (ring self-attention). Liu, Zaharia, Abbeel 2023, "Ring Attention with Blockwise
    Transformers for Near-Infinite Context", Alg. 1. Jacobs et al. 2023, "DeepSpeed Ulysses",
    §3.1 (all-to-all between sequence and head sharding). Dao 2023, "FlashAttention-2", Alg. 1–2
    (online softmax; backward with D_i = rowsum(dO_i ∘ O_i) and P = exp(S − lse)).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxbatch.nn import attention as attention_lib

# The chunked attention's per-block forward (o, lse) and backward; used, not copied.
from jaxbatch.nn.attention import Tiling, chunked_backward, chunked_forward

STRATEGIES: tuple[str, ...] = ("all_gather", "ring", "ulysses")
LAYOUTS: tuple[str, ...] = ("contiguous", "zigzag")
CONTEXT_AXIS = "context"
_F32 = jnp.float32


# ----------------------------------------------------------------------------- zig-zag order


def _check_zigzag(seq_len: int, context: int) -> None:
    for name, value in (("sequence length", seq_len), ("context", context)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"zig-zag: {name} must be a positive int, got {value!r}")
    if seq_len % (2 * context):
        raise ValueError(
            f"zig-zag layout: sequence length {seq_len} is not divisible by 2 × context = "
            f"{2 * context} (each of the {context} devices holds 2 equal chunks)"
        )


def zigzag_permutation(seq_len: int, context: int) -> np.ndarray:
    """The zig-zag order: position j of the reordered sequence holds original position perm[j].

    The sequence is cut into 2P chunks of C = T / 2P (P = context); the reordered sequence is
    chunks 0, 2P−1, 1, 2P−2, …, P−1, P, so its contiguous shard d (of T / P) holds chunks d and
    2P − 1 − d.

    Examples:
      >>> zigzag_permutation(8, 2).tolist()
      [0, 1, 6, 7, 2, 3, 4, 5]

    Args:
      seq_len: T, divisible by 2 × context.
      context: P, the size of the 'context' mesh axis.

    Returns:
      int32 [T], a permutation of 0..T−1 (``x_zigzag = x[:, perm]``).
    """
    _check_zigzag(seq_len, context)
    chunk = seq_len // (2 * context)
    devices = np.arange(context)
    order = np.stack([devices, 2 * context - 1 - devices], axis=1).reshape(-1)
    return (order[:, None] * chunk + np.arange(chunk)[None]).reshape(-1).astype(np.int32)


def zigzag_inverse_permutation(seq_len: int, context: int) -> np.ndarray:
    """inv with ``x_zigzag[:, inv] == x``: original position i sits at reordered position inv[i]."""
    perm = zigzag_permutation(seq_len, context)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(seq_len, dtype=perm.dtype)
    return inv


def _take(x, index: np.ndarray, axis: int):
    return x[(slice(None),) * axis + (index,)]


def _sequence_length(tree: Any, axis: int, what: str) -> int:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if not leaves:
        raise ValueError(f"{what}: got an empty batch")
    lengths = {}
    for path, leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) <= axis:
            raise ValueError(
                f"{what}: entry {jax.tree_util.keystr(path)} of shape {shape} has no sequence "
                f"axis {axis}"
            )
        lengths[jax.tree_util.keystr(path)] = shape[axis]
    if len(set(lengths.values())) != 1:
        raise ValueError(
            f"{what}: entries have different sequence lengths (axis {axis}): {lengths}"
        )
    return next(iter(lengths.values()))


def zigzag_shard_batch(
    batch: Any, context: int, *, axis: int = 1, add_positions: str | None = None
) -> Any:
    """Puts every entry of the batch in the zig-zag order along its sequence axis.

    Apply it once to the input batch (tokens, targets, positions, segment ids, loss mask, all
    [B, T, ...]) before the batch is sharded over 'context'; shift the targets (next token)
    *before* it. Position-wise computation and order-free reductions (the loss mean) need nothing
    else; attention gets ``layout='zigzag'``; :func:`unzigzag` restores the order of an output.

    Args:
      batch: a pytree of arrays (NumPy or JAX) sharing the sequence length on ``axis``.
      context: the size of the 'context' mesh axis.
      axis: the sequence axis of every entry.
      add_positions: for a dict batch, a key under which to add the original positions
        (int32 [B, T], 0..T−1) before reordering, if the batch has none; positional embeddings
        must look them up, since the tokens no longer sit at their index.

    Returns:
      The batch with every entry reordered (same structure, plus ``add_positions``).

    Raises:
      ValueError: entries without the axis or of different lengths, or a length not divisible
        by 2 × context.
    """
    seq_len = _sequence_length(batch, axis, "zigzag_shard_batch")
    perm = zigzag_permutation(seq_len, context)
    if add_positions is not None:
        if not isinstance(batch, Mapping):
            raise ValueError(
                f"zigzag_shard_batch: add_positions={add_positions!r} needs a dict batch, got "
                f"{type(batch).__name__}"
            )
        if add_positions not in batch:
            lead = np.shape(jax.tree_util.tree_leaves(batch)[0])[: axis + 1]
            positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), lead)
            batch = {**batch, add_positions: positions}
    return jax.tree.map(lambda x: _take(x, perm, axis), batch)


def unzigzag(tree: Any, context: int, *, axis: int = 1) -> Any:
    """Restores the original order of arrays in the zig-zag order (inverse of the batch step)."""
    seq_len = _sequence_length(tree, axis, "unzigzag")
    inv = zigzag_inverse_permutation(seq_len, context)
    return jax.tree.map(lambda x: _take(x, inv, axis), tree)


def _run_starts(zigzag: bool, device, size: int, run_len: int) -> tuple[Any, ...]:
    """Original start positions of the runs (contiguous pieces) a device holds."""
    if not zigzag:
        return (device * run_len,)
    return (device * run_len, (2 * size - 1 - device) * run_len)


# ----------------------------------------------------------------------------- public entry


def context_parallel_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    strategy: str = "ring",
    axis_name: str = CONTEXT_AXIS,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    key_mask: jax.Array | None = None,
    layout: str = "contiguous",
    implementation: str = "auto",
    chunk_size: int | None = None,
) -> jax.Array:
    """Self-attention of a sequence sharded over ``axis_name``; call inside ``jax.shard_map``.

    Args:
      q, k, v: this device's shard [B, T / P, H, D] (positions as given by ``layout``).
      strategy: one of :data:`STRATEGIES`.
      axis_name: the mesh axis the sequence is split over (size P).
      causal: a query sees the keys at earlier or equal original positions.
      segment_ids: int [B, T / P] (packed sequences), this device's shard; queries and keys.
      key_mask: bool [B, T / P], False on padding keys, this device's shard.
      layout: 'contiguous' or 'zigzag' (see the module docstring).
      implementation: the attention of each block ('ring': 'auto' or 'chunked') or of the local
        full-sequence call ('all_gather', 'ulysses': any of ``attention.IMPLEMENTATIONS``).
      chunk_size: tile size of the chunked attention (default 512, clamped to the lengths).

    Returns:
      [B, T / P, H, D], this device's queries attended over the whole sequence.

    Raises:
      ValueError: shapes, dtypes or options that do not fit, before anything is compiled.
      NotImplementedError: 'ring' with a platform kernel (it needs each block's lse).
    """
    size = _check_local(
        q, k, v, strategy, axis_name, causal, segment_ids, key_mask, layout, implementation
    )
    chunk = attention_lib.DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(
            f"context_parallel_attention: chunk_size must be a positive int, got {chunk!r}"
        )
    zigzag = layout == "zigzag"
    if strategy == "ring":
        return _ring(q, k, v, segment_ids, key_mask, axis_name, size, causal, zigzag, chunk)
    kw = dict(implementation=implementation, chunk_size=chunk)
    if strategy == "all_gather":
        return _all_gather(q, k, v, segment_ids, key_mask, axis_name, size, causal, zigzag, kw)
    return _ulysses(q, k, v, segment_ids, key_mask, axis_name, size, causal, zigzag, kw)


def _check_local(q, k, v, strategy, axis_name, causal, segment_ids, key_mask, layout, impl) -> int:
    where = "context_parallel_attention"
    if strategy not in STRATEGIES:
        raise ValueError(f"{where}: unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if layout not in LAYOUTS:
        raise ValueError(f"{where}: unknown layout {layout!r}; expected one of {LAYOUTS}")
    if impl not in attention_lib.IMPLEMENTATIONS:
        raise ValueError(
            f"{where}: unknown implementation {impl!r}; expected one of "
            f"{attention_lib.IMPLEMENTATIONS}"
        )
    if strategy == "ring" and impl not in ("auto", "chunked"):
        raise NotImplementedError(
            f"{where}: strategy='ring' folds every block through its log-sum-exp, which only the "
            f"chunked XLA attention returns; got implementation={impl!r} (use 'auto' or 'chunked')"
        )
    if not isinstance(causal, bool):
        raise ValueError(f"{where}: causal must be a bool, got {causal!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"{where}: {name} must be float [B, T/P, H, D], got {x.dtype}{x.shape}"
            )
    if not (q.shape == k.shape == v.shape) or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"{where}: self-attention needs q, k, v of one shape and dtype, got "
            f"{q.dtype}{q.shape}, {k.dtype}{k.shape}, {v.dtype}{v.shape}"
        )
    b, t = q.shape[:2]
    for name, x, kind in (("segment_ids", segment_ids, "int"), ("key_mask", key_mask, "bool")):
        if x is None:
            continue
        ok = jnp.issubdtype(x.dtype, jnp.integer) if kind == "int" else x.dtype == jnp.bool_
        if x.shape != (b, t) or not ok:
            raise ValueError(
                f"{where}: {name} must be {kind} [B, T/P] = {(b, t)}, got {x.dtype}{x.shape}"
            )
    try:
        size = lax.axis_size(axis_name)
    except NameError as e:
        raise ValueError(
            f"{where}: mesh axis {axis_name!r} is not bound; call inside jax.shard_map over it "
            "(or use sharded_context_parallel_attention)"
        ) from e
    if axis_name in jax.typeof(q).manual_axis_type.varying:
        raise ValueError(
            f"{where}: call inside jax.shard_map(..., check_vma=False): the chunked attention's "
            "loop carries are not typed as varying over mesh axes"
        )
    if layout == "zigzag" and t % 2:
        raise ValueError(
            f"{where}: layout='zigzag' holds 2 chunks per device, so the local length {t} must be "
            f"even (the sequence {t * size} divisible by 2 × context = {2 * size})"
        )
    if strategy == "ulysses":
        _check_ulysses_heads(q.shape[2], k.shape[2], size, where="local ")
    return size


def _check_ulysses_heads(q_heads: int, kv_heads: int, size: int, *, where: str) -> None:
    if kv_heads == 1 and size > 1:
        raise ValueError(
            f"strategy='ulysses' splits heads over context = {size}, but there is a single KV "
            "head; use strategy='ring' or 'all_gather'"
        )
    for name, heads in (("query", q_heads), ("KV", kv_heads)):
        if heads % size:
            raise ValueError(
                f"strategy='ulysses' splits heads over context = {size}, but the {where}{name} "
                f"heads {heads} are not divisible by {size}; use strategy='ring' or 'all_gather'"
            )


# ----------------------------------------------------------------------------- all-gather


def _all_gather(q, k, v, segment_ids, key_mask, axis, size, causal, zigzag, kw):
    t_local = q.shape[1]

    def gather(x):
        if x is None:
            return None
        x = lax.all_gather(x, axis, axis=1, tiled=True)  # shard order
        return _take(x, zigzag_inverse_permutation(t_local * size, size), 1) if zigzag else x

    k_all, v_all, seg_all, mask_all = gather(k), gather(v), gather(segment_ids), gather(key_mask)
    if not causal:  # positions do not matter: one call, static offset (any implementation)
        return attention_lib.dot_product_attention(
            q, k_all, v_all, query_segment_ids=segment_ids, key_segment_ids=seg_all,
            key_mask=mask_all, **kw,
        )  # fmt: skip
    runs = 2 if zigzag else 1
    run_len = t_local // runs
    starts = _run_starts(zigzag, lax.axis_index(axis), size, run_len)
    outs = []
    for r, start in enumerate(starts):
        piece = slice(r * run_len, (r + 1) * run_len)
        q_seg = None if segment_ids is None else segment_ids[:, piece]
        outs.append(
            attention_lib.dot_product_attention(
                q[:, piece],
                k_all,
                v_all,
                causal=True,
                query_offset=start.astype(jnp.int32),
                query_segment_ids=q_seg,
                key_segment_ids=seg_all,
                key_mask=mask_all,
                **kw,
            )  # fmt: skip
        )
    return jnp.concatenate(outs, axis=1)


# ----------------------------------------------------------------------------- Ulysses


def _ulysses(q, k, v, segment_ids, key_mask, axis, size, causal, zigzag, kw):
    seq_len = q.shape[1] * size
    perm, inv = None, None
    if zigzag:
        perm, inv = zigzag_permutation(seq_len, size), zigzag_inverse_permutation(seq_len, size)

    def to_heads(x):  # [B, T/P, H, D] -> [B, T, H/P, D], original order
        x = lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)
        return _take(x, inv, 1) if zigzag else x

    def gather(x):
        if x is None:
            return None
        x = lax.all_gather(x, axis, axis=1, tiled=True)
        return _take(x, inv, 1) if zigzag else x

    seg = gather(segment_ids)
    out = attention_lib.dot_product_attention(
        to_heads(q), to_heads(k), to_heads(v), causal=causal, query_segment_ids=seg,
        key_segment_ids=seg, key_mask=gather(key_mask), **kw,
    )  # fmt: skip
    if zigzag:
        out = _take(out, perm, 1)
    return lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)


# ----------------------------------------------------------------------------- ring


@dataclasses.dataclass(frozen=True)
class _RingPlan:
    """Static description of one ring: the (query run, key run, tiling) pairs of a block."""

    axis_name: str
    size: int
    zigzag: bool  # causal with two runs per device
    run_len: int  # unpadded positions per run
    pairs: tuple[tuple[int, int, Tiling], ...]

    def offset(self, me, src, a: int, b: int, tiling: Tiling) -> jax.Array:
        """Relative offset of query run a (on device me) to key run b (held by device src)."""
        if not tiling.causal:
            return jnp.zeros((), jnp.int32)
        q0 = _run_starts(self.zigzag, me, self.size, self.run_len)[a]
        k0 = _run_starts(self.zigzag, src, self.size, self.run_len)[b]
        return (q0 - k0).astype(jnp.int32)

    def shift(self, tree):
        """Sends every leaf from device d to device d + 1."""
        if self.size == 1:
            return tree
        perm = [(d, (d + 1) % self.size) for d in range(self.size)]
        return lax.ppermute(tree, self.axis_name, perm)


def _ring(q, k, v, segment_ids, key_mask, axis, size, causal, zigzag, chunk):
    b, t_local = q.shape[:2]
    runs = 2 if (zigzag and causal) else 1
    run_len = t_local // runs
    block = min(chunk, run_len)
    padded = -(-run_len // block) * block
    causal_tiles, full_tiles = Tiling(True, block, block), Tiling(False, block, block)
    if not causal:
        pairs = ((0, 0, full_tiles),)
    elif runs == 1:
        pairs = ((0, 0, causal_tiles),)
    else:  # (early q, late k) is never visible; (late q, early k) always is
        pairs = ((0, 0, causal_tiles), (1, 0, full_tiles), (1, 1, causal_tiles))
    plan = _RingPlan(axis, size, runs == 2, run_len, pairs)

    def to_runs(x, fill):  # [B, T/P, ...] -> [R, B, padded, ...]
        x = jnp.moveaxis(x.reshape(b, runs, run_len, *x.shape[2:]), 1, 0)
        widths = [(0, 0), (0, 0), (0, padded - run_len)] + [(0, 0)] * (x.ndim - 3)
        return jnp.pad(x, widths, constant_values=fill)

    valid = jnp.ones((b, t_local), bool) if key_mask is None else key_mask
    seg = None if segment_ids is None else to_runs(segment_ids.astype(jnp.int32), 0)
    out = _ring_attention(
        plan, to_runs(q, 0), to_runs(k, 0), to_runs(v, 0), seg, to_runs(valid, False)
    )
    out = jnp.moveaxis(out[:, :, :run_len], 0, 1)  # [B, R, run_len, H, D]
    return out.reshape(b, t_local, *out.shape[3:])


def _pick(x, r):
    return None if x is None else x[r]


def _merge(o, lse, o_blk, lse_blk):
    """Folds a block's (o, lse) into the running (o, lse); lse −inf marks rows with no key yet."""
    lse_blk = jnp.where(lse_blk == jnp.inf, -jnp.inf, lse_blk)  # chunked: +inf = saw no key
    new = jnp.logaddexp(lse, lse_blk)
    safe = jnp.where(jnp.isfinite(new), new, 0.0)

    def weight(x):  # [B, H, C] -> [B, C, H, 1]
        return jnp.swapaxes(jnp.exp(x - safe), 1, 2)[..., None]

    return o * weight(lse) + o_blk.astype(_F32) * weight(lse_blk), new


def _ring_loop(plan: _RingPlan, step, carry):
    """step(s, carry, send) for s = 0..P−1; the K/V shard is not sent after the last step."""
    if plan.size > 1:
        carry = lax.fori_loop(0, plan.size - 1, lambda s, c: step(s, c, True), carry)
    return step(plan.size - 1, carry, False)


def _ring_forward(plan: _RingPlan, q, k, v, seg, valid):
    """Forward ring on runs [R, B, C, H, D]: (o [R, B, C, H, D], lse [R, B, H, C]; +inf = none)."""
    me = lax.axis_index(plan.axis_name)
    runs, b, c, h, d = q.shape

    def step(s, carry, send):
        kv, o, lse = carry
        kv_next = plan.shift(kv) if send else kv  # issued before this block's compute
        src = (me - s) % plan.size
        k_cur, v_cur, seg_cur, valid_cur = kv
        o, lse = list(o), list(lse)
        for a, r, tiling in plan.pairs:
            o_blk, lse_blk = chunked_forward(
                tiling, q[a], k_cur[r], v_cur[r], _pick(seg, a), _pick(seg_cur, r), valid_cur[r],
                plan.offset(me, src, a, r, tiling),
            )  # fmt: skip
            o[a], lse[a] = _merge(o[a], lse[a], o_blk, lse_blk)
        return kv_next, tuple(o), tuple(lse)

    o0 = tuple(jnp.zeros((b, c, h, d), _F32) for _ in range(runs))
    lse0 = tuple(jnp.full((b, h, c), -jnp.inf, _F32) for _ in range(runs))
    _, o, lse = _ring_loop(plan, step, ((k, v, seg, valid), o0, lse0))
    lse = jnp.stack(lse)
    return jnp.stack(o).astype(v.dtype), jnp.where(jnp.isfinite(lse), lse, jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(plan: _RingPlan, q, k, v, seg, valid):
    return _ring_forward(plan, q, k, v, seg, valid)[0]


def _ring_attention_fwd(plan, q, k, v, seg, valid):
    o, lse = _ring_forward(plan, q, k, v, seg, valid)
    return o, (q, k, v, seg, valid, o, lse)


def _ring_attention_bwd(plan: _RingPlan, res, do):
    """Backward ring: per block the chunked backward against the global (o, lse); dq stays, the
    dK/dV accumulator of a shard travels with it and is home after P hops."""
    q, k, v, seg, valid, o, lse = res
    me = lax.axis_index(plan.axis_name)

    def step(s, carry, send):
        kv, dkv_in, dq = carry
        kv_next = plan.shift(kv) if send else kv  # issued before this block's compute
        src = (me - s) % plan.size
        k_cur, v_cur, seg_cur, valid_cur = kv
        dq, dk, dv = list(dq), [0.0] * k.shape[0], [0.0] * k.shape[0]
        for a, r, tiling in plan.pairs:
            res_blk = (
                q[a], k_cur[r], v_cur[r], o[a], lse[a], _pick(seg, a), _pick(seg_cur, r),
                valid_cur[r], plan.offset(me, src, a, r, tiling),
            )  # fmt: skip
            dq_blk, dk_blk, dv_blk = chunked_backward(tiling, res_blk, do[a])[:3]
            dq[a] = dq[a] + dq_blk.astype(_F32)
            dk[r] = dk[r] + dk_blk.astype(_F32)
            dv[r] = dv[r] + dv_blk.astype(_F32)
        # dkv_in was sent during the previous step; it is needed only now, after the compute.
        dkv_out = plan.shift((dkv_in[0] + jnp.stack(dk), dkv_in[1] + jnp.stack(dv)))
        return kv_next, dkv_out, tuple(dq)

    zeros = jnp.zeros(k.shape, _F32)
    dq0 = tuple(jnp.zeros(q.shape[1:], _F32) for _ in range(q.shape[0]))
    _, (dk, dv), dq = _ring_loop(plan, step, ((k, v, seg, valid), (zeros, zeros), dq0))
    return jnp.stack(dq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


# ----------------------------------------------------------------------------- mesh wrapper


def _present(mesh: Mesh, axes: Sequence[str] | str | None):
    if axes is None:
        return None
    names = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in mesh.axis_names)
    if not names:
        return None
    return names[0] if len(names) == 1 else names


def _axes_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def sharded_context_parallel_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: Mesh,
    strategy: str = "ring",
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    key_mask: jax.Array | None = None,
    layout: str = "contiguous",
    implementation: str = "auto",
    chunk_size: int | None = None,
    axis_name: str = CONTEXT_AXIS,
    batch_axes: Sequence[str] | str | None = ("data", "fsdp"),
    heads_axis: str | None = "tensor",
) -> jax.Array:
    """:func:`context_parallel_attention` on global arrays, through ``jax.shard_map`` on ``mesh``.

    q, k, v [B, T, H, D] are split as P(batch_axes, axis_name, heads_axis, None) (axes the mesh
    lacks are dropped), the masks [B, T] as P(batch_axes, axis_name). With ``layout='zigzag'`` the
    arrays must already be in the zig-zag order (:func:`zigzag_shard_batch`); the output is in
    the order of the input.

    Args:
      q, k, v: [B, T, H, D].
      mesh: a mesh with ``axis_name`` (e.g. ``jaxbatch.parallel.make_mesh(context=4)``).
      strategy, causal, segment_ids, key_mask, layout, implementation, chunk_size: as in
        :func:`context_parallel_attention` (global [B, T] masks).
      axis_name: the sequence axis of the mesh.
      batch_axes: mesh axes that split B.
      heads_axis: mesh axis that splits H (tensor parallelism), or None.

    Returns:
      [B, T, H, D].

    Raises:
      ValueError: sizes the mesh does not divide (naming both), before anything is compiled.
    """
    where = "sharded_context_parallel_attention"
    if axis_name not in mesh.axis_names:
        raise ValueError(f"{where}: mesh axes {mesh.axis_names} have no {axis_name!r} axis")
    size = mesh.shape[axis_name]
    batch, heads = _present(mesh, batch_axes), _present(mesh, heads_axis)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if np.ndim(x) != 4:
            raise ValueError(f"{where}: {name} must be [B, T, H, D], got shape {np.shape(x)}")
    b, t, h = q.shape[:3]
    pieces = 2 * size if layout == "zigzag" else size
    if t % pieces:
        raise ValueError(
            f"{where}: sequence length {t} is not divisible by "
            + (
                f"2 × context = {pieces} (zig-zag layout)"
                if layout == "zigzag"
                else f"context = {size}"
            )
        )
    if b % _axes_size(mesh, batch):
        raise ValueError(
            f"{where}: batch {b} is not divisible by {batch} = {_axes_size(mesh, batch)}"
        )
    tensor = _axes_size(mesh, heads)
    if h % tensor:
        raise ValueError(f"{where}: heads {h} are not divisible by {heads!r} = {tensor}")
    if strategy == "ulysses":
        _check_ulysses_heads(h // tensor, k.shape[2] // tensor, size, where="per-device ")
    spec4, spec2 = P(batch, axis_name, heads, None), P(batch, axis_name)
    masks = {"segment_ids": segment_ids, "key_mask": key_mask}
    given = {name: x for name, x in masks.items() if x is not None}

    def local(q, k, v, given):
        return context_parallel_attention(
            q, k, v, strategy=strategy, axis_name=axis_name, causal=causal, layout=layout,
            implementation=implementation, chunk_size=chunk_size, **given,
        )  # fmt: skip

    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec4, spec4, spec4, {name: spec2 for name in given}),
        out_specs=spec4,
        check_vma=False,
    )
    return fn(q, k, v, given)


# ----------------------------------------------------------------------------- models


MODEL_STRATEGIES: tuple[str, ...] = ("none", *STRATEGIES)
"""The values of a model's ``context_parallel`` attribute ('none': the ordinary attention)."""


def check_model_options(strategy: str, layout: str, *, where: str) -> None:
    """ValueError unless ``strategy`` is in :data:`MODEL_STRATEGIES` and ``layout`` in LAYOUTS."""
    if strategy not in MODEL_STRATEGIES:
        raise ValueError(
            f"{where}: unknown context_parallel={strategy!r}; expected one of {MODEL_STRATEGIES}"
        )
    if layout not in LAYOUTS:
        raise ValueError(f"{where}: unknown context_layout={layout!r}; expected one of {LAYOUTS}")


def current_mesh():
    """The mesh of the trace (``jax.set_mesh`` / ``use_abstract_mesh``), or None if none is set."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def context_axis_size(mesh=None) -> int:
    """Size of the 'context' axis of ``mesh`` (default: the trace's mesh); 1 without one."""
    mesh = current_mesh() if mesh is None else mesh
    if mesh is None or CONTEXT_AXIS not in mesh.axis_names:
        return 1
    return int(mesh.shape[CONTEXT_AXIS])


def model_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    strategy: str,
    layout: str,
    causal: bool,
    segment_ids: jax.Array | None,
    key_mask: jax.Array | None,
    implementation: str,
    chunk_size: int | None,
) -> jax.Array:
    """The self-attention of a model's layer over the trace's mesh ('context' axis > 1).

    q, k, v [B, T, H, D] are the layer's global activations (their sequence sharded over
    'context' by the logical rule length → context); the call runs
    :func:`sharded_context_parallel_attention` on the abstract mesh of the trace, the batch over
    (data, fsdp), heads over tensor. In the zig-zag layout the batch must have been put in the
    zig-zag order for this context size (:func:`zigzag_shard_batch`; the trainer's tasks do it).
    """
    mesh = current_mesh()
    if mesh is None or context_axis_size(mesh) == 1:
        raise ValueError(
            f"context_parallel={strategy!r}: model_attention needs a mesh with a 'context' axis "
            "> 1 in the trace (jax.set_mesh or the trainer's step)"
        )
    batch_axes, heads_axis = _rule_axes("batch", ("data", "fsdp")), _rule_axes("heads", "tensor")
    return sharded_context_parallel_attention(
        q, k, v, mesh=mesh, strategy=strategy, causal=causal, segment_ids=segment_ids,
        key_mask=key_mask, layout=layout, implementation=implementation, chunk_size=chunk_size,
        batch_axes=batch_axes, heads_axis=heads_axis,
    )  # fmt: skip


def _rule_axes(name: str, default):
    """The mesh axes the active flax logical-axis rules give ``name`` (``default`` without rules).

    Read from the rules rather than fixed, so that inside the trainer's noise groups (a vmap
    whose group axis holds some batch axes, with rules mapping 'batch' to the others) the
    shard_map splits the batch over the axes left to it.
    """
    rules = linen.get_logical_axis_rules()
    if not rules:
        return default
    return dict(rules).get(name, default)


def check_model_sizes(
    *,
    seq_len: int,
    heads: int,
    strategy: str,
    layout: str,
    mesh_shape: Mapping[str, int],
    where: str,
) -> None:
    """Refuses, before anything is traced, sizes a context-parallel model cannot split.

    Args:
      seq_len: tokens per example T.
      heads: attention heads H of the model.
      strategy, layout: the model's context_parallel / context_layout.
      mesh_shape: the mesh's axis sizes (context, tensor).
      where: a prefix for the messages (e.g. 'config.model').

    Raises:
      ValueError: T not divisible by context (2 × context for zig-zag), heads not divisible by
        tensor, or (Ulysses) per-device heads not divisible by context; each naming the sizes.
    """
    context = int(mesh_shape.get(CONTEXT_AXIS, 1))
    tensor = int(mesh_shape.get("tensor", 1))
    if context == 1:
        return
    pieces = 2 * context if layout == "zigzag" else context
    if seq_len % pieces:
        need = f"2 × context = {pieces} (zig-zag layout)" if layout == "zigzag" else None
        raise ValueError(
            f"{where}: sequence length {seq_len} is not divisible by "
            f"{need or f'context = {context}'}"
        )
    if heads % tensor:
        raise ValueError(f"{where}: heads {heads} are not divisible by tensor = {tensor}")
    if strategy == "ulysses":
        _check_ulysses_heads(heads // tensor, heads // tensor, context, where="per-device ")
