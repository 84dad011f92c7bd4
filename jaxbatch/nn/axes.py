"""Logical axis names shared by every jaxbatch model.

Models only *name* the axes of their parameters and activations; ``jaxbatch.parallel`` owns the
table that maps these names to mesh axes. Without a mesh and rules context every helper here is a
no-op on the values (parameters are merely boxed in ``nn.LogicallyPartitioned``).
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax

BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV = "kv"
VOCAB = "vocab"
LAYERS = "layers"
CONV_IN = "conv_in"
CONV_OUT = "conv_out"
NORM = "norm"

LOGICAL_AXES: tuple[str, ...] = (
    BATCH,
    LENGTH,
    EMBED,
    MLP,
    HEADS,
    KV,
    VOCAB,
    LAYERS,
    CONV_IN,
    CONV_OUT,
    NORM,
)

LogicalNames = Sequence[str | None]


def _check_names(names: LogicalNames) -> tuple[str | None, ...]:
    names = tuple(names)
    unknown = [n for n in names if n is not None and n not in LOGICAL_AXES]
    if unknown:
        raise ValueError(
            f"unknown logical axis names {unknown}; expected names from {LOGICAL_AXES}"
        )
    return names


def partitioned(init: Callable[..., Any], names: LogicalNames) -> Callable[..., Any]:
    """Wraps an initializer so the parameter it creates carries logical axis ``names``.

    Args:
      init: a flax initializer ``init(key, shape, dtype)``.
      names: one logical name (or None) per dimension of the parameter.

    Returns:
      The initializer wrapped with ``nn.with_logical_partitioning``.
    """
    return nn.with_logical_partitioning(init, _check_names(names))


def constrain(x: jax.Array, names: LogicalNames) -> jax.Array:
    """Constrains an activation's sharding by logical names (a no-op without mesh rules)."""
    return nn.with_logical_constraint(x, _check_names(names))
