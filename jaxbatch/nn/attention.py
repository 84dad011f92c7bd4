"""Scaled dot-product attention that need not hold the [T, T] score matrix.

One entry point, :func:`dot_product_attention`, with an ``implementation`` argument:

| name         | holds                  | where                                                  |
|--------------|------------------------|--------------------------------------------------------|
| 'reference'  | [B, H, Tq, Tk] scores  | everywhere; the test oracle                            |
| 'chunked'    | [B, H, chunk, chunk]   | everywhere (XLA): online softmax, recomputing VJP      |
| 'cudnn'      | cuDNN flash attention  | GPU, bf16/fp16 (``jax.nn.dot_product_attention``)       |
| 'pallas_tpu' | splash attention       | TPU (``jax.experimental.pallas.ops.tpu``)               |
| 'auto'       | one of the above       | :func:`choose_attention_implementation`                 |

Masking (the same for every implementation): query i (absolute position ``query_offset + i``)
attends key j iff ``key_mask[b, j]``, and ``j <= query_offset + i`` when ``causal``, and
``query_segment_ids[b, i] == key_segment_ids[b, j]`` when segment ids are given. A query that sees
no key outputs exactly 0 (and passes no gradient).

References:
  Vaswani et al. 2017, "Attention Is All You Need", Eq. 1: softmax(Q Kᵀ / sqrt(d)) V.
  Milakov, Gimelshein 2018, "Online normalizer calculation for softmax" (the running max/sum).
  Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning",
  Algorithm 1 (forward) and Algorithm 2 (backward: D_i = rowsum(dO_i ∘ O_i), dS = P ∘ (dP − D)).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbatch.nn import compressed_activations

IMPLEMENTATIONS: tuple[str, ...] = ("reference", "chunked", "cudnn", "pallas_tpu", "auto")
DEFAULT_CHUNK_SIZE = 512
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_CUDNN_MAX_HEAD_DIM = 128  # 256 from Hopper on; 128 holds on every cuDNN-flash GPU
_SPLASH_LANES = 128  # splash blocks are multiples of the TPU lane width


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    query_segment_ids: jax.Array | None = None,
    key_segment_ids: jax.Array | None = None,
    key_mask: jax.Array | None = None,
    query_offset: int | jax.Array = 0,
    implementation: str = "auto",
    chunk_size: int | None = None,
) -> jax.Array:
    """softmax(q·kᵀ / sqrt(D), masked) · v with the softmax in float32.

    Args:
      q: queries [B, Tq, H, D].
      k, v: keys and values [B, Tk, H, D] (same dtype as ``q``).
      causal: query at absolute position p sees keys 0..p.
      query_segment_ids, key_segment_ids: int [B, Tq] / [B, Tk] (packed sequences); give both
        or neither.
      key_mask: bool [B, Tk], False on padding keys.
      query_offset: absolute position of query 0 (int >= 0 or an int32 scalar array): a chunk of
        queries against a longer prefix of keys, as in StreamBP.
      implementation: one of :data:`IMPLEMENTATIONS`.
      chunk_size: query and key block of 'chunked' (default 512, clamped to the lengths; T need not
        be a multiple).

    Returns:
      [B, Tq, H, D] in the dtype of ``v``.

    Raises:
      ValueError: on shapes, dtypes or options that do not fit (before anything is compiled).
      NotImplementedError: 'cudnn' or 'pallas_tpu' asked explicitly for masks they cannot
        express ('auto' routes such calls to 'chunked' instead).

    Examples:
      >>> q = k = v = jnp.ones((1, 8, 2, 4))
      >>> dot_product_attention(q, k, v, causal=True, implementation="chunked").shape
      (1, 8, 2, 4)
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if isinstance(query_offset, np.integer):
        query_offset = int(query_offset)
    masks = _validate(
        q, k, v, causal, query_segment_ids, key_segment_ids, key_mask, query_offset, chunk_size
    )
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; expected one of "
            f"{IMPLEMENTATIONS}"
        )
    name, _ = choose_attention_implementation(
        implementation,
        dtype=q.dtype,
        head_dim=q.shape[-1],
        segment_ids=masks.q_seg is not None,
        key_mask=masks.key_mask is not None,
        query_offset=query_offset if isinstance(query_offset, int) else None,
    )
    if name == "reference":
        return reference_attention(q, k, v, causal=causal, query_offset=query_offset, **masks.kw())
    if name == "chunked":
        return chunked_attention(
            q, k, v, causal=causal, query_offset=query_offset, chunk_size=chunk_size, **masks.kw()
        )
    if name == "cudnn":
        why = _cudnn_unsupported(q.dtype, q.shape[-1], masks.q_seg is not None, query_offset)
        if why:
            raise NotImplementedError(f"implementation='cudnn' cannot run this call: {why}")
        return cudnn_attention(q, k, v, causal=causal, key_mask=masks.key_mask)
    why = _pallas_unsupported(query_offset)
    if why:
        raise NotImplementedError(f"implementation='pallas_tpu' cannot run this call: {why}")
    return pallas_tpu_attention(q, k, v, causal=causal, query_offset=query_offset, **masks.kw())


