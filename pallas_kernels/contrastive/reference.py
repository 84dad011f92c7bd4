"""The plain-XLA N×N contrastive loss, the kernels' oracle: the library's own reference.

There is one N×N oracle in the project, ``jaxbatch.losses._contrastive_reference.reference_loss``
(also behind ``contrastive_loss(..., implementation='reference')``); the kernels and their tests
use it through this float32 entry point, so every implementation is checked against the same code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxbatch.losses._contrastive_reference import reference_loss


def contrastive_loss_reference(
    x: jax.Array,
    y: jax.Array,
    logit_scale: jax.Array | float,
    logit_bias: jax.Array | float | None = None,
    *,
    kind: str = "softmax",
) -> jax.Array:
    """Contrastive loss of paired embeddings, materialising all N² logits in f32 (HIGHEST).

    L = s · x · yᵀ + b, with x, y: [N, D], s = ``logit_scale`` (already exponentiated).

      softmax:   ½ (1/N) Σ_i [lse_j L_ij − L_ii] + ½ (1/N) Σ_j [lse_i L_ij − L_jj]
      sigmoid:   −(1/N) Σ_ij log σ(z_ij · L_ij),  z_ij = +1 if i = j else −1
      decoupled: the softmax form with the positive pair left out of both denominators,
                 lse_{j≠i} L_ij instead of lse_j L_ij (and likewise for columns); −inf at N = 1.

    References:
      Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
        Supervision" (CLIP), Figure 3 (symmetric cross-entropy).
      Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training" (SigLIP), Eq. 1.
      Yeh et al. 2022, "Decoupled Contrastive Learning", Sec. 3 (the DCL loss L_DC).

    Args:
      x: [N, D] embeddings of the first modality (not normalised here).
      y: [N, D] embeddings of the second modality; row i of x and y is a positive pair.
      logit_scale: scalar multiplier of the similarities.
      logit_bias: optional scalar added to every logit.
      kind: 'softmax', 'sigmoid' or 'decoupled'.

    Returns:
      The scalar loss in f32 (inputs of any float dtype are cast to f32 first).
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    return reference_loss(x, y, logit_scale, logit_bias, kind=kind)
