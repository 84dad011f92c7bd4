"""Flax linen models for large-batch training (functional ``init`` / ``apply``).

Models: :class:`GhostBatchNorm`, :class:`ResNet` (``resnet18``, ``resnet50``, ``resnet_cifar``),
:class:`ViT`, :class:`TextEncoder`, :class:`NgramBagEncoder`, :class:`SubtokenBagEncoder`,
:class:`DualEncoder`, :class:`DecoderLM`, :class:`BertMLM`;
remat policies by name
in :mod:`jaxbatch.nn.remat`; attention implementations ('reference', 'chunked', 'cudnn',
'pallas_tpu', 'auto') in :mod:`jaxbatch.nn.attention`. Every model takes ``dtype`` (compute)
and ``param_dtype``.

Logical axis names. Every parameter is created through ``nn.with_logical_partitioning`` so
``init`` returns ``nn.LogicallyPartitioned`` boxes and ``nn.get_partition_spec`` yields a spec
for every leaf; activations are constrained with ``nn.with_logical_constraint`` at block
boundaries. Both are no-ops without a mesh and rules (``jaxbatch.parallel`` owns the mapping to
mesh axes). The names (``jaxbatch.nn.axes.LOGICAL_AXES``):

- 'batch'    examples (activations only).
- 'length'   sequence / token positions (activations only).
- 'embed'    model width: token width, pooled features, input side of heads and projections.
- 'mlp'      hidden width of MLPs and of the dual-encoder projection output.
- 'heads'    attention heads.
- 'kv'       per-head feature dimension.
- 'vocab'    output vocabulary / classes (embedding tables, LM and classifier heads).
- 'layers'   the stacked layer axis of ``nn.scan`` (``DecoderLM(scan_layers=True)``).
- 'conv_in'  convolution input channels.
- 'conv_out' convolution output channels (also ResNet activations' channel axis).
- 'norm'     scale and bias of normalisation layers.

Kernels: Dense q/k/v ('embed', 'heads', 'kv'), attention out ('heads', 'kv', 'embed'),
MLP ('embed', 'mlp') / ('mlp', 'embed'), conv (None, None, 'conv_in', 'conv_out'),
ViT patch embedding (None, None, 'conv_in', 'embed'), embeddings ('vocab', 'embed'),
heads ('embed', 'vocab'), position tables (None, 'embed') or (None, None, 'embed'),
logit scale / bias () (scalars). Activations: ('batch', 'length', 'embed') after every transformer
block, ('batch', None, None, 'conv_out') after every ResNet block, ('batch', 'embed') for pooled
features. Batch-norm running statistics ('batch_stats') are plain arrays, exactly as in
``flax.linen.BatchNorm`` (replicated).
"""

from jaxbatch.nn import attention, remat
from jaxbatch.nn.attention import choose_attention_implementation, dot_product_attention
from jaxbatch.nn.axes import LOGICAL_AXES
from jaxbatch.nn.bert import BertBlock, BertMLM
from jaxbatch.nn.decoder_lm import DecoderBlock, DecoderLM
from jaxbatch.nn.dual_encoder import (
    CLIP_LOGIT_SCALE_INIT,
    SIGLIP_LOGIT_BIAS_INIT,
    SIGLIP_LOGIT_SCALE_INIT,
    DualEncoder,
    l2_normalize,
)
from jaxbatch.nn.ghost_batch_norm import GhostBatchNorm
from jaxbatch.nn.layers import MlpBlock, MultiHeadAttention, TransformerBlock
from jaxbatch.nn.ngram_encoder import NgramBagEncoder, ngram_ids
from jaxbatch.nn.remat import POLICY_NAMES, get_policy
from jaxbatch.nn.resnet import BasicBlock, BottleneckBlock, ResNet, resnet18, resnet50, resnet_cifar
from jaxbatch.nn.subtoken_encoder import SubtokenBagEncoder, bucket_weights
from jaxbatch.nn.text_encoder import BYTE_VOCAB_SIZE, CLS_ID, PAD_ID, TextEncoder
from jaxbatch.nn.vit import ViT

__all__ = [
    "BertBlock",
    "BertMLM",
    "BYTE_VOCAB_SIZE",
    "CLIP_LOGIT_SCALE_INIT",
    "CLS_ID",
    "LOGICAL_AXES",
    "PAD_ID",
    "POLICY_NAMES",
    "SIGLIP_LOGIT_BIAS_INIT",
    "SIGLIP_LOGIT_SCALE_INIT",
    "BasicBlock",
    "BottleneckBlock",
    "DecoderBlock",
    "DecoderLM",
    "DualEncoder",
    "GhostBatchNorm",
    "MlpBlock",
    "MultiHeadAttention",
    "ResNet",
    "NgramBagEncoder",
    "SubtokenBagEncoder",
    "TextEncoder",
    "ngram_ids",
    "bucket_weights",
    "TransformerBlock",
    "ViT",
    "get_policy",
    "l2_normalize",
    "remat",
    "attention",
    "choose_attention_implementation",
    "dot_product_attention",
    "resnet18",
    "resnet50",
    "resnet_cifar",
]
