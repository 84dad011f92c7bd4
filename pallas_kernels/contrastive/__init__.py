"""Pallas TPU/GPU kernels for the tiled contrastive loss (CLIP softmax, SigLIP sigmoid, DCL).

Public API:
  contrastive_loss: fused kernels behind a custom_vjp (api.py).
  contrastive_loss_reference: the plain N×N XLA oracle (reference.py).
  BlockSizes: tile sizes with per-backend defaults.
  tiles: per-block entry points for one step of a device ring (home and off-home y blocks),
    returning partial statistics (tiles.py).
"""

from jaxbatch.losses._contrastive_reference import KINDS
from pallas_kernels.contrastive import tiles
from pallas_kernels.contrastive._common import BlockSizes
from pallas_kernels.contrastive.api import contrastive_loss
from pallas_kernels.contrastive.reference import contrastive_loss_reference

__all__ = ["KINDS", "BlockSizes", "contrastive_loss", "contrastive_loss_reference", "tiles"]
