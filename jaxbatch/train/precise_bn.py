"""Precise BatchNorm: population statistics recomputed with fixed weights before evaluation.

Running statistics are an exponential average over the *changing* weights of recent steps; in a
short run at a large learning rate they lag the final weights and the evaluated model is much
worse than the trained one (digits/LARS, ``scripts/compare_precise_bn.py``: 66 % accuracy at BN
momentum 0.9 and 21 % at 0.99 with the running statistics, 97 % with recomputed ones). Precise
BN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", Section 3.1, and fvcore's
``update_bn_stats``) freezes the weights, runs n training batches in training mode and takes the
equal-weight average of their batch statistics:

  mean = (1/n) Σ_i μ_i,   var = (1/n) Σ_i σ²_i.

It works for any module whose running statistics take one linear EMA step per call,
``r <- m·r + (1 - m)·s`` (``flax.linen.BatchNorm``, ``jaxbatch.nn.GhostBatchNorm``), without
knowing m: one call from r = 0 gives (1 - m)·s, one from r = 1 gives m + (1 - m)·s, so
m = difference and s_i = (call from 0) / (1 - m). Only the 'batch_stats' collection changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp

COLLECTION = "batch_stats"


def has_batch_stats(model_state: Any) -> bool:
    """Whether ``model_state`` holds running statistics to recompute."""
    return bool(jax.tree.leaves((model_state or {}).get(COLLECTION, {})))


def make_stats_fn(task):
    """``stats(params, model_state, batch, start) -> batch_stats`` after one training-mode call
    from running statistics ``start`` (the task's loss function, its outputs discarded)."""

    def stats(params, model_state, batch, start):
        _, (_, new_state) = task.loss_fn(
            params, {**model_state, COLLECTION: start}, batch, jax.random.PRNGKey(0)
        )
        return new_state[COLLECTION]

    return stats


def recompute_batch_stats(stats_fn, params: Any, model_state: Any, batches: Iterable[dict]) -> dict:
    """``model_state`` with its 'batch_stats' replaced by the average over ``batches``.

    Args:
      stats_fn: from :func:`make_stats_fn`, ideally jitted with the run's shardings.
      params: the (frozen) parameters whose statistics are wanted.
      model_state: collections of the model, with 'batch_stats'.
      batches: training batches (global, as the train step takes them), at least one.

    Returns:
      a new model state; the momentum m of every statistic is recovered from the first batch.
    """
    if not has_batch_stats(model_state):
        raise ValueError("model state has no 'batch_stats' to recompute")
    running = model_state[COLLECTION]
    zeros = jax.tree.map(jnp.zeros_like, running)
    ones = jax.tree.map(jnp.ones_like, running)
    total, one_minus_m, count = None, None, 0
    for batch in batches:
        from_zero = stats_fn(params, model_state, batch, zeros)  # (1 - m)·s_i
        if one_minus_m is None:
            from_one = stats_fn(params, model_state, batch, ones)  # m + (1 - m)·s_i
            # m is one number per module: average over the leaf to cancel rounding
            one_minus_m = jax.tree.map(
                lambda a, b: 1.0 - jnp.mean((b - a).astype(jnp.float32)), from_zero, from_one
            )
        total = from_zero if total is None else jax.tree.map(jnp.add, total, from_zero)
        count += 1
    if count == 0:
        raise ValueError("precise BN needs at least one batch")

    def average(summed, scale, old):
        # momentum 1 (statistics never updated) keeps the old value
        ok = scale > 1e-6
        return jnp.where(ok, summed / (count * jnp.where(ok, scale, 1.0)), old).astype(old.dtype)

    return {**model_state, COLLECTION: jax.tree.map(average, total, one_minus_m, running)}
