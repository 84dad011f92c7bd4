"""The :class:`Task` record every task builder returns, and helpers shared by the task modules.

``jaxbatch.train.tasks`` (classification, contrastive, lm and the registry) and
``jaxbatch.train.tasks_mlm`` both import this module, so neither imports the other's internals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Task:
    """A model with its loss, evaluation and data fields.

    ``choices`` records what the task decided when it was built, from the backend and the mesh,
    for the run to print and store (e.g. ``{'loss.implementation': 'pallas',
    'loss.implementation.reason': 'auto on tpu: ...'}``): string keys named after the config
    entry they resolve, string values.
    """

    name: str
    model: nn.Module
    fields: tuple[str, ...]
    init_fn: Callable[[jax.Array, Batch], Any]
    loss_fn: Callable[..., tuple[jax.Array, tuple[dict, Any]]]
    eval_fn: Callable[[Any, Batch], dict[str, jax.Array]]
    summarize: Callable[[dict[str, np.ndarray]], dict[str, float]]
    primary_metric: str
    baseline: Callable[[], dict[str, float]] | None = None
    # Losses over the whole batch of embeddings (contrastive) also give these two, so that
    # gradient accumulation can cache embedding gradients (jaxbatch.train.grad_cache):
    # embed_fn(params, model_state, batch, rng) -> ((per_example, shared), new_model_state) and
    # pair_loss_fn(per_example, shared) -> (loss, metrics), with loss_fn their composition.
    embed_fn: Callable[..., tuple[Any, Any]] | None = None
    pair_loss_fn: Callable[[Any, Any], tuple[jax.Array, dict]] | None = None
    choices: dict[str, str] = dataclasses.field(default_factory=dict)


def split_variables(variables) -> tuple[Any, dict]:
    """(params, the other collections) of ``model.init``'s output."""
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables
