"""Transformer building blocks shared by ViT, TextEncoder and DecoderLM (pre-LN, named axes)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype
from jax.ad_checkpoint import checkpoint_name

from jaxbatch.nn import attention as attention_lib
from jaxbatch.nn import compressed_activations, context_parallel, remat
from jaxbatch.nn.axes import BATCH, EMBED, HEADS, KV, LENGTH, MLP, NORM, constrain, partitioned

_default_kernel_init = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros
_ones = nn.initializers.ones


def layer_norm(
    *, dtype: Dtype, param_dtype: Dtype, name: str | None = None, compress: bool = False
) -> nn.Module:
    """A LayerNorm whose scale and bias carry the logical name 'norm'.

    ``compress=True`` ('layer_norm_input' of ``compress_activations``) gives
    :class:`jaxbatch.nn.compressed_activations.CompressedLayerNorm`: the same parameters and
    forward, its input kept as int8 for the backward pass.
    """
    cls = compressed_activations.CompressedLayerNorm if compress else nn.LayerNorm
    return cls(
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=partitioned(_ones, (NORM,)),
        bias_init=partitioned(_zeros, (NORM,)),
        name=name,
    )


def check_softmax_compression(compress: bool, attention: str, where: str) -> None:
    """Raises ValueError when softmax compression is asked of an attention that keeps no
    probabilities (every implementation but 'reference' recomputes them in the backward)."""
    if compress and attention != "reference":
        raise ValueError(
            f"{where}: compress_activations 'softmax' keeps the attention probabilities as int8, "
            f"which only attention='reference' stores; got attention={attention!r} (the chunked "
            "and kernel implementations save no probabilities: drop 'softmax' or use "
            "attention='reference')"
        )


def causal_mask(length: int) -> jax.Array:
    """[1, 1, L, L] boolean mask, True where query i may attend to key j (j <= i)."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def padding_mask(tokens: jax.Array, pad_id: int) -> jax.Array:
    """[B, 1, 1, L] boolean mask, True on the keys that are not padding."""
    return (tokens != pad_id)[:, None, None, :]


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None
) -> jax.Array:
    """softmax(q·kᵀ / sqrt(d) masked) · v with the softmax in float32 (materialises the scores).

    The legacy form of :func:`jaxbatch.nn.attention.dot_product_attention` with
    ``implementation='reference'``: ``mask`` is broadcastable to [B, H, L_q, L_k], False entries
    get probability 0 and a fully masked row outputs 0.

    Args:
      q, k, v: [B, L, H, D].
      mask: broadcastable boolean mask, or None.

    Returns:
      [B, L, H, D] in the dtype of ``v``.
    """
    return attention_lib.reference_attention(q, k, v, mask=mask)


def _dense_general(
    module, x, features, kernel_names, bias_names, contract_ndim, dtype, param_dtype
):
    """x contracted over its last ``contract_ndim`` axes with module's 'kernel', plus 'bias'."""
    shape = x.shape[-contract_ndim:] + tuple(features)
    init = nn.initializers.variance_scaling(
        1.0,
        "fan_avg",
        "uniform",
        in_axis=tuple(range(contract_ndim)),
        out_axis=tuple(range(contract_ndim, len(shape))),
    )
    kernel = module.param("kernel", partitioned(init, kernel_names), shape, param_dtype)
    bias = module.param("bias", partitioned(_zeros, bias_names), tuple(features), param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=dtype)
    return jnp.tensordot(x, kernel, axes=contract_ndim) + bias


class DenseGeneral(nn.Module):
    """y = x contracted over its last ``contract_ndim`` axes with a kernel of shape
    x.shape[-contract_ndim:] + features, plus a bias of shape ``features``.

    Used instead of ``nn.DenseGeneral``, whose initializer builds a flattened 2-D kernel and so
    cannot carry per-dimension logical names under a mesh. The kernel is Glorot-uniform over
    fan_in = prod(contracted dims) and fan_out = prod(features), as the flattened kernel would be.
    """

    features: tuple[int, ...]
    kernel_names: tuple[str | None, ...]
    bias_names: tuple[str | None, ...]
    contract_ndim: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _dense_general(
            self, x, self.features, self.kernel_names, self.bias_names, self.contract_ndim,
            self.dtype, self.param_dtype,
        )  # fmt: skip


