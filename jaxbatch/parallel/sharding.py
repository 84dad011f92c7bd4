"""Shardings: parameters from their logical axes, optimizer state like its parameters, the batch.

Every function here is checked before anything is compiled: a dimension that its mesh axes do not
divide is an error naming the parameter, the logical axis, the mesh axis and both sizes (XLA would
otherwise pad silently or fail with an opaque message deep inside compilation).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
from flax.core import meta
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbatch.parallel.rules import DEFAULT_RULES, MeshAxes

BATCH_AXES: tuple[str, str] = ("data", "fsdp")
"""Mesh axes the leading (batch) dimension of every input is split over."""

REPLICATED_STATE_LIMIT = 4096
"""Elements up to which an optimizer-state leaf that mirrors no parameter is replicated silently
(step counts, per-layer trust ratios); a larger one is named (see ``opt_state_shardings``)."""


class ReplicatedStateWarning(UserWarning):
    """An optimizer-state leaf mirrors no parameter, so it is replicated on every device."""


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy of the array on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Splits the leading dimension over ``('data', 'fsdp')``; other dimensions are whole.

    Args:
      mesh: a mesh with the axes of ``make_mesh``.

    Returns:
      ``NamedSharding(mesh, P(('data', 'fsdp')))``, valid for inputs of any rank ≥ 1.
    """
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_axis_size(mesh: Mesh) -> int:
    """Number of batch shards: data × fsdp."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
    """Raises unless ``global_batch`` splits evenly over data × fsdp.

    Args:
      global_batch: examples per step over all devices.
      mesh: the training mesh.

    Raises:
      ValueError: e.g. "batch 100 is not divisible by data×fsdp = 8 (data=2, fsdp=4)".
    """
    size = batch_axis_size(mesh)
    if global_batch <= 0 or global_batch % size:
        raise ValueError(
            f"batch {global_batch} is not divisible by data×fsdp = {size} "
            f"(data={mesh.shape['data']}, fsdp={mesh.shape['fsdp']})"
        )


@contextlib.contextmanager
def activation_sharding(
    mesh: Mesh, rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES
) -> Iterator[None]:
    """Context in which ``nn.with_logical_constraint`` in the models shards activations.

    Trace (``jax.jit(...).lower`` or the first call) the train step inside it. It sets the mesh with
    ``jax.set_mesh`` and the rules with ``nn.logical_axis_rules``: with jax 0.10 / flax 0.12 the
    legacy ``with mesh:`` leaves flax's constraints silently unapplied.

    Args:
      mesh: the training mesh.
      rules: logical-axis rules.

    Yields:
      Nothing; the mesh and rules are active inside the ``with`` block.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
        yield


def logical_to_mesh_sharding(
    tree: Any, mesh: Mesh, rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES
) -> Any:
    """Maps a tree of logical annotations to a tree of ``NamedSharding``.

    Leaves may be flax boxes (``nn.LogicallyPartitioned`` from ``with_logical_partitioning``; a
    plain ``nn.Partitioned`` names mesh axes directly), ``PartitionSpec`` of logical names (as
    returned by ``nn.get_partition_spec``), or anything else (arrays, ``ShapeDtypeStruct``,
    ``None``), which is replicated. Boxes carry shapes, so their divisibility is checked; logical
    ``PartitionSpec`` leaves carry none. Rules stored inside boxes are ignored: ``rules`` decides.

    Args:
      tree: the annotated tree.
      mesh: the mesh to shard over.
      rules: logical-axis rules (``DEFAULT_RULES`` or ``make_rules(...)``).

    Returns:
      A tree of ``NamedSharding`` shaped like the *unboxed* tree (each box replaced by the sharding
      of its value); it is a valid ``out_shardings`` prefix for the boxed tree as well.

    Raises:
      ValueError: a logical name without a rule, or a dimension its mesh axes do not divide.
    """
    return _map_shardings(tree, mesh, tuple(rules), require_shapes=False)


