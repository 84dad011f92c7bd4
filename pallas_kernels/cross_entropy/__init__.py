"""Pallas TPU/GPU kernels for the linear cross-entropy of a vocabulary head, never forming [T, V].

Public API:
  linear_cross_entropy: fused forward (lse and target logit per token) and recomputing backward
    kernels behind a custom_vjp (api.py); ``jaxbatch.losses.linear_cross_entropy`` with
    ``implementation='pallas'`` (or 'auto' on TPU/GPU) is the entry models use.
  linear_cross_entropy_reference: the plain [T, V] XLA oracle (reference.py).
  BlockSizes: tile sizes with per-backend defaults.
"""

from pallas_kernels.cross_entropy._common import BlockSizes
from pallas_kernels.cross_entropy.api import linear_cross_entropy
from pallas_kernels.cross_entropy.reference import linear_cross_entropy_reference

__all__ = ["BlockSizes", "linear_cross_entropy", "linear_cross_entropy_reference"]
