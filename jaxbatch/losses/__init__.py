"""Losses for large batches: tiled contrastive losses (and, later, chunked linear cross-entropy).

``contrastive_loss`` computes the CLIP softmax, SigLIP sigmoid and decoupled (DCL) losses over any
batch size: tiled so that the N×N logit matrix never exists, and around a ``ppermute`` ring of
devices inside ``jax.shard_map``.
"""

from jaxbatch.losses import contrastive_specs
from jaxbatch.losses.contrastive import (
    DEFAULT_BLOCK_SIZE,
    IMPLEMENTATIONS,
    KINDS,
    contrastive_loss,
)

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "IMPLEMENTATIONS",
    "KINDS",
    "contrastive_loss",
    "contrastive_specs",
]