def param_shardings(
    abstract_variables: Any, mesh: Mesh, rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES
) -> Any:
    """Shardings of a model's variables from ``jax.eval_shape(model.init, ...)``.

    Annotated leaves get their logical axes mapped through ``rules``; un-annotated leaves (e.g.
    batch-norm statistics) are replicated. Every sharded dimension is checked for divisibility.

    Examples:
      >>> abstract = jax.eval_shape(model.init, key, x)  # doctest: +SKIP
      >>> shardings = param_shardings(abstract, mesh)  # doctest: +SKIP
      >>> variables = jax.jit(model.init, out_shardings=shardings)(key, x)  # doctest: +SKIP

    Args:
      abstract_variables: the (boxed) variables, with ``ShapeDtypeStruct`` or array values.
      mesh: the mesh to shard over.
      rules: logical-axis rules.

    Returns:
      A tree of ``NamedSharding`` shaped like ``nn.unbox(abstract_variables)``.

    Raises:
      ValueError: a leaf without a shape, a logical name without a rule, or an indivisible
        dimension (the message names the parameter path, logical axis, mesh axis and sizes).

    References:
      Rajbhandari, Rasley, Ruwase, He, 2020, "ZeRO: Memory Optimizations Toward Training Trillion
      Parameter Models", §5.3 (P_os+g+p: parameters partitioned over data-parallel ranks);
      Shoeybi et al., 2019, "Megatron-LM: Training Multi-Billion Parameter Language Models Using
      Model Parallelism", §3 (column/row-parallel MLP and attention, vocabulary-parallel embedding).
    """
    return _map_shardings(abstract_variables, mesh, tuple(rules), require_shapes=True)


