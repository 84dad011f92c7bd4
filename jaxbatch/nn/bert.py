"""BERT: a bidirectional post-LN transformer encoder with a masked-language-model head."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from jaxbatch.nn import attention as attention_lib
from jaxbatch.nn import compressed_activations, context_parallel
from jaxbatch.nn.axes import BATCH, EMBED, LAYERS, LENGTH, VOCAB, constrain, partitioned
from jaxbatch.nn.layers import (
    MlpBlock,
    MultiHeadAttention,
    check_softmax_compression,
    layer_norm,
)
from jaxbatch.nn.remat import get_policy, remat_module

BERT_PAD_ID = 0
"""Token id of [PAD] in the BERT WordPiece vocabulary."""


class BertBlock(nn.Module):
    """One post-LN encoder block (Vaswani et al. 2017, Section 3.1; as in BERT).

    x = LN(x + dropout(attn(x, key_mask))); x = LN(x + dropout(mlp(x))). The signature
    ``(carry, key_mask) -> (carry, None)`` is the one ``nn.scan`` needs (key_mask bool [B, L],
    False on padding, is broadcast over the layers).
    """

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"
    attention_chunk_size: int = attention_lib.DEFAULT_CHUNK_SIZE
    compress_activations: tuple[str, ...] = ()
    context_parallel: str = "none"
    context_layout: str = "contiguous"

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array) -> tuple[jax.Array, None]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        names = tuple(self.compress_activations)
        compress_ln = compressed_activations.LAYER_NORM_INPUT in names
        h = MultiHeadAttention(
            self.num_heads,
            **kw,
            attention=self.attention,
            attention_chunk_size=self.attention_chunk_size,
            compress_softmax=compressed_activations.SOFTMAX in names,
            context_parallel=self.context_parallel,
            context_layout=self.context_layout,
            name="attn",
        )(x, key_mask=key_mask)
        h = nn.Dropout(self.dropout)(h, deterministic=self.deterministic)
        x = layer_norm(**kw, name="ln_attn", compress=compress_ln)(x + h)
        h = MlpBlock(self.mlp_dim, self.dropout, **kw, compress_activations=names, name="mlp")(
            x, deterministic=self.deterministic
        )
        h = nn.Dropout(self.dropout)(h, deterministic=self.deterministic)
        x = layer_norm(**kw, name="ln_mlp", compress=compress_ln)(x + h)
        return constrain(x, (BATCH, LENGTH, EMBED)), None


class BertMLM(nn.Module):
    """BERT encoder with the masked-LM head, evaluated only at the masked positions.

    z_0 = LN(E[ids] + P[:L]);  z_l = post-LN block(z_{l-1}, key_mask = ids != pad_id);
    h_p = z_depth at masked position p;  t_p = LN(gelu(h_p W_t + b_t));
    logits_p = t_p Eᵀ + b_out  (output embedding tied to the input one).

    Gathering the P masked positions before the vocabulary projection (P = 20 of 128 or 80 of 512
    tokens in BERT's pre-training data) keeps the logits at [B, P, V] instead of [B, L, V]. There is
    no segment embedding and no next-sentence head: the LAMB runs of jaxbatch train the MLM
    objective alone (as RoBERTa, Liu et al. 2019, found sufficient). Padding reaches attention
    as a key_mask [B, L], so with ``attention`` other than 'reference' no [L, L] mask or score
    matrix is built (``jaxbatch.nn.attention``).

    References:
      Devlin, Chang, Lee, Toutanova 2019, "BERT: Pre-training of Deep Bidirectional Transformers
      for Language Understanding", Section 3.1 (masked LM) and Appendix A.2 (BERT-Large: L=24,
      H=1024, A=16, 4H feed-forward); You et al. 2020, "Large Batch Optimization for Deep Learning:
      Training BERT in 76 minutes" (the model LAMB trains).

    Attributes:
      vocab_size: WordPiece vocabulary (30,522 for BERT; pad it to a multiple of the tensor axis).
      width: model width H.
      depth: number of blocks L.
      heads: attention heads A (must divide ``width``).
      mlp_dim: feed-forward width (4H).
      max_len: longest sequence (size of the learned position table).
      dropout: dropout rate (needs a 'dropout' rng when ``train=True`` and rate > 0).
      pad_id: the padding token id (masked out as attention key).
      scan_layers: stack the blocks with ``nn.scan`` (leading parameter axis 'layers').
      remat_policy: a name from ``jaxbatch.nn.remat.POLICY_NAMES``.
      attention: a name from ``jaxbatch.nn.attention.IMPLEMENTATIONS`` ('auto': the Pallas
        splash kernel on TPU, the chunked XLA attention elsewhere, since cuDNN takes no general
        key mask; see ``choose_attention_implementation``).
      attention_chunk_size: query/key block of the 'chunked' attention.
      compress_activations: names from ``jaxbatch.nn.compressed_activations.COMPRESSIBLE`` of the
        saved activations kept as int8 for the backward pass: 'mlp_input', 'layer_norm_input'
        (every layer norm of the encoder, the embedding one included), 'softmax' (needs
        ``attention='reference'``).
      dtype: compute dtype (logits are returned in float32).
      param_dtype: parameter dtype.
      context_parallel: 'none' or a strategy of ``jaxbatch.nn.context_parallel``: with a mesh
        'context' axis > 1 every block's attention runs inside ``jax.shard_map`` over it.
      context_layout: 'contiguous' or 'zigzag' (the 'mlm' task reorders the batch and passes
        the original ``positions``; attention here is not causal, so zig-zag only changes the
        order).
    """

    vocab_size: int = 30522
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    max_len: int = 512
    dropout: float = 0.1
    pad_id: int = BERT_PAD_ID
    scan_layers: bool = True
    remat_policy: str = "none"
    attention: str = "auto"
    attention_chunk_size: int = attention_lib.DEFAULT_CHUNK_SIZE
    compress_activations: tuple[str, ...] = ()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    context_parallel: str = "none"
    context_layout: str = "contiguous"

    def __post_init__(self):
        get_policy(self.remat_policy)  # fails early on an unknown name
        context_parallel.check_model_options(
            self.context_parallel, self.context_layout, where="BertMLM"
        )
        if self.attention not in attention_lib.IMPLEMENTATIONS:
            raise ValueError(
                f"BertMLM: unknown attention {self.attention!r}; expected one of "
                f"{attention_lib.IMPLEMENTATIONS}"
            )
        names = compressed_activations.validate_names(
            self.compress_activations, where="BertMLM.compress_activations"
        )
        check_softmax_compression(
            compressed_activations.SOFTMAX in names, self.attention, "BertMLM"
        )
        chunk = self.attention_chunk_size
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
            raise ValueError(f"BertMLM: attention_chunk_size must be a positive int, got {chunk!r}")
        if self.width % self.heads:
            raise ValueError(f"BertMLM: width={self.width} is not divisible by heads={self.heads}")
        if self.depth < 1:
            raise ValueError(f"BertMLM: depth must be >= 1, got {self.depth}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BertMLM: dropout must be in [0, 1), got {self.dropout}")
        super().__post_init__()

    def _check_context(self, length: int, positions) -> None:
        context = context_parallel.context_axis_size()
        if context == 1 or self.is_initializing():
            return
        if self.context_parallel == "none":
            raise ValueError(
                f"BertMLM: the mesh splits the sequence over context = {context}, but "
                f"context_parallel='none'; set it to one of {context_parallel.STRATEGIES}"
            )
        if self.context_layout == "zigzag" and positions is None:
            raise ValueError(
                "BertMLM: context_layout='zigzag' reorders the tokens, so the original positions "
                "must be passed"
            )
        context_parallel.check_model_sizes(
            seq_len=length, heads=self.heads, strategy=self.context_parallel,
            layout=self.context_layout, mesh_shape=context_parallel.current_mesh().shape,
            where="BertMLM",
        )  # fmt: skip

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        masked_positions: jax.Array,
        train: bool = False,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """MLM logits float32 [B, P, vocab] at ``masked_positions`` int [B, P] of ids int [B, L].

        ``positions`` int [B, L] (default 0..L−1) index the position table: the original
        positions of a batch in the zig-zag order (``masked_positions`` then index the reordered
        sequence).
        """
        if input_ids.ndim != 2 or masked_positions.ndim != 2:
            raise ValueError(
                f"BertMLM: expected input_ids [B, L] and masked_positions [B, P], got shapes "
                f"{input_ids.shape} and {masked_positions.shape}"
            )
        length = input_ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"BertMLM: sequence length {length} exceeds max_len={self.max_len}")
        if positions is not None and (
            positions.shape != input_ids.shape or not jnp.issubdtype(positions.dtype, jnp.integer)
        ):
            raise ValueError(
                f"BertMLM: positions must be int of the ids' shape {input_ids.shape}, got "
                f"{positions.dtype}{positions.shape}"
            )
        self._check_context(length, positions)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embed = nn.Embed(
            self.vocab_size,
            self.width,
            **kw,
            embedding_init=partitioned(nn.initializers.normal(0.02), (VOCAB, EMBED)),
            name="embed",
        )
        pos = self.param(
            "pos_embedding",
            partitioned(nn.initializers.normal(0.02), (None, EMBED)),
            (self.max_len, self.width),
            self.param_dtype,
        )
        pos = pos[:length][None] if positions is None else jnp.take(pos, positions, axis=0)
        x = embed(input_ids) + pos.astype(self.dtype)
        names = tuple(self.compress_activations or ())
        x = layer_norm(
            **kw, name="embed_norm", compress=compressed_activations.LAYER_NORM_INPUT in names
        )(x)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x = constrain(x, (BATCH, LENGTH, EMBED))
        key_mask = input_ids != self.pad_id  # [B, L]
        block_cls = remat_module(BertBlock, self.remat_policy, prevent_cse=not self.scan_layers)
        block_kw = dict(
            num_heads=self.heads,
            mlp_dim=self.mlp_dim,
            dropout=self.dropout,
            deterministic=not train,
            attention=self.attention,
            attention_chunk_size=self.attention_chunk_size,
            compress_activations=names,
            # init traces the plain attention (the same parameters, any init batch size)
            context_parallel="none" if self.is_initializing() else self.context_parallel,
            context_layout=self.context_layout,
            **kw,
        )
        if self.scan_layers:
            x, _ = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                variable_broadcast=False,
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: LAYERS},
            )(**block_kw, name="layers")(x, key_mask)
        else:
            for i in range(self.depth):
                x, _ = block_cls(**block_kw, name=f"layers_{i}")(x, key_mask)
        h = jnp.take_along_axis(x, masked_positions[..., None].astype(jnp.int32), axis=1)
        h = nn.Dense(
            self.width,
            **kw,
            kernel_init=partitioned(nn.initializers.normal(0.02), (EMBED, None)),
            bias_init=partitioned(nn.initializers.zeros, (None,)),
            name="transform",
        )(h)
        h = layer_norm(**kw, name="transform_norm")(nn.gelu(h))
        out_bias = self.param(
            "out_bias",
            partitioned(nn.initializers.zeros, (VOCAB,)),
            (self.vocab_size,),
            self.param_dtype,
        )
        logits = embed.attend(h) + out_bias.astype(self.dtype)
        return constrain(logits.astype(jnp.float32), (BATCH, None, VOCAB))
