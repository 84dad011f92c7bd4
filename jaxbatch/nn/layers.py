"""Transformer building blocks shared by ViT, TextEncoder and DecoderLM (pre-LN, named axes)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype
from jax.ad_checkpoint import checkpoint_name

from jaxbatch.nn import remat
from jaxbatch.nn.axes import BATCH, EMBED, HEADS, KV, LENGTH, MLP, NORM, constrain, partitioned

_default_kernel_init = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros
_ones = nn.initializers.ones


def layer_norm(*, dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """A LayerNorm whose scale and bias carry the logical name 'norm'."""
    return nn.LayerNorm(
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=partitioned(_ones, (NORM,)),
        bias_init=partitioned(_zeros, (NORM,)),
        name=name,
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
    """softmax(q·kᵀ / sqrt(d) masked) · v, with the softmax in float32.

    Args:
      q, k, v: [B, L, H, D].
      mask: broadcastable to [B, H, L_q, L_k]; False entries get probability 0 (a row that is
        fully masked gets a uniform distribution instead of NaN).

    Returns:
      [B, L, H, D] in the dtype of ``v``.
    """
    depth = q.shape[-1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(depth)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


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
        n_in = self.contract_ndim
        shape = x.shape[-n_in:] + tuple(self.features)
        init = nn.initializers.variance_scaling(
            1.0,
            "fan_avg",
            "uniform",
            in_axis=tuple(range(n_in)),
            out_axis=tuple(range(n_in, len(shape))),
        )
        kernel = self.param("kernel", partitioned(init, self.kernel_names), shape, self.param_dtype)
        bias = self.param(
            "bias", partitioned(_zeros, self.bias_names), tuple(self.features), self.param_dtype
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return jnp.tensordot(x, kernel, axes=n_in) + bias


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017, "Attention Is All You Need", Eq. 1).

    head_h = softmax(x W_q^h (x W_k^h)ᵀ / sqrt(d)) x W_v^h; out = concat_h(head_h) W_o.
    Kernels are named ('embed', 'heads', 'kv') for q/k/v and ('heads', 'kv', 'embed') for the
    output; projections are tagged for the named remat policies.
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads={self.num_heads}")
        head_dim = width // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def proj(name: str, tag: str) -> jax.Array:
            y = DenseGeneral(
                (self.num_heads, head_dim), (EMBED, HEADS, KV), (HEADS, KV), **kw, name=name
            )(x)
            return checkpoint_name(y, tag)

        q = proj("query", remat.QUERY_PROJ)
        k = proj("key", remat.KEY_PROJ)
        v = proj("value", remat.VALUE_PROJ)
        y = dot_product_attention(q, k, v, mask)  # [B, L, H, D]
        y = DenseGeneral((width,), (HEADS, KV, EMBED), (EMBED,), 2, **kw, name="out")(y)
        return checkpoint_name(y, remat.OUT_PROJ)


class MlpBlock(nn.Module):
    """Position-wise MLP: Dense(mlp_dim) → GELU → dropout → Dense(width)."""

    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

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
        h = checkpoint_name(nn.gelu(h), remat.MLP_HIDDEN)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return nn.Dense(
            width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(_default_kernel_init, (MLP, EMBED)),
            bias_init=partitioned(_zeros, (EMBED,)),
            name="wo",
        )(h)


def pre_ln_block(
    block: nn.Module, x: jax.Array, mask: jax.Array | None, *, deterministic: bool
) -> jax.Array:
    """The body of a pre-LN transformer block, built inside ``block``'s compact method.

    x = x + dropout(attn(LN(x), mask)); x = x + dropout(mlp(LN(x))); the result is constrained to
    the logical axes ('batch', 'length', 'embed'). ``block`` supplies num_heads, mlp_dim, dropout,
    dtype and param_dtype; the sub-layers are named ln_attn, attn, ln_mlp, mlp.
    """
    kw = dict(dtype=block.dtype, param_dtype=block.param_dtype)
    h = layer_norm(**kw, name="ln_attn")(x)
    h = MultiHeadAttention(block.num_heads, **kw, name="attn")(h, mask)
    x = x + nn.Dropout(block.dropout)(h, deterministic=deterministic)
    h = layer_norm(**kw, name="ln_mlp")(x)
    h = MlpBlock(block.mlp_dim, block.dropout, **kw, name="mlp")(h, deterministic=deterministic)
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