def opt_state_shardings(
    abstract_opt_state: Any,
    abstract_params: Any,
    shardings: Any,
    *,
    unmatched: str = "warn",
    replicated_limit: int = REPLICATED_STATE_LIMIT,
) -> Any:
    """Gives every parameter-shaped leaf of an optimizer state its parameter's sharding.

    Optax states mirror the parameters (Adam's ``mu``/``nu``, momenta, EMA copies, accumulators):
    such a leaf's tree path *ends with* the parameter's path, e.g. ``[0].mu['params']['w']`` mirrors
    ``['params']['w']``. A state leaf whose path ends with a parameter's path and whose shape equals
    that parameter's shape gets the parameter's sharding; every other leaf (step counts, per-layer
    trust ratios, factored statistics) is replicated. This works for any tree that mirrors the
    parameters this way, not only optax states (model EMA, gradient accumulators).

    A replicated leaf of more than ``replicated_limit`` elements silently costs its full size on
    every device (ZeRO's saving is lost for it), e.g. an optimizer that stores its statistics
    flattened or reshaped. Such leaves are named with their path, shape and size: a
    :class:`ReplicatedStateWarning` (``unmatched='warn'``), a ``ValueError``
    (``unmatched='error'``), or nothing (``unmatched='ignore'``).

    Args:
      abstract_opt_state: e.g. ``jax.eval_shape(tx.init, abstract_params)``.
      abstract_params: the same parameter tree the optimizer was initialised with (boxed or not).
      shardings: ``NamedSharding`` tree for ``abstract_params`` (from ``param_shardings``).
      unmatched: 'warn', 'error' or 'ignore': what to do with a large replicated leaf.
      replicated_limit: elements up to which a leaf that mirrors no parameter is replicated
        without a word.

    Returns:
      A tree of ``NamedSharding`` shaped like ``abstract_opt_state`` (boxes replaced by leaves).

    Raises:
      ValueError: ``shardings`` holds no ``NamedSharding`` to take the mesh from; with
        ``unmatched='error'``, a large leaf mirrors no parameter.

    References:
      Rajbhandari, Rasley, Ruwase, He, 2020, "ZeRO: Memory Optimizations Toward Training Trillion
      Parameter Models", §5.1 (P_os: optimizer states partitioned like the parameters).
    """
    param_leaves = jax.tree_util.tree_flatten_with_path(_unbox(abstract_params))[0]
    sharding_leaves = jax.tree.leaves(shardings)
    if len(param_leaves) != len(sharding_leaves):
        raise ValueError(
            f"shardings has {len(sharding_leaves)} leaves but abstract_params has "
            f"{len(param_leaves)}; pass the shardings of exactly these parameters"
        )
    named = [s for s in sharding_leaves if isinstance(s, NamedSharding)]
    if not named:
        raise ValueError("shardings must contain NamedSharding leaves (to take the mesh from)")
    by_path = {
        _path_names(path): (tuple(leaf.shape), sharding)
        for (path, leaf), sharding in zip(param_leaves, sharding_leaves, strict=True)
    }
    if unmatched not in ("warn", "error", "ignore"):
        raise ValueError(f"unmatched={unmatched!r}; expected 'warn', 'error' or 'ignore'")
    fallback = replicated(named[0].mesh)
    large: list[str] = []

    def leaf_sharding(path, leaf):
        names = _path_names(path)
        shape = tuple(getattr(leaf, "shape", ()))
        for start in range(len(names)):
            hit = by_path.get(names[start:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        if math.prod(shape) > replicated_limit:
            large.append(f"{_path_str(path)} {shape} ({math.prod(shape):,} elements)")
        return fallback

    out = jax.tree_util.tree_map_with_path(leaf_sharding, _unbox(abstract_opt_state))
    if large and fallback.mesh.size > 1 and unmatched != "ignore":
        message = (
            f"{len(large)} optimizer-state leaf/leaves mirror no parameter (no parameter path "
            "ends their path with the same shape), so they are replicated on every device and "
            f"not sharded like the parameters: {'; '.join(large)}"
        )
        if unmatched == "error":
            raise ValueError(message)
        warnings.warn(message, ReplicatedStateWarning, stacklevel=2)
    return out


def _map_shardings(tree: Any, mesh: Mesh, rules: tuple, *, require_shapes: bool) -> Any:
    known = {name for name, _ in rules}

    def leaf_sharding(path, leaf):
        where = _path_str(path)
        if isinstance(leaf, nn.LogicallyPartitioned):
            names = tuple(leaf.names)
            spec = _logical_spec(where, names, rules, known)
            _check_divisible(where, leaf.value.shape, names, spec, mesh)
        elif isinstance(leaf, meta.Partitioned):
            spec = P(*leaf.names)
            _check_divisible(where, leaf.value.shape, leaf.names, spec, mesh)
        elif isinstance(leaf, P):
            spec = _logical_spec(where, tuple(leaf), rules, known)
        else:
            if require_shapes and not hasattr(leaf, "shape"):
                raise ValueError(
                    f"parameter {where}: expected an array or ShapeDtypeStruct (the output of "
                    f"jax.eval_shape), got {type(leaf).__name__}"
                )
            spec = P()
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree, is_leaf=_is_annotation)


def _logical_spec(where: str, names: tuple, rules: tuple, known: set[str]) -> P:
    unknown = [n for n in names if isinstance(n, str) and n not in known]
    if unknown:
        raise ValueError(
            f"parameter {where}: logical axis {unknown[0]!r} has no sharding rule; "
            f"rules exist for {sorted(known)} (add one with make_rules)"
        )
    return nn.logical_to_mesh_axes(names, rules)


def _check_divisible(
    where: str, shape: Sequence[int], names: Sequence[Any], spec: P, mesh: Mesh
) -> None:
    if len(names) != len(shape):
        raise ValueError(
            f"parameter {where}: {len(names)} axis names {tuple(names)} for a {len(shape)}-d "
            f"array of shape {tuple(shape)}"
        )
    for dim, (size, name, axes) in enumerate(zip(shape, names, spec, strict=False)):
        if axes is None:
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        shards = math.prod(mesh.shape[a] for a in axes)
        if size % shards:
            mesh_desc = (
                f"mesh axis {axes[0]!r} of size {shards}"
                if len(axes) == 1
                else f"mesh axes {axes} of total size {shards}"
            )
            raise ValueError(
                f"parameter {where}: dimension {dim} (logical axis {name!r}) has size {size}, "
                f"which {mesh_desc} does not divide; change the mesh or the rule for {name!r}"
            )


def _is_annotation(x: Any) -> bool:
    return x is None or isinstance(x, (meta.AxisMetadata, P))


def _unbox(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: x.value if isinstance(x, meta.Partitioned) else x,
        tree,
        is_leaf=lambda x: isinstance(x, meta.Partitioned),
    )


def _path_names(path: Sequence[Any]) -> tuple[Any, ...]:
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(key.key)
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(key.idx)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            names.append(key.key)
        else:
            names.append(str(key))
    return tuple(names)


def _path_str(path: Sequence[Any]) -> str:
    return "/".join(str(n) for n in _path_names(path)) or "<root>"
