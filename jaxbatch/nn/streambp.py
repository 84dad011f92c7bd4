"""StreamBP: exact backprop through a stack of causal blocks, chunk by chunk along the sequence.

For causal blocks z_l = f_l(z_{l-1}), l = 1..L, on sequences of length T, the forward pass keeps
only the layer-boundary hidden states z_0..z_{L-1} (one [B, T, D] array per layer, the residuals
of one ``custom_vjp`` per layer). The backward pass of layer l, given dz_l:

1. computes the keys and values of the whole sequence once, (K, V) = g(θ, z_{l-1}) (O(T·D));
2. walks the sequence in chunks [s, e): recomputes the chunk's output
   y[s:e] = c(θ, z_{l-1}[s:e], K, V, s) (queries s..e-1 against their causal prefix of keys) and
   takes its VJP with dz_l[s:e], which gives the direct part of dz_{l-1}[s:e], a share of dθ
   (accumulated) and dK, dV (accumulated into [B, T, ...] buffers: the gradient that flows into
   earlier positions through attention);
3. pulls (dK, dV) back through g: dz_{l-1} += ∂g/∂zᵀ (dK, dV) and dθ += ∂g/∂θᵀ (dK, dV).

Since y[s:e] depends on z_{l-1} only through z_{l-1}[s:e] and (K, V)[:e], this chain rule is the
full gradient, exact up to the order of floating-point summation:
dθ = Σ_chunks ∂c/∂θᵀ dz_l[s:e] + ∂g/∂θᵀ (Σ_chunks dK_chunk, Σ_chunks dV_chunk). What the backward
pass of a layer holds at once is O(T·D) (K, V, their gradients, dz) plus one chunk's activations,
O(chunk · (T + mlp width)) (O(chunk · mlp width) with a flash attention) instead of a whole
layer's O(T · (T + mlp width)). Masks are honoured: the chunk function gets the per-position
auxiliary arrays (segment ids of packed sequences, key padding) and the query offset s.

For attention blocks (:class:`AttentionChunk`, what :func:`pre_ln_block_fns` returns) the
backward pass is fused further: the chunks are walked from the last to the first, the attention of
a chunk over its prefix runs by key blocks read in place with dK, dV added into float32
accumulators in place, and as soon as a chunk is done its dK, dV are complete (only later chunks
read its keys), so it pulls them through the key/value projection at once and writes its whole
input gradient over its output cotangent. One layer's backward pass then holds x, one dy/dx
buffer, K, V, dK, dV and one chunk. Measured (scripts/bench_membackprop.py, 12 layers, D = 768,
batch 1 per device, the whole train step): about 55 KiB per token, of which 36 KiB are the
twelve f32 layer inputs, against 154 KiB per token for per-layer remat with the chunked attention.
``streambp_stack(layer_groups=G)`` also checkpoints groups of layers, so that G + L/G layer
inputs are held instead of L.

The chunks run in a ``lax.scan`` (one compiled chunk, run one after the other, so only one
chunk's activations exist at a time); T is padded up to a multiple of the chunk (the padded
positions come after every real one, so causality keeps them out of the real outputs, and their
cotangent is 0). Every chunk reads the whole (padded) K and V and gets its start s as a traced
offset: the attention masks the keys after each query (and may skip the key blocks past the
chunk, as a flash attention does).

References:
  Luo, Zhang, Xu, Sun 2025, "StreamBP: Memory-Efficient Exact Backpropagation for Long Sequence
  Training of LLMs", Sec. 3 (the layer-wise chunked chain rule; their code drops the attention mask,
  here it is kept).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxbatch.nn import compressed_activations, layers
from jaxbatch.nn.axes import BATCH, EMBED, LENGTH, constrain

PreFn = Callable[[Any, jax.Array, Any], Any]
ChunkFn = Callable[[Any, jax.Array, Any, Any, jax.Array], jax.Array]


def check_chunk_size(chunk_size: Any, length: int) -> None:
    """Raises ValueError unless chunk_size is an int with 1 <= chunk_size <= length."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise ValueError(f"stream chunk_size must be an int, got {chunk_size!r}")
    if not 1 <= chunk_size <= length:
        raise ValueError(f"stream chunk_size={chunk_size} must be in [1, sequence length {length}]")