def choose_attention_implementation(
    requested: str,
    *,
    backend: str | None = None,
    dtype: Any = jnp.float32,
    head_dim: int = 64,
    segment_ids: bool = False,
    key_mask: bool = False,
    query_offset: int | None = 0,
) -> tuple[str, str]:
    """The implementation 'auto' runs for these inputs on ``backend``, and why.

    ``backend`` defaults to ``jax.default_backend()``; ``query_offset`` is the Python int offset,
    or None when it is a traced array.

    TPU → 'pallas_tpu' (a static query offset); GPU → 'cudnn' when the call fits it (bf16/fp16,
    head dim a multiple of 8 and <= 128, no segment ids, no key mask, query offset 0); anything
    else → 'chunked'. An explicit request is returned as it is (the implementation checks it).

    Returns:
      (name, reason) with name one of 'reference', 'chunked', 'cudnn', 'pallas_tpu'.
    """
    if requested not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {requested!r}; expected one of {IMPLEMENTATIONS}"
        )
    if requested != "auto":
        return requested, "requested explicitly"
    backend = (backend or jax.default_backend()).lower()
    if backend == "tpu":
        why = _pallas_unsupported(query_offset)
        if why is None:
            return "pallas_tpu", "TPU: Pallas splash attention"
        return "chunked", f"TPU but {why}"
    if backend in ("gpu", "cuda", "rocm"):
        why = _cudnn_unsupported(jnp.dtype(dtype), head_dim, segment_ids, query_offset)
        if why is None and key_mask:
            why = "cuDNN takes padding only as right-padded lengths; a key_mask may be any mask"
        if why is None:
            return "cudnn", "GPU: cuDNN flash attention"
        return "chunked", f"GPU but {why}"
    return "chunked", f"backend {backend!r} has no attention kernel; exact chunked XLA attention"


# ----------------------------------------------------------------------------- validation


@dataclasses.dataclass(frozen=True)
class _Masks:
    q_seg: jax.Array | None
    k_seg: jax.Array | None
    key_mask: jax.Array | None

    def kw(self) -> dict[str, jax.Array | None]:
        return dict(
            query_segment_ids=self.q_seg, key_segment_ids=self.k_seg, key_mask=self.key_mask
        )


