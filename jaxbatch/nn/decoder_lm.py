"""Decoder-only (causal) transformer language model with scanned, rematerialised layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from jaxbatch.nn import compressed_activations, context_parallel, streambp
from jaxbatch.nn.axes import BATCH, EMBED, LAYERS, LENGTH, VOCAB, constrain, partitioned
from jaxbatch.nn.layers import check_softmax_compression, layer_norm, pre_ln_block
from jaxbatch.nn.remat import get_policy, remat_module

BACKPROP_MODES = ("full", "remat", "streambp")
# compress_activations name: streambp keeps the layer-boundary states as int8.
LAYER_INPUT = "layer_input"
# Every name DecoderLM.compress_activations takes: the block-level ones, then 'layer_input'.
COMPRESSIBLE: tuple[str, ...] = (*compressed_activations.COMPRESSIBLE, LAYER_INPUT)


def _compress_names(names) -> tuple[str, ...]:
    """DecoderLM.compress_activations as a tuple, every name checked against COMPRESSIBLE."""
    if names is None:
        return ()
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError(
            f"DecoderLM: compress_activations={names!r}; expected a tuple of names from "
            f"{COMPRESSIBLE}"
        )
    unknown = [n for n in names if n not in COMPRESSIBLE]
    if unknown:
        raise ValueError(
            f"DecoderLM: compress_activations has unknown name(s) {unknown}; expected names from "
            f"{COMPRESSIBLE}"
        )
    return tuple(names)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token within its segment, int32 [B, L], for packed sequences.

    A segment is a run of equal ids: [[7, 7, 7, 2, 2]] -> [[0, 1, 2, 0, 1]].
    """
    length = segment_ids.shape[1]
    index = jnp.arange(length, dtype=jnp.int32)[None]
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


class DecoderBlock(nn.Module):
    """One causal pre-LN block with the ``(carry, x) -> (carry, y)`` signature ``nn.scan`` needs
    (x: the segment ids of packed sequences or None, the same for every layer)."""

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"
    attention_chunk_size: int = 512
    compress_activations: tuple[str, ...] = ()  # block-level names, read by pre_ln_block
    context_parallel: str = "none"  # read by pre_ln_block
    context_layout: str = "contiguous"

    @nn.compact
    def __call__(
        self, x: jax.Array, segment_ids: jax.Array | None = None
    ) -> tuple[jax.Array, None]:
        y = pre_ln_block(self, x, None, deterministic=True, causal=True, segment_ids=segment_ids)
        return y, None


