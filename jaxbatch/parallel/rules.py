"""Logical-axis rules: the one table that maps the models' axis names onto the mesh.

Models name every parameter dimension with ``flax.linen.with_logical_partitioning`` (and activations
with ``nn.with_logical_constraint``) and never mention a mesh axis; this table decides where each
name goes. Rules are ordered pairs ``(logical name, mesh axes)``, read in priority order as in flax
(``nn.logical_to_mesh_axes``): a mesh axis is used at most once per array, so a later rule whose
mesh axis is already taken leaves its dimension replicated.

Why each entry:

- ``batch → ('data', 'fsdp')``: every data-parallel device holds a different slice of the batch.
  First in the table so that an activation ``[batch, length, embed]`` gives ``fsdp`` to the batch
  and leaves ``embed`` replicated (activations are sharded by batch, parameters by ``fsdp``).
- ``vocab``, ``heads``, ``mlp → 'tensor'``: the Megatron split (Shoeybi et al., 2019): column-
  parallel up-projections / heads, row-parallel down-projections, vocabulary-parallel embedding.
- ``kv → 'tensor'``: only takes effect when ``heads`` is absent from the array (e.g. a fused
  ``[embed, kv]`` projection); in ``[embed, heads, kv]`` the heads already hold ``tensor``.
- ``embed → 'fsdp'``: ZeRO-3 / FSDP (Rajbhandari et al., 2020): every matrix has an ``embed``
  dimension, so sharding it along ``fsdp`` shards all dense parameters and their optimizer state.
- ``conv_out → 'fsdp'``: the FSDP dimension of convolution kernels ``[h, w, conv_in, conv_out]``.
  Output channels are 64…2048 in ResNets (divisible by any power-of-two ``fsdp`` up to 64), while
  the stem's ``conv_in`` is 3 (RGB), which no mesh axis > 1 divides.
- ``conv_in → None``: see above; and ``tensor`` is not used for convolutions: at ResNet sizes a
  convolution is far too small to be worth splitting inside a layer.
- ``norm → None``: norm scales/biases are vectors of ``embed`` size, tiny next to the matrices;
  keeping them whole avoids an all-gather per norm.
- ``layers → None``: the stacked axis of scanned layers; sharding it would be pipeline
  parallelism, which the mesh does not have.
- ``length → 'context'``: context (sequence) parallelism: activations ``[batch, length, ...]`` are
  split along the sequence over the ``context`` axis (size 1 unless a long-sequence mesh asks for
  it). Attention, the one place where positions meet, exchanges keys/values explicitly inside
  ``jax.shard_map`` (``jaxbatch.nn.context_parallel``); everything else is position-wise.

References:
  Shoeybi et al., 2019, "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model
  Parallelism", §3. Rajbhandari, Rasley, Ruwase, He, 2020, "ZeRO: Memory Optimizations Toward
  Training Trillion Parameter Models", §5.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from jaxbatch.parallel.mesh import MESH_AXES

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", "tensor"),
    ("embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("conv_in", None),
    ("norm", None),
    ("layers", None),
    ("length", "context"),
)
"""Logical axis name → mesh axes, in priority order."""


def make_rules(
    overrides: Mapping[str, MeshAxes] | Sequence[tuple[str, MeshAxes]] | None = None,
    *,
    base: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES,
) -> Rules:
    """Returns ``base`` with some logical names re-mapped, e.g. from a config's ``sharding_rules``.

    An override of a name already in ``base`` replaces that rule in place (keeping its priority);
    a new name is appended at the end (lowest priority).

    Examples:
      >>> make_rules({"conv_out": "tensor", "embed": None})  # doctest: +SKIP

    Args:
      overrides: a mapping or a sequence of ``(logical name, mesh axes)`` pairs; mesh axes are a
        mesh axis name, a tuple/list of them, or None (replicated).
      base: the rules to start from.

    Returns:
      The rules as a tuple of ``(name, mesh axes)`` pairs, mesh axes normalised to str/tuple/None.

    Raises:
      ValueError: a mesh axis that is not one of ``MESH_AXES``, or a repeated logical name.
    """
    rules = {name: _normalise(name, axes) for name, axes in _pairs(base, "base rules")}
    for name, axes in _pairs(overrides or (), "rule overrides"):
        rules[name] = _normalise(name, axes)
    return tuple(rules.items())


def _pairs(rules, what: str) -> list[tuple[str, MeshAxes]]:
    items = list(rules.items()) if isinstance(rules, Mapping) else [tuple(r) for r in rules]
    seen = set()
    for item in items:
        if len(item) != 2 or not isinstance(item[0], str):
            raise ValueError(f"{what}: expected (logical name, mesh axes) pairs, got {item!r}")
        if item[0] in seen:
            raise ValueError(f"{what}: logical axis {item[0]!r} appears more than once")
        seen.add(item[0])
    return items


def _normalise(name: str, axes) -> MeshAxes:
    if axes is None:
        return None
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    for axis in names:
        if axis not in MESH_AXES:
            raise ValueError(
                f"logical axis {name!r} is mapped to unknown mesh axis {axis!r}; "
                f"the mesh axes are {', '.join(MESH_AXES)}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"logical axis {name!r} maps to a repeated mesh axis: {names}")
    if not names:
        return None
    return names[0] if len(names) == 1 else names
