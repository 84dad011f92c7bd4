"""Byte n-gram bag encoder: hashed byte n-grams → embeddings → weighted mean, one vector per text.

A fast, byte-level text tower (no tokenizer, no vocabulary file): every window of n bytes
(n in ``orders``) of the token ids is hashed into one of ``buckets`` rows of an embedding table,
exactly as fastText builds words from character n-grams, and the text is the weighted mean of its
n-gram embeddings, each weighted by its sublinear count (as in TF-IDF) times a learned positive
scalar (a learned, IDF-like salience):

  id_t^n = hash(n, b_t, ..., b_{t+n-1}) mod buckets    (windows that touch padding are dropped)
  c_b[j] = #{(t, n): id_t^n = j}             (n-gram counts of text b, per bucket)
  w_b[j] = log(1 + c_b[j]) · softplus(s[j]),  h_b = Σ_j w_b[j] E[j] / Σ_j w_b[j],  out = LN(h) (+
  MLP)

Letters can be folded to lower case first (``lowercase``), so 'ReadFile' and 'read_file' share their
'read'/'file' n-grams. On a CPU this trains hundreds of times faster than a transformer over the
same bytes, which is what the bundled code-search job needs; the transformer tower is
``TextEncoder``.

References:
  Bojanowski, Grave, Joulin, Mikolov 2017, "Enriching Word Vectors with Subword Information"
  (character n-grams hashed into buckets, Sec. 3.2); Joulin et al. 2017, "Bag of Tricks for
  Efficient Text Classification" (fastText, averaged n-gram embeddings).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbatch.nn.axes import BATCH, EMBED, MLP, NORM, VOCAB, constrain, partitioned

# Token ids of jaxbatch.data.tokens: PAD = 0, byte b -> b + 1, CLS = 257.
_PAD = 0
_UPPER_A, _UPPER_Z = ord("A") + 1, ord("Z") + 1
# Odd multipliers of a multiplicative (Knuth-style) hash on uint32.
_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xD3A2646C, 0xFD7046C5)


def ngram_ids(tokens: jax.Array, orders: Sequence[int], buckets: int, *, lowercase: bool):
    """Hashed n-gram ids and validity masks.

    Args:
      tokens: int [B, L] token ids (PAD = 0).
      orders: the n of the n-grams, each in [1, 7].
      buckets: number of hash buckets.
      lowercase: fold bytes 'A'..'Z' to 'a'..'z' before hashing.

    Returns:
      (ids int32 [B, K], valid bool [B, K]) with K = Σ_n (L - n + 1).
    """
    t = tokens.astype(jnp.uint32)
    if lowercase:
        upper = (t >= _UPPER_A) & (t <= _UPPER_Z)
        t = jnp.where(upper, t + 32, t)
    ids, valid = [], []
    length = tokens.shape[1]
    for n in orders:
        if not 1 <= n <= len(_MULTIPLIERS) or n > length:
            raise ValueError(f"n-gram order {n} must be in [1, {min(len(_MULTIPLIERS), length)}]")
        h = jnp.full(t[:, : length - n + 1].shape, jnp.uint32(n * 0x01000193))
        ok = jnp.ones(h.shape, bool)
        for j in range(n):
            window = t[:, j : length - n + 1 + j]
            h = (h ^ window) * jnp.uint32(_MULTIPLIERS[j])
            h = h ^ (h >> 15)
            ok = ok & (window != _PAD)
        ids.append((h % jnp.uint32(buckets)).astype(jnp.int32))
        valid.append(ok)
    return jnp.concatenate(ids, axis=1), jnp.concatenate(valid, axis=1)


def bag_head(module: nn.Module, pooled: jax.Array, weight_sum: jax.Array) -> jax.Array:
    """The shared output of the bag encoders: the weighted sum ``pooled`` [B, width] divided by
    its total weight ``weight_sum`` [B, 1], LayerNorm, then (when ``module.mlp_dim``) a residual
    GELU MLP; constrained to ('batch', 'embed'). Call it from the module's compact ``__call__``:
    the layers it creates are the module's own (LayerNorm_0, Dense_0, Dense_1)."""
    total = jnp.maximum(weight_sum, 1e-6)
    pooled = pooled / total.astype(module.dtype)
    h = nn.LayerNorm(
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        scale_init=partitioned(nn.initializers.ones, (NORM,)),
        bias_init=partitioned(nn.initializers.zeros, (NORM,)),
    )(pooled)
    if module.mlp_dim:
        dense = lambda features, names: nn.Dense(  # noqa: E731
            features,
            dtype=module.dtype,
            param_dtype=module.param_dtype,
            kernel_init=partitioned(nn.initializers.lecun_normal(), names),
            bias_init=partitioned(nn.initializers.zeros, (names[1],)),
        )
        h = h + dense(module.width, (MLP, EMBED))(nn.gelu(dense(module.mlp_dim, (EMBED, MLP))(h)))
    return constrain(h, (BATCH, EMBED))