class DecoderLM(nn.Module):
    """GPT-style decoder-only language model.

    z_0 = E[tokens] + P[positions];  z_l = z_{l-1} + attn(LN(z_{l-1}), causal), then + mlp(LN(·)),
    l = 1..depth;  h = LN(z_depth);  logits = h W  with W = Eᵀ when ``tie_embeddings`` else a
    separate [width, vocab] kernel. Position t only sees tokens 0..t (of its own segment when
    ``segment_ids`` mark packed sequences; positions then count from each segment's start).

    ``scan_layers=True`` runs the blocks with ``nn.scan``: their parameters are stacked under
    params['layers'] with a leading axis of size ``depth`` whose logical name is 'layers'.
    ``scan_layers=False`` unrolls them as params['layers_0'], ..., params['layers_{depth-1}'] (the
    same values, unstacked). ``remat_policy`` wraps each block in ``nn.remat`` with the
    ``jax.checkpoint`` policy of that name (see ``jaxbatch.nn.remat``).

    ``backprop`` picks how the gradient of the blocks is formed (the parameters and the forward
    values are the same in all three):

    - 'full': ordinary autodiff (what is saved is set by ``remat_policy``);
    - 'remat': every block recomputed in the backward pass (``jax.checkpoint`` saving nothing but
      the block inputs), with the attention of ``attention`` (the chunked one for long sequences);
    - 'streambp': exact sequence-chunked backprop (``jaxbatch.nn.streambp``; Luo et al. 2025): the
      forward keeps the block inputs only and the backward of each block walks the sequence in
      chunks of ``stream_chunk_size`` positions. Needs ``remat_policy='none'``; it is used on apply
      (init runs the ordinary path, which makes the same parameters).

    For a chunked linear cross-entropy, ``apply(..., method='hidden')`` gives h [B, L, width] and
    ``apply(..., method='output_kernel')`` gives W [width, vocab], so that logits = h @ W.

    References:
      Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2);
      Vaswani et al. 2017, "Attention Is All You Need", Eq. 1 (masked attention);
      Luo et al. 2025, "StreamBP: Memory-Efficient Exact Backpropagation for Long Sequence Training
      of LLMs".

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
      attention: attention implementation (``jaxbatch.nn.attention.IMPLEMENTATIONS``).
      attention_chunk_size: query chunk of the chunked attention.
      backprop: one of :data:`BACKPROP_MODES`.
      stream_chunk_size: positions per chunk of 'streambp' (1 <= it <= sequence length).
      stream_layer_groups: 'streambp' runs the blocks in this many checkpointed groups
        (``streambp.streambp_stack(layer_groups=)``: G + depth/G block inputs held instead of
        depth, for one more forward pass of the blocks); must divide ``depth``; 1 = off.
      compress_activations: names from :data:`COMPRESSIBLE` of the saved activations kept as
        int8 for the backward pass (``jaxbatch.nn.compressed_activations``; Mesa / GACT):
        'mlp_input' (the GELU input), 'layer_norm_input' (the inputs of every layer norm, the
        final one included), 'softmax' (the attention probabilities; needs
        ``attention='reference'``, the only implementation that stores them), with any
        ``backprop``; 'layer_input' (with 'streambp' only): the block inputs kept for the backward
        pass are int8 with one scale per position (a quarter of the f32 bytes; the gradient
        becomes that at the dequantized inputs).
      context_parallel: 'none' or a strategy of ``jaxbatch.nn.context_parallel`` ('all_gather',
        'ring', 'ulysses'): when the trace's mesh has a 'context' axis > 1 (the sequence of the
        activations is split over it by the rule length → context), every block's attention
        runs inside ``jax.shard_map`` over 'context' with that strategy. Everything else in the
        model is position-wise.
      context_layout: 'contiguous' or 'zigzag' (causal load balancing): the batch must come in
        that order (``context_parallel.zigzag_shard_batch``, which the 'lm' task applies) with
        the original ``positions``; the causal mask follows the layout.
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
    attention: str = "auto"
    attention_chunk_size: int = 512
    backprop: str = "full"
    stream_chunk_size: int = 512
    stream_layer_groups: int = 1
    compress_activations: tuple[str, ...] = ()
    context_parallel: str = "none"
    context_layout: str = "contiguous"

    def __post_init__(self):
        get_policy(self.remat_policy)  # fails early on an unknown name
        context_parallel.check_model_options(
            self.context_parallel, self.context_layout, where="DecoderLM"
        )
        if self.context_parallel != "none" and compressed_activations.SOFTMAX in tuple(
            self.compress_activations or ()
        ):
            raise ValueError(
                "DecoderLM: compress_activations 'softmax' keeps the reference attention's "
                f"probabilities, which context_parallel={self.context_parallel!r} never forms"
            )
        if self.width % self.heads:
            raise ValueError(
                f"DecoderLM: width={self.width} is not divisible by heads={self.heads}"
            )
        if self.depth < 1:
            raise ValueError(f"DecoderLM: depth must be >= 1, got {self.depth}")
        if self.backprop not in BACKPROP_MODES:
            raise ValueError(
                f"DecoderLM: unknown backprop={self.backprop!r}; expected one of {BACKPROP_MODES}"
            )
        if self.backprop == "streambp" and self.remat_policy != "none":
            raise ValueError(
                "DecoderLM: backprop='streambp' recomputes every block chunk by chunk; it does not "
                f"support remat_policy={self.remat_policy!r} (use 'none')"
            )
        if self.backprop == "remat" and self.remat_policy not in ("none", "full"):
            raise ValueError(
                f"DecoderLM: backprop='remat' does not combine with remat_policy="
                f"{self.remat_policy!r} (it recomputes whole blocks); use remat_policy='none' or "
                "backprop='full'"
            )
        compress = _compress_names(self.compress_activations)
        if LAYER_INPUT in compress and self.backprop != "streambp":
            raise ValueError(
                f"DecoderLM: compress_activations {LAYER_INPUT!r} (int8 block inputs) needs "
                f"backprop='streambp', got backprop={self.backprop!r}"
            )
        check_softmax_compression(
            compressed_activations.SOFTMAX in compress, self.attention, "DecoderLM"
        )
        for name in ("stream_chunk_size", "attention_chunk_size", "stream_layer_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DecoderLM: {name} must be a positive int, got {value!r}")
        if self.depth % self.stream_layer_groups:
            raise ValueError(
                f"DecoderLM: stream_layer_groups={self.stream_layer_groups} must divide "
                f"depth={self.depth}"
            )
        super().__post_init__()

    @property
    def _block_compress(self) -> tuple[str, ...]:
        """The block-level names of compress_activations (all but 'layer_input')."""
        return tuple(n for n in _compress_names(self.compress_activations) if n != LAYER_INPUT)

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
        policy = "full" if self.backprop == "remat" else self.remat_policy
        block_cls = remat_module(DecoderBlock, policy, prevent_cse=not self.scan_layers)
        block_kw = dict(
            num_heads=self.heads,
            mlp_dim=self.mlp_dim,
            attention=self.attention,
            attention_chunk_size=self.attention_chunk_size,
            compress_activations=self._block_compress,
            # init traces the plain attention (the same parameters, any init batch size)
            context_parallel="none" if self.is_initializing() else self.context_parallel,
            context_layout=self.context_layout,
            **kw,
        )
        if self.scan_layers:
            scanned = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: LAYERS},
            )
            self.layers = scanned(**block_kw)
        else:
            self.layers = [block_cls(**block_kw) for _ in range(self.depth)]
        compress_ln = compressed_activations.LAYER_NORM_INPUT in self._block_compress
        self.final_norm = layer_norm(**kw, compress=compress_ln)
        if not self.tie_embeddings:
            self.head_kernel = self.param(
                "head_kernel",
                partitioned(nn.initializers.lecun_normal(), (EMBED, VOCAB)),
                (self.width, self.vocab_size),
                self.param_dtype,
            )

    def _check_inputs(self, tokens, segment_ids, positions):
        if tokens.ndim != 2:
            raise ValueError(f"DecoderLM: expected tokens [B, L], got shape {tokens.shape}")
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"DecoderLM: sequence length {length} exceeds max_len={self.max_len}")
        for name, a in (("segment_ids", segment_ids), ("positions", positions)):
            if a is None:
                continue
            if a.shape != tokens.shape:
                raise ValueError(
                    f"DecoderLM: {name} has shape {a.shape}; expected the tokens' shape "
                    f"{tokens.shape} [B, L]"
                )
            if not jnp.issubdtype(a.dtype, jnp.integer):
                raise ValueError(f"DecoderLM: {name} must be integers, got {a.dtype}")
        if self.backprop == "streambp":
            streambp.check_chunk_size(self.stream_chunk_size, length)
        context = context_parallel.context_axis_size()
        if context > 1 and not self.is_initializing():
            if self.context_parallel == "none":
                raise ValueError(
                    f"DecoderLM: the mesh splits the sequence over context = {context}, but "
                    "context_parallel='none'; set it to one of "
                    f"{context_parallel.STRATEGIES}"
                )
            if self.backprop == "streambp":
                raise ValueError(
                    f"DecoderLM: backprop='streambp' does not compose with context parallelism "
                    f"(context = {context}): its sequence chunks attend to a key prefix, not "
                    "the whole sharded sequence; use backprop 'full' or 'remat'"
                )
            if self.context_layout == "zigzag" and positions is None:
                raise ValueError(
                    "DecoderLM: context_layout='zigzag' reorders the tokens, so the original "
                    "positions must be passed (zigzag_shard_batch(..., add_positions=...))"
                )
            context_parallel.check_model_sizes(
                seq_len=length, heads=self.heads, strategy=self.context_parallel,
                layout=self.context_layout, mesh_shape=context_parallel.current_mesh().shape,
                where="DecoderLM",
            )  # fmt: skip

    def _stream_blocks(self, x: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        params = nn.meta.unbox(self.variables["params"])
        if self.scan_layers:
            layer_params = params["layers"]
        else:
            layer_params = [params[f"layers_{i}"] for i in range(self.depth)]
        pre_fn, chunk_fn = streambp.pre_ln_block_fns(
            num_heads=self.heads,
            mlp_dim=self.mlp_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            attention=self.attention,
            attention_chunk_size=self.attention_chunk_size,
            compress_activations=self._block_compress,
        )
        return streambp.streambp_stack(
            pre_fn,
            chunk_fn,
            layer_params,
            x,
            segment_ids,
            chunk_size=self.stream_chunk_size,
            scanned=self.scan_layers,
            int8_input=LAYER_INPUT in _compress_names(self.compress_activations),
            layer_groups=self.stream_layer_groups,
        )

    def hidden(
        self,
        tokens: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Final hidden states h [B, L, width] (after the last LayerNorm).

        Args:
          tokens: int [B, L] token ids.
          segment_ids: int [B, L] or None; packed sequences: a token attends only to earlier
            tokens of its own segment.
          positions: int [B, L] indices into the position table, or None for 0..L-1 (packed
            sequences usually restart them at each segment).
        """
        self._check_inputs(tokens, segment_ids, positions)
        length = tokens.shape[1]
        if positions is None:
            pos = self.pos_embedding[:length][None]
        else:
            pos = jnp.take(self.pos_embedding, positions, axis=0)
        x = self.embed(tokens) + pos.astype(self.dtype)
        x = constrain(x, (BATCH, LENGTH, EMBED))
        if self.backprop == "streambp" and not self.is_initializing():
            x = self._stream_blocks(x, segment_ids)
        elif self.scan_layers:
            x, _ = self.layers(x, segment_ids)
        else:
            for layer in self.layers:
                x, _ = layer(x, segment_ids)
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
        self,
        tokens: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        return_hidden: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Next-token logits float32 [B, L, vocab] for tokens int [B, L].

        Args:
          tokens: token ids.
          segment_ids, positions: see :meth:`hidden`.
          return_hidden: also return the final hidden states h [B, L, width].

        Returns:
          logits, or (logits, h) when ``return_hidden``.
        """
        h = self.hidden(tokens, segment_ids, positions)
        logits = self.logits_from_hidden(h)
        return (logits, h) if return_hidden else logits
