"""Bag of hashed identifier sub-tokens: learned-salience weighted mean of their embeddings.

The input is a row of feature ids from ``jaxbatch.data.subtokens`` (identifier sub-tokens such as
'read', 'file' of ``readFile``/``read_file``, hashed; 0 is padding). Each id is folded into one of
``buckets`` rows of an embedding table, and the text is the mean of its features' embeddings,
each feature weighted by its sublinear count (as in TF-IDF) times a learned positive scalar per
bucket (a learned, IDF-like salience, so 'self' or 'return' can learn to weigh little):

  j_l = id_l mod buckets,   c_b[j] = #{l : j_l = j, id_l != 0}   (feature counts of text b)
  w_b[j] = log(1 + c_b[j]) · softplus(s[j]),   h_b = Σ_j w_b[j] E[j] / Σ_j w_b[j],   out = LN(h)

It is computed per position (w_l = softplus(s[j_l]) · log(1 + c_l) / c_l, with c_l the count of
position l's bucket in its row), so the cost is O(B·L·width) in gathers, not O(B·buckets).
``token_dropout`` drops each feature with that probability while training (then c is counted
over the kept features), re-sampling the bag every step as word dropout does.

References:
  Joulin et al. 2017, "Bag of Tricks for Efficient Text Classification" (averaged embeddings of
  hashed features); Salton, Buckley 1988, "Term-weighting approaches in automatic text retrieval"
  (sublinear tf); Iyyer et al. 2015, "Deep Unordered Composition Rivals Syntactic Methods for
  Text Classification" (word dropout, Sec. 3).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbatch.nn.axes import EMBED, VOCAB, partitioned
from jaxbatch.nn.ngram_encoder import bag_head


def bucket_weights(ids: jax.Array, valid: jax.Array, buckets: int) -> tuple[jax.Array, jax.Array]:
    """(bucket ids int32 [B, L], per-position tf weights float32 [B, L]) of a row of features.

    The tf weight of position l is log(1 + c_l) / c_l (0 where not ``valid``), c_l the number of
    valid positions of its row in the same bucket, so the weights of one bucket sum to
    log(1 + c).
    """
    j = jnp.mod(ids, buckets).astype(jnp.int32)
    same = (j[:, :, None] == j[:, None, :]) & valid[:, None, :]  # [B, L, L]
    count = jnp.maximum(same.sum(axis=-1).astype(jnp.float32), 1.0)
    return j, jnp.where(valid, jnp.log1p(count) / count, 0.0)


class SubtokenBagEncoder(nn.Module):
    """Salience-weighted mean of hashed sub-token embeddings (see the module docstring).

    No ``remat_policy``: there is no stack of layers whose activations a recomputation could
    drop. The backward pass keeps the gathered rows [B, L, width] (for the weights' gradient) and
    the head's [B, width] inputs; a remat would regather the same rows from the same ids, one
    tensor for one gather, which is the whole forward pass of the encoder.

    Attributes:
      width: embedding width.
      buckets: hash buckets (rows of the embedding table).
      mlp_dim: hidden width of an optional residual MLP on the pooled vector (0: none).
      token_dropout: during training, drop each feature with this probability (needs a
        'dropout' rng).
      embed_init_std: standard deviation of the embedding table's normal initialisation.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    width: int = 256
    buckets: int = 2**16
    mlp_dim: int = 0
    token_dropout: float = 0.0
    embed_init_std: float = 1.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        if self.width < 1 or self.buckets < 1:
            raise ValueError(
                "SubtokenBagEncoder: width and buckets must be >= 1, got "
                f"{self.width}, {self.buckets}"
            )
        if not 0.0 <= self.token_dropout < 1.0:
            raise ValueError(
                f"SubtokenBagEncoder: token_dropout must be in [0, 1), got {self.token_dropout}"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, ids: jax.Array, train: bool = False) -> jax.Array:
        """Encodes int [B, L] feature ids (0 = padding) into [B, width]."""
        if ids.ndim != 2:
            raise ValueError(f"SubtokenBagEncoder: expected ids [B, L], got shape {ids.shape}")
        valid = ids != 0
        if train and self.token_dropout > 0:
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - self.token_dropout, ids.shape)
            valid = valid & keep
        table = self.param(
            "embedding",
            partitioned(nn.initializers.normal(self.embed_init_std), (VOCAB, EMBED)),
            (self.buckets, self.width),
            self.param_dtype,
        )
        salience = self.param(
            "salience",
            partitioned(nn.initializers.zeros, (VOCAB,)),
            (self.buckets,),
            self.param_dtype,
        )
        j, tf = bucket_weights(ids, valid, self.buckets)
        w = tf * jax.nn.softplus(salience.astype(jnp.float32)[j])  # [B, L]
        vectors = table.astype(self.dtype)[j]  # [B, L, width]
        pooled = jnp.einsum("bl,bld->bd", w.astype(self.dtype), vectors)
        return bag_head(self, pooled, w.sum(axis=1, keepdims=True))
