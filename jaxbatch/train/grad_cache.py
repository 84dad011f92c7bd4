"""Gradient accumulation for losses over the whole batch of embeddings (contrastive losses).

A contrastive loss couples every example with every other one, so the mean of per-micro-batch
losses is a different objective (fewer negatives per query), not the full-batch loss. Gradient
caching (Gao, Zhang, Han, Callan 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup", Section 3) keeps the full-batch objective at the memory of one micro-batch:

  1. embed every micro-batch without keeping activations:  Z = [f_θ(m_1); ...; f_θ(m_k)];
  2. differentiate the loss with respect to the embeddings only:  G = ∂L(Z, s)/∂Z, g_s = ∂L/∂s
     (s: outputs shared by all examples, such as the logit scale and bias);
  3. re-embed micro-batch j with its activations and pull its rows of G back to the parameters:
     ∇_θ L = Σ_j (∂f_θ(m_j)/∂θ)^T G_j + (∂s/∂θ)^T g_s.

Step 3 runs inside ``optim.accumulate``, which averages k per-micro-batch gradients; micro-batch j
therefore pulls back k·G_j and all of g_s, so the average is exactly ∇_θ L. The cotangents G ride
in the batch under :data:`COTANGENT_KEY`, so ``accumulate`` splits them the same strided way as
the inputs (and with the same sharding). Micro-batch j draws its dropout masks from its own key
``optim.accumulate.micro_batch_rng(step_key, j)`` in both passes, so the re-embedding of step 3
reproduces step 1 exactly while different micro-batches get independent masks. Cost: one extra
forward pass.

The per-micro-batch gradients of step 3 are not independent gradient estimates, so the
gradient-noise scale (B_simple) is not computed from them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxbatch.optim.accumulate import merge_micro_batches, micro_batch_rng, split_micro_batches

COTANGENT_KEY = "_grad_cache_embedding_cotangents"


def applies(task, micro_batches: int) -> bool:
    """Whether the step of ``task`` accumulates through cached embedding gradients."""
    return micro_batches > 1 and task.embed_fn is not None and task.pair_loss_fn is not None


def embedding_cotangents(
    task, params: Any, model_state: Any, batch: dict, rng: jax.Array, micro_batches: int
) -> tuple[dict, Any, jax.Array, dict]:
    """Steps 1-2: embeds the batch micro-batch by micro-batch and differentiates the loss.

    Returns:
      (batch with k·G under COTANGENT_KEY, g_s, full-batch loss, the loss's metrics).
    """
    k = micro_batches

    def embed(indexed_micro_batch):
        index, micro_batch = indexed_micro_batch
        key = micro_batch_rng(rng, index)
        (per_example, shared), _ = task.embed_fn(params, model_state, micro_batch, key)
        return per_example, shared

    indices = jnp.arange(k, dtype=jnp.int32)
    per_example, shared = jax.lax.map(embed, (indices, split_micro_batches(batch, k)))
    per_example = merge_micro_batches(per_example, k)
    shared = jax.tree.map(lambda x: x[0], shared)  # the same in every micro-batch (no dropout)
    (loss, vjp, metrics) = jax.vjp(task.pair_loss_fn, per_example, shared, has_aux=True)
    d_per_example, d_shared = vjp(jnp.ones_like(loss))
    d_per_example = jax.tree.map(lambda d: d * jnp.asarray(k, d.dtype), d_per_example)
    return {**batch, COTANGENT_KEY: d_per_example}, d_shared, loss, metrics


def grad_fn_for(task, model_state: Any, d_shared: Any, loss, metrics):
    """Step 3 as ``grad_fn(params, micro_batch, rng) -> (grads, aux)`` for
    ``optim.accumulate(..., rng=step_key)``, which passes micro-batch j the key of step 1."""

    def grad_fn(params, micro_batch, rng):
        micro_batch = dict(micro_batch)
        d_per_example = micro_batch.pop(COTANGENT_KEY)

        def embed(p):
            outputs, new_model_state = task.embed_fn(p, model_state, micro_batch, rng)
            return outputs, new_model_state

        _, pullback, new_model_state = jax.vjp(embed, params, has_aux=True)
        (grads,) = pullback((d_per_example, d_shared))
        return grads, {"loss": loss, "metrics": metrics, "model_state": new_model_state}

    return grad_fn
