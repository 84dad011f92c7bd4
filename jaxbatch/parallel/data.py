"""The global batch, assembled from the part of it that each process loaded.

Each process reads only its own shard of the data (a grain pipeline with ``shard_index =
jax.process_index()``); the global batch is the concatenation of the process-local batches in
process order, split over ``('data', 'fsdp')``. No process ever holds the whole batch.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxbatch.parallel.sharding import batch_axis_size, batch_sharding, check_batch_divisible


def make_global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Turns this process's rows into global ``jax.Array``s sharded along data × fsdp.

    global_batch = local_rows / (batch shards on this process's devices) × data × fsdp, i.e.
    local_rows × number of processes when the processes split the batch axes; each process passes
    only its own rows (``jax.make_array_from_process_local_data``), which land on its own devices.

    Args:
      local_batch: a pytree (usually a dict) of NumPy arrays with the same leading dimension, the
        rows this process loaded.
      mesh: the training mesh (from ``make_mesh``).

    Returns:
      The same pytree of global ``jax.Array``s with sharding ``batch_sharding(mesh)``.

    Raises:
      ValueError: leaves with different leading dimensions, a scalar leaf, or local rows that do
        not split evenly over this process's batch shards.
    """
    leaves_with_path = jax.tree_util.tree_flatten_with_path(local_batch)[0]
    if not leaves_with_path:
        raise ValueError("make_global_batch got an empty batch")
    rows = {}
    for path, leaf in leaves_with_path:
        shape = np.shape(leaf)
        if not shape:
            raise ValueError(
                f"batch entry {jax.tree_util.keystr(path)} is a scalar; every entry needs a "
                "leading batch dimension"
            )
        rows[jax.tree_util.keystr(path)] = shape[0]
    if len(set(rows.values())) != 1:
        raise ValueError(f"batch entries have different leading dimensions: {rows}")
    local_rows = next(iter(rows.values()))
    # Batch shards (data, fsdp coordinates) on this process's devices. With several processes
    # along tensor, each of them feeds the same rows.
    here = jax.process_index()
    coords = {i[:2] for i, device in np.ndenumerate(mesh.devices) if device.process_index == here}
    if not coords:
        raise ValueError(f"process {here} has no device in the mesh {dict(mesh.shape)}")
    if len(coords) == batch_axis_size(mesh):  # this process feeds the whole batch
        check_batch_divisible(local_rows, mesh)
    elif local_rows % len(coords):
        raise ValueError(
            f"process-local batch {local_rows} is not divisible by the {len(coords)} batch shards "
            f"on process {here}'s devices"
        )
    global_rows = local_rows // len(coords) * batch_axis_size(mesh)
    sharding = batch_sharding(mesh)

    def to_global(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, (global_rows, *x.shape[1:]))

    return jax.tree.map(to_global, local_batch)
