"""The plain-XLA [T, V] linear cross-entropy, the kernels' oracle: the library's own reference.

There is one [T, V] oracle in the project, ``jaxbatch.losses.linear_cross_entropy(...,
implementation='reference')``; the kernels and their tests use it through this float32 entry
point, so every implementation is checked against the same code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxbatch.losses.linear_cross_entropy import linear_cross_entropy


def linear_cross_entropy_reference(
    h: jax.Array, w: jax.Array, labels: jax.Array, *, ignore_index: int | None = None
) -> jax.Array:
    """Mean cross-entropy of softmax(h·w), materialising the [T, V] logits in f32.

      loss = (1/|M|) Σ_{t∈M} [ log Σ_v exp(h_t·w_v) − h_t·w_{y_t} ],  M = {t : y_t ≠ ignore_index}

    Args:
      h: [T, D] hidden states (any float dtype; cast to f32 first).
      w: [D, V] output kernel.
      labels: int [T] in [0, V), or ``ignore_index``.
      ignore_index: label value of the tokens left out of the mean.

    Returns:
      The f32 scalar mean (0 if no token counts).
    """
    h = jnp.asarray(h, jnp.float32)
    w = jnp.asarray(w, jnp.float32)
    return linear_cross_entropy(h, w, labels, ignore_index=ignore_index, implementation="reference")