class NgramBagEncoder(nn.Module):
    """Weighted mean of hashed byte n-gram embeddings (see the module docstring).

    No ``remat_policy``: there is no stack of layers whose activations a recomputation could
    drop. The backward pass keeps the [B, buckets] bag weights (for the table's gradient, a
    matmul input) and the head's [B, width] inputs; a remat would recompute the same matmul
    from the same weights and free nothing.

    Attributes:
      width: embedding width.
      buckets: hash buckets (rows of the embedding table).
      orders: n-gram orders.
      lowercase: fold ASCII letters to lower case before hashing.
      mlp_dim: hidden width of an optional residual MLP on the pooled vector (0: none).
      ngram_dropout: during training, drop each n-gram with this probability (a 'dropout' rng is
        needed then): the text is re-sampled every step, which keeps the bag from memorising.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    width: int = 256
    buckets: int = 2**18
    orders: Sequence[int] = (3, 4, 5)
    lowercase: bool = True
    mlp_dim: int = 0
    ngram_dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        if self.width < 1 or self.buckets < 1:
            raise ValueError(
                f"NgramBagEncoder: width and buckets must be >= 1, got {self.width}, {self.buckets}"
            )
        if not 0.0 <= self.ngram_dropout < 1.0:
            raise ValueError(
                f"NgramBagEncoder: ngram_dropout must be in [0, 1), got {self.ngram_dropout}"
            )
        if not self.orders:
            raise ValueError("NgramBagEncoder: orders must name at least one n")
        super().__post_init__()

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        """Encodes int [B, L] token ids into [B, width]."""
        if tokens.ndim != 2:
            raise ValueError(f"NgramBagEncoder: expected tokens [B, L], got shape {tokens.shape}")
        ids, valid = ngram_ids(tokens, self.orders, self.buckets, lowercase=self.lowercase)
        if train and self.ngram_dropout > 0:
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - self.ngram_dropout, ids.shape)
            valid = valid & keep
        table = self.param(
            "embedding",
            partitioned(nn.initializers.normal(1.0), (VOCAB, EMBED)),
            (self.buckets, self.width),
            self.param_dtype,
        )
        salience = self.param(
            "salience",
            partitioned(nn.initializers.zeros, (VOCAB,)),
            (self.buckets,),
            self.param_dtype,
        )
        # Bag of n-grams as a dense [B, buckets] matrix of sublinear counts: one scatter-add and one
        # matmul, O(B·buckets + B·buckets·width), instead of gathering a [B, K, width] tensor.
        rows = jnp.broadcast_to(jnp.arange(ids.shape[0])[:, None], ids.shape)
        counts = jnp.zeros((ids.shape[0], self.buckets), jnp.float32)
        counts = counts.at[rows, ids].add(valid.astype(jnp.float32))
        weights = jnp.log1p(counts) * jax.nn.softplus(salience.astype(jnp.float32))[None, :]
        pooled = weights.astype(self.dtype) @ table.astype(self.dtype)  # [B, width]
        return bag_head(self, pooled, weights.sum(axis=1, keepdims=True))