class _SplitHeads(nn.Module):
    """x [..., width] -> [..., H, width / H]: a q, k or v projection (kernel 'embed', 'heads',
    'kv'); the head dim comes from the input, so the module can be built in ``setup``."""

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads={self.num_heads}")
        features = (self.num_heads, width // self.num_heads)
        return _dense_general(
            self, x, features, (EMBED, HEADS, KV), (HEADS, KV), 1, self.dtype, self.param_dtype
        )


class _MergeHeads(nn.Module):
    """y [..., H, D] -> [..., H·D]: the attention output projection (kernel 'heads', 'kv',
    'embed')."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        width = y.shape[-1] * y.shape[-2]
        return _dense_general(
            self, y, (width,), (HEADS, KV, EMBED), (EMBED,), 2, self.dtype, self.param_dtype
        )


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017, "Attention Is All You Need", Eq. 1).

    head_h = softmax(x W_q^h (x W_k^h)ᵀ / sqrt(d)) x W_v^h; out = concat_h(head_h) W_o.
    Kernels are named ('embed', 'heads', 'kv') for q/k/v and ('heads', 'kv', 'embed') for the
    output (parameters attn/{query,key,value,out}/{kernel,bias}); projections are tagged for the
    named remat policies.

    The masks come as ``causal`` / ``segment_ids`` [B, T] / ``key_mask`` [B, T] and go to
    :func:`jaxbatch.nn.attention.dot_product_attention` with ``implementation=attention``, so no
    [T, T] array is built unless the implementation is 'reference'. The legacy ``mask``
    (broadcastable to [B, H, T, T]) is still accepted with ``attention`` 'reference' or 'auto'
    and always runs the reference (only it takes an arbitrary mask).

    For sequence-chunked backprop (StreamBP) the two halves are methods:
    ``qkv(x) -> (q, k, v)`` and ``attend(q, k, v, ..., query_offset=...) -> y``, e.g.
    ``mha.apply(params, x, method='qkv')``; ``__call__(x)`` is ``attend(*qkv(x))``.

    Attributes:
      num_heads: heads H (must divide the width).
      attention: an implementation name from ``jaxbatch.nn.attention.IMPLEMENTATIONS``.
      attention_chunk_size: the query/key block of the 'chunked' implementation.
      compress_softmax: keep the attention probabilities for the backward pass as int8 ('softmax'
        of ``compress_activations``); only the 'reference' implementation stores them (the others
        recompute them from q, k, v), so it needs ``attention='reference'``.
      context_parallel: 'none', or a strategy of ``jaxbatch.nn.context_parallel`` ('all_gather',
        'ring', 'ulysses') used for the self-attention of a whole sequence when the trace's mesh
        has a 'context' axis > 1 (otherwise the ordinary attention runs).
      context_layout: 'contiguous' or 'zigzag': the order of the sequence over 'context' (the
        batch must already be in it; positions come from the batch).
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "reference"
    attention_chunk_size: int = attention_lib.DEFAULT_CHUNK_SIZE
    compress_softmax: bool = False
    context_parallel: str = "none"
    context_layout: str = "contiguous"

    def setup(self):
        if self.attention not in attention_lib.IMPLEMENTATIONS:
            raise ValueError(
                f"MultiHeadAttention: unknown attention {self.attention!r}; expected one of "
                f"{attention_lib.IMPLEMENTATIONS}"
            )
        check_softmax_compression(self.compress_softmax, self.attention, "MultiHeadAttention")
        context_parallel.check_model_options(
            self.context_parallel, self.context_layout, where="MultiHeadAttention"
        )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.query = _SplitHeads(self.num_heads, **kw)
        self.key = _SplitHeads(self.num_heads, **kw)
        self.value = _SplitHeads(self.num_heads, **kw)
        self.out = _MergeHeads(**kw)

    def qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The projections q, k, v, each [B, T, H, D], of x [B, T, width]."""
        q = checkpoint_name(self.query(x), remat.QUERY_PROJ)
        k = checkpoint_name(self.key(x), remat.KEY_PROJ)
        v = checkpoint_name(self.value(x), remat.VALUE_PROJ)
        return q, k, v

    def attend(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        causal: bool = False,
        query_segment_ids: jax.Array | None = None,
        key_segment_ids: jax.Array | None = None,
        key_mask: jax.Array | None = None,
        query_offset: int | jax.Array = 0,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Attention of q [B, Tq, H, D] over k, v [B, Tk, H, D], then the output projection.

        Masks as in :func:`jaxbatch.nn.attention.dot_product_attention` (queries at absolute
        positions ``query_offset + i``); ``mask`` is the legacy broadcastable mask.
        """
        kw = dict(
            causal=causal, query_segment_ids=query_segment_ids, key_segment_ids=key_segment_ids,
            key_mask=key_mask, query_offset=query_offset,
        )  # fmt: skip
        if mask is not None:
            if self.attention not in ("reference", "auto"):
                raise ValueError(
                    f"MultiHeadAttention(attention={self.attention!r}) got a [B, H, T, T]-style "
                    "mask, which only 'reference' (or 'auto') takes; pass causal / segment_ids / "
                    "key_mask instead"
                )
            y = attention_lib.reference_attention(
                q, k, v, mask=mask, compress_softmax=self.compress_softmax, **kw
            )
        elif self.context_parallel != "none" and context_parallel.context_axis_size() > 1:
            self_attention = q.shape[1] == k.shape[1] and query_segment_ids is key_segment_ids
            if not self_attention or not isinstance(query_offset, int) or query_offset:
                raise ValueError(
                    f"MultiHeadAttention(context_parallel={self.context_parallel!r}) splits the "
                    "self-attention of a whole sequence over 'context'; got queries "
                    f"{q.shape[1]} against keys {k.shape[1]} at query_offset={query_offset!r} "
                    "(StreamBP's sequence chunks do not compose with context parallelism)"
                )
            if self.compress_softmax:
                raise ValueError(
                    "MultiHeadAttention: compress_softmax keeps the reference attention's "
                    "probabilities, which the context-parallel attention never forms"
                )
            y = context_parallel.model_attention(
                q, k, v, strategy=self.context_parallel, layout=self.context_layout,
                causal=causal, segment_ids=query_segment_ids, key_mask=key_mask,
                implementation=self.attention, chunk_size=self.attention_chunk_size,
            )  # fmt: skip
        elif self.compress_softmax:
            y = attention_lib.reference_attention(q, k, v, compress_softmax=True, **kw)
        else:
            y = attention_lib.dot_product_attention(
                q, k, v, implementation=self.attention, chunk_size=self.attention_chunk_size, **kw
            )
        return checkpoint_name(self.out(y), remat.OUT_PROJ)

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        *,
        causal: bool = False,
        segment_ids: jax.Array | None = None,
        key_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Self-attention of x [B, T, width]; ``segment_ids`` serve as query and key ids."""
        q, k, v = self.qkv(x)
        return self.attend(
            q, k, v, causal=causal, query_segment_ids=segment_ids, key_segment_ids=segment_ids,
            key_mask=key_mask, mask=mask,
        )  # fmt: skip


class MlpBlock(nn.Module):
    """Position-wise MLP: Dense(mlp_dim) → GELU → dropout → Dense(width).

    With 'mlp_input' in ``compress_activations`` the backward pass keeps only an int8 copy of
    the GELU input h (``jaxbatch.nn.compressed_activations``): without dropout GELU and the output
    projection run as one :class:`~jaxbatch.nn.compressed_activations.GeluDense` (neither gelu(h)
    nor its internals are kept; the ``mlp_hidden`` tag then has nothing to name), with active
    dropout only the GELU is compressed. Parameters and the forward pass are unchanged.
    """

    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    compress_activations: tuple[str, ...] = ()

    def __post_init__(self):
        compressed_activations.validate_names(
            self.compress_activations, where="MlpBlock.compress_activations"
        )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        width = x.shape[-1]
        h = nn.Dense(
            self.mlp_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(_default_kernel_init, (EMBED, MLP)),
            bias_init=partitioned(_zeros, (MLP,)),
            name="wi",
        )(x)
        out_kw = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(_default_kernel_init, (MLP, EMBED)),
            bias_init=partitioned(_zeros, (EMBED,)),
            name="wo",
        )
        compress = compressed_activations.MLP_INPUT in self.compress_activations
        if compress and (deterministic or self.dropout == 0.0):
            return compressed_activations.GeluDense(width, **out_kw)(h)
        h = compressed_activations.compressed_gelu(h) if compress else nn.gelu(h)
        h = checkpoint_name(h, remat.MLP_HIDDEN)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return nn.Dense(width, **out_kw)(h)


def pre_ln_block(
    block: nn.Module,
    x: jax.Array,
    mask: jax.Array | None,
    *,
    deterministic: bool,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    key_mask: jax.Array | None = None,
) -> jax.Array:
    """The body of a pre-LN transformer block, built inside ``block``'s compact method.

    x = x + dropout(attn(LN(x), masks)); x = x + dropout(mlp(LN(x))); the result is constrained
    to the logical axes ('batch', 'length', 'embed'). ``block`` supplies num_heads, mlp_dim,
    dropout, dtype, param_dtype and optionally attention / attention_chunk_size (defaults
    'reference', 512); the sub-layers are named ln_attn, attn, ln_mlp, mlp. ``mask`` is the legacy
    broadcastable mask; ``causal`` / ``segment_ids`` / ``key_mask`` build no [T, T] array.
    ``block.compress_activations`` (optional, default ()) names the saved activations kept as
    int8 for the backward pass (``jaxbatch.nn.compressed_activations.COMPRESSIBLE``: the MLP
    input, the layer-norm inputs and, with the 'reference' attention, the softmax output).
    ``block.context_parallel`` / ``block.context_layout`` (optional, default 'none' /
    'contiguous') go to :class:`MultiHeadAttention`.
    """
    kw = dict(dtype=block.dtype, param_dtype=block.param_dtype)
    names = tuple(getattr(block, "compress_activations", ()))
    compress_ln = compressed_activations.LAYER_NORM_INPUT in names
    h = layer_norm(**kw, name="ln_attn", compress=compress_ln)(x)
    h = MultiHeadAttention(
        block.num_heads,
        **kw,
        attention=getattr(block, "attention", "reference"),
        attention_chunk_size=getattr(
            block, "attention_chunk_size", attention_lib.DEFAULT_CHUNK_SIZE
        ),
        compress_softmax=compressed_activations.SOFTMAX in names,
        context_parallel=getattr(block, "context_parallel", "none"),
        context_layout=getattr(block, "context_layout", "contiguous"),
        name="attn",
    )(h, mask, causal=causal, segment_ids=segment_ids, key_mask=key_mask)
    x = x + nn.Dropout(block.dropout)(h, deterministic=deterministic)
    h = layer_norm(**kw, name="ln_mlp", compress=compress_ln)(x)
    h = MlpBlock(block.mlp_dim, block.dropout, **kw, compress_activations=names, name="mlp")(
        h, deterministic=deterministic
    )
    x = x + nn.Dropout(block.dropout)(h, deterministic=deterministic)
    return constrain(x, (BATCH, LENGTH, EMBED))


class TransformerBlock(nn.Module):
    """Pre-LN transformer block (Xiong et al. 2020, "On Layer Normalization in the Transformer
    Architecture"): x + attn(LN(x)), then + mlp(LN(·)); see :func:`pre_ln_block`."""

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, *, deterministic: bool = True
    ) -> jax.Array:
        return pre_ln_block(self, x, mask, deterministic=deterministic)
