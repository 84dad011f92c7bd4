"""Losses for large batches: tiled contrastive losses and chunked linear cross-entropy.

``contrastive_loss`` computes the CLIP softmax, SigLIP sigmoid and decoupled (DCL) losses over any
batch size: tiled so that the N×N logit matrix never exists, and around a ``ppermute`` ring of
devices inside ``jax.shard_map``. ``linear_cross_entropy`` is the cross-entropy of ``h @ w`` over
a vocabulary, computed in token chunks so that the [T, V] logits never exist
(``LCE_IMPLEMENTATIONS``; ``choose_linear_cross_entropy_implementation`` says what 'auto' runs
for a shape on a backend, and why, as the trainer's 'lm' task records it).
"""

from jaxbatch.losses.contrastive import (
    DEFAULT_BLOCK_SIZE,
    IMPLEMENTATIONS,
    KINDS,
    contrastive_loss,
)
from jaxbatch.losses.linear_cross_entropy import IMPLEMENTATIONS as LCE_IMPLEMENTATIONS
from jaxbatch.losses.linear_cross_entropy import (
    choose_implementation as choose_linear_cross_entropy_implementation,
)
from jaxbatch.losses.linear_cross_entropy import linear_cross_entropy

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "IMPLEMENTATIONS",
    "KINDS",
    "LCE_IMPLEMENTATIONS",
    "choose_linear_cross_entropy_implementation",
    "contrastive_loss",
    "linear_cross_entropy",
]
