"""Decoder-only (causal) transformer language model with scanned, rematerialised layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from jaxbatch.nn.axes import BATCH, EMBED, LAYERS, LENGTH, VOCAB, constrain, partitioned
from jaxbatch.nn.layers import causal_mask, layer_norm, pre_ln_block
from jaxbatch.nn.remat import get_policy, remat_module


class DecoderBlock(nn.Module):
    """One causal pre-LN block with the ``(carry, x) -> (carry, y)`` signature ``nn.scan`` needs."""

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, unused: None = None) -> tuple[jax.Array, None]:
        del unused
        return pre_ln_block(self, x, causal_mask(x.shape[1]), deterministic=True), None


class DecoderLM(nn.Module):
    """GPT-style decoder-only language model.

    z_0 = E[tokens] + P[:L];  z_l = z_{l-1} + attn(LN(z_{l-1}), causal), then + mlp(LN(·)),
    l = 1..depth;  h = LN(z_depth);  logits = h W  with W = Eᵀ when ``tie_embeddings`` else a
    separate [width, vocab] kernel. Position t only sees tokens 0..t.

    ``scan_layers=True`` runs the blocks with ``nn.scan``: their parameters are stacked under
    params['layers'] with a leading axis of size ``depth`` whose logical name is 'layers'.
    ``scan_layers=False`` unrolls them as params['layers_0'], ..., params['layers_{depth-1}'] (the
    same values, unstacked). ``remat_policy`` wraps each block in ``nn.remat`` with the
    ``jax.checkpoint`` policy of that name (see ``jaxbatch.nn.remat``).

    For a chunked linear cross-entropy, ``apply(..., method='hidden')`` gives h [B, L, width] and
    ``apply(..., method='output_kernel')`` gives W [width, vocab], so that logits = h @ W.

    References:
      Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2);
      Vaswani et al. 2017, "Attention Is All You Need", Eq. 1 (masked attention).

    Attributes:
      vocab_size: number of token ids.
      width: model width.
      depth: number of blocks.
      heads: attention heads (must divide ``width``).
      mlp_dim: hidden width of the MLPs.
      max_len: longest sequence (size of the learned position table).
      scan_layers: stack the blocks with ``nn.scan``.
      remat_policy: a name from ``jaxbatch.nn.remat.POLICY_NAMES``.
      tie_embeddings: use the token embedding as the output kernel.
      dtype: compute dtype (logits are returned in float32).
      param_dtype: parameter dtype.
    """

    vocab_size: int = 258
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_dim: int = 1024
    max_len: int = 512
    scan_layers: bool = True
    remat_policy: str = "none"
    tie_embeddings: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        get_policy(self.remat_policy)  # fails early on an unknown name
        if self.width % self.heads:
            raise ValueError(
                f"DecoderLM: width={self.width} is not divisible by heads={self.heads}"
            )
        if self.depth < 1:
            raise ValueError(f"DecoderLM: depth must be >= 1, got {self.depth}")
        super().__post_init__()

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed = nn.Embed(
            self.vocab_size,
            self.width,
            **kw,
            embedding_init=partitioned(nn.initializers.normal(0.02), (VOCAB, EMBED)),
        )
        self.pos_embedding = self.param(
            "pos_embedding",
            partitioned(nn.initializers.normal(0.02), (None, EMBED)),
            (self.max_len, self.width),
            self.param_dtype,
        )
        block_cls = remat_module(DecoderBlock, self.remat_policy, prevent_cse=not self.scan_layers)
        block_kw = dict(num_heads=self.heads, mlp_dim=self.mlp_dim, **kw)
        if self.scan_layers:
            scanned = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: LAYERS},
            )
            self.layers = scanned(**block_kw)
        else:
            self.layers = [block_cls(**block_kw) for _ in range(self.depth)]
        self.final_norm = layer_norm(**kw)
        if not self.tie_embeddings:
            self.head_kernel = self.param(
                "head_kernel",
                partitioned(nn.initializers.lecun_normal(), (EMBED, VOCAB)),
                (self.width, self.vocab_size),
                self.param_dtype,
            )

    def hidden(self, tokens: jax.Array) -> jax.Array:
        """Final hidden states h [B, L, width] (after the last LayerNorm) for tokens int [B, L]."""
        if tokens.ndim != 2:
            raise ValueError(f"DecoderLM: expected tokens [B, L], got shape {tokens.shape}")
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"DecoderLM: sequence length {length} exceeds max_len={self.max_len}")
        x = self.embed(tokens) + self.pos_embedding[:length].astype(self.dtype)
        x = constrain(x, (BATCH, LENGTH, EMBED))
        if self.scan_layers:
            x, _ = self.layers(x, None)
        else:
            for layer in self.layers:
                x, _ = layer(x, None)
        return constrain(self.final_norm(x), (BATCH, LENGTH, EMBED))

    def output_kernel(self) -> jax.Array:
        """The output kernel W [width, vocab] (Eᵀ when embeddings are tied)."""
        if self.tie_embeddings:
            return self.embed.embedding.T
        return self.head_kernel

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        """float32 logits [B, L, vocab] = h @ W."""
        w = self.output_kernel().astype(self.dtype)
        logits = jnp.einsum("bld,dv->blv", h.astype(self.dtype), w)
        return constrain(logits.astype(jnp.float32), (BATCH, LENGTH, VOCAB))

    def __call__(
        self, tokens: jax.Array, *, return_hidden: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Next-token logits float32 [B, L, vocab] for tokens int [B, L].

        Args:
          tokens: token ids.
          return_hidden: also return the final hidden states h [B, L, width].

        Returns:
          logits, or (logits, h) when ``return_hidden``.
        """
        h = self.hidden(tokens)
        logits = self.logits_from_hidden(h)
        return (logits, h) if return_hidden else logits
