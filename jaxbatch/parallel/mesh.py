"""The device mesh: axes ``(data, fsdp, context, tensor)`` over every device of every process.

- ``data``:    pure data parallelism. Parameters are replicated along it; the batch is split.
- ``fsdp``:    data parallelism with ZeRO-3 / FSDP sharding: the batch is split *and* parameters and
               optimizer state are sharded along it (gathered per layer by XLA when needed).
- ``context``: context (sequence) parallelism: the sequence of every activation is split, and
               attention exchanges keys/values over it (``jaxbatch.nn.context_parallel``: ring,
               Ulysses or all-gather). Size 1 (the default) is a no-op axis.
- ``tensor``:  tensor (model) parallelism: hidden, head and vocabulary dimensions are split.

The axis order is outermost → innermost by how much traffic it carries: ``data`` needs one gradient
all-reduce per step, ``context`` one K/V exchange per attention layer (a ring passes neighbour to
neighbour), ``tensor`` an all-reduce inside every layer. On a multi-host run the host (or
TPU-slice) boundary therefore falls on the ``data`` axis whenever ``data`` is a multiple of the
number of hosts, so the slow network carries only the gradient all-reduce.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES: tuple[str, str, str, str] = ("data", "fsdp", "context", "tensor")
"""Mesh axis names, outermost first."""


def resolve_mesh_shape(
    num_devices: int, *, data: int = -1, fsdp: int = 1, tensor: int = 1, context: int = 1
) -> tuple[int, int, int, int]:
    """Returns ``(data, fsdp, context, tensor)`` (``MESH_AXES`` order) with at most one ``-1``
    replaced by "the remaining devices".

    The mesh must cover the devices exactly: data × fsdp × context × tensor = num_devices.

    Args:
      num_devices: number of devices the mesh must cover.
      data: size of the ``data`` axis, or -1.
      fsdp: size of the ``fsdp`` axis, or -1.
      tensor: size of the ``tensor`` axis, or -1.
      context: size of the ``context`` axis, or -1.

    Returns:
      The four axis sizes in ``MESH_AXES`` order, all positive.

    Raises:
      ValueError: a size that is neither positive nor -1, more than one -1, or a product that does
        not equal ``num_devices``.
    """
    sizes = {"data": data, "fsdp": fsdp, "context": context, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool):
            raise TypeError(f"mesh axis {name}={size!r} must be an int (-1 for 'the rest')")
        if size == 0 or size < -1:
            raise ValueError(f"mesh axis {name}={size} must be a positive int or -1 for 'the rest'")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {_describe(sizes)}")
    if free:
        fixed = math.prod(size for size in sizes.values() if size != -1)
        if num_devices % fixed:
            raise ValueError(
                f"mesh {_describe(sizes)}: the fixed axes multiply to {fixed}, which does not "
                f"divide {num_devices} devices"
            )
        sizes[free[0]] = num_devices // fixed
    product = math.prod(sizes.values())
    if product != num_devices:
        raise ValueError(
            f"mesh {_describe(sizes)} = {product} does not match {num_devices} devices"
        )
    return tuple(sizes[name] for name in MESH_AXES)


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    context: int = 1,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds the ``('data', 'fsdp', 'context', 'tensor')`` mesh over all devices of all processes.

    Device order: on TPU, ``jax.make_mesh`` follows the physical torus. With several TPU slices, or
    several processes on CPU/GPU, each slice (process) holds a contiguous block of the ``data`` axis
    (``mesh_utils.create_hybrid_device_mesh``) when ``data`` is a multiple of their number.

    All axes are ``AxisType.Auto``: the trainer is a plain ``jax.jit`` with in/out shardings and XLA
    propagates the rest. (``jax.make_mesh`` defaults to ``Explicit`` axes since jax 0.7, which would
    turn every un-annotated contraction over a sharded dimension into a trace-time error.)

    Examples:
      >>> mesh = make_mesh(data=2, fsdp=-1)  # doctest: +SKIP
      >>> dict(mesh.shape)  # doctest: +SKIP
      {'data': 2, 'fsdp': 4, 'context': 1, 'tensor': 1}
      >>> make_mesh(data=2, context=4).shape["context"]  # doctest: +SKIP
      4

    Args:
      data: size of the ``data`` axis; -1 (the default) means "all remaining devices".
      fsdp: size of the ``fsdp`` axis (or -1).
      tensor: size of the ``tensor`` axis (or -1).
      context: size of the ``context`` axis (or -1); the sequence is split over it.
      devices: the devices to lay out; defaults to ``jax.devices()`` (global, all processes). The
        mesh must use every one of them.

    Returns:
      A ``jax.sharding.Mesh`` with axis names ``MESH_AXES``.

    Raises:
      ValueError: the axis sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device, got an empty device list")
    shape = resolve_mesh_shape(len(devices), data=data, fsdp=fsdp, tensor=tensor, context=context)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    granules = _granule_attribute(devices)
    if granules is not None:
        attr, count = granules
        if shape[0] % count == 0:
            device_array = mesh_utils.create_hybrid_device_mesh(
                (shape[0] // count, *shape[1:]),
                (count,) + (1,) * (len(shape) - 1),
                devices,
                process_is_granule=attr == "process_index",
            )
            return Mesh(device_array, MESH_AXES, axis_types=axis_types)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """Parses a ``--mesh`` flag such as ``"data=2,fsdp=4,tensor=1"`` into ``{'data': 2, ...}``.

    Axes not named keep ``make_mesh``'s defaults (data=-1, fsdp=1, tensor=1, context=1).

    Args:
      spec: comma-separated ``axis=size`` pairs; sizes are ints, -1 means "the rest".

    Returns:
      A dict from mesh axis name to size.

    Raises:
      ValueError: an unknown axis name, a repeated axis, or a size that is not an int.
    """
    sizes: dict[str, int] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, sep, value = (s.strip() for s in item.partition("="))
        if not sep:
            raise ValueError(f"mesh spec item {item!r} in {spec!r} must look like 'axis=size'")
        _check_axis_name(name, spec)
        if name in sizes:
            raise ValueError(f"mesh axis {name!r} given twice in {spec!r}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(
                f"mesh axis {name}={value!r} in {spec!r}: size must be an int (-1 for 'the rest')"
            ) from None
    if not sizes:
        raise ValueError(f"mesh spec {spec!r} names no axis; expected e.g. 'data=2,fsdp=4'")
    return sizes


def mesh_from_config(
    cfg: Mapping[str, Any] | str, *, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Builds the mesh from a config entry: a mapping (dict / ConfigDict) or a ``--mesh`` string.

    Args:
      cfg: ``{'data': 2, 'fsdp': 4, 'tensor': 1, 'context': 1}`` (any subset), or
        ``"data=2,fsdp=4,context=2"``.
      devices: as in ``make_mesh``.

    Returns:
      ``make_mesh(**sizes, devices=devices)``.

    Raises:
      ValueError: unknown axis names, or sizes that do not match the devices.
    """
    if isinstance(cfg, str):
        sizes = parse_mesh_spec(cfg)
    else:
        if not hasattr(cfg, "items"):
            raise TypeError(f"mesh config must be a mapping or a string, got {type(cfg).__name__}")
        sizes = dict(cfg.items())
        for name in sizes:
            _check_axis_name(name, sizes)
    return make_mesh(**sizes, devices=devices)


def _check_axis_name(name: str, context: Any) -> None:
    if name not in MESH_AXES:
        raise ValueError(
            f"unknown mesh axis {name!r} in {context!r}; the mesh axes are {', '.join(MESH_AXES)}"
        )


def _granule_attribute(devices: Sequence[jax.Device]) -> tuple[str, int] | None:
    """Which device attribute splits the devices over the slow network, and into how many parts."""
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) > 1:
        return "slice_index", len(slices)
    processes = {d.process_index for d in devices}
    # A single TPU slice spanning hosts is one torus: jax.make_mesh already orders it physically.
    if len(processes) > 1 and devices[0].platform != "tpu":
        return "process_index", len(processes)
    return None


def _describe(sizes: Mapping[str, int]) -> str:
    # context=1 is left out, so the messages of meshes without sequence parallelism read as before.
    return " × ".join(
        f"{name}={sizes[name]}"
        for name in MESH_AXES
        if name in sizes and not (name == "context" and sizes[name] == 1)
    )
