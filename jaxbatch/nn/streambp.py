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

import functools
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
) -> jax.Array:
    """z_L of z_l = f(θ_l, z_{l-1}), every layer a :func:`streambp_layer`.

    Args:
      pre_fn, chunk_fn, aux, chunk_size, int8_input: as for :func:`streambp_layer` (the same for
        every layer).
      layer_params: with ``scanned``, one pytree whose leaves are stacked [L, ...] (run with
        ``lax.scan``: one compiled layer); otherwise a sequence of L per-layer pytrees (unrolled).
      x: z_0 [B, T, ...].

    Returns:
      z_L. The forward pass keeps z_0..z_{L-1} for the backward pass and nothing else.
    """
    layer = functools.partial(
        streambp_layer, pre_fn, chunk_fn, aux=aux, chunk_size=chunk_size, int8_input=int8_input
    )
    if scanned:
        x, _ = lax.scan(lambda z, p: (layer(p, z), None), x, layer_params)
        return x
    for p in layer_params:
        x = layer(p, x)
    return x


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
    [B, T] of packed sequences, or None. ``attention`` / ``attention_chunk_size``: the attention
    implementation (``jaxbatch.nn.attention``) and its block. ``compress_activations``: the
    block's int8-saved activations (``jaxbatch.nn.compressed_activations.COMPRESSIBLE``), which
    here shrink what one chunk's VJP keeps.
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

    def chunk_fn(params, z_c, kv, segment_ids, start):
        k, v = kv
        h = norm.apply({"params": params["ln_attn"]}, z_c)
        q, _, _ = mha.apply({"params": params["attn"]}, h, method="qkv")
        seg_q = None
        if segment_ids is not None:
            seg_q = lax.dynamic_slice_in_dim(segment_ids, start, z_c.shape[1], axis=1)
        y = mha.apply(
            {"params": params["attn"]},
            q,
            k,
            v,
            causal=True,
            query_segment_ids=seg_q,
            key_segment_ids=segment_ids,
            query_offset=start,
            method="attend",
        )
        x = z_c + y
        h = norm.apply({"params": params["ln_mlp"]}, x)
        x = x + mlp.apply({"params": params["mlp"]}, h, deterministic=True)
        return constrain(x, (BATCH, LENGTH, EMBED))

    return pre_fn, chunk_fn
