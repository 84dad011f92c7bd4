"""Scale-out: the device mesh, logical-axis rules, shardings, multi-host start and the global batch.

Models only name their axes (``nn.with_logical_partitioning``); every sharding decision is made
here:

- ``make_mesh`` / ``mesh_from_config`` / ``parse_mesh_spec``: the ``('data', 'fsdp', 'tensor')``
  mesh over all devices of all processes.
- ``DEFAULT_RULES`` / ``make_rules``: the logical-axis → mesh-axis table.
- ``param_shardings`` / ``logical_to_mesh_sharding`` / ``opt_state_shardings`` / ``batch_sharding``:
  ``NamedSharding`` trees for ``jax.jit`` in/out shardings, validated for divisibility;
  ``activation_sharding``: the context that makes the models' activation constraints apply.
- ``initialize``: ``jax.distributed`` from TPU, SLURM or ``JAXBATCH_*`` variables.
- ``make_global_batch``: process-local rows → global sharded arrays.
- ``bytes_per_device``: per-device memory of a sharded tree (for the planner).
"""

from jaxbatch.parallel.data import make_global_batch
from jaxbatch.parallel.distributed import (
    DistributedInfo,
    detect_cluster,
    initialize,
    parse_slurm_nodelist,
)
from jaxbatch.parallel.local_cluster import free_port, run_local_cluster
from jaxbatch.parallel.memory import bytes_per_device, global_bytes
from jaxbatch.parallel.mesh import (
    MESH_AXES,
    make_mesh,
    mesh_from_config,
    parse_mesh_spec,
    resolve_mesh_shape,
)
from jaxbatch.parallel.rules import DEFAULT_RULES, make_rules
from jaxbatch.parallel.sharding import (
    BATCH_AXES,
    REPLICATED_STATE_LIMIT,
    ReplicatedStateWarning,
    activation_sharding,
    batch_axis_size,
    batch_sharding,
    check_batch_divisible,
    logical_to_mesh_sharding,
    opt_state_shardings,
    param_shardings,
    replicated,
)

__all__ = [
    "BATCH_AXES",
    "REPLICATED_STATE_LIMIT",
    "ReplicatedStateWarning",
    "DEFAULT_RULES",
    "MESH_AXES",
    "DistributedInfo",
    "activation_sharding",
    "batch_axis_size",
    "batch_sharding",
    "bytes_per_device",
    "check_batch_divisible",
    "detect_cluster",
    "free_port",
    "global_bytes",
    "initialize",
    "logical_to_mesh_sharding",
    "make_global_batch",
    "make_mesh",
    "make_rules",
    "mesh_from_config",
    "opt_state_shardings",
    "param_shardings",
    "parse_mesh_spec",
    "parse_slurm_nodelist",
    "replicated",
    "resolve_mesh_shape",
    "run_local_cluster",
]
