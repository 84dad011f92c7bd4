"""Byte-level transformer text encoder with padding masks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from jaxbatch.nn.axes import BATCH, EMBED, LENGTH, MLP, VOCAB, constrain, partitioned
from jaxbatch.nn.layers import TransformerBlock, layer_norm, padding_mask
from jaxbatch.nn.remat import get_policy, remat_module

POOLS = ("mean", "cls", "last")
PAD_ID = 0
CLS_ID = 257
BYTE_VOCAB_SIZE = 258


class EncoderBlock(TransformerBlock):
    """:class:`TransformerBlock` called as ``block(x, mask, deterministic)``: ``deterministic``
    positional, so that ``nn.remat`` can take it as a static argument (``static_argnums=(3,)``)."""

    def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool) -> jax.Array:
        return super().__call__(x, mask, deterministic=deterministic)


def remat_encoder_block(policy: str) -> type[nn.Module]:
    """:class:`EncoderBlock`, wrapped in ``nn.remat`` with the named policy ('none': unwrapped)."""
    return remat_module(EncoderBlock, policy, static_argnums=(3,))


class TextEncoder(nn.Module):
    """Bidirectional pre-LN transformer over token ids, pooled to one vector per sequence.

    Token scheme of ``jaxbatch.data`` (bytes as tokens): PAD = 0, byte b -> b + 1, CLS/BOS = 257,
    vocabulary 258. Positions holding ``pad_id`` are masked out as attention keys and out of the
    pooling, so appending padding never changes the result:

      z_0 = E[tokens] + P[:L];  z_l = block(z_{l-1}, key mask = tokens != pad_id);  h = LN(z_depth)
      'mean': sum_t m_t h_t / max(1, sum_t m_t)  (m_t = 1 on non-pad tokens)
      'cls':  h_0 (put the CLS token first);  'last': h at the last non-pad position
      out = h_pooled, or h_pooled W_out when ``out_dim`` is set.

    References:
      Vaswani et al. 2017, "Attention Is All You Need" (the encoder, Section 3.1);
      Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture" (pre-LN).

    Attributes:
      vocab_size: number of token ids.
      width: model width.
      depth: number of transformer blocks.
      heads: attention heads (must divide ``width``).
      mlp_dim: hidden width of the MLPs.
      max_len: longest sequence (size of the learned position table).
      pool: 'mean', 'cls' or 'last'.
      pad_id: the padding token id.
      out_dim: optional linear projection of the pooled vector.
      dropout: dropout rate (needs a 'dropout' rng when ``train=True`` and rate > 0).
      remat_policy: a name from ``jaxbatch.nn.remat.POLICY_NAMES``; every block is wrapped in
        ``nn.remat`` with it (parameters unchanged).
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    vocab_size: int = BYTE_VOCAB_SIZE
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_dim: int = 1024
    max_len: int = 512
    pool: str = "mean"
    pad_id: int = PAD_ID
    out_dim: int | None = None
    dropout: float = 0.0
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        get_policy(self.remat_policy)  # fails early on an unknown name
        if self.pool not in POOLS:
            raise ValueError(f"TextEncoder: unknown pool {self.pool!r}; expected one of {POOLS}")
        if self.width % self.heads:
            raise ValueError(
                f"TextEncoder: width={self.width} is not divisible by heads={self.heads}"
            )
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(
                f"TextEncoder: pad_id={self.pad_id} is outside the vocabulary "
                f"[0, {self.vocab_size})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TextEncoder: dropout must be in [0, 1), got {self.dropout}")
        super().__post_init__()

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        """Encodes token ids int [B, L] (L <= max_len) into [B, width] (or [B, out_dim])."""
        if tokens.ndim != 2:
            raise ValueError(f"TextEncoder: expected tokens [B, L], got shape {tokens.shape}")
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(
                f"TextEncoder: sequence length {length} exceeds max_len={self.max_len}"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Embed(
            self.vocab_size,
            self.width,
            **kw,
            embedding_init=partitioned(nn.initializers.normal(0.02), (VOCAB, EMBED)),
            name="embed",
        )(tokens)
        pos = self.param(
            "pos_embedding",
            partitioned(nn.initializers.normal(0.02), (None, EMBED)),
            (self.max_len, self.width),
            self.param_dtype,
        )
        x = x + pos[:length].astype(x.dtype)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x = constrain(x, (BATCH, LENGTH, EMBED))
        mask = padding_mask(tokens, self.pad_id)
        block_cls = remat_encoder_block(self.remat_policy)
        for i in range(self.depth):
            x = block_cls(self.heads, self.mlp_dim, self.dropout, **kw, name=f"block{i}")(
                x, mask, not train
            )
        x = layer_norm(**kw, name="encoder_norm")(x)
        valid = tokens != self.pad_id  # [B, L]
        if self.pool == "mean":
            weights = valid.astype(jnp.float32)
            total = jnp.einsum("bl,bld->bd", weights, x.astype(jnp.float32))
            x = (total / jnp.maximum(weights.sum(1, keepdims=True), 1.0)).astype(x.dtype)
        elif self.pool == "cls":
            x = x[:, 0]
        else:
            last = jnp.max(jnp.where(valid, jnp.arange(length), 0), axis=1)
            x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        x = constrain(x, (BATCH, EMBED))
        if self.out_dim is None:
            return x
        return nn.Dense(
            self.out_dim,
            **kw,
            kernel_init=partitioned(nn.initializers.lecun_normal(), (EMBED, MLP)),
            bias_init=partitioned(nn.initializers.zeros, (MLP,)),
            name="out_proj",
        )(x)