def _pad(tree: Any, length: int) -> Any:
    """Pads axis 1 of every leaf with zeros up to ``length``."""

    def pad(a):
        widths = [(0, 0)] * a.ndim
        widths[1] = (0, length - a.shape[1])
        return jnp.pad(a, widths)

    return jax.tree.map(pad, tree)


def _acc_zeros(tree: Any) -> Any:
    """float32 (or wider) zeros shaped like ``tree``: gradient accumulators."""
    return jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.promote_types(a.dtype, jnp.float32)), tree)


def _add(acc: Any, g: Any) -> Any:
    return jax.tree.map(lambda a, b: a + b.astype(a.dtype), acc, g)


def _cast_like(tree: Any, like: Any) -> Any:
    return jax.tree.map(lambda a, b: a.astype(b.dtype), tree, like)


def _padded(x, aux, chunk):
    length = x.shape[1]
    padded = -(-length // chunk) * chunk
    return _pad(x, padded), _pad(aux, padded), padded // chunk


def _slice(a: jax.Array, start: jax.Array, size: int) -> jax.Array:
    return lax.dynamic_slice_in_dim(a, start, size, axis=1)


def _forward(pre_fn, chunk_fn, chunk_size, params, x, aux):
    xp, auxp, n = _padded(x, aux, chunk_size)
    kv = pre_fn(params, xp, auxp)

    def body(y, start):
        y_c = chunk_fn(params, _slice(xp, start, chunk_size), kv, auxp, start)
        return lax.dynamic_update_slice_in_dim(y, y_c.astype(y.dtype), start, axis=1), None

    starts = jnp.arange(n, dtype=jnp.int32) * chunk_size
    y, _ = lax.scan(body, jnp.zeros_like(xp), starts)
    return y[:, : x.shape[1]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _layer(pre_fn, chunk_fn, chunk_size, int8, params, x, aux):
    del int8
    return _forward(pre_fn, chunk_fn, chunk_size, params, x, aux)


def _layer_fwd(pre_fn, chunk_fn, chunk_size, int8, params, x, aux):
    # Residuals: the layer's input (int8 with one scale per position when ``int8``) and its
    # parameters only, no activation of the layer.
    y = _forward(pre_fn, chunk_fn, chunk_size, params, x, aux)
    if int8:
        q, scale = compressed_activations.quantize(x, axis=(0, 1))
        return y, (params, (q, scale, jnp.zeros((0,), x.dtype)), aux)
    return y, (params, x, aux)


def _layer_bwd(pre_fn, chunk_fn, chunk_size, int8, residuals, dy):
    params, x, aux = residuals
    if int8:
        q, scale, like = x
        x = compressed_activations.dequantize(q, scale, like.dtype)
    if isinstance(chunk_fn, AttentionChunk):
        dparams, dx = _attention_layer_bwd(pre_fn, chunk_fn, chunk_size, params, x, aux, dy)
        return dparams, dx, jax.tree.map(lambda _: None, aux)
    xp, auxp, n = _padded(x, aux, chunk_size)
    dyp = _pad(dy, xp.shape[1])
    acc = jnp.promote_types(x.dtype, jnp.float32)
    # K, V without their VJP residuals during the walk; the VJP of g recomputes them after it.
    kv = pre_fn(params, xp, auxp)

    def body(carry, start):
        dparams, dkv, dx = carry
        _, chunk_vjp = jax.vjp(
            lambda p, z, k: chunk_fn(p, z, k, auxp, start),
            params,
            _slice(xp, start, chunk_size),
            kv,
        )
        dp, dx_c, dkv_c = chunk_vjp(_slice(dyp, start, chunk_size))
        dx = lax.dynamic_update_slice_in_dim(dx, dx_c.astype(acc), start, axis=1)
        return (_add(dparams, dp), _add(dkv, dkv_c), dx), None

    starts = jnp.arange(n, dtype=jnp.int32) * chunk_size
    init = (_acc_zeros(params), _acc_zeros(kv), jnp.zeros(xp.shape, acc))
    (dparams, dkv, dx_direct), _ = lax.scan(body, init, starts)
    _, pre_vjp = jax.vjp(lambda p, z: pre_fn(p, z, auxp), params, xp)
    dp, dx = pre_vjp(_cast_like(dkv, kv))
    dparams = _cast_like(_add(dparams, dp), params)
    dx = dx.astype(acc) + dx_direct
    return dparams, dx[:, : x.shape[1]].astype(x.dtype), jax.tree.map(lambda _: None, aux)


_layer.defvjp(_layer_fwd, _layer_bwd)


# ------------------------------------------------------------------ attention blocks, fused walk


def _key_block(query_len: int, key_len: int, preferred: int) -> int:
    """The key block of the prefix attention: ``preferred`` when it tiles the queries and the
    keys, else the query length (the StreamBP chunk, which tiles the padded keys)."""
    if query_len % preferred == 0 and key_len % preferred == 0:
        return preferred
    return query_len


def _visible(q_pos, k_pos, q_seg, k_seg) -> jax.Array:
    """bool [B or 1, 1, c, bk]: causal, and within the segment when segment ids are given."""
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None]
    if q_seg is not None:
        mask = mask & (q_seg[:, None, :, None] == k_seg[:, None, None, :])
    return mask


class _Prefix:
    """Queries q [B, c, H, Dh] at positions start..start+c-1 against the keys and values
    [B, Tk, H, Dh] of the whole (padded) sequence, walked in key blocks of ``block`` positions
    read in place (``lax.dynamic_slice``), only the blocks that are not wholly in the future."""

    def __init__(self, q, k, segment_ids, start, block):
        self.c, self.d, self.block, self.start = q.shape[1], q.shape[-1], block, start
        self.q_pos = start + jnp.arange(self.c, dtype=jnp.int32)
        self.seg = segment_ids
        self.q_seg = None if segment_ids is None else _slice(segment_ids, start, self.c)
        last = (start + self.c + block - 1) // block
        self.n_blocks = jnp.minimum(last, k.shape[1] // block)

    def block_at(self, a, j):
        return lax.dynamic_slice_in_dim(a, j * self.block, self.block, axis=1)

    def scores_and_mask(self, q, k, j):
        k_j = self.block_at(k, j)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k_j, preferred_element_type=jnp.float32)
        k_pos = j * self.block + jnp.arange(self.block, dtype=jnp.int32)
        k_seg = None if self.seg is None else self.block_at(self.seg, j)
        return s / math.sqrt(self.d), _visible(self.q_pos, k_pos, self.q_seg, k_seg)


def _prefix_attention_fwd(q, k, v, segment_ids, start, block):
    """(o [B, c, H, Dh] in v's dtype, lse [B, H, c] float32): the online softmax (Dao 2023,
    Alg. 1) over the key blocks; a query that sees no key gets o = 0 and lse = +inf."""
    pre = _Prefix(q, k, segment_ids, start, block)
    b, c, h, d = q.shape

    def key_block(j, carry):
        m, l, acc = carry
        s, visible = pre.scores_and_mask(q, k, j)
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        pv = jnp.einsum(
            "bhqk,bkhd->bqhd", p.astype(v.dtype), pre.block_at(v, j),
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        acc = acc * jnp.swapaxes(alpha, 1, 2)[..., None] + pv
        return m_new, alpha * l + jnp.sum(p, axis=-1), acc

    init = (
        jnp.full((b, h, c), -jnp.inf, jnp.float32),
        jnp.zeros((b, h, c), jnp.float32),
        jnp.zeros((b, c, h, d), jnp.float32),
    )
    m, l, acc = lax.fori_loop(0, pre.n_blocks, key_block, init)
    seen = l > 0
    o = acc / jnp.swapaxes(jnp.where(seen, l, 1.0), 1, 2)[..., None]
    o = jnp.where(jnp.swapaxes(seen, 1, 2)[..., None], o, 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
    return o.astype(v.dtype), lse


def _prefix_attention_bwd(q, k, v, o, lse, do, segment_ids, start, block, dk, dv):
    """dq [B, c, H, Dh] float32, and the float32 accumulators dk, dv [B, Tk, H, Dh] with this
    chunk's share added in place, block by block (Dao 2023, Alg. 2: P = exp(s − lse),
    dV += Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − D) with D = rowsum(dO ∘ O), dQ = dS K / sqrt(Dh),
    dK += dSᵀ Q / sqrt(Dh))."""
    pre = _Prefix(q, k, segment_ids, start, block)
    f32 = dict(preferred_element_type=jnp.float32)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B, c, H]
    delta = jnp.swapaxes(delta, 1, 2)[..., None]  # [B, H, c, 1]

    def key_block(j, carry):
        dq, dk, dv = carry
        s, visible = pre.scores_and_mask(q, k, j)
        p = jnp.where(visible, jnp.exp(s - lse[..., None]), 0.0)
        dp = jnp.einsum("bqhd,bkhd->bhqk", do, pre.block_at(v, j), **f32)
        ds = p * (dp - delta) / math.sqrt(pre.d)
        dq = dq + jnp.einsum("bhqk,bkhd->bqhd", ds.astype(k.dtype), pre.block_at(k, j), **f32)
        dv_j = jnp.einsum("bhqk,bqhd->bkhd", p.astype(do.dtype), do, **f32)
        dk_j = jnp.einsum("bhqk,bqhd->bkhd", ds.astype(q.dtype), q, **f32)
        at = j * pre.block
        dk = lax.dynamic_update_slice_in_dim(dk, pre.block_at(dk, j) + dk_j, at, axis=1)
        dv = lax.dynamic_update_slice_in_dim(dv, pre.block_at(dv, j) + dv_j, at, axis=1)
        return dq, dk, dv

    dq0 = jnp.zeros(q.shape, jnp.float32)
    return lax.fori_loop(0, pre.n_blocks, key_block, (dq0, dk, dv))


@dataclasses.dataclass(frozen=True)
class AttentionChunk:
    """The chunk function of a causal attention block, in the three parts the fused backward walk
    of :func:`streambp_layer` needs: y_c = post_fn(θ, z_c, attn(q_fn(θ, z_c), K, V)), with
    (K, V) = pre_fn(θ, z, segment_ids) and attn the causal softmax attention of the chunk's
    queries over their prefix (within the segment when the auxiliary input, segment ids [B, T],
    is given). pre_fn must be position-wise (K, V at position t depend on z_t only), as the
    key/value projections of a pre-norm block are.

    Called as a ``ChunkFn`` (``chunk(params, z_c, (K, V), segment_ids, start)``) it is that
    expression. Given to :func:`streambp_layer`, the backward pass walks the chunks from the last
    to the first and (i) runs the attention by key blocks read in place, adding each block's
    dK, dV into the float32 accumulators in place, so one chunk holds O(c · (block + mlp width))
    beside them; (ii) once a chunk is done, the chunks after it have all been, so dK, dV of its
    positions are complete: it pulls them back through pre_fn on the chunk at once and writes the
    chunk's whole input gradient into the buffer that held its output cotangent. A layer's
    backward pass thus holds x, dy/dx (one buffer), K, V, dK, dV and one chunk.

    Attributes:
      q_fn: ``q_fn(params, z_c) -> q`` [B, c, H, Dh].
      post_fn: ``post_fn(params, z_c, o) -> y_c``, o [B, c, H, Dh] the attention output.
      key_block: keys per block of the attention (used when it divides the chunk; else the chunk).
    """

    q_fn: Callable[[Any, jax.Array], jax.Array]
    post_fn: Callable[[Any, jax.Array, jax.Array], jax.Array]
    key_block: int = 512

    def __call__(self, params, z_c, kv, segment_ids, start):
        k, v = kv
        block = _key_block(z_c.shape[1], k.shape[1], self.key_block)
        if k.shape[1] % block:  # a direct call at an untiled length: masked future keys
            kv_seg = _pad((k, v, segment_ids), -(-k.shape[1] // block) * block)
            k, v, segment_ids = kv_seg
        q = self.q_fn(params, z_c)
        o, _ = _prefix_attention_fwd(q, k, v, segment_ids, start, block)
        return self.post_fn(params, z_c, o)


def _attention_layer_bwd(pre_fn, chunk: AttentionChunk, chunk_size, params, x, aux, dy):
    """(dθ, dx) of one :class:`AttentionChunk` layer: the fused reverse walk (see its docstring).

    Exact: y_c depends on z only through z_c and (K, V)[:e]; for chunk c (walked last to first)
    dz_c = ∂post/∂z_cᵀ dy_c + ∂q/∂z_cᵀ dq_c + ∂g/∂z_cᵀ (Σ_{c' ≥ c} dK_{c'}[c], Σ dV_{c'}[c]), every
    term available when chunk c is reached, and dθ is the sum of the same three parts over chunks.
    """
    xp, segp, n = _padded(x, aux, chunk_size)
    grad = _pad(dy, xp.shape[1]).astype(x.dtype)  # dy, overwritten chunk by chunk with dx
    k, v = pre_fn(params, xp, segp)
    block = _key_block(chunk_size, xp.shape[1], chunk.key_block)
    acc = jnp.promote_types(x.dtype, jnp.float32)

    def body(carry, start):
        dparams, grad, dk, dv = carry
        z_c = _slice(xp, start, chunk_size)
        seg_c = None if segp is None else _slice(segp, start, chunk_size)
        q, q_vjp = jax.vjp(chunk.q_fn, params, z_c)
        o, lse = _prefix_attention_fwd(q, k, v, segp, start, block)
        _, post_vjp = jax.vjp(chunk.post_fn, params, z_c, o)
        dp_post, dz_post, do = post_vjp(_slice(grad, start, chunk_size))
        dq, dk, dv = _prefix_attention_bwd(q, k, v, o, lse, do, segp, start, block, dk, dv)
        dp_q, dz_q = q_vjp(dq.astype(q.dtype))
        _, kv_vjp = jax.vjp(lambda p, z: pre_fn(p, z, seg_c), params, z_c)
        dkv_c = (_slice(dk, start, chunk_size), _slice(dv, start, chunk_size))
        dp_kv, dz_kv = kv_vjp(_cast_like(dkv_c, (k, v)))
        dz = dz_post.astype(acc) + dz_q.astype(acc) + dz_kv.astype(acc)
        grad = lax.dynamic_update_slice_in_dim(grad, dz.astype(grad.dtype), start, axis=1)
        dparams = _add(_add(_add(dparams, dp_post), dp_q), dp_kv)
        return (dparams, grad, dk, dv), None

    starts = (jnp.arange(n, dtype=jnp.int32) * chunk_size)[::-1]
    init = (_acc_zeros(params), grad, _acc_zeros(k), _acc_zeros(v))
    (dparams, grad, _, _), _ = lax.scan(body, init, starts)
    return _cast_like(dparams, params), grad[:, : x.shape[1]]


def streambp_layer(
    pre_fn: PreFn,
    chunk_fn: ChunkFn,
    params: Any,
    x: jax.Array,
    aux: Any = None,
    *,
    chunk_size: int,
    int8_input: bool = False,
) -> jax.Array:
    """One causal layer y = f(θ, x) whose backward pass runs chunk by chunk (see module docstring).

    Args:
      pre_fn: ``pre_fn(params, x, aux) -> kv``, the part of the layer every later position reads:
        a pytree of [B, T, ...] arrays (the keys and values of the whole sequence).
      chunk_fn: ``chunk_fn(params, x_chunk, kv, aux, start) -> y_chunk``: the layer's output for
        the positions start..start+c-1 from x[:, start:start+c], the keys and values ``kv`` and
        ``aux`` of the whole sequence (padded to a multiple of c) and ``start``, an int32 scalar
        (traced: the query offset of the chunk). Position i may read kv and aux at positions <= i
        only (causality is what makes the chunked chain rule exact).
      params: the layer's parameter pytree (differentiated).
      x: the layer input [B, T, ...] (differentiated).
      aux: a pytree of [B, T, ...] arrays that are not differentiated (segment ids, key masks), or
        None.
      chunk_size: positions per chunk c, 1 <= c <= T; T need not be a multiple.
      int8_input: keep x for the backward pass as int8 with one float32 scale per position
        (``jaxbatch.nn.compressed_activations.quantize``; Mesa / GACT-style compression of the
        layer-boundary states): a quarter of the f32 bytes; the gradient is then that of the
        layer at the dequantized input x̂, |x̂ − x| <= max_d |x[b, t, d]| / 254 per entry.

    Returns:
      y [B, T, ...], the same as ``chunk_fn(params, x, pre_fn(params, x, aux), aux, 0)``, with
      gradients for params and x equal to those of that expression up to summation order.
    """
    if x.ndim < 2:
        raise ValueError(f"streambp_layer: expected x [B, T, ...], got shape {x.shape}")
    check_chunk_size(chunk_size, x.shape[1])
    for a in jax.tree.leaves(aux):
        if a.shape[:2] != x.shape[:2]:
            raise ValueError(
                f"streambp_layer: auxiliary array of shape {a.shape} does not start with x's "
                f"[B, T] = {x.shape[:2]}"
            )
    return _layer(pre_fn, chunk_fn, chunk_size, bool(int8_input), params, x, aux)


def streambp_stack(
    pre_fn: PreFn,
    chunk_fn: ChunkFn,
    layer_params: Any | Sequence[Any],
    x: jax.Array,
    aux: Any = None,
    *,
    chunk_size: int,
    scanned: bool,
    int8_input: bool = False,
    layer_groups: int = 1,
) -> jax.Array:
    """z_L of z_l = f(θ_l, z_{l-1}), every layer a :func:`streambp_layer`.

    Args:
      pre_fn, chunk_fn, aux, chunk_size, int8_input: as for :func:`streambp_layer` (the same for
        every layer).
      layer_params: with ``scanned``, one pytree whose leaves are stacked [L, ...] (run with
        ``lax.scan``: one compiled layer); otherwise a sequence of L per-layer pytrees (unrolled).
      x: z_0 [B, T, ...].
      layer_groups: G, dividing L. With G = 1 the forward pass keeps z_0..z_{L-1}. With G > 1 the
        layers run in G groups of L/G, each a ``jax.checkpoint`` (Chen et al. 2016, "Training
        Deep Nets with Sublinear Memory Cost", Sec. 4.1): the forward pass keeps only the G group
        inputs, and the backward pass of a group first re-runs its forward (chunked, as here),
        keeping its L/G layer inputs, then walks its layers back. The states held drop from L to
        G + L/G per position (L = 12, G = 4: 7; L = 24, G = 4: 10) for one more forward pass of
        the layers; the result and the gradients are the same (recomputation only). On XLA:CPU
        the saving shows with ``scanned`` only (the CPU compiler drops the remat barriers of
        unrolled code; see ``jaxbatch.nn.remat``).

    Returns:
      z_L. The forward pass keeps z_0..z_{L-1} (G = 1) or the G group inputs for the backward
      pass, and nothing else.
    """
    layer = functools.partial(
        streambp_layer, pre_fn, chunk_fn, aux=aux, chunk_size=chunk_size, int8_input=int8_input
    )
    depth = jax.tree.leaves(layer_params)[0].shape[0] if scanned else len(layer_params)
    check_layer_groups(layer_groups, depth)
    if scanned:

        def run(z, stacked):
            return lax.scan(lambda z, p: (layer(p, z), None), z, stacked)[0]

        if layer_groups == 1:
            return run(x, layer_params)
        grouped = jax.tree.map(
            lambda a: a.reshape(layer_groups, depth // layer_groups, *a.shape[1:]), layer_params
        )
        group = jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable)
        return lax.scan(lambda z, p: (group(z, p), None), x, grouped)[0]

    def run_list(z, params_list):
        for p in params_list:
            z = layer(p, z)
        return z

    if layer_groups == 1:
        return run_list(x, layer_params)
    size = depth // layer_groups
    group = jax.checkpoint(run_list, policy=jax.checkpoint_policies.nothing_saveable)
    for g in range(layer_groups):
        x = group(x, list(layer_params[g * size : (g + 1) * size]))
    return x


def check_layer_groups(layer_groups: Any, depth: int) -> None:
    """Raises ValueError unless layer_groups is an int >= 1 that divides the depth."""
    if isinstance(layer_groups, bool) or not isinstance(layer_groups, int) or layer_groups < 1:
        raise ValueError(f"streambp layer_groups must be a positive int, got {layer_groups!r}")
    if depth % layer_groups:
        raise ValueError(
            f"streambp layer_groups={layer_groups} must divide the number of layers {depth}"
        )


def pre_ln_block_fns(
    *,
    num_heads: int,
    mlp_dim: int,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    attention: str = "reference",
    attention_chunk_size: int = 512,
    compress_activations: Sequence[str] = (),
) -> tuple[PreFn, ChunkFn]:
    """(pre_fn, chunk_fn) of a causal :func:`jaxbatch.nn.layers.pre_ln_block` (no dropout), for
    :func:`streambp_layer` on that block's parameter tree {ln_attn, attn/{query, key, value, out},
    ln_mlp, mlp/{wi, wo}}.

    pre_fn(θ, z, seg) = (K, V) of LN_attn(z) for the whole sequence (``MultiHeadAttention.qkv``);
    chunk_fn computes x = z_c + W_o·attn(Q(LN_attn(z_c)), K, V) (``MultiHeadAttention.attend``,
    causal from the chunk's offset, within the segment), then x + mlp(LN_mlp(x)), with the
    block's own sub-modules (and so the same numbers). The auxiliary input is the segment ids
    [B, T] of packed sequences, or None. The chunk function is an :class:`AttentionChunk`: its
    attention over the prefix is the XLA online softmax of this module, by key blocks of
    ``attention_chunk_size`` (when that divides the chunk, else the chunk), whatever
    ``attention`` says (``attention`` builds the block's module only; the fused walk calls no
    attention kernel). ``compress_activations``: the block's int8-saved activations
    (``jaxbatch.nn.compressed_activations.COMPRESSIBLE``), which here shrink what one chunk's VJP
    keeps ('mlp_input', 'layer_norm_input'); 'softmax' has no effect here, since the walk keeps
    no probabilities (it recomputes them per key block).
    """
    names = compressed_activations.validate_names(compress_activations)
    kw = dict(dtype=dtype, param_dtype=param_dtype, parent=None)
    if compressed_activations.LAYER_NORM_INPUT in names:
        norm = compressed_activations.CompressedLayerNorm(**kw)
    else:
        norm = nn.LayerNorm(**kw)
    mlp = layers.MlpBlock(mlp_dim, 0.0, **kw, compress_activations=names)
    mha = layers.MultiHeadAttention(
        num_heads,
        attention=attention,
        attention_chunk_size=attention_chunk_size,
        compress_softmax=compressed_activations.SOFTMAX in names,
        **kw,
    )

    def pre_fn(params, z, segment_ids):
        del segment_ids
        h = norm.apply({"params": params["ln_attn"]}, z)
        _, k, v = mha.apply({"params": params["attn"]}, h, method="qkv")  # q is dead code
        return k, v

    def q_fn(params, z_c):
        h = norm.apply({"params": params["ln_attn"]}, z_c)
        q, _, _ = mha.apply({"params": params["attn"]}, h, method="qkv")  # k, v are dead code
        return q

    def post_fn(params, z_c, o):
        x = z_c + mha.apply({"params": params["attn"]}, o, method=lambda m, y: m.out(y))
        h = norm.apply({"params": params["ln_mlp"]}, x)
        x = x + mlp.apply({"params": params["mlp"]}, h, deterministic=True)
        return constrain(x, (BATCH, LENGTH, EMBED))

    return pre_fn, AttentionChunk(q_fn, post_fn, attention_chunk_size)