def _validate(q, k, v, causal, q_seg, k_seg, key_mask, query_offset, chunk_size) -> _Masks:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"attention: {name} must be [B, T, H, D], got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"attention: {name} must be floating point, got dtype {x.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have one shape, got {k.shape} and {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"attention: q [B, Tq, H, D] = {q.shape} and k [B, Tk, H, D] = {k.shape} must share "
            "B, H and D"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.shape[1] < 1 or k.shape[1] < 1:
        raise ValueError(f"attention: empty sequence, q {q.shape}, k {k.shape}")
    if not isinstance(causal, bool):
        raise ValueError(f"attention: causal must be a bool, got {causal!r}")
    b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    if (q_seg is None) != (k_seg is None):
        raise ValueError(
            "attention: give query_segment_ids and key_segment_ids together (for self-attention "
            "the same array twice)"
        )
    if q_seg is not None:
        q_seg, k_seg = jnp.asarray(q_seg), jnp.asarray(k_seg)
        for name, seg, want in (("query", q_seg, (b, tq)), ("key", k_seg, (b, tk))):
            if seg.shape != want or not jnp.issubdtype(seg.dtype, jnp.integer):
                raise ValueError(
                    f"attention: {name}_segment_ids must be int [B, T{name[0]}] = {want}, got "
                    f"{seg.dtype}{list(seg.shape)}"
                )
        q_seg, k_seg = q_seg.astype(jnp.int32), k_seg.astype(jnp.int32)
    if key_mask is not None:
        key_mask = jnp.asarray(key_mask)
        if key_mask.shape != (b, tk) or key_mask.dtype != jnp.bool_:
            raise ValueError(
                f"attention: key_mask must be bool [B, Tk] = {(b, tk)}, got "
                f"{key_mask.dtype}{list(key_mask.shape)}"
            )
    if isinstance(query_offset, bool) or not isinstance(query_offset, int | jax.Array | np.ndarray):
        raise ValueError(
            f"attention: query_offset must be an int or an int32 scalar array, got {query_offset!r}"
        )
    if isinstance(query_offset, int) and query_offset < 0:
        raise ValueError(f"attention: query_offset must be >= 0, got {query_offset}")
    if not isinstance(query_offset, int) and (
        query_offset.shape != () or not jnp.issubdtype(query_offset.dtype, jnp.integer)
    ):
        raise ValueError(
            f"attention: query_offset must be an integer scalar, got "
            f"{query_offset.dtype}{list(query_offset.shape)}"
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
    ):
        raise ValueError(f"attention: chunk_size must be a positive int, got {chunk_size!r}")
    return _Masks(q_seg, k_seg, key_mask)


def _cudnn_unsupported(dtype, head_dim, segment_ids, query_offset) -> str | None:
    if jnp.dtype(dtype) not in _CUDNN_DTYPES:
        return f"cuDNN flash attention takes bfloat16/float16, got {jnp.dtype(dtype)}"
    if head_dim % 8 or head_dim > _CUDNN_MAX_HEAD_DIM:
        return f"head dim {head_dim} is not a multiple of 8 <= {_CUDNN_MAX_HEAD_DIM}"
    if segment_ids:
        return "jax.nn.dot_product_attention takes no segment ids (only a [B, H, T, T] mask)"
    if not isinstance(query_offset, int) or query_offset:
        return f"its causal mask starts at position 0, got query_offset={query_offset!r}"
    return None


def _pallas_unsupported(query_offset) -> str | None:
    if not isinstance(query_offset, int):
        return (
            "the splash causal mask is static and needs a Python int query_offset, got "
            f"{query_offset!r}"
        )
    return None


# ----------------------------------------------------------------------------- mask helpers


def _positions(query_offset, length: int) -> jax.Array:
    return jnp.asarray(query_offset, jnp.int32) + jnp.arange(length, dtype=jnp.int32)


def _visible(q_pos, k_pos, q_seg, k_seg, key_valid, causal) -> jax.Array:
    """bool [B, 1, tq, tk]: query may attend key (positions [tq] / [tk], the rest [B, t])."""
    mask = key_valid[:, None, None, :]
    if causal:
        mask = mask & (k_pos[None, :] <= q_pos[:, None])[None, None]
    if q_seg is not None:
        mask = mask & (q_seg[:, None, :, None] == k_seg[:, None, None, :])
    return mask


def rows_with_a_visible_key(
    tq: int, *, causal, query_segment_ids, key_segment_ids, key_valid, query_offset
) -> jax.Array:
    """bool [B, Tq]: the query sees at least one key, in O(T log T) (no [Tq, Tk] array).

    Keys are sorted by (segment, invalid, position); the first key of a query's segment in that
    order is its earliest valid key of that segment, visible iff it exists and (causal) is not in
    the query's future.
    """
    tk = key_valid.shape[1]
    q_pos = _positions(query_offset, tq)
    if query_segment_ids is None:
        first = jnp.argmax(key_valid, axis=-1)  # first valid key (0 if none)
        seen = jnp.any(key_valid, axis=-1)[:, None]
        if causal:
            return seen & (first[:, None] <= q_pos[None])
        return jnp.broadcast_to(seen, (key_valid.shape[0], tq))

    def one(q_seg, k_seg, valid):
        order = jnp.lexsort((jnp.arange(tk), ~valid, k_seg))
        idx = jnp.minimum(jnp.searchsorted(k_seg[order], q_seg, side="left"), tk - 1)
        first = order[idx]
        hit = (k_seg[first] == q_seg) & valid[first]
        return hit & (first <= q_pos) if causal else hit

    return jax.vmap(one)(query_segment_ids, key_segment_ids, key_valid)


# ----------------------------------------------------------------------------- reference


def reference_attention(
    q, k, v, *, causal=False, query_segment_ids=None, key_segment_ids=None, key_mask=None,
    query_offset=0, mask=None, compress_softmax=False,
) -> jax.Array:  # fmt: skip
    """The materialising oracle: logits [B, H, Tq, Tk] in float32, masked, softmax, · v.

    ``mask`` (optional, broadcastable to [B, H, Tq, Tk]) is ANDed with the other masks; it is how
    the layers' legacy ``mask`` argument reaches attention. Rows with no visible key give 0.
    ``compress_softmax=True`` ('softmax' of ``compress_activations``) keeps the probabilities
    for the backward pass as int8 with one scale per row
    (``jaxbatch.nn.compressed_activations.compressed_softmax_values``): the same forward, a
    quarter of the float32 bytes of the [B, H, Tq, Tk] residual.
    """
    b, tq, _, d = q.shape
    tk = k.shape[1]
    key_valid = jnp.ones((b, tk), bool) if key_mask is None else key_mask
    visible = _visible(
        _positions(query_offset, tq), jnp.arange(tk), query_segment_ids, key_segment_ids,
        key_valid, causal,
    )  # fmt: skip
    if mask is not None:
        visible = visible & mask
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(visible, logits / math.sqrt(d), jnp.finfo(jnp.float32).min)
    seen = jnp.any(visible, axis=-1, keepdims=True)  # [B, 1 or H, Tq, 1]
    if compress_softmax:
        out = compressed_activations.compressed_softmax_values(logits, v)
        return jnp.where(jnp.swapaxes(seen, 1, 2), out, 0.0).astype(v.dtype)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(seen, probs, 0.0).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


# ----------------------------------------------------------------------------- chunked (XLA)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static tiles of :func:`chunked_forward` / :func:`chunked_backward`: the causal flag and
    the query / key block sizes (the inputs' lengths must be multiples of them)."""

    causal: bool
    block_q: int
    block_k: int


def chunked_attention(
    q, k, v, *, causal=False, query_segment_ids=None, key_segment_ids=None, key_mask=None,
    query_offset=0, chunk_size=None,
) -> jax.Array:  # fmt: skip
    """Exact attention by blocks with an online softmax (FlashAttention-2, Dao 2023, Alg. 1-2).

    Forward, per query block i, over key blocks j that are not wholly in its causal future:
      s = q_i k_jᵀ / sqrt(D);  m' = max(m, rowmax s);  l = e^(m − m') l + rowsum e^(s − m');
      acc = e^(m − m') acc + e^(s − m') v_j;  finally o_i = acc / l, lse_i = m + log l.
    Residuals: q, k, v, o and lse [B, H, Tq] (float32); nothing of size Tq × Tk. Backward, per
    key block j over the query blocks that can see it: P = exp(s − lse), dV_j += Pᵀ dO_i,
    dP = dO_i v_jᵀ, dS = P ∘ (dP − D_i) with D_i = rowsum(dO_i ∘ o_i), dQ_i += dS k_j / sqrt(D),
    dK_j += dSᵀ q_i / sqrt(D). Peak memory O(B·H·block_q·block_k) plus O(T·H·D) buffers. T not a
    multiple of the block is padded internally with masked keys (and discarded queries).
    """
    b, tq, h, d = q.shape
    tk = k.shape[1]
    chunk = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    tiling = Tiling(causal, min(chunk, tq), min(chunk, tk))
    pad_q, pad_k = -tq % tiling.block_q, -tk % tiling.block_k
    key_valid = jnp.ones((b, tk), bool) if key_mask is None else key_mask
    key_valid = jnp.pad(key_valid, ((0, 0), (0, pad_k)))
    pad4 = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))  # noqa: E731
    q_seg, k_seg = query_segment_ids, key_segment_ids
    if q_seg is not None:
        q_seg, k_seg = jnp.pad(q_seg, ((0, 0), (0, pad_q))), jnp.pad(k_seg, ((0, 0), (0, pad_k)))
    out = _chunked(
        tiling, pad4(q, pad_q), pad4(k, pad_k), pad4(v, pad_k), q_seg, k_seg, key_valid,
        jnp.asarray(query_offset, jnp.int32),
    )  # fmt: skip
    return out[:, :tq]


def _blocks(x, size):
    """[B, T, ...] -> [T / size, B, size, ...]."""
    return jnp.moveaxis(x.reshape(x.shape[0], -1, size, *x.shape[2:]), 1, 0)


def _unblock(x):
    """[n, B, size, ...] -> [B, n * size, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


class _Blocked:
    """The padded inputs cut into blocks, and the tile mask / causal loop bounds."""

    def __init__(self, t: Tiling, q, k, q_seg, k_seg, key_valid, offset):
        self.t, self.offset = t, offset
        self.nq, self.nk = q.shape[1] // t.block_q, k.shape[1] // t.block_k
        self.q_seg = None if q_seg is None else _blocks(q_seg, t.block_q)
        self.k_seg = None if k_seg is None else _blocks(k_seg, t.block_k)
        self.key_valid = _blocks(key_valid, t.block_k)

    def mask(self, i, j) -> jax.Array:  # [B, 1, block_q, block_k]
        t = self.t
        q_pos = self.offset + i * t.block_q + jnp.arange(t.block_q)
        k_pos = j * t.block_k + jnp.arange(t.block_k)
        seg = (None, None) if self.q_seg is None else (self.q_seg[i], self.k_seg[j])
        return _visible(q_pos, k_pos, *seg, self.key_valid[j], self.t.causal)

    def key_blocks_end(self, i):
        """1 + the last key block that query block i can see (all of them unless causal)."""
        if not self.t.causal:
            return self.nk
        last = (self.offset + (i + 1) * self.t.block_q - 1) // self.t.block_k
        return jnp.clip(last + 1, 0, self.nk)

    def query_blocks_start(self, j):
        """The first query block that can see key block j (0 unless causal)."""
        if not self.t.causal:
            return 0
        return jnp.clip((j * self.t.block_k - self.offset) // self.t.block_q, 0, self.nq)


def _scores(qi, kj, d):
    return jnp.einsum("bqhd,bkhd->bhqk", qi, kj, preferred_element_type=jnp.float32) / math.sqrt(d)


def chunked_forward(t: Tiling, q, k, v, q_seg, k_seg, key_valid, offset):
    """The forward of :func:`chunked_attention` on padded inputs: (o, lse).

    FlashAttention-2 forward (Dao 2023, Alg. 1) by tiles ``t``: q [B, Tq, H, D], k, v [B, Tk, H,
    D] with Tq, Tk multiples of the blocks, segment ids int32 [B, T] or None, key_valid bool
    [B, Tk], offset an int32 scalar (absolute position of query 0; keys start at 0). Key tiles
    wholly in a query tile's causal future are not visited. Returns o [B, Tq, H, D] (v's dtype)
    and lse = m + log l, float32 [B, H, Tq], +inf on rows that saw no key. Used per block by
    ``jaxbatch.nn.context_parallel``'s ring, which merges blocks through their lse.
    """
    d = q.shape[-1]
    blk = _Blocked(t, q, k, q_seg, k_seg, key_valid, offset)
    qb, kb, vb = _blocks(q, t.block_q), _blocks(k, t.block_k), _blocks(v, t.block_k)
    b, h = q.shape[0], q.shape[2]

    def query_block(args):
        i, qi = args

        def key_block(j, carry):
            m, l, acc = carry  # [B, H, bq], [B, H, bq], [B, bq, H, D] (float32)
            s = jnp.where(blk.mask(i, j), _scores(qi, kb[j], d), -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows that have seen nothing
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), vb[j],
                            preferred_element_type=jnp.float32)  # fmt: skip
            acc = acc * jnp.swapaxes(alpha, 1, 2)[..., None] + pv
            return m_new, alpha * l + jnp.sum(p, axis=-1), acc

        init = (
            jnp.full((b, h, t.block_q), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, t.block_q), jnp.float32),
            jnp.zeros((b, t.block_q, h, d), jnp.float32),
        )
        m, l, acc = lax.fori_loop(0, blk.key_blocks_end(i), key_block, init)
        seen = l > 0
        o = acc / jnp.swapaxes(jnp.where(seen, l, 1.0), 1, 2)[..., None]
        o = jnp.where(jnp.swapaxes(seen, 1, 2)[..., None], o, 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
        return o.astype(v.dtype), lse

    o, lse = lax.map(query_block, (jnp.arange(blk.nq), qb))
    return _unblock(o), jnp.moveaxis(lse, 0, 2).reshape(b, h, -1)  # [B, Tq, H, D], [B, H, Tq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(t: Tiling, q, k, v, q_seg, k_seg, key_valid, offset):
    return chunked_forward(t, q, k, v, q_seg, k_seg, key_valid, offset)[0]


def _chunked_fwd(t, q, k, v, q_seg, k_seg, key_valid, offset):
    o, lse = chunked_forward(t, q, k, v, q_seg, k_seg, key_valid, offset)
    return o, (q, k, v, o, lse, q_seg, k_seg, key_valid, offset)


def chunked_backward(t: Tiling, res, do):
    """The backward of :func:`chunked_attention` (Dao 2023, Alg. 2): (dq, dk, dv, None × 4).

    ``res = (q, k, v, o, lse, q_seg, k_seg, key_valid, offset)`` as :func:`chunked_forward`
    takes and returns them; P = exp(s − lse) is recomputed per tile, so a caller may pass the
    *global* o and lse of a longer key sequence (the ring attention's blocks) and get this
    block's share of dq and its dk, dv.
    """
    q, k, v, o, lse, q_seg, k_seg, key_valid, offset = res
    d = q.shape[-1]
    blk = _Blocked(t, q, k, q_seg, k_seg, key_valid, offset)
    qb, dob = _blocks(q, t.block_q), _blocks(do, t.block_q)
    lseb = _blocks(jnp.swapaxes(lse, 1, 2), t.block_q)  # [nq, B, bq, H]
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # D_i [B, Tq, H]
    deltab = _blocks(delta, t.block_q)
    f32 = dict(preferred_element_type=jnp.float32)

    def key_block(dq, args):
        j, kj, vj = args

        def query_block(i, carry):
            dq, dk, dv = carry
            qi, doi = qb[i], dob[i]
            s = _scores(qi, kj, d)
            lse_i = jnp.swapaxes(lseb[i], 1, 2)[..., None]  # [B, H, bq, 1]
            p = jnp.where(blk.mask(i, j), jnp.exp(s - lse_i), 0.0)  # P, [B, H, bq, bk]
            dv = dv + jnp.einsum("bhqk,bqhd->bkhd", p.astype(do.dtype), doi, **f32)
            dp = jnp.einsum("bqhd,bkhd->bhqk", doi, vj, **f32)
            ds = p * (dp - jnp.swapaxes(deltab[i], 1, 2)[..., None]) / math.sqrt(d)
            dq = dq.at[i].add(jnp.einsum("bhqk,bkhd->bqhd", ds.astype(kj.dtype), kj, **f32))
            dk = dk + jnp.einsum("bhqk,bqhd->bkhd", ds.astype(qi.dtype), qi, **f32)
            return dq, dk, dv

        zeros = jnp.zeros(kj.shape, jnp.float32)
        dq, dk, dv = lax.fori_loop(blk.query_blocks_start(j), blk.nq, query_block,
                                   (dq, zeros, zeros))  # fmt: skip
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq0 = jnp.zeros(qb.shape, jnp.float32)
    kb, vb = _blocks(k, t.block_k), _blocks(v, t.block_k)
    dq, (dk, dv) = lax.scan(key_block, dq0, (jnp.arange(blk.nk), kb, vb))
    return _unblock(dq).astype(q.dtype), _unblock(dk), _unblock(dv), None, None, None, None


_chunked.defvjp(_chunked_fwd, chunked_backward)


# ----------------------------------------------------------------------------- cuDNN (GPU)


def cudnn_attention(q, k, v, *, causal=False, key_mask=None, backend_impl="cudnn") -> jax.Array:
    """cuDNN flash attention through ``jax.nn.dot_product_attention(implementation='cudnn')``.

    The masks go in the forms that API has without a [T, T] array: ``is_causal`` (query_offset 0)
    and ``key_value_seq_lengths = key_mask.sum(-1)``, which is exact only for a right-padded
    key_mask (True then False). A batch row whose key_mask is not right-padded gets NaN outputs
    rather than a silently wrong number; 'auto' never sends a key_mask here. Rows with no key
    give 0. ``backend_impl='xla'`` runs the same call through JAX's XLA path (tests on CPU).
    """
    lengths, right_padded = None, None
    if key_mask is not None:
        tk = key_mask.shape[1]
        lengths = jnp.sum(key_mask, axis=-1, dtype=jnp.int32)
        right_padded = jnp.all(key_mask == (jnp.arange(tk) < lengths[:, None]), axis=-1)
    out = jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, key_value_seq_lengths=lengths, implementation=backend_impl
    )
    if key_mask is not None:
        out = jnp.where(right_padded[:, None, None, None], out, jnp.nan)
        out = jnp.where((lengths > 0)[:, None, None, None], out, 0.0)
    return out.astype(v.dtype)


# ----------------------------------------------------------------------------- Pallas (TPU)


def _splash_block(length: int) -> int:
    return next(s for s in (512, 256, _SPLASH_LANES) if length % s == 0)


def pallas_tpu_attention(
    q, k, v, *, causal=False, query_segment_ids=None, key_segment_ids=None, key_mask=None,
    query_offset=0, interpret=False,
) -> jax.Array:  # fmt: skip
    """Splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``), one call per
    example (vmap over B), heads in the kernel.

    Lengths are padded to multiples of 128; padding and key_mask become segment ids (queries get
    2·segment, valid keys 2·segment, invalid keys 1, which no query id equals); ``causal`` is a
    static ``CausalMask(offset=query_offset)``, so the offset must be a Python int. q is scaled
    by 1/sqrt(D) before the kernel (splash applies no scale). Rows with no visible key give 0
    (:func:`rows_with_a_visible_key`). ``interpret=True`` runs the kernel in the Pallas
    interpreter (tests on CPU).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, tq, h, d = q.shape
    tk = k.shape[1]
    pq, pk = -tq % _SPLASH_LANES, -tk % _SPLASH_LANES
    block_q, block_k = _splash_block(tq + pq), _splash_block(tk + pk)
    key_valid = jnp.ones((b, tk), bool) if key_mask is None else key_mask
    scaled = (q.astype(jnp.float32) / math.sqrt(d)).astype(q.dtype)
    to_bhtd = lambda x, n: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, n), (0, 0)))  # noqa: E731
    shape = (tq + pq, tk + pk)
    head = splash.CausalMask(shape, offset=query_offset) if causal else splash.FullMask(shape)
    sizes = splash.BlockSizes(
        block_q=block_q, block_kv=block_k, block_kv_compute=block_k,
        block_q_dkv=block_q, block_kv_dkv=block_k, block_kv_dkv_compute=block_k,
        block_q_dq=block_q, block_kv_dq=block_k,
    )  # fmt: skip
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([head] * h), block_sizes=sizes, head_shards=1, q_seq_shards=1,
        interpret=interpret,
    )  # fmt: skip
    segments = None
    if query_segment_ids is not None or key_mask is not None or pk:
        q_ids = jnp.zeros((b, tq), jnp.int32) if query_segment_ids is None else query_segment_ids
        k_ids = jnp.zeros((b, tk), jnp.int32) if key_segment_ids is None else key_segment_ids
        q_ids = jnp.pad(2 * q_ids, ((0, 0), (0, pq)))
        k_ids = jnp.pad(jnp.where(key_valid, 2 * k_ids, 1), ((0, 0), (0, pk)), constant_values=1)
        segments = splash.SegmentIds(q=q_ids, kv=k_ids)
    out = jax.vmap(lambda q_, k_, v_, s_: kernel(q_, k_, v_, segment_ids=s_))(
        to_bhtd(scaled, pq), to_bhtd(k, pk), to_bhtd(v, pk), segments
    )
    out = jnp.swapaxes(out[:, :, :tq], 1, 2)
    if query_segment_ids is not None or key_mask is not None:
        seen = rows_with_a_visible_key(
            tq, causal=causal, query_segment_ids=query_segment_ids,
            key_segment_ids=key_segment_ids, key_valid=key_valid, query_offset=query_offset,
        )  # fmt: skip
        out = jnp.where(seen[:, :, None, None], out, 0.0)
    return out.astype(v.dtype)
