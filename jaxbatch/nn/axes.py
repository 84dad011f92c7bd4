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


def stacked_layer_axes(variables: Any) -> Any:
    """Per leaf, the position of the 'layers' axis (stacked, scanned blocks), or None.

    ``nn.scan(..., metadata_params={nn.PARTITION_NAME: 'layers'})`` prepends the logical name
    'layers' to every parameter of the scanned block, so the stacked ``[L, ...]`` leaves say
    which of their axes runs over layers. Per-layer optimizers (LARS, LAMB) need that axis to give
    every layer slice its own trust ratio: it is the ``layer_axes`` argument of
    ``jaxbatch.optim.lars`` / ``lamb`` / ``scale_by_trust_ratio``.

    Args:
      variables: a tree boxed in ``nn.LogicallyPartitioned`` (the output of ``model.init`` or of
        ``jax.eval_shape`` of it, before ``nn.meta.unbox``); unboxed leaves count as unstacked.

    Returns:
      A tree shaped like ``nn.meta.unbox(variables)`` of ``int | None``.

    Raises:
      ValueError: a leaf names 'layers' more than once (the layer axis would be ambiguous).
    """

    def axis(path, leaf):
        names = tuple(leaf.names) if isinstance(leaf, nn.LogicallyPartitioned) else ()
        if names.count(LAYERS) > 1:
            raise ValueError(
                f"parameter {jax.tree_util.keystr(path)} names the logical axis {LAYERS!r} "
                f"{names.count(LAYERS)} times ({names}); nested scans need distinct names"
            )
        return names.index(LAYERS) if LAYERS in names else None

    return jax.tree_util.tree_map_with_path(
        axis, variables, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )


def unstack_layers(params: Any, depth: int, name: str = "layers") -> Any:
    """A scanned model's params as its unrolled twin's: ``params[name]`` (every leaf stacked
    ``[depth, ...]`` by ``nn.scan``) becomes ``params[f'{name}_{i}']`` for i < depth.

    The unrolled models (``scan_layers=False``) name their blocks ``layers_0 … layers_{L-1}``,
    so this converts weights between the two forms (and lets tests compare them slice by slice).

    Raises:
      ValueError: ``params`` has no ``name`` entry, or a stacked leaf's leading axis is not
        ``depth``.
    """
    params = dict(params)
    if name not in params:
        raise ValueError(f"params has no stacked entry {name!r}; top-level keys: {sorted(params)}")
    stacked = params.pop(name)
    for path, leaf in jax.tree_util.tree_leaves_with_path(stacked):
        if not leaf.shape or leaf.shape[0] != depth:
            raise ValueError(
                f"params[{name!r}]{jax.tree_util.keystr(path)} has shape {leaf.shape}; expected "
                f"a leading layer axis of size depth={depth}"
            )
    for i in range(depth):
        params[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return params
